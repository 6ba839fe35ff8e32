"""GPU timing grid: lstm_fused.LSTM against nn.LSTM (cuDNN), same process, interleaved.

    python bench/bench_gpu.py --out bench/results/logs/bench.json [--time-budget 150]

For every row of the grid both modules get the same weights (LSTM.from_torch) and the same
input; each is timed for the forward (training mode: autograd on, input requires grad, what a
training step pays) and for forward+backward (torch.autograd.grad of the output w.r.t. the
input and every parameter, with a fixed random output gradient). Each measurement starts from
an idle GPU queue (synchronize), is bracketed by CUDA events, and the four measurements
(ours fwd, cuDNN fwd, ours fwd+bwd, cuDNN fwd+bwd) are interleaved iteration by iteration
so that clock drift and thermals hit both alike. Medians are reported.

When the build has the persistent CUDA kernels (lstm_fused::set_cuda_persistent), a third
column times lstm_fused.LSTM with them switched on ("persistent"; the "ours" column has them
off); rows where they decline (no launch during warm-up: float64, projection, W_hh too large
for shared memory) record that and skip the third column's timing.

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

DEVICE = "cuda"  # a dry run of the script's logic may set "cpu" (with torch.cuda stubbed)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}


def grid():
    """The benchmark rows: lstm_fused.benchmarking.GPU_GRID (the one definition of the grid,
    shared with `python -m lstm_fused bench --device cuda`), as this script's row dicts."""
    from lstm_fused.benchmarking import GPU_GRID  # importable without the compiled library

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
    return [dict(T=c.T, B=c.B, I=c.input_size, H=c.H, layers=c.layers,
                 bidirectional=c.bidirectional, proj=c.proj_size, dtype=short[c.dtype])
            for c in GPU_GRID]


def row_id(r):
    s = f"T{r['T']}-B{r['B']}-I{r['I']}-H{r['H']}-L{r['layers']}"
    if r["bidirectional"]:
        s += "-bi"
    if r["proj"]:
        s += f"-P{r['proj']}"
    return s + f"-{r['dtype']}"


def meta(args):
    props = torch.cuda.get_device_properties(0)
    return dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(0),
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        python=platform.python_version(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        forward_mode="training forward (autograd on, input requires grad)",
        backward="torch.autograd.grad w.r.t. input and all parameters, fixed output grad",
        timing="CUDA events per call from an idle queue; median over interleaved iterations",
        row_cap_s=args.row_cap, min_iters=args.min_iters, max_iters=args.max_iters,
        warmup=args.warmup,
    )


def _time_call(fn):
    """GPU time of one call from an idle queue, in ms (CUDA events)."""
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _persistent_ops():
    """The switch and launch counters of the persistent kernels, or None when not built."""
    ops = torch.ops.lstm_fused
    try:
        return ops.set_cuda_persistent, ops.cuda_persistent_stats
    except (AttributeError, RuntimeError):
        return None


def _switched(on, call):
    """`call` with the persistent kernels switched on or off (restored afterwards)."""
    persistent = _persistent_ops()
    if persistent is None:
        return call
    set_switch = persistent[0]

    def wrapped():
        old = set_switch(on)
        try:
            call()
        finally:
            set_switch(old)
    return wrapped


