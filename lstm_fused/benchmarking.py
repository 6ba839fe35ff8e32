"""Benchmark grids, workloads, timers and reports shared by `python -m lstm_fused bench` and
the pytest-benchmark suite (bench/test_bench_cpu.py).

A workload is one call of lstm_fused.LSTM or torch.nn.LSTM (same weights, same inputs) in
one of two modes: "forward" (inference: eval mode, no autograd) or "forward+backward" (a
training step: forward with autograd, then backward of the output with a fixed random
gradient into the input and every parameter). Implementations are timed interleaved, round
after round, so that both see the same machine load; the median is reported.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

__all__ = [
    "BenchCase", "CPU_GRID", "GPU_GRID", "TINY_GRID", "GRIDS", "IMPLS", "MODES",
    "build_modules", "make_workloads", "time_interleaved", "peak_memory_bytes", "gemm_rates",
    "run_benchmark", "geomean_speedup", "machine_info", "markdown_report", "plot_speedups",
    "write_results", "update_results_page", "VARIANTS", "VARIANT_CASES", "VARIANT_IMPLS",
    "VARIANT_TARGETS", "variant_workloads", "run_variant_benchmark", "variant_report",
]

IMPLS = ("nn.LSTM", "lstm_fused")
MODES = ("forward", "forward+backward")


@dataclass(frozen=True)
class BenchCase:
    """One benchmark shape: sequence length T, batch B, hidden size H (input size I = H
    unless given), layers, bidirectional, proj_size, dtype (a torch dtype's name); packed:
    a PackedSequence of unsorted lengths between T/2 and T instead of a (T, B, I) tensor;
    modes: which of MODES run (a one-token step is inference only); autocast: the dtype name
    of torch.autocast that both modules (built in `dtype`) run under, or None."""

    T: int
    B: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    dtype: str = "float32"
    I: int | None = None  # noqa: E741 - the notation of docs/ARCHITECTURE.md
    packed: bool = False
    modes: tuple[str, ...] = MODES
    autocast: str | None = None

    @property
    def input_size(self) -> int:
        """I: the given input size, else H."""
        return self.I if self.I is not None else self.H

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch.dtype named by `dtype`."""
        return getattr(torch, self.dtype)

    @property
    def gemm_dtype(self) -> str:
        """The dtype name the GEMMs run in: the autocast dtype, else dtype."""
        return self.autocast or self.dtype

    @property
    def name(self) -> str:
        """Short id such as "T100-B32-H128-L2-bi-float32"."""
        parts = [f"T{self.T}", f"B{self.B}", f"H{self.H}"]
        if self.I is not None:
            parts.append(f"I{self.I}")
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.proj_size:
            parts.append(f"P{self.proj_size}")
        if self.packed:
            parts.append("packed")
        parts.append(self.dtype)
        if self.autocast:
            parts.append(f"autocast-{self.autocast}")
        return "-".join(parts)

    def lengths(self) -> list[int]:
        """The sequence lengths of a packed case: between T/2 and T, unsorted (the longest
        in the middle), so that packing has to sort."""
        lengths = [self.T - (b * self.T) // (2 * self.B) for b in range(self.B)]
        return lengths[1::2] + lengths[0::2]

    def useful_flops(self, mode: str) -> int:
        """FLOPs of the GEMMs an LSTM must do for this case and mode (2 per multiply-add),
        whatever the implementation: per layer and direction, over all N rows, the input
        projection and the recurrent product (and W_hr); the backward adds the input, weight
        and recurrent gradients (twice each product, W_hr's twice too)."""
        rows = sum(self.lengths()) if self.packed else self.T * self.B
        D, H = (2 if self.bidirectional else 1), self.H
        P = self.proj_size or H
        forward = backward = 0
        for layer in range(self.layers):
            inputs = self.input_size if layer == 0 else D * P
            product = 4 * H * (inputs + P) + (H * P if self.proj_size else 0)
            forward += 2 * rows * product * D
            backward += 2 * 2 * rows * product * D  # input / hidden and weight gradients
        return forward if mode == "forward" else forward + backward



# The CPU benchmark grid (float32, I = H unless noted): the shapes the targets name (the
# word-LM example's, a large compute-bound one, a bidirectional stack, one token), the other
# dtypes, float32 modules under bfloat16 autocast, and packed input.
CPU_GRID = (
    BenchCase(T=100, B=32, H=128),
    BenchCase(T=100, B=32, H=256, layers=2),
    BenchCase(T=200, B=8, H=64),
    BenchCase(T=50, B=64, H=512),
    BenchCase(T=500, B=1, H=128),
    BenchCase(T=35, B=20, H=200, layers=2),
    BenchCase(T=20, B=256, H=1024, modes=("forward+backward",)),
    BenchCase(T=60, B=16, I=256, H=128, layers=2, bidirectional=True),
    BenchCase(T=1, B=1, H=200, layers=2, modes=("forward",)),
    BenchCase(T=100, B=32, H=128, layers=2, bidirectional=True),
    BenchCase(T=100, B=32, H=128, proj_size=64),
    BenchCase(T=100, B=32, H=128, dtype="float64"),
    BenchCase(T=100, B=32, H=128, dtype="bfloat16"),
    BenchCase(T=50, B=64, H=512, dtype="bfloat16"),
    BenchCase(T=100, B=32, H=128, autocast="bfloat16"),
    BenchCase(T=50, B=64, H=512, autocast="bfloat16"),
    BenchCase(T=100, B=32, H=128, dtype="float16"),
    BenchCase(T=100, B=32, H=128, packed=True),
    BenchCase(T=100, B=32, H=128, layers=2, bidirectional=True, packed=True),
)

# GPU grid (also the rows of bench/bench_gpu.py): the shape of published cuDNN and FlashRNN
# figures (T=1024 B=16 H=768) in each dtype, a batch sweep, a bidirectional and a
# projection row.
GPU_GRID = (
    *(BenchCase(T=1024, B=16, H=768, dtype=dt) for dt in ("float16", "bfloat16", "float32")),
    *(BenchCase(T=100, B=b, H=h, dtype=dt)
      for dt in ("float32", "bfloat16") for h in (256, 1024) for b in (1, 8, 32, 128, 512)),
    BenchCase(T=100, B=64, H=512, layers=2, bidirectional=True),
    BenchCase(T=100, B=32, H=1024, proj_size=256),
)

# Seconds-long grid for the tests of the command line.
TINY_GRID = (
    BenchCase(T=6, B=3, H=8),
    BenchCase(T=5, B=2, H=8, layers=2, bidirectional=True, proj_size=4, dtype="float64"),
)

GRIDS = {"cpu": CPU_GRID, "cuda": GPU_GRID, "tiny": TINY_GRID}

# The cell variants (`bench --variants`): each against the same module on backend="reference"
# and against the plain fused LSTM, a training step (forward+backward) in float32. residual
# runs with 2 layers (the plain baseline too). The targets of the issue: at least 3x faster
# than the reference, at most 1.5x the plain fused LSTM's time.
VARIANTS = {
    "layer_norm": dict(layer_norm=True),
    "recurrent_dropout": dict(recurrent_dropout=0.25),
    "zoneout": dict(zoneout=0.1),
    "residual": dict(residual=True),
    "all four": dict(layer_norm=True, recurrent_dropout=0.25, zoneout=0.1, residual=True),
}
VARIANT_CASES = {"cpu": BenchCase(T=100, B=32, H=128), "cuda": BenchCase(T=100, B=32, H=256),
                 "tiny": BenchCase(T=6, B=3, H=8)}
VARIANT_TARGETS = {"reference_speedup": 3.0, "vs_plain": 1.5}
VARIANT_IMPLS = ("plain fused", "fused", "reference")


# -- workloads -------------------------------------------------------------------------------

def build_modules(case: BenchCase, device, seed: int = 0) -> dict[str, nn.Module]:
    """{impl: module} for IMPLS: an nn.LSTM for `case` and an lstm_fused.LSTM with its
    weights."""
    from .module import LSTM

    torch.manual_seed(seed)
    ref = nn.LSTM(case.input_size, case.H, num_layers=case.layers,
                  bidirectional=case.bidirectional, proj_size=case.proj_size,
                  device=device, dtype=case.torch_dtype)
    return {"nn.LSTM": ref, "lstm_fused": LSTM.from_torch(ref)}


def _data(output) -> torch.Tensor:
    return output.data if isinstance(output, nn.utils.rnn.PackedSequence) else output


def _forward(module: nn.Module, x) -> Callable[[], None]:
    module.eval()

    def run():
        with torch.no_grad():
            module(x)

    return run


def _forward_backward(module: nn.Module, x, leaf: torch.Tensor,
                      grad_output: torch.Tensor) -> Callable[[], None]:
    """x: the module's input (a tensor, or a PackedSequence packed from `leaf` at every call,
    as a training step packs its batch)."""
    module.train()  # dropout is 0: same math, but nn.LSTM picks its training kernels
    params = list(module.parameters())

    def run():
        output, _ = module(x() if callable(x) else x)
        _data(output).backward(grad_output)
        # dropped as optimizer.zero_grad() does, so every call starts without gradients and
        # its peak memory includes allocating them
        leaf.grad = None
        for p in params:
            p.grad = None

    return run


def make_workloads(case: BenchCase, mode: str, device="cpu", impls: Sequence[str] = IMPLS,
                   seed: int = 0) -> dict[str, Callable[[], None]]:
    """{impl: zero-argument callable running one `mode` call}; all share the same weights,
    input and output gradient."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    modules = build_modules(case, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(case.T, case.B, case.input_size, generator=g, device=device,
                    dtype=case.torch_dtype)
    lengths = torch.tensor(case.lengths()) if case.packed else None

    def pack():
        return nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)

    if mode == "forward":
        workloads = {impl: _forward(modules[impl], pack() if case.packed else x)
                     for impl in impls}
    else:
        out_size = (case.proj_size or case.H) * (2 if case.bidirectional else 1)
        rows = (int(lengths.sum()),) if case.packed else (case.T, case.B)
        # under autocast the output (and so its gradient) has the autocast dtype
        grad_output = torch.randn(*rows, out_size, generator=g, device=device,
                                  dtype=getattr(torch, case.gemm_dtype))
        x.requires_grad_()
        workloads = {impl: _forward_backward(modules[impl], pack if case.packed else x, x,
                                             grad_output)
                     for impl in impls}
    if case.autocast:
        workloads = {impl: _under_autocast(fn, device, getattr(torch, case.autocast))
                     for impl, fn in workloads.items()}
    return workloads


def _under_autocast(fn: Callable[[], None], device: torch.device,
                    dtype: torch.dtype) -> Callable[[], None]:
    def run():
        with torch.autocast(device.type, dtype=dtype):
            fn()

    return run


def variant_workloads(case: BenchCase, variant: str, device="cpu",
                      seed: int = 0) -> dict[str, Callable[[], None]]:
    """{impl: training step} for VARIANT_IMPLS: the plain fused LSTM, the fused LSTM with
    the variant, and the same module on backend="reference" (same weights, input, output
    gradient)."""
    from .module import LSTM

    kw = VARIANTS[variant]
    layers = 2 if kw.get("residual") else case.layers
    device = torch.device(device)
    factory = dict(num_layers=layers, device=device, dtype=case.torch_dtype)
    torch.manual_seed(seed)
    plain = LSTM(case.input_size, case.H, **factory)
    torch.manual_seed(seed)
    fused = LSTM(case.input_size, case.H, **factory, **kw)
    reference = LSTM(case.input_size, case.H, **factory, **kw, backend="reference")
    reference.load_state_dict(fused.state_dict())
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(case.T, case.B, case.input_size, generator=g, device=device,
                    dtype=case.torch_dtype, requires_grad=True)
    grad_output = torch.randn(case.T, case.B, case.H, generator=g, device=device,
                              dtype=case.torch_dtype)
    return {impl: _forward_backward(m, x, x, grad_output)
            for impl, m in zip(VARIANT_IMPLS, (plain, fused, reference))}


def run_variant_benchmark(case: BenchCase, device="cpu", repeats: int = 10, warmup: int = 2,
                          progress: Callable[[str], None] | None = None) -> list[dict]:
    """Time every variant of VARIANTS (variant_workloads, interleaved rounds). One row per
    variant: {"variant", "case", impl: summary for VARIANT_IMPLS, "vs_plain" (fused / plain
    fused medians), "reference_speedup" (reference / fused), "meets_targets"}."""
    rows = []
    for variant in VARIANTS:
        if progress:
            progress(f"{variant} {case.name}")
        samples = time_interleaved(variant_workloads(case, variant, device), repeats, warmup,
                                   device)
        row = {"variant": variant, "case": case.name, "config": asdict(case),
               "layers": 2 if VARIANTS[variant].get("residual") else case.layers}
        row.update({impl: _summary(samples[impl]) for impl in VARIANT_IMPLS})
        fused = row["fused"]["median_ms"]
        row["vs_plain"] = fused / row["plain fused"]["median_ms"]
        row["reference_speedup"] = row["reference"]["median_ms"] / fused
        row["meets_targets"] = (row["vs_plain"] <= VARIANT_TARGETS["vs_plain"] and
                                row["reference_speedup"] >= VARIANT_TARGETS["reference_speedup"])
        rows.append(row)
    return rows


def variant_report(rows: Sequence[dict], info: Mapping, command: str) -> str:
    """run_variant_benchmark's rows as a Markdown section."""
    lines = [
        f"Command: `{command}`  ",
        f"Date: {info['date']} · device: {info.get('gpu', info['device'])} · CPU: {info['cpu']} "
        f"({info['cpu_count']} cores, {info['torch_threads']} torch threads, load "
        f"{info['load_average_1min']}) · torch {info['torch']}",
        "",
        "Training step (forward+backward), milliseconds per call, median of interleaved rounds. "
        f"Targets: fused at least {VARIANT_TARGETS['reference_speedup']:g}x faster than "
        f"backend=\"reference\", at most {VARIANT_TARGETS['vs_plain']:g}x the plain fused "
        "LSTM's time (residual: both with 2 layers).",
        "",
        "| variant | case | plain fused | fused | reference | fused / plain | reference / fused "
        "| targets |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        case = r["case"] + (f"-L{r['layers']}" if r["layers"] > 1 else "")
        lines.append(
            f"| {r['variant']} | {case} | {r['plain fused']['median_ms']:.1f} "
            f"| {r['fused']['median_ms']:.1f} | {r['reference']['median_ms']:.1f} "
            f"| {r['vs_plain']:.2f}x | {r['reference_speedup']:.1f}x "
            f"| {'met' if r['meets_targets'] else 'missed'} |")
    load, cores = info.get("load_average_1min"), info.get("cpu_count")
    if load is not None and cores and load > 0.5 * cores:
        lines += ["", f"**The machine was busy** (load average {load} on {cores} cores when the "
                      "run started): timings are noisy and slower than on an idle machine."]
    return "\n".join(lines) + "\n"


# -- timing and memory -----------------------------------------------------------------------

def _time_cpu_ms(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _time_cuda_ms(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_interleaved(fns: Mapping[str, Callable[[], None]], repeats: int, warmup: int = 1,
                     device="cpu") -> dict[str, list[float]]:
    """Milliseconds per call of each fn, `repeats` samples each: all fns once per round,
    in alternating order, after `warmup` untimed rounds. CUDA events on a CUDA device."""
    timer = _time_cuda_ms if torch.device(device).type == "cuda" else _time_cpu_ms
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        # alternate the order so neither always runs right after the other's cache effects
        for name in names if round_index % 2 == 0 else reversed(names):
            samples[name].append(timer(fns[name]))
    return samples


@contextlib.contextmanager
def _stderr_silenced():
    # The profiler's native layer prints start/stop lines straight to file descriptor 2.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], None]) -> int:
    # torch's CPU allocator keeps no statistics: replay the profiler's allocation and free
    # events in time order. Memory a library allocates on its own (oneDNN scratchpads) is
    # not seen.
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced(), profiler as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def _cuda_peak_bytes(fn: Callable[[], None]) -> int:
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def peak_memory_bytes(fn: Callable[[], None], device="cpu") -> int | None:
    """Peak bytes allocated during one call of fn above what was allocated before it, or
    None when it cannot be measured here."""
    try:
        if torch.device(device).type == "cuda":
            return _cuda_peak_bytes(fn)
        return _cpu_peak_bytes(fn)
    except (RuntimeError, AttributeError):  # profiler API differences between torch versions
        return None


# -- a whole run -----------------------------------------------------------------------------

def _summary(samples: list[float]) -> dict:
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "q1_ms": quartiles[0], "q3_ms": quartiles[2], "times_ms": samples}


def gemm_rates(dtypes: Sequence[str], device="cpu", size: int = 2048,
               repeats: int = 5) -> dict[str, float]:
    """The machine's large-GEMM rate in GFLOP/s per dtype: the product of two (size x size)
    matrices, the median of `repeats` calls after one warm-up, by torch.mm and (on the CPU)
    by the GEMM lstm_fused's layers use (torch.ops.lstm_fused.cpu_mm: oneDNN instead of MKL on
    AMD CPUs, a bf16 result in fp32), whichever is faster. The ceiling an LSTM's GEMMs can
    reach; each benchmark row's GFLOP/s is shown as a fraction of it."""
    device = torch.device(device)
    timer = _time_cuda_ms if device.type == "cuda" else _time_cpu_ms
    from . import functional
    products = [torch.mm]
    if device.type == "cpu" and functional.backend_unavailable_reason("fused") is None:
        products.append(torch.ops.lstm_fused.cpu_mm)
    rates = {}
    for name in dict.fromkeys(dtypes):
        a = torch.randn(size, size, device=device).to(getattr(torch, name))
        b = torch.randn(size, size, device=device).to(getattr(torch, name))
        best = 0.0
        for product in products:
            product(a, b)
            ms = statistics.median(timer(lambda: product(a, b)) for _ in range(repeats))
            best = max(best, 2 * size ** 3 / (ms * 1e6))
        rates[name] = best
    return rates


def run_benchmark(grid: Sequence[BenchCase], device="cpu", repeats: int = 15, warmup: int = 3,
                  measure_memory: bool = True,
                  progress: Callable[[str], None] | None = None,
                  gemm_rates: Mapping[str, float] | None = None) -> list[dict]:
    """Time every case of `grid` in its modes (both MODES unless the case says otherwise) for
    both IMPLS. One row per (case, mode): {"case", "config", "mode", "nn.LSTM": summary,
    "lstm_fused": summary, "speedup", "useful_gflop", "gflops": {impl: GFLOP/s},
    "gemm_fraction" (lstm_fused's GFLOP/s over gemm_rates[dtype], when given), "peak_bytes":
    {impl: bytes} (the peak of one call, in each mode)}; speedup = nn.LSTM median / lstm_fused median
    (> 1: lstm_fused is faster)."""
    rows = []
    for case in grid:
        for mode in case.modes:
            if progress:
                progress(f"{case.name} {mode}")
            workloads = make_workloads(case, mode, device)
            samples = time_interleaved(workloads, repeats, warmup, device)
            row = {"case": case.name, "config": asdict(case), "mode": mode}
            row.update({impl: _summary(samples[impl]) for impl in IMPLS})
            row["speedup"] = row["nn.LSTM"]["median_ms"] / row["lstm_fused"]["median_ms"]
            flops = case.useful_flops(mode)
            row["useful_gflop"] = flops / 1e9
            row["gflops"] = {impl: flops / (row[impl]["median_ms"] * 1e6) for impl in IMPLS}
            if gemm_rates and gemm_rates.get(case.gemm_dtype):
                row["gemm_fraction"] = row["gflops"]["lstm_fused"] / gemm_rates[case.gemm_dtype]
            if measure_memory:
                row["peak_bytes"] = {impl: peak_memory_bytes(fn, device)
                                     for impl, fn in workloads.items()}
            rows.append(row)
    return rows


def geomean_speedup(rows: Sequence[dict], mode: str = "forward+backward",
                    dtype: str = "float32") -> float | None:
    """Geometric mean of the speedups of the `mode` rows in `dtype` (not under autocast); None
    when there are none."""
    speedups = [r["speedup"] for r in rows if r["mode"] == mode and r["config"]["dtype"] == dtype
                and not r["config"].get("autocast")]
    if not speedups:
        return None
    return math.exp(sum(math.log(s) for s in speedups) / len(speedups))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="cpu") -> dict:
    """Where and when a benchmark ran: date (UTC), CPU, threads, load, versions, GPU."""
    from . import __version__
    from ._loader import build_info

    build = build_info()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lstm_fused": __version__,
        "lstm_fused_with_cuda": getattr(build, "WITH_CUDA", None),
        "onednn": torch.backends.mkldnn.is_available(),
    }
    if torch.device(device).type == "cuda":
        # TF32 settings change float32 speed (and accuracy) of both, so they are recorded
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                    cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    return info


def _mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def markdown_report(rows: Sequence[dict], info: Mapping, command: str) -> str:
    """The results as a Markdown page section: how and where they were made, one table row
    per case (milliseconds, medians), the float32 fwd+bwd geometric-mean speedup."""
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["mode"]] = r
    lines = [
        f"Command: `{command}`  ",
        f"Date: {info['date']} · device: {info.get('gpu', info['device'])} · CPU: {info['cpu']} "
        f"({info['cpu_count']} cores, {info['torch_threads']} torch threads, load "
        f"{info['load_average_1min']}) · torch {info['torch']} · lstm_fused {info['lstm_fused']}",
        "",
        "Milliseconds per call, median; speedup = nn.LSTM / lstm_fused (> 1: lstm_fused is "
        "faster). Peak memory: MiB allocated during one forward (under no_grad) and during one "
        "forward+backward.",
        "",
        *(["On the CPU nn.LSTM runs oneDNN's fused RNN for float32 without proj_size; the "
           "float64 and proj_size rows use its native per-step path.", ""]
          if info["device"] == "cpu" else []),
        "GFLOP/s: the GEMM FLOPs any LSTM must do (BenchCase.useful_flops) over lstm_fused's "
        "time, forward / forward+backward; of GEMM: that rate over the machine's large-GEMM "
        "rate in the same dtype (2048x2048, the faster of torch.mm and the GEMM lstm_fused's "
        "layers call, measured when the run started"
        + (": " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in info["gemm_gflops"].items())
           if info.get("gemm_gflops") else "") + ").",
        "",
        "| case | nn.LSTM fwd | lstm_fused fwd | speedup fwd | nn.LSTM fwd+bwd "
        "| lstm_fused fwd+bwd | speedup fwd+bwd | GFLOP/s | of GEMM | peak MiB fwd nn.LSTM / "
        "lstm_fused | peak MiB fwd+bwd nn.LSTM / lstm_fused |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, modes in by_case.items():
        cells = [name]
        for mode in MODES:
            r = modes.get(mode)
            if r is None:
                cells += ["", "", ""]
                continue
            cells += [f"{r['nn.LSTM']['median_ms']:.2f}", f"{r['lstm_fused']['median_ms']:.2f}",
                      f"{r['speedup']:.2f}x"]
        rates = [modes[m]["gflops"]["lstm_fused"] if m in modes and "gflops" in modes[m] else None
                 for m in MODES]
        fractions = [modes[m].get("gemm_fraction") if m in modes else None for m in MODES]
        cells.append(" / ".join("-" if v is None else f"{v:.0f}" for v in rates))
        cells.append(" / ".join("-" if v is None else f"{v:.0%}" for v in fractions))
        for mode in MODES:
            peak = modes.get(mode, {}).get("peak_bytes")
            cells.append(f"{_mib(peak['nn.LSTM'])} / {_mib(peak['lstm_fused'])}" if peak else "")
        lines.append("| " + " | ".join(cells) + " |")
    load, cores = info.get("load_average_1min"), info.get("cpu_count")
    if load is not None and cores and load > 0.5 * cores:
        lines += ["", f"**The machine was busy** (load average {load} on {cores} cores when the "
                      "run started): timings are noisy and slower than on an idle machine."]
    geomean = geomean_speedup(rows)
    if geomean is not None:
        lines += ["", f"Geometric-mean speedup, forward+backward, float32 rows: **{geomean:.2f}x**"]
    return "\n".join(lines) + "\n"


def plot_speedups(rows: Sequence[dict], path: str, title: str) -> bool:
    """Speedup against batch size (one line per hidden size, dtype and layer variant; one
    panel per mode) as a PNG at `path`. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(MODES), figsize=(12, 4.5), sharey=True)
    for ax, mode in zip(axes, MODES):
        lines: dict[tuple, list[tuple[int, float, int]]] = {}
        for r in rows:
            if r["mode"] != mode:
                continue
            c = BenchCase(**r["config"])
            variant = "".join(f" {v}" for v in (
                f"L{c.layers}" if c.layers > 1 else "", "bi" if c.bidirectional else "",
                f"P{c.proj_size}" if c.proj_size else "",
                f"autocast {c.autocast}" if c.autocast else "") if v)
            key = (c.H, c.dtype, variant)  # sorts the legend by hidden size
            lines.setdefault(key, []).append((c.B, r["speedup"], c.T))
        for (hidden, dtype, variant), points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"H={hidden} {dtype}{variant}")
            for b, speedup, steps in points:
                ax.annotate(f"T={steps}", (b, speedup), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)  # 2x faster and 2x slower equally far from 1
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2, subs=(1.0, 1.5)))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("batch size B")
        ax.set_title(mode)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("speedup over nn.LSTM (x)")
    axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(out_dir: str, rows: Sequence[dict], info: Mapping, settings: Mapping,
                  command: str) -> dict[str, str]:
    """Write results.json, results.md and speedup.png (when matplotlib is there) into
    out_dir; returns {kind: path} of the files written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"),
             "markdown": os.path.join(out_dir, "results.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"command": command, "machine": info, "settings": dict(settings),
                   "geomean_speedup_fwd_bwd_float32": geomean_speedup(rows),
                   "rows": list(rows)}, f, indent=1)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(f"# lstm_fused vs nn.LSTM on {info.get('gpu', info['device'])}\n\n")
        f.write(markdown_report(rows, info, command))
    png = os.path.join(out_dir, "speedup.png")
    title = (f"lstm_fused vs nn.LSTM, {info.get('gpu', info['cpu'])}, "
             f"{info['torch_threads']} threads, {info['date'][:10]}")
    if plot_speedups(rows, png, title):
        paths["plot"] = png
    return paths


def update_results_page(page: str, section: str, report: str, out_dir: str,
                        plot: str | None = None) -> None:
    """Put `report` (markdown_report's text), the results folder and the plot into the
    Markdown file `page`, between `<!-- results:{section}:begin -->` and its `end` marker
    (replacing what was there; appended with the markers when they are absent)."""
    body = f"Files: `{out_dir}`\n\n{report}"
    if plot:  # linked relative to the page, so that it shows wherever both are
        link = os.path.relpath(plot, os.path.dirname(page) or ".")
        body += f"\n![speedup against batch size]({link})\n"
    begin, end = f"<!-- results:{section}:begin -->", f"<!-- results:{section}:end -->"
    text = ""
    if os.path.exists(page):
        with open(page, encoding="utf-8") as f:
            text = f.read()
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    with open(page, "w", encoding="utf-8") as f:
        f.write(text)
