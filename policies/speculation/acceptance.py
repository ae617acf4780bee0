"""Acceptance models: how many of a request's draft tokens the verifier accepts.

Every model is a prefix process: the verifier accepts draft tokens left to right and stops at the
first rejection, so the accepted length ``L`` of a chain of ``k`` drafts is ``min(L_inf, k)``, where
``L_inf`` is the accepted length of an endless chain; a model is its survival function
``S(j) = P(L_inf >= j)``. A chain of ``k`` then yields, per target step,

    E[tokens] = 1 + sum_{j=1..k} S(j)        (i.i.d. rate a: (1 - a^(k+1)) / (1 - a))

A tree of ``w`` chains of depth ``d`` under one root (what ``tree`` verifies) accepts the longest
accepted prefix among its chains. With chains judged independently (each branch an i.i.d. draw of
the same model) ``P(L >= j) = 1 - (1 - S(j))^w``, so

    E[tokens] = 1 + sum_{j=1..d} [1 - (1 - S(j))^w]     (w = 1: the chain above)

Models (``acceptance`` in the speculation policy's section):

=============  =======================================================================================
``iid``        every draft token accepted with probability ``alpha``: ``S(j) = alpha^j``
``positional`` token ``j`` accepted with probability ``alphas[j-1]`` given the ones before (the last
               rate repeats beyond the list): ``S(j) = prod_{i<=j} alphas[i-1]``
``column``     i.i.d. with each request's own rate, from the trace's ``acceptance_rate`` column
``empirical``  an accepted-length histogram from a file (``file``: a bundled name, or a TOML path):
               ``counts[l]`` verify steps accepted ``l`` of ``num_draft_tokens`` drafts; drafts deeper
               than that are refused (nothing measured). Bundled (``sim/presets/acceptance``, each
               citing where its numbers were published): ``eagle3-llamacpp`` (EAGLE-3, 3 drafts,
               llama.cpp #24536) and ``ngram-vllm`` (prompt lookup, 5 drafts, vLLM #24127)
``forced``     forced rejection, a benchmark mode: the draft that would become output token number
               ``n`` of its request is rejected whenever ``n`` is a multiple of ``reject_stride``,
               whatever the models; every other draft is accepted. Deterministic: it measures what
               rolling back costs (the verify and draft work of the discarded tokens, the KV slots
               reserved and released), independent of any acceptance statistics.
=============  =======================================================================================

Randomness comes from the generator the replica passes (seeded by the run's seed), so runs repeat.
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np

ACCEPTANCE_MODELS = ("iid", "positional", "column", "empirical", "forced")


def bundled_acceptance_dir() -> Path:
    import sim

    return Path(sim.__file__).parent / "presets" / "acceptance"


def bundled_acceptance_files() -> list[str]:
    d = bundled_acceptance_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.exists() else []


class AcceptanceModel:
    """A prefix-acceptance process (see the module docstring). ``max_depth``: the deepest chain the
    model can judge (None: any)."""

    name = ""
    max_depth: int | None = None

    def survival(self, req, j: int) -> float:
        """``P(L_inf >= j)`` for request ``req`` (j >= 1)."""
        raise NotImplementedError

    def sample(self, rng: np.random.Generator, req, k: int) -> int:
        """Accepted length of a chain of ``k`` drafts (0..k)."""
        raise NotImplementedError

    def expected(self, req, k: int) -> float:
        """Expected accepted drafts of a chain of ``k``."""
        return sum(self.survival(req, j) for j in range(1, k + 1))

    def expected_tree(self, req, width: int, depth: int) -> float:
        """Expected accepted depth of ``width`` independent chains of ``depth`` (the longest wins)."""
        if width == 1:
            return self.expected(req, depth)
        return sum(1.0 - (1.0 - self.survival(req, j)) ** width for j in range(1, depth + 1))

    def sample_tree(self, rng: np.random.Generator, req, width: int, depth: int) -> int:
        best = 0
        for _ in range(width):
            a = self.sample(rng, req, depth)
            if a > best:
                best = a
                if best == depth:
                    break
        return best


def _geometric_accepts(rng: np.random.Generator, alpha: float, k: int) -> int:
    """Successes before the first failure of Bernoulli(alpha) trials, capped at k."""
    if k <= 0 or alpha <= 0.0:
        return 0
    if alpha >= 1.0:
        return k
    return min(int(rng.geometric(1.0 - alpha)) - 1, k)


class IID(AcceptanceModel):
    name = "iid"

    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)

    def survival(self, req, j: int) -> float:
        return self.alpha ** j

    def expected(self, req, k: int) -> float:
        a = self.alpha
        return k if a >= 1.0 else a * (1.0 - a ** k) / (1.0 - a)

    def sample(self, rng, req, k: int) -> int:
        return _geometric_accepts(rng, self.alpha, k)


class Positional(AcceptanceModel):
    name = "positional"

    def __init__(self, alphas) -> None:
        self.alphas = tuple(float(a) for a in alphas)

    def _rate(self, j: int) -> float:
        a = self.alphas
        return a[j - 1] if j <= len(a) else a[-1]

    def survival(self, req, j: int) -> float:
        s = 1.0
        for i in range(1, j + 1):
            s *= self._rate(i)
        return s

    def sample(self, rng, req, k: int) -> int:
        a = 0
        while a < k and rng.random() < self._rate(a + 1):
            a += 1
        return a


class PerRequest(AcceptanceModel):
    """i.i.d. per token, at each request's rate from the trace column ``acceptance_rate``."""

    name = "column"

    @staticmethod
    def _alpha(req) -> float:
        a = req.acceptance_rate
        if not a == a:      # NaN: the trace has no such column
            raise ValueError("policies.speculation.acceptance = \"column\" needs the trace's acceptance_rate "
                             f"column (request {req.req_id} has none)")
        return a

    def survival(self, req, j: int) -> float:
        return self._alpha(req) ** j

    def sample(self, rng, req, k: int) -> int:
        return _geometric_accepts(rng, self._alpha(req), k)


