"""Issue 16's GPU runs: what the new cost models need, measured and validated on a real H200 in two leases.

- ``plan``: every part's points and ids, and each part's time estimate (no torch, no numba);
- ``predict``: tiersim's predictions for every planned point, from the H200 table, written and
  committed before any measurement (``calibration/tables/h200/validation/gpu16/predictions-*.parquet``);
- ``run``: the one device command of a lease (``python -m calibration.gpu16 --out $OUT/gpu16``), each part
  in its own process within a time budget, three output files;
- ``steps``, ``unfused_ops``, ``unfused_counts``, ``fp8``, ``sm_share``: the single-GPU parts;
- ``tp``: the multi-GPU parts (NCCL all-reduce sweep, a TP 2 decoder step), one process per GPU;
- ``ingest``: the returned files into ``calibration/tables/h200/runs/<n>-.../``, refits and reports.

``calibration/tables/h200/PROVENANCE.md`` ("Issue 16") gives the exact commands.
"""
