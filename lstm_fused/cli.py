"""`python -m lstm_fused {check,bench,demo}`: parity with nn.LSTM, speed against nn.LSTM and
the gradient-flow demo, on this machine.

Exit codes: 0 success, 1 a check failed (or the command failed), 2 usage or setup error
(unknown option, no GPU for --device cuda, extension not built).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shlex
import sys
import warnings

import torch

from . import benchmarking, parity

__all__ = ["main", "build_parser"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_DTYPES = {_dtype_name(dtype): dtype for dtype in parity.TOLERANCES}
# (timed rounds, warm-up rounds) of `bench` and `bench --quick`
_BENCH_ROUNDS = {"full": (15, 3), "quick": (5, 1)}


class UsageError(Exception):
    """A problem with the arguments or the setup; reported without a traceback, exit 2."""


def _device(name: str) -> torch.device:
    """The device for --device, or UsageError when lstm_fused cannot run there."""
    from .functional import backend_unavailable_reason

    reason = backend_unavailable_reason("fused")
    if reason:
        raise UsageError(reason)
    if name == "cuda":
        from ._loader import build_info

        if not torch.cuda.is_available():
            raise UsageError(
                f"--device cuda: no CUDA GPU is visible to torch {torch.__version__} "
                f"(built with CUDA: {torch.version.cuda or 'no'}); use --device cpu")
        if not getattr(build_info(), "WITH_CUDA", False):
            raise UsageError(
                "--device cuda: lstm_fused was built without its CUDA kernels (no nvcc at "
                "build time, or LSTM_FUSED_NO_CUDA=1); rebuild with the CUDA toolkit: "
                "./dev build --force")
    return torch.device(name)


def _command_line(argv) -> str:
    return "python -m lstm_fused " + " ".join(shlex.quote(a) for a in argv)


# -- check -----------------------------------------------------------------------------------

def _cmd_check(args) -> int:
    device = _device(args.device)
    dtypes = list(_DTYPES.values()) if not args.dtype or "all" in args.dtype \
        else [_DTYPES[name] for name in dict.fromkeys(args.dtype)]
    grid = parity.TINY_CHECK_GRID if args.grid == "tiny" else parity.CHECK_GRID
    sizes = grid[0]
    print(f"lstm_fused.LSTM vs torch.nn.LSTM on {device} (torch {torch.__version__}): "
          f"outputs and all gradients, T={sizes.T} B={sizes.B} I={sizes.input_size} "
          f"H={sizes.hidden_size}; error = max|ours - ref| / max|ref|, "
          f"16-bit against float32 nn.LSTM")
    print(f"{'dtype':<9} {'case':<42} {'max rel err':>11} {'tolerance':>9}  result  worst tensor")

    def report(r):
        error = "-" if r.max_rel_error is None else f"{r.max_rel_error:.2e}"
        verdict = "pass" if r.passed else "FAIL"
        detail = r.error if r.error else r.worst_tensor
        print(f"{_dtype_name(r.dtype):<9} {r.case.name:<42} {error:>11} "
              f"{r.tolerance:>9.0e}  {verdict:<6}  {detail}", flush=True)

    results = parity.run_parity(dtypes, device, grid, progress=report)
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed}/{len(results)} cases passed" +
          (f", {failed} FAILED" if failed else ""))
    return 1 if failed else 0


# -- bench -----------------------------------------------------------------------------------

def _cmd_bench_variants(args, argv, device) -> int:
    case = benchmarking.VARIANT_CASES[args.grid or device.type]
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out_dir = args.out or os.path.join("bench", "results", f"{device.type}-variants-{stamp}")
    command = _command_line(argv)
    info = benchmarking.machine_info(device)
    print(f"benchmarking {len(benchmarking.VARIANTS)} cell variants on "
          f"{info.get('gpu', info['cpu'])}, {info['torch_threads']} threads, {repeats} timed "
          f"rounds after {warmup} warm-up", flush=True)
    rows = benchmarking.run_variant_benchmark(
        case, device, repeats=repeats, warmup=warmup,
        progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True))
    report = benchmarking.variant_report(rows, info, command)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command, "machine": info, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# lstm_fused cell variants on {info.get('gpu', info['device'])}\n\n{report}")
    print()
    print(report)
    print(f"wrote {out_dir}/results.md and results.json")
    return 0


def _cmd_bench(args, argv) -> int:
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variants:
        return _cmd_bench_variants(args, argv, device)
    grid = benchmarking.GRIDS[args.grid or device.type]
    default_repeats, default_warmup = _BENCH_ROUNDS["quick" if args.quick else "full"]
    repeats = args.repeats or default_repeats
    warmup = args.warmup if args.warmup is not None else default_warmup
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out_dir = args.out or os.path.join("bench", "results", f"{device.type}-{stamp}")
    command = _command_line(argv)
    info = benchmarking.machine_info(device)
    print(f"benchmarking {len(grid)} cases on {info.get('gpu', info['cpu'])}, "
          f"{info['torch_threads']} threads, {repeats} timed rounds after {warmup} warm-up",
          flush=True)
    # the ceiling of each dtype's GEMMs on this machine, before the grid (smaller when quick)
    info["gemm_gflops"] = benchmarking.gemm_rates(
        [c.gemm_dtype for c in grid], device, size=1024 if args.quick else 2048,
        repeats=3 if args.quick else 5)
    print("large-GEMM rate: " + ", ".join(f"{k} {v:.0f} GFLOP/s"
                                         for k, v in info["gemm_gflops"].items()), flush=True)
    with warnings.catch_warnings():
        # said once in the report instead, not in the middle of the progress lines
        warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
        rows = benchmarking.run_benchmark(
            grid, device, repeats=repeats, warmup=warmup,
            progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True),
            gemm_rates=info["gemm_gflops"])
    settings = {"grid": args.grid or device.type, "repeats": repeats, "warmup": warmup,
                "quick": args.quick}
    paths = benchmarking.write_results(out_dir, rows, info, settings, command)
    report = benchmarking.markdown_report(rows, info, command)
    print()
    print(report)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if "plot" not in paths:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
    if args.page:
        benchmarking.update_results_page(args.page, device.type, report, out_dir,
                                         paths.get("plot"))
        print(f"updated {args.page}")
    return 0


# -- demo ------------------------------------------------------------------------------------

def _cmd_demo(demo_args: list[str]) -> int:
    try:
        demo = importlib.import_module(f"{__package__}.demo")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.demo":
            raise
        raise UsageError("the demo is not part of this installation (lstm_fused/demo.py is "
                         "missing)") from None
    return int(demo.main(demo_args) or 0)


# -- parser ----------------------------------------------------------------------------------

def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to run (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m lstm_fused`."""
    parser = argparse.ArgumentParser(
        prog="python -m lstm_fused",
        description="lstm_fused on this machine: parity with torch.nn.LSTM (check), speed "
                    "against it (bench), and the gradient-flow demo (demo).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,bench,demo}")

    tolerances = ", ".join(f"{_dtype_name(dtype)} {tol:.0e}"
                           for dtype, tol in parity.TOLERANCES.items())
    check = sub.add_parser(
        "check", help="outputs and gradients equal to nn.LSTM's, per case",
        description="Run lstm_fused.LSTM and torch.nn.LSTM with the same weights on a grid of "
                    "configurations (layers 1-2, bidirectional, proj_size, packed input) and "
                    "compare the outputs and all gradients. Tolerances on the norm-wise "
                    f"relative error: {tolerances}; 16-bit against a float32 nn.LSTM, TF32 off "
                    "on CUDA. Exit code 1 when a case fails.")
    _add_device_argument(check)
    check.add_argument("--dtype", action="append", choices=(*_DTYPES, "all"),
                       help="dtype to check; repeat for several (default: all)")
    check.add_argument("--grid", choices=("full", "tiny"), default="full", help=argparse.SUPPRESS)

    bench = sub.add_parser(
        "bench", help="time lstm_fused against nn.LSTM, write table, JSON and plot",
        description="Time lstm_fused.LSTM and torch.nn.LSTM side by side (interleaved rounds "
                    "after warm-up, median; CUDA events on the GPU), forward (inference) and "
                    "forward+backward (training step), on the benchmark grid of the device. "
                    "Prints a table of speedups and writes results.md, results.json and "
                    "speedup.png to --out.")
    _add_device_argument(bench)
    (repeats, warmup), (quick_repeats, quick_warmup) = _BENCH_ROUNDS["full"], _BENCH_ROUNDS["quick"]
    bench.add_argument("--quick", action="store_true",
                       help=f"{quick_repeats} timed rounds after {quick_warmup} warm-up (under a "
                            "minute on 2 idle CPU cores)")
    bench.add_argument("--out", metavar="DIR",
                       help="output folder (default bench/results/<device>-<date-time>)")
    bench.add_argument("--repeats", type=int, metavar="N",
                       help=f"timed rounds (default {repeats})")
    bench.add_argument("--warmup", type=int, metavar="N",
                       help=f"warm-up rounds (default {warmup})")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--page", metavar="FILE",
                       help="also put the table and plot into this Markdown page, e.g. "
                            "docs/results.md (replaces the previous section for the device)")
    bench.add_argument("--variants", action="store_true",
                       help="time the cell variants (layer_norm, recurrent_dropout, zoneout, "
                            "residual) against backend='reference' and the plain fused LSTM "
                            "instead (training step, T=100 B=32 H=128 on the CPU)")
    bench.add_argument("--grid", choices=tuple(benchmarking.GRIDS), help=argparse.SUPPRESS)

    # listed for --help only: main() hands everything after "demo" to the demo unparsed
    sub.add_parser("demo", add_help=False,
                   help="gradient-flow demo (arguments go to the demo; see `demo --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `python -m lstm_fused` with `argv` (default sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "demo":
            return _cmd_demo(argv[1:])
        args = build_parser().parse_args(argv)
        if args.command == "check":
            return _cmd_check(args)
        return _cmd_bench(args, argv)
    except UsageError as e:
        print(f"python -m lstm_fused {command}: error: {e}", file=sys.stderr)
        return 2
