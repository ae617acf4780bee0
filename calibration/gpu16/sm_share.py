"""Part ``sm_share``: model ops and whole steps with SMs held back, to validate ``StepCostModel.for_share``.

Workloads (``plan.SM_WORKLOADS``): a compute-bound GEMM (M = 4,096 on the 8B gate/up weights), the same
GEMM at M = 1 (memory-bound: it reads the 235 MB of weights), a 1 GiB device copy, and whole Llama-3.1-8B
steps replayed as CUDA graphs (decode, batch 1 at 1,024 cached; prefill of one 2,048-token prompt).

Mechanisms:

- ``occupier``: a persistent kernel (``calibration.kernels.occupier``) holds N SMs, one block each, on its
  own non-blocking stream, while the workloads run on another: the persistent-megakernel case. Each hold
  records which SMs it took and whether small probe blocks launched during it avoided them.
- ``green``: the workloads run in a CUDA green context of 132 - N SMs (``torch.cuda.green_contexts``,
  else the driver API through ``cuda.bindings``), where the stack offers them; what failed is recorded.

Rows: part ``sm_share``, variant = mechanism, key = workload, x = SMs held back, y = SMs the work may use,
median seconds per call (CUDA events on the work's stream; nothing synchronises the device during a
hold). Extra: ``point`` (``plan.sm_point_id``), the SM fraction, hold and probe results. Under the CUDA
simulator (quick mode) only the occupier's protocol runs, and the workloads are timed on the CPU.
"""
from __future__ import annotations

import math
import time

from calibration.gpu16.plan import (
    SM_COPY_BYTES,
    SM_DECODE,
    SM_GEMM,
    SM_GEMM_M,
    SM_MODEL,
    SM_PREFILL,
    SM_WORKLOADS,
    sm_point_id,
    sm_points,
)
from calibration.raw import make_row

REPS = 7
HOLD_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------------------------ workloads
class Workloads:
    """The workloads' inputs and captured graphs, built once before any hold (nothing is allocated
    during one)."""

    def __init__(self, env, quick: bool) -> None:
        torch = self.torch = env.torch
        self.env = env
        dev, dt = env.device, env.dtype
        n, k = (256, 128) if quick else SM_GEMM
        self.w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        self.xc = torch.randn(64 if quick else SM_GEMM_M["gemm_compute"], k, device=dev, dtype=dt)
        self.xm = torch.randn(SM_GEMM_M["gemm_memory"], k, device=dev, dtype=dt)
        elems = (2**16 if quick else SM_COPY_BYTES) // 2
        self.src = torch.randn(elems, device=dev, dtype=dt)
        self.dst = torch.empty_like(self.src)
        self.graphs: dict[str, object] = {}
        self.steps: dict[str, object] = {}
        from calibration.reference_model import ReferenceModel

        spec = "tiny-llama" if quick else SM_MODEL
        cap = 64 if quick else max(SM_DECODE[0] * (SM_DECODE[1] + 1), SM_PREFILL[0] * SM_PREFILL[1])
        self.model = ReferenceModel(spec, device=dev, dtype=dt, kv_capacity_tokens=cap)
        self.steps["decode_step"] = self.model.make_step("decode", *((1, 16) if quick else SM_DECODE))
        self.steps["prefill_step"] = self.model.make_step("prefill", *((1, 32) if quick else SM_PREFILL))
        for name, step in self.steps.items():
            step()
            if env.cuda:
                self.graphs[name] = capture(torch, step)

    def call(self, name: str, graphs: dict | None = None):
        """A zero-arg launcher of workload ``name`` on the current stream."""
        torch = self.torch
        if name == "gemm_compute":
            return lambda: torch.nn.functional.linear(self.xc, self.w)
        if name == "gemm_memory":
            return lambda: torch.nn.functional.linear(self.xm, self.w)
        if name == "copy":
            return lambda: self.dst.copy_(self.src)
        g = (graphs if graphs is not None else self.graphs).get(name)
        return g.replay if g is not None else self.steps[name]

    def nbytes(self, name: str) -> float:
        if name == "copy":
            return 2.0 * self.src.numel() * self.src.element_size()
        return 0.0


