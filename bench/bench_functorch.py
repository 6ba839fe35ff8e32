"""torch.func on the CPU: the batching rules of lstm_fused/_vmap.py against a Python loop.

    python bench/bench_functorch.py [--quick | --repeats N] [--threads N] [-k TEXT] [--json PATH]

Rows (float32, I = H, V = the vmap size; medians of interleaved rounds,
lstm_fused.benchmarking.time_interleaved):

- "vmap over inputs": vmap(lstm)(x) for x of shape (V, T, B, I): the rule folds the vmap
  dimension into the batch, one op call for V*B sequences; against a Python loop of V calls
  of lstm_fused.LSTM, and of nn.LSTM (which has no batching rule), forward (no autograd) and
  forward+backward (ordinary autograd through the vmapped forward).
- "ensemble": V models, parameters stacked with torch.func.stack_module_state, called with
  vmap(functional_call) on a shared input; the rule loops over the members (one op call
  each); against a Python loop over the V modules. Forward, and per-member gradients
  (vmap(grad) against autograd member by member), where the layer_backward rule loops too.
- "per-sample grads": vmap(grad) over V samples of batch 1 (parameter gradients per sample),
  against a loop of V autograd.grad calls; both run V fused backward calls (the
  layer_backward rule loops), the vmapped forward is one call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch
import torch.nn as nn
from torch.func import functional_call, grad, stack_module_state, vmap

import lstm_fused
from lstm_fused.benchmarking import machine_info, time_interleaved


def _stack_outputs(m, xs):
    return torch.stack([m(x)[0] for x in xs])


def vmap_over_inputs(T, B, H, V, mode):
    torch.manual_seed(0)
    ref = nn.LSTM(H, H)
    ours = lstm_fused.LSTM.from_torch(ref)
    x = torch.randn(V, T, B, H)
    g = torch.randn(V, T, B, H)
    batched = vmap(lambda t: ours(t)[0])
    if mode == "forward":
        def run(f):
            def call():
                with torch.no_grad():
                    f()
            return call
        return {"vmap (fold rule)": run(lambda: batched(x)),
                "loop, lstm_fused": run(lambda: _stack_outputs(ours, x)),
                "loop, nn.LSTM": run(lambda: _stack_outputs(ref, x))}

    def train(m, f):
        params = list(m.parameters())

        def call():
            f().backward(g)
            for p in params:
                p.grad = None
        return call

    return {"vmap (fold rule)": train(ours, lambda: batched(x)),
            "loop, lstm_fused": train(ours, lambda: _stack_outputs(ours, x)),
            "loop, nn.LSTM": train(ref, lambda: _stack_outputs(ref, x))}


def ensemble(T, B, H, V, mode):
    torch.manual_seed(0)
    models = [lstm_fused.LSTM(H, H) for _ in range(V)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    base = lstm_fused.LSTM(H, H, device="meta")
    x = torch.randn(T, B, H)

    def member(p, b, t):
        return functional_call(base, (p, b), (t,))[0]

    if mode == "forward":
        batched = vmap(member, in_dims=(0, 0, None))

        def vmapped():
            with torch.no_grad():
                batched(params, buffers, x)

        def loop():
            with torch.no_grad():
                [m(x)[0] for m in models]

        return {"vmap (rule: loop)": vmapped, "loop over modules": loop}

    per_member = vmap(grad(lambda p, b, t: member(p, b, t).pow(2).sum()), in_dims=(0, 0, None))

    def loop_grads():
        for m in models:
            torch.autograd.grad(m(x)[0].pow(2).sum(), list(m.parameters()))

    return {"vmap(grad) (rule: loop)": lambda: per_member(params, buffers, x),
            "loop of autograd.grad": loop_grads}


def per_sample_grads(T, H, V):
    torch.manual_seed(0)
    model = lstm_fused.LSTM(H, H)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(V, T, 1, H)

    def loss(p, t):
        return functional_call(model, p, (t,))[0].pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))

    def loop():
        for t in x:
            torch.autograd.grad(model(t)[0].pow(2).sum(), list(model.parameters()))

    return {"vmap(grad)": lambda: per_sample(params, x), "loop of autograd.grad": loop}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--repeats", type=int, help="rounds (default 15)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("-k", dest="only", help="only the cases whose name contains TEXT")
    parser.add_argument("--json", help="write the samples and the machine there")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 15)
    warnings.simplefilter("ignore")
    cases = [
        ("vmap over inputs, forward", "T=50 B=8 H=128 V=16",
         lambda: vmap_over_inputs(50, 8, 128, 16, "forward")),
        ("vmap over inputs, forward+backward", "T=50 B=8 H=128 V=16",
         lambda: vmap_over_inputs(50, 8, 128, 16, "forward+backward")),
        ("vmap over inputs, forward", "T=50 B=1 H=64 V=32",
         lambda: vmap_over_inputs(50, 1, 64, 32, "forward")),
        ("vmap over inputs, forward+backward", "T=50 B=1 H=64 V=32",
         lambda: vmap_over_inputs(50, 1, 64, 32, "forward+backward")),
        ("ensemble, forward", "T=50 B=8 H=128 V=4", lambda: ensemble(50, 8, 128, 4, "forward")),
        ("ensemble, per-member grads", "T=50 B=8 H=128 V=4",
         lambda: ensemble(50, 8, 128, 4, "grad")),
        ("per-sample grads", "T=50 B=1 H=64 V=16", lambda: per_sample_grads(50, 64, 16)),
    ]
    info = machine_info()
    print(f"CPU: {info['cpu']}, {info['torch_threads']} threads, load {info['load_average_1min']}"
          f", torch {info['torch']}; medians of {repeats} interleaved rounds (ms)\n")
    print("| case | shape | variant | ms | vs first |")
    print("|---|---|---|---:|---:|")
    results = []
    for name, shape, make in cases:
        if args.only and args.only not in name:
            continue
        samples = time_interleaved(make(), repeats=repeats, warmup=2)
        medians = {k: statistics.median(v) for k, v in samples.items()}
        first = next(iter(medians.values()))
        for variant, ms in medians.items():
            print(f"| {name} | {shape} | {variant} | {ms:.1f} | {ms / first:.2f}x |")
        results.append({"case": name, "shape": shape, "samples_ms": samples})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
