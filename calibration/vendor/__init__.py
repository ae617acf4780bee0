"""Vendor-library calibration parts: cost-table ops timed through PyTorch (cuBLAS, SDPA) and CuPy.

Each part module exposes ``PART`` (a ``calibration.raw.Part``); :data:`PART_MODULES` lists them in
the order a suite should run them (cheapest and most fundamental first, the validation model last).
Modules import torch / cupy only inside their ``run`` functions, so collecting the parts needs
neither. Shared machinery: ``timing`` (events, graph replay, L2-defeating rotation, budgets) and
``kernel_count`` (kernels per call, in a child process and from captured graphs).
"""

PART_MODULES = ("calibration.vendor.launch", "calibration.vendor.gemm", "calibration.vendor.gemm_cupy",
                "calibration.vendor.attention", "calibration.vendor.ops",
                "calibration.vendor.validation")


def all_parts() -> list:
    """The ``PART`` of every vendor module, in :data:`PART_MODULES` order."""
    import importlib

    return [importlib.import_module(name).PART for name in PART_MODULES]
