"""GPU timing grid: lstm_fused.LSTM against nn.LSTM (cuDNN), same process, interleaved.

    python bench/bench_gpu.py --out bench/results/logs/bench.json [--time-budget 150]
    python bench/bench_gpu.py --device cpu --tiny --out /tmp/bench.json   # dry run on the CPU

For every row of the grid both modules get the same weights (LSTM.from_torch) and the same
input; each is timed for the forward (training mode: autograd on, input requires grad, what a
training step pays) and for forward+backward (torch.autograd.grad of the output w.r.t. the
input and every parameter, with a fixed random output gradient). Each measurement starts from
an idle GPU queue (synchronize), is bracketed by CUDA events, and the measurements (nn.LSTM,
ours per-step, ours persistent; forward and forward+backward) are interleaved iteration by
iteration so that clock drift and thermals hit all alike. Medians are reported.

Columns: `nn_lstm` (cuDNN), `per_step` (ours with the persistent kernels switched off),
`direct` (the per-step path with its raw-pointer cuBLAS calls, lstm_fused::set_cuda_direct_gemm)
and, when the build has them (lstm_fused::set_cuda_persistent), `persistent` (switched on, with
the direct calls: so a 16-bit row runs the 16-bit GEMM mode, whose persistent kernels multiply on
the tensor cores, and a pass they decline falls back to the direct per-step path); rows
where they decline (no launch during warm-up: float64, projection, W_hh too large for shared
memory, the backward's batch cap) record that and skip the third column's timing.
`default_path` names the path each pass took with the switch as the process found it (the
default dispatch), and `host_us_per_step` the host time of the per-step calls (from the call
to its return, before the GPU finished) per time step of each layer and direction.

TF32: float32 rows run twice, first with TF32 off on both sides (the headline:
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False), then with it
on for both (those rows come last, so a short budget cuts them first). 16-bit rows record tf32
as null (it does not apply to them).

Time is bounded: a row gets at most --row-cap seconds of measurement (the iteration count
comes from the warm-up timing, between --min-iters and --max-iters), and rows that would
start after --time-budget seconds are recorded as skipped. The JSON is rewritten after
every row, so a run killed by a timeout still leaves the rows it finished.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

DEVICE = "cuda"  # --device cpu: the dry run (perf_counter timing, nn.LSTM on oneDNN)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def grid(tiny=False):
    """The benchmark rows: lstm_fused.benchmarking.GPU_GRID (the one definition of the grid,
    shared with `python -m lstm_fused bench --device cuda`), or TINY_GRID for a dry run, as
    this script's row dicts: float32 rows with TF32 off first, the same rows with TF32 on
    last; tf32 None for the other dtypes."""
    from lstm_fused.benchmarking import GPU_GRID, TINY_GRID  # importable without the library

    rows = [dict(T=c.T, B=c.B, I=c.input_size, H=c.H, layers=c.layers,
                 bidirectional=c.bidirectional, proj=c.proj_size, dtype=SHORT[c.dtype])
            for c in (TINY_GRID if tiny else GPU_GRID)]
    first = [dict(r, tf32=False if r["dtype"] == "fp32" else None) for r in rows]
    return first + [dict(r, tf32=True) for r in rows if r["dtype"] == "fp32"]


def row_id(r):
    s = f"T{r['T']}-B{r['B']}-I{r['I']}-H{r['H']}-L{r['layers']}"
    if r["bidirectional"]:
        s += "-bi"
    if r["proj"]:
        s += f"-P{r['proj']}"
    s += f"-{r['dtype']}"
    if r.get("tf32") is not None:
        s += "-tf32" if r["tf32"] else "-notf32"
    return s


def _is_cuda():
    return DEVICE.startswith("cuda")


def _sync():
    if _is_cuda():
        torch.cuda.synchronize()


def meta(args):
    base = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        bench_device=DEVICE,
        forward_mode="training forward (autograd on, input requires grad)",
        backward="torch.autograd.grad w.r.t. input and all parameters, fixed output grad",
        timing=("CUDA events per call from an idle queue" if _is_cuda() else
                "perf_counter per call (dry run on the CPU)")
        + "; median over interleaved iterations",
        host_time="host_us_per_step: wall time from the call to its return (no sync), per "
                  "time step of each layer and direction (forward+backward: per step and pass)",
        tf32="per row: float32 rows with TF32 off (headline) and on, for both sides",
        row_cap_s=args.row_cap, min_iters=args.min_iters, max_iters=args.max_iters,
        warmup=args.warmup,
    )
    if not _is_cuda():
        return dict(base, device=f"cpu: {platform.processor() or platform.machine()}")
    props = torch.cuda.get_device_properties(0)
    return dict(base, device=torch.cuda.get_device_name(0),
                capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                cudnn=torch.backends.cudnn.version())


def _time_call(fn):
    """Time of one call from an idle queue, in ms (CUDA events; perf_counter on the CPU), and
    the host time until the call returned."""
    _sync()
    if not _is_cuda():
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        return dt, dt
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    fn()
    host = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end), host


def _persistent_ops():
    """The switch and launch counters ([forward, backward] launches) of the persistent
    kernels, or None when not built."""
    ops = torch.ops.lstm_fused
    try:
        set_switch, stats = ops.set_cuda_persistent, ops.cuda_persistent_stats
    except (AttributeError, RuntimeError):
        return None
    return set_switch, lambda: list(stats())[:2]


def _switched(on, call, direct=False):
    """`call` with the persistent kernels switched on or off and the per-step path's direct
    cuBLAS calls on or off (both restored afterwards)."""
    persistent = _persistent_ops()
    if persistent is None:
        return call
    set_switch = persistent[0]
    set_direct = getattr(torch.ops.lstm_fused, "set_cuda_direct_gemm", None)

    def wrapped():
        old = set_switch(on)
        old_direct = set_direct(direct) if set_direct is not None else None
        try:
            call()
        finally:
            set_switch(old)
            if set_direct is not None:
                set_direct(old_direct)
    return wrapped


def _set_tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    torch.backends.cudnn.allow_tf32 = bool(on)


def default_path(call):
    """The path each pass took in one call with the switch as the process has it: persistent
    (a launch counted) or per-step; on the CPU, the CPU kernels."""
    persistent = _persistent_ops()
    if not _is_cuda() or persistent is None:
        return dict(forward="cpu" if not _is_cuda() else "per-step",
                    backward="cpu" if not _is_cuda() else "per-step")
    before = persistent[1]()
    call()
    _sync()
    fwd, bwd = (a - b for a, b in zip(persistent[1](), before))
    return dict(forward="persistent" if fwd else "per-step",
                backward="persistent" if bwd else "per-step")


def run_row(r, args, deadline):
    import lstm_fused

    dtype = DTYPES[r["dtype"]]
    dev = DEVICE
    _set_tf32(bool(r.get("tf32")))
    torch.manual_seed(0)
    ref = nn.LSTM(r["I"], r["H"], r["layers"], bidirectional=r["bidirectional"],
                  proj_size=r["proj"], device=dev, dtype=dtype)
    ours = lstm_fused.LSTM.from_torch(ref)
    D = 2 if r["bidirectional"] else 1
    P = r["proj"] or r["H"]
    x = torch.randn(r["T"], r["B"], r["I"], device=dev, dtype=dtype, requires_grad=True)
    gout = torch.randn(r["T"], r["B"], D * P, device=dev, dtype=dtype)

    def fwd(m):
        def call():
            m(x)
        return call

    def fwdbwd(m):
        params = list(m.parameters())

        def call():
            out, _ = m(x)
            torch.autograd.grad(out, [x, *params], gout)
        return call

    calls = {("per_step", "fwd"): _switched(False, fwd(ours)), ("nn_lstm", "fwd"): fwd(ref),
             ("per_step", "fwdbwd"): _switched(False, fwdbwd(ours)),
             ("nn_lstm", "fwdbwd"): fwdbwd(ref)}
    persistent = _persistent_ops() if _is_cuda() else None
    if persistent is not None:
        calls[("direct", "fwd")] = _switched(False, fwd(ours), direct=True)
        calls[("direct", "fwdbwd")] = _switched(False, fwdbwd(ours), direct=True)
        calls[("persistent", "fwd")] = _switched(True, fwd(ours), direct=True)
        calls[("persistent", "fwdbwd")] = _switched(True, fwdbwd(ours), direct=True)
    result = dict(r, id=row_id(r), status="ok")
    errors = {}

    # correctness sanity: forward outputs of the implementations
    try:
        with torch.no_grad():
            o1, _ = ours(x)
            o2, _ = ref(x)
            result["max_abs_diff_out"] = float((o1.float() - o2.float()).abs().max())
            if persistent is not None:
                switched_out = {}  # the persistent column's forward (both switches on)
                _switched(True, lambda: switched_out.update(o3=ours(x)[0]), direct=True)()
                o3 = switched_out.pop("o3")
                result["max_abs_diff_out_persistent"] = float((o3.float() - o2.float()).abs().max())
                del o3
        del o1, o2
        result["default_path"] = default_path(fwdbwd(ours))
    except Exception as e:  # noqa: BLE001 - recorded, the row goes on
        result["max_abs_diff_out"] = None
        errors["sanity"] = f"{type(e).__name__}: {e}"

    # warm-up; its last timing estimates the cost of one call
    estimate = {}
    launches = {}
    for key, call in calls.items():
        try:
            before = persistent[1]() if persistent is not None else None
            for _ in range(args.warmup):
                t0 = time.perf_counter()
                call()
                _sync()
                estimate[key] = time.perf_counter() - t0
            if before is not None:
                launches[key] = [a - b for a, b in zip(persistent[1](), before)]
        except Exception as e:  # noqa: BLE001
            errors[f"{key[0]}_{key[1]}"] = f"{type(e).__name__}: {e}"[:500]
            _sync()
    if persistent is not None:
        # persistent launches (forward, backward) during the warm-up of each call
        result["persistent_launches"] = {f"{k[0]}_{k[1]}": v for k, v in launches.items()
                                         if k[0] == "persistent"}
        if not any(n for k, v in launches.items() if k[0] == "persistent" for n in v):
            result["persistent_declined"] = True  # same code path as per_step: not timed again
            for key in [k for k in calls if k[0] == "persistent"]:
                estimate.pop(key, None)
    live = [k for k in calls if k in estimate and f"{k[0]}_{k[1]}" not in errors]
    per_iter = sum(estimate[k] for k in live) or 1e-3
    room = min(args.row_cap, max(0.0, deadline - time.monotonic()))
    iters = max(args.min_iters, min(args.max_iters, int(room / per_iter)))
    times = {k: [] for k in live}
    host = {k: [] for k in live}
    for i in range(iters):
        if time.monotonic() > deadline and i >= args.min_iters:
            break
        order = live if i % 2 == 0 else list(reversed(live))
        for key in order:
            gpu_ms, host_ms = _time_call(calls[key])
            times[key].append(gpu_ms)
            host[key].append(host_ms)
    for impl in ("per_step", "nn_lstm", "direct", "persistent"):
        if impl in ("direct", "persistent") and persistent is None:
            continue
        entry = {}
        for mode in ("fwd", "fwdbwd"):
            ts = times.get((impl, mode), [])
            entry[f"{mode}_ms"] = statistics.median(ts) if ts else None
            entry[f"{mode}_min_ms"] = min(ts) if ts else None
            entry[f"{mode}_iters"] = len(ts)
        result[impl] = entry
    # host time of our per-step calls, per step of each layer and direction (and pass)
    steps = r["T"] * r["layers"] * D
    for impl in ("per_step", "direct"):
        for mode, passes in (("fwd", 1), ("fwdbwd", 2)):
            hs = host.get((impl, mode), [])
            if impl in result:
                result[impl][f"{mode}_host_us_per_step"] = (
                    statistics.median(hs) * 1e3 / (steps * passes) if hs else None)
    for mode in ("fwd", "fwdbwd"):
        ref_ms = result["nn_lstm"][f"{mode}_ms"]
        for impl in ("per_step", "direct", "persistent"):
            ms = result.get(impl, {}).get(f"{mode}_ms")
            if impl in result:
                result[f"speedup_{impl}_{mode}"] = (ref_ms / ms) if (ms and ref_ms) else None
    if errors:
        result["errors"] = errors
        result["status"] = "error" if not times or not any(times.values()) else "partial"
    del ref, ours, x, gout, calls
    return result


def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _fmt(v):
    return "-" if v is None else f"{v:.3f}"


def main(argv=None):
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/logs/bench.json")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dry run of the script on the CPU (use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="the tiny grid (seconds)")
    ap.add_argument("--time-budget", type=float, default=150.0,
                    help="seconds for the whole grid; later rows are skipped")
    ap.add_argument("--row-cap", type=float, default=5.0,
                    help="seconds of timed iterations per row (all measurements)")
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--max-iters", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default="", help="substring filter on row ids")
    args = ap.parse_args(argv)

    DEVICE = args.device
    if _is_cuda() and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    if _is_cuda():
        torch.backends.cudnn.benchmark = False

    t_start = time.monotonic()
    deadline = t_start + args.time_budget
    data = dict(meta=meta(args), rows=[])
    rows = [r for r in grid(args.tiny) if args.only in row_id(r)]
    for r in rows:
        rid = row_id(r)
        if time.monotonic() > deadline:
            data["rows"].append(dict(r, id=rid, status="skipped (time budget)"))
            print(f"{rid}: skipped (time budget)", flush=True)
            write_json(args.out, data)
            continue
        try:
            res = run_row(r, args, deadline)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record, go on
            res = dict(r, id=rid, status="error", errors={"row": f"{type(e).__name__}: {e}"[:500]})
        if _is_cuda():
            torch.cuda.empty_cache()
        data["rows"].append(res)
        data["elapsed_s"] = round(time.monotonic() - t_start, 1)
        write_json(args.out, data)

        o, c = res.get("per_step", {}), res.get("nn_lstm", {})
        pe = res.get("persistent")
        pers = ""
        if res.get("persistent_declined"):
            pers = " | persistent: declined"
        elif pe is not None:
            pers = (f" | persistent fwd {_fmt(pe.get('fwd_ms'))} fwd+bwd "
                    f"{_fmt(pe.get('fwdbwd_ms'))} ms")
        print(f"{rid}: {res['status']}  fwd per-step {_fmt(o.get('fwd_ms'))} nn.LSTM "
              f"{_fmt(c.get('fwd_ms'))} ms | fwd+bwd per-step {_fmt(o.get('fwdbwd_ms'))} nn.LSTM "
              f"{_fmt(c.get('fwdbwd_ms'))} ms{pers} | host {_fmt(o.get('fwd_host_us_per_step'))} "
              f"us/step | iters {o.get('fwd_iters', 0)}"
              + (f" | errors {res['errors']}" if res.get("errors") else ""), flush=True)
    _set_tf32(False)
    data["elapsed_s"] = round(time.monotonic() - t_start, 1)
    write_json(args.out, data)
    print(f"bench_gpu: {len(data['rows'])} rows in {data['elapsed_s']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