def capture(torch, step):
    """A CUDA graph of one call of ``step`` (warmed on a side stream first, as torch advises)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def stream_time(env, fn, reps: int = REPS) -> list[float]:
    """Seconds per call of ``fn`` on the current stream: events around it after a priming spin (so the
    start event fires with the call already queued); only the end event is waited for."""
    torch = env.torch
    if not env.cuda:
        fn()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    from calibration.vendor.timing import prime_queue

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(2):                              # warm, waited for on this stream only
        start.record()
        fn()
        end.record()
        end.synchronize()
    first = start.elapsed_time(end) / 1e3
    inner = int(min(32, max(1, math.ceil(2e-3 / max(first, 1e-7)))))
    out = []
    for _ in range(reps):
        prime_queue(torch, 50e-6 + 20e-6 * inner)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / inner)
    return out


# ------------------------------------------------------------------------------------------ green contexts
class GreenPartition:
    """A CUDA green context of ``sms`` SMs and a stream in it, through torch's API or the driver's.

    ``with partition:`` makes the context (and its stream) current; ``sms`` is what the driver granted
    (driver API) or what was asked for (torch's API does not say). Raises RuntimeError naming the step
    that failed."""

    def __init__(self, torch, sms: int) -> None:
        self.torch, self.asked = torch, sms
        self.sms, self.how, self.stream = sms, "", None
        self._gc = self._ctx = self._gctx = self._raw = None
        errors = []
        try:
            self._torch_api(sms)
            return
        except Exception as exc:  # noqa: BLE001
            errors.append(f"torch.cuda.green_contexts: {type(exc).__name__}: {str(exc)[:160]}")
        try:
            self._driver_api(sms)
            return
        except Exception as exc:  # noqa: BLE001
            errors.append(f"cuda.bindings: {type(exc).__name__}: {str(exc)[:160]}")
        raise RuntimeError("; ".join(errors))

    def _torch_api(self, sms: int) -> None:
        from torch.cuda import green_contexts as g

        if not getattr(g, "SUPPORTED", True):
            raise RuntimeError("this torch was built without green contexts")
        try:
            self._gc = g.GreenContext.create(num_sms=sms, device_id=0)
        except TypeError:   # an older signature: create(num_sms, device_id)
            self._gc = g.GreenContext.create(sms, 0)
        self.how = "torch.cuda.green_contexts.GreenContext (set_context)"

    def _driver_api(self, sms: int) -> None:
        from cuda.bindings import driver as cu

        def ok(res):
            err, *rest = res if isinstance(res, tuple) else (res,)
            if int(err) != 0:
                raise RuntimeError(f"CUresult {int(err)}")
            return rest[0] if len(rest) == 1 else rest

        self.torch.cuda.init()
        dev = ok(cu.cuDeviceGet(0))
        res = ok(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        groups, _n, _rem = ok(cu.cuDevSmResourceSplitByCount(1, res, 0, sms))
        group = groups[0] if isinstance(groups, list | tuple) else groups
        desc = ok(cu.cuDevResourceGenerateDesc([group], 1))
        self._gctx = ok(cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        self._ctx = ok(cu.cuCtxFromGreenCtx(self._gctx))
        self._raw = ok(cu.cuGreenCtxStreamCreate(self._gctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        self.stream = self.torch.cuda.ExternalStream(int(self._raw))
        self.sms = int(group.sm.smCount)
        self.how = "cuda.bindings cuGreenCtxCreate + cuGreenCtxStreamCreate"

    def __enter__(self):
        if self._gc is not None:
            self._gc.set_context()
            return self
        from cuda.bindings import driver as cu

        cu.cuCtxPushCurrent(self._ctx)
        self._stream_ctx = self.torch.cuda.stream(self.stream)
        self._stream_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._gc is not None:
            self._gc.pop_context()
            return False
        from cuda.bindings import driver as cu

        self._stream_ctx.__exit__(*exc)
        cu.cuCtxPopCurrent()
        return False

    def close(self) -> None:
        if self._raw is not None:
            from cuda.bindings import driver as cu

            cu.cuStreamDestroy(self._raw)
            cu.cuGreenCtxDestroy(self._gctx)
            self._raw = None
        self._gc = None


# ------------------------------------------------------------------------------------------ the part
def _rows(mech: str, reserved: int, sms: int, total: int, work: Workloads, env, extra: dict, graphs=None) -> list:
    from calibration.vendor.timing import describe_error, failure_row

    out = []
    for name in SM_WORKLOADS:
        e = {**extra, "point": sm_point_id(mech, name, reserved), "sm_fraction": sms / total}
        try:
            samples = stream_time(env, work.call(name, graphs))
            out.append(make_row("sm_share", mech, samples, key=name, x=reserved, y=sms, nbytes=work.nbytes(name),
                                extra=e))
        except Exception as exc:  # noqa: BLE001 - one workload's failure is recorded
            out.append(failure_row("sm_share", mech, describe_error(exc), key=name, x=reserved, y=sms, extra=e))
    return out


def _occupier_sweep(ctx, sink, env, work: Workloads, reserved_list, total: int, deadline: float) -> None:
    from calibration.kernels.occupier import Occupier
    from calibration.kernels.runtime import cuda

    torch = env.torch
    occ_stream = torch.cuda.Stream() if env.cuda else None    # torch's pool streams are non-blocking
    work_stream = torch.cuda.Stream() if env.cuda else None
    occ = Occupier(cuda.external_stream(occ_stream.cuda_stream) if env.cuda else 0)
    caps = sink.meta.setdefault("capabilities", {})
    caps["occupier"] = {"smid": occ.smid_how, "dynamic_shared_bytes": occ.smem}
    for reserved in reserved_list:
        if time.monotonic() > deadline:
            ctx.progress(f"occupier: budget spent before {reserved} SMs")
            break
        extra = {**env.base_extra(), "mechanism": "persistent occupier kernel, one block per held SM"}
        with cuda.defer_cleanup():
            try:
                held = occ.hold(reserved, HOLD_TIMEOUT_S) if reserved else []
                extra.update(held_sms=len(set(held)), exclusive=occ.exclusive() if reserved else True,
                             opt_in_error=occ.opt_in_error)
                if env.cuda:
                    with torch.cuda.stream(work_stream):
                        rows = _rows("occupier", reserved, total - reserved, total, work, env, extra)
                        if reserved and occ.smid_how.startswith("%smid"):
                            probed = occ.probe(cuda.external_stream(work_stream.cuda_stream))
                            on_held = sum(1 for s in probed if s in set(held))
                            for r in rows:
                                r["extra"] = _merge(r["extra"], probe_blocks=len(probed), probe_on_held_sms=on_held)
                else:   # simulator: the hold has ended already (launches block); time the CPU workloads
                    rows = _rows("occupier", reserved, total - reserved, total, work, env,
                                 {**extra, "simulated": True})
            finally:
                released = occ.release()
        for r in rows:
            r["extra"] = _merge(r["extra"], released_cleanly=released)
        sink.add(*rows)
        sink.flush()
        ctx.progress(f"occupier: {reserved} SMs held ({len(set(held))} distinct), {len(rows)} rows")


def _merge(extra_json: str, **more) -> str:
    import json

    e = json.loads(extra_json)
    e.update(more)
    return json.dumps(e, sort_keys=True)


def _green_sweep(ctx, sink, env, work: Workloads, reserved_list, total: int, deadline: float) -> None:
    torch = env.torch
    caps = sink.meta.setdefault("capabilities", {})
    if not env.cuda:
        caps["green_contexts"] = "not tried: no GPU"
        return
    for reserved in reserved_list:
        if time.monotonic() > deadline:
            ctx.progress(f"green: budget spent before {reserved} SMs")
            break
        if reserved == 0:   # the baseline: all SMs, no green context (one of all SMs may round down)
            sink.add(*_rows("green", 0, total, total, work, env, {**env.base_extra(), "mechanism": "none (all SMs)"}))
            continue
        try:
            part = GreenPartition(torch, total - reserved)
        except Exception as exc:  # noqa: BLE001 - the stack does not offer them: say why, once
            caps["green_contexts"] = f"unavailable: {exc}"
            ctx.progress(f"green contexts unavailable: {exc}")
            return
        caps["green_contexts"] = part.how
        extra = {**env.base_extra(), "mechanism": part.how, "sms_asked": part.asked}
        try:
            with part:
                graphs, how = {}, "replayed the primary context's graphs"
                try:
                    for g in work.graphs.values():
                        g.replay()
                    torch.cuda.current_stream().synchronize()
                except Exception as exc:  # noqa: BLE001 - graphs of another context: capture here
                    how = f"captured in the green context ({type(exc).__name__} replaying the primary's)"
                    graphs = {name: capture(torch, step) for name, step in work.steps.items()}
                extra["graphs"] = how
                rows = _rows("green", reserved, part.sms, total, work, env, extra, graphs or None)
        except Exception as exc:  # noqa: BLE001
            from calibration.vendor.timing import describe_error

            caps["green_contexts"] = f"{part.how}: failed at {reserved} SMs held: {describe_error(exc)}"
            ctx.progress(caps["green_contexts"])
            part.close()
            return
        part.close()
        sink.add(*rows)
        sink.flush()
        ctx.progress(f"green: {part.sms} SMs ({reserved} held back), {len(rows)} rows")


def run(part: str, ctx, sink) -> None:
    from calibration.kernels.runtime import sm_count
    from calibration.vendor.timing import torch_env

    env = torch_env(ctx.quick)
    total = env.torch.cuda.get_device_properties(0).multi_processor_count if env.cuda else sm_count()
    start = time.monotonic()
    deadline = start + (ctx.budget_s if math.isfinite(ctx.budget_s) else 1e9)
    ctx.progress(f"building the workloads ({SM_MODEL} graphs, GEMM, copy) on {total} SMs")
    work = Workloads(env, ctx.quick)
    points = sm_points(ctx.quick)
    reserved = list(dict.fromkeys(r for _, _, r in points))
    if not env.cuda:
        reserved = [r for r in reserved if r < total]
    # green contexts first (no Numba kernel in the process yet: in lease 1 the occupier's first launch
    # left the context unusable, and nothing after it ran); the occupier gets the rest of the time
    green_deadline = time.monotonic() + 0.45 * (deadline - time.monotonic())
    _green_sweep(ctx, sink, env, work, reserved, total, green_deadline)
    _occupier_sweep(ctx, sink, env, work, reserved, total, deadline)
    sink.meta["sm_count"] = total
