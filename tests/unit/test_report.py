"""``tiersim report`` in a real browser: headless Chromium renders the run report and the sweep report
offline (file://, no network), the page's script says every plot drew, and the screenshot shows them:
plot lines in their colours, not a blank page.

Chromium is Debian's package (``/usr/bin/chromium``). When it is missing and this runs as root with
apt-get (CI's machine: the same kind as a developer's), the fixture installs it
(``apt-get install -y --no-install-recommends chromium``, about 80 s once); it skips, saying why, only
where that is impossible. ``TIERSIM_NO_APT=1`` forbids the install.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from sim.cli import main

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
SMALL = ["--set", "costs.backend=roofline", "--set", "model.name=llama-3.2-1b", "--no-progress"]


def _find() -> str | None:
    for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser")):
        if p and Path(p).exists():
            return p
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _find()
    if path:
        return path
    if os.environ.get("TIERSIM_NO_APT"):
        pytest.skip("chromium is not installed and TIERSIM_NO_APT forbids installing it")
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get): "
                    "apt-get install chromium")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ok = subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode == 0
    if not ok:   # the package lists may be missing or stale
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        ok = subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode == 0
    path = _find()
    if not ok or not path:
        pytest.skip("chromium could not be installed with apt-get (no package repository reachable?)")
    return path


def _browser(chromium: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              timeout=120)


def _render(chromium: str, page: Path, shot: Path) -> dict:
    """The page's body attributes after its scripts ran, and its screenshot as an RGB array."""
    import re

    import matplotlib.image

    dom = _browser(chromium, "--dump-dom", page.as_uri()).stdout.decode()
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body))
    _browser(chromium, "--window-size=1400,2400", f"--screenshot={shot}", page.as_uri())
    attrs["pixels"] = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    return attrs


def _saturated(img: np.ndarray) -> int:
    """Pixels in colour (text, axes and grid are grey): what the plot lines drew."""
    return int(((img.max(axis=-1) - img.min(axis=-1)) > 60).sum())


def _colour_pixels(img: np.ndarray, hex_colour: str, tol: int = 40) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).sum(axis=-1) < tol).sum())


def test_run_and_sweep_reports_render_in_a_headless_browser(tmp_path, capsys, chromium):
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), *SMALL, "--trace", "mooncake-conversation",
                 "--set", "trace.max_requests=200", "--set", "trace.rate_scale=16",
                 "--set", "replica.preemption_mode=swap", "--set", "replica.num_hbm_blocks=400"]) == 0
    assert main(["report", str(run), "--figures", str(tmp_path / "figs"), "--format", "svg"]) == 0
    html = (run / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html
    page = _render(chromium, run / "report.html", tmp_path / "run.png")
    assert page["plots-failed"] == "0" and int(page["plots-rendered"]) == 8, page
    assert int(page["points-drawn"]) > 1000
    img = page["pixels"]
    assert (img.sum(axis=-1) < 600).mean() > 0.02, "the page is almost blank"
    assert _saturated(img) > 8000, "plot lines missing"
    assert _colour_pixels(img, "#1f77b4") > 1000 and _colour_pixels(img, "#ff7f0e") > 200, "plot lines missing"
    assert len(list((tmp_path / "figs").glob("*.svg"))) == 8

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--out", str(sweep), *SMALL[:-1], "--set", "trace.max_requests=30",
                 "--set", "replica.num_hbm_blocks=64", "--grid", "policies.scheduling.name=fcfs,chunked-prefill",
                 "--grid", "replica.block_size_tokens=8,16", "--jobs", "1", "--quiet"]) == 0
    assert main(["report", str(sweep)]) == 0
    page = _render(chromium, sweep / "report.html", tmp_path / "sweep.png")
    # 6 metrics against each of the 2 parameters, and the runs' 3 CDFs overlaid
    assert page["plots-failed"] == "0" and int(page["plots-rendered"]) == 15, page
    img = page["pixels"]
    assert _saturated(img) > 3000 and _colour_pixels(img, "#ff7f0e") > 300 and _colour_pixels(img, "#d62728") > 100
    capsys.readouterr()