def run_row(r, args, deadline):
    import lstm_fused

    dtype = DTYPES[r["dtype"]]
    dev = DEVICE
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

    calls = {("ours", "fwd"): _switched(False, fwd(ours)), ("cudnn", "fwd"): fwd(ref),
             ("ours", "fwdbwd"): _switched(False, fwdbwd(ours)),
             ("cudnn", "fwdbwd"): fwdbwd(ref)}
    persistent = _persistent_ops()
    if persistent is not None:
        calls[("persistent", "fwd")] = _switched(True, fwd(ours))
        calls[("persistent", "fwdbwd")] = _switched(True, fwdbwd(ours))
    result = dict(r, id=row_id(r), status="ok")
    errors = {}

    # correctness sanity: forward outputs of the implementations
    try:
        with torch.no_grad():
            o1, _ = ours(x)
            o2, _ = ref(x)
            result["max_abs_diff_out"] = float((o1.float() - o2.float()).abs().max())
            if persistent is not None:
                old = persistent[0](True)
                try:
                    o3, _ = ours(x)
                finally:
                    persistent[0](old)
                result["max_abs_diff_out_persistent"] = float((o3.float() - o2.float()).abs().max())
                del o3
        del o1, o2
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
                torch.cuda.synchronize()
                estimate[key] = time.perf_counter() - t0
            if before is not None:
                launches[key] = [a - b for a, b in zip(persistent[1](), before)]
        except Exception as e:  # noqa: BLE001
            errors[f"{key[0]}_{key[1]}"] = f"{type(e).__name__}: {e}"[:500]
            torch.cuda.synchronize()
    if persistent is not None:
        # persistent launches (forward, backward) during the warm-up of each call
        result["persistent_launches"] = {f"{k[0]}_{k[1]}": v for k, v in launches.items()
                                         if k[0] == "persistent"}
        if not any(n for k, v in launches.items() if k[0] == "persistent" for n in v):
            result["persistent_declined"] = True  # same code path as "ours": not timed again
            for key in [k for k in calls if k[0] == "persistent"]:
                estimate.pop(key, None)
    live = [k for k in calls if k in estimate and f"{k[0]}_{k[1]}" not in errors]
    per_iter = sum(estimate[k] for k in live) or 1e-3
    room = min(args.row_cap, max(0.0, deadline - time.monotonic()))
    iters = max(args.min_iters, min(args.max_iters, int(room / per_iter)))
    times = {k: [] for k in live}
    for i in range(iters):
        if time.monotonic() > deadline and i >= args.min_iters:
            break
        order = live if i % 2 == 0 else list(reversed(live))
        for key in order:
            times[key].append(_time_call(calls[key]))
    for impl in ("ours", "cudnn", "persistent"):
        if impl == "persistent" and persistent is None:
            continue
        entry = {}
        for mode in ("fwd", "fwdbwd"):
            ts = times.get((impl, mode), [])
            entry[f"{mode}_ms"] = statistics.median(ts) if ts else None
            entry[f"{mode}_min_ms"] = min(ts) if ts else None
            entry[f"{mode}_iters"] = len(ts)
        result[impl] = entry
    for mode in ("fwd", "fwdbwd"):
        a, b = result["ours"][f"{mode}_ms"], result["cudnn"][f"{mode}_ms"]
        result[f"speedup_{mode}"] = (b / a) if (a and b) else None
        if "persistent" in result:
            p = result["persistent"][f"{mode}_ms"]
            result[f"speedup_persistent_{mode}"] = (b / p) if (p and b) else None
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/logs/bench.json")
    ap.add_argument("--time-budget", type=float, default=150.0,
                    help="seconds for the whole grid; later rows are skipped")
    ap.add_argument("--row-cap", type=float, default=5.0,
                    help="seconds of timed iterations per row (all four measurements)")
    ap.add_argument("--min-iters", type=int, default=3)
    ap.add_argument("--max-iters", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tf32", choices=["default", "off", "on"], default="default",
                    help="TF32 for fp32 GEMMs (ours: cuBLAS) and cuDNN; default leaves torch's")
    ap.add_argument("--only", default="", help="substring filter on row ids")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device", file=sys.stderr)
        return 2
    if args.tf32 != "default":
        on = args.tf32 == "on"
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
    torch.backends.cudnn.benchmark = False

    t_start = time.monotonic()
    deadline = t_start + args.time_budget
    data = dict(meta=meta(args), rows=[])
    rows = [r for r in grid() if args.only in row_id(r)]
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
        torch.cuda.empty_cache()
        data["rows"].append(res)
        data["elapsed_s"] = round(time.monotonic() - t_start, 1)
        write_json(args.out, data)

        def fmt(v):
            return "-" if v is None else f"{v:.3f}"
        o, c = res.get("ours", {}), res.get("cudnn", {})
        pe = res.get("persistent")
        pers = ""
        if res.get("persistent_declined"):
            pers = " | persistent: declined"
        elif pe is not None:
            pers = (f" | persistent fwd {fmt(pe.get('fwd_ms'))} fwd+bwd "
                    f"{fmt(pe.get('fwdbwd_ms'))} ms")
        print(f"{rid}: {res['status']}  fwd ours {fmt(o.get('fwd_ms'))} cudnn "
              f"{fmt(c.get('fwd_ms'))} ms | fwd+bwd ours {fmt(o.get('fwdbwd_ms'))} cudnn "
              f"{fmt(c.get('fwdbwd_ms'))} ms{pers} | iters {o.get('fwd_iters', 0)}"
              + (f" | errors {res['errors']}" if res.get("errors") else ""), flush=True)
    data["elapsed_s"] = round(time.monotonic() - t_start, 1)
    write_json(args.out, data)
    print(f"bench_gpu: {len(data['rows'])} rows in {data['elapsed_s']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
