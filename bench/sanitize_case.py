"""A small CUDA forward+backward that reaches every step-kernel variant, for compute-sanitizer.

Run under `compute-sanitizer --tool memcheck|racecheck` (bench/gpu_check.sh does, with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation and an access
past a tensor's end is reported instead of landing in the caching allocator's pool).

Covered: float32 and float64; the vectorised path (hidden % 4 == 0, aligned) and the scalar
path (odd sizes, an odd projection); unpacked and packed input, bidirectional, projection;
clip modes off / element-wise / norm, with and without gradient-flow telemetry (the
single-block reduction kernels); a step with more vectors than the reduction block has
threads (a reduction over several blocks); a 16-bit input (computed in float32 by the driver);
and with the persistent kernels
switched on, float32 layers that take them (one cooperative launch per direction and pass),
and bfloat16 / float16 layers that take their tensor-core kernels (with the direct path's
16-bit GEMM mode on too).
`--small`: one case of each kernel family only (the per-step kernels with the two-stage
reduction of norm clipping and telemetry, the packed scalar path, one persistent launch per
pass), for the slower tools (synccheck, initcheck).
Exits non-zero if anything raises or a result is not finite.
"""

from __future__ import annotations

import sys

import torch

import lstm_fused
from lstm_fused import functional
from lstm_fused.options import LayerOptions


def layer_case(dev, dtype, T, B, I, H, proj=0, bidirectional=False, lengths=None, clip=0.0,
               mode=0, flow=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = 2 if bidirectional else 1
    P = proj or H

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype=dtype, device=dev).requires_grad_()

    params = []
    for _ in range(D):
        params += [rand(4 * H, I, scale=0.3), rand(4 * H, P, scale=0.3), rand(4 * H), rand(4 * H)]
        if proj:
            params.append(rand(P, H, scale=0.3))
    if lengths is None:
        batch_sizes, x = None, rand(T, B, I)
        steps = T
    else:
        B = len(lengths)
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))])
        x = rand(int(batch_sizes.sum()), I)
        steps = len(batch_sizes)
    hx, cx = rand(D, B, P), rand(D, B, H)
    probe = None
    if flow:
        probe = torch.zeros(D, steps, 3, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16)
                            else dtype, device=dev, requires_grad=True)
    options = LayerOptions(has_proj=bool(proj), bidirectional=bidirectional, bptt_clip=clip,
                           bptt_clip_mode=mode)
    outs = functional.BACKENDS["fused"](x, hx, cx, params, batch_sizes, probe, options)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(dev)).sum() for o in outs)
    inputs = [x, hx, cx, *params] + ([probe] if flow else [])
    grads = torch.autograd.grad(loss, inputs)
    for t in list(outs) + list(grads):
        if not torch.isfinite(t).all():
            raise RuntimeError("non-finite result")


def main() -> int:
    # `--device cpu` runs the same cases on the CPU kernels (a dry run of this script).
    dev = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    small = "--small" in sys.argv
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("sanitize_case: no CUDA device", file=sys.stderr)
        return 2
    cases = []
    for dtype in ((torch.float32,) if small else (torch.float32, torch.float64)):
        cases += [
            dict(dtype=dtype, T=3, B=3, I=3, H=7, proj=3, bidirectional=True,        # scalar
                 lengths=[3, 2, 2, 1]),
            dict(dtype=dtype, T=2, B=36, I=4, H=64, clip=0.3, mode=2, flow=True),     # > 1 block
        ]
        if small:
            continue
        cases += [
            dict(dtype=dtype, T=4, B=3, I=5, H=8),                                   # vector
            dict(dtype=dtype, T=3, B=2, I=4, H=8, clip=0.05, mode=1),
            dict(dtype=dtype, T=3, B=2, I=4, H=8, clip=0.05, mode=1, flow=True),
            dict(dtype=dtype, T=3, B=3, I=4, H=8, clip=0.3, mode=2, bidirectional=True),
            dict(dtype=dtype, T=3, B=3, I=4, H=9, clip=0.3, mode=2, flow=True,
                 lengths=[3, 3, 1]),
            dict(dtype=dtype, T=2, B=2, I=4, H=8, flow=True),
            dict(dtype=dtype, T=2, B=300, I=4, H=1024, clip=0.3, mode=2, flow=True),  # > 256 blocks
        ]
    if not small:
        cases.append(dict(dtype=torch.bfloat16, T=3, B=2, I=4, H=8))
    for k, case in enumerate(cases):
        layer_case(dev, **case, seed=k)
    # The persistent kernels (float32, no projection / clipping / telemetry), switched on for
    # these cases only: vector and scalar staging, packed bidirectional, two row chunks.
    persistent = [
        dict(dtype=torch.float32, T=3, B=3, I=3, H=7, bidirectional=True, lengths=[3, 2, 2, 1]),
    ]
    if not small:
        persistent += [
            dict(dtype=torch.float32, T=4, B=3, I=5, H=8),
            dict(dtype=torch.float32, T=2, B=20, I=4, H=40),
        ]
    # The tensor-core persistent kernels: 16-bit layers in the 16-bit GEMM mode (the direct
    # path's switch), scalar and vector staging.
    sixteen = [
        dict(dtype=torch.bfloat16, T=3, B=3, I=3, H=7, bidirectional=True, lengths=[3, 2, 2, 1]),
    ]
    if not small:
        sixteen.append(dict(dtype=torch.float16, T=2, B=20, I=4, H=40))
    ops = torch.ops.lstm_fused
    old = ops.set_cuda_persistent(True)
    try:
        for k, case in enumerate(persistent):
            layer_case(dev, **case, seed=100 + k)
        old_direct = ops.set_cuda_direct_gemm(True)
        try:
            for k, case in enumerate(sixteen):
                layer_case(dev, **case, seed=200 + k)
        finally:
            ops.set_cuda_direct_gemm(old_direct)
    finally:
        ops.set_cuda_persistent(old)
    cases += persistent + sixteen
    # the module path once (two layers, bidirectional, projection, packed)
    torch.manual_seed(0)
    m = lstm_fused.LSTM(5, 8, num_layers=2, bidirectional=True, proj_size=4).to(dev)
    x = torch.randn(3, 4, 5, device=dev, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([4, 3, 1]), batch_first=True)
    out, (hy, cy) = m(packed)
    (out.data.sum() + hy.sum() + cy.sum()).backward()
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"sanitize_case: {len(cases) + 1} cases ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