class Empirical(AcceptanceModel):
    """An accepted-length histogram measured at one draft depth ``K``: ``counts[l]`` verify steps
    accepted ``l`` drafts (l = 0..K). Truncation gives any depth k <= K exactly (a prefix process)."""

    name = "empirical"

    def __init__(self, counts, source: str = "") -> None:
        c = np.asarray(counts, dtype=np.float64)
        if c.ndim != 1 or c.size < 2 or (c < 0).any() or c.sum() <= 0:
            raise ValueError(f"{source}: counts must list at least two non-negative numbers (accepted 0..K) "
                             f"with a positive sum")
        self.p = c / c.sum()
        self.max_depth = c.size - 1
        self.cum = np.cumsum(self.p)
        # S(j) = P(L >= j), j = 0..K
        self.surv = np.concatenate(([1.0], 1.0 - self.cum[:-1]))
        self.source = source

    @classmethod
    def load(cls, name_or_path: str) -> Empirical:
        path = Path(name_or_path)
        if not (path.suffix == ".toml" and path.is_file()):
            candidate = bundled_acceptance_dir() / f"{name_or_path}.toml"
            if not candidate.is_file():
                raise ValueError(f"file: unknown acceptance-length file {name_or_path!r} (bundled: "
                                 f"{', '.join(bundled_acceptance_files()) or 'none'}; or a path to a .toml file)")
            path = candidate
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"file: cannot read {path}: {exc}") from None
        unknown = sorted(set(data) - {"counts", "num_draft_tokens", "source"})
        if unknown:
            raise ValueError(f"file: {path}: unknown key {unknown[0]!r} (known: counts, num_draft_tokens, source)")
        if "counts" not in data:
            raise ValueError(f"file: {path} has no 'counts' (verify steps that accepted 0, 1, ..., K drafts)")
        model = cls(data["counts"], str(path))
        k = data.get("num_draft_tokens")
        if k is not None and k != model.max_depth:
            raise ValueError(f"file: {path}: num_draft_tokens = {k} but counts cover 0..{model.max_depth}")
        return model

    def survival(self, req, j: int) -> float:
        return float(self.surv[j]) if j <= self.max_depth else 0.0

    def sample(self, rng, req, k: int) -> int:
        l_inf = int(np.searchsorted(self.cum, rng.random(), side="right"))
        return min(l_inf, k, self.max_depth)


class Forced(AcceptanceModel):
    """Forced rejection at a fixed stride of output positions (see the module docstring)."""

    name = "forced"

    def __init__(self, stride: int) -> None:
        self.stride = int(stride)

    def _accepts(self, req, k: int) -> int:
        # draft j (1-based) becomes output token num_generated + j
        s = self.stride
        g = req.num_generated
        first_rejected = s - g % s           # the smallest j >= 1 with (g + j) % s == 0
        return min(k, first_rejected - 1)

    def survival(self, req, j: int) -> float:
        return 1.0 if self._accepts(req, j) >= j else 0.0

    def expected(self, req, k: int) -> float:
        return float(self._accepts(req, k))

    def sample(self, rng, req, k: int) -> int:
        return self._accepts(req, k)

    def sample_tree(self, rng, req, width: int, depth: int) -> int:
        return self._accepts(req, depth)

    def expected_tree(self, req, width: int, depth: int) -> float:
        return float(self._accepts(req, depth))


def build_acceptance(p) -> AcceptanceModel:
    """The acceptance model a speculation policy's parameters name (``p.acceptance`` and its keys)."""
    kind = p.acceptance
    if kind == "iid":
        return IID(p.alpha)
    if kind == "positional":
        return Positional(p.alphas)
    if kind == "column":
        return PerRequest()
    if kind == "empirical":
        return Empirical.load(p.file)
    if kind == "forced":
        return Forced(p.reject_stride)
    raise ValueError(f"acceptance: unknown model {kind!r} (known: {', '.join(ACCEPTANCE_MODELS)})")


def check_acceptance_params(p) -> None:
    """Validate the acceptance keys of a speculation policy's parameters (messages name the key)."""
    if p.acceptance not in ACCEPTANCE_MODELS:
        raise ValueError(f"acceptance must be one of {', '.join(ACCEPTANCE_MODELS)} (got {p.acceptance!r})")
    if not 0.0 <= p.alpha <= 1.0 or math.isnan(p.alpha):
        raise ValueError(f"alpha must be in [0, 1] (got {p.alpha!r})")
    if p.acceptance == "positional":
        if not p.alphas:
            raise ValueError("alphas: acceptance = \"positional\" needs a list of per-position rates")
        bad = [a for a in p.alphas if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"alphas: every rate must be a number in [0, 1] (got {bad[0]!r})")
    if p.acceptance == "empirical" and not p.file:
        raise ValueError("file: acceptance = \"empirical\" needs an acceptance-length file")
    if p.reject_stride < 1:
        raise ValueError(f"reject_stride must be >= 1 (got {p.reject_stride})")
