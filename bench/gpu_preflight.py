"""First check of bench/gpu_check.sh: the library loads and, on a GPU, runs its CUDA kernels.

    python bench/gpu_preflight.py [--allow-no-gpu]

Fails loudly (exit 1, a line starting "### preflight FAILED") when lstm_fused does not load,
when no GPU is visible (unless --allow-no-gpu: the script's dry run), or when a GPU is visible
but the CUDA kernels are not registered (a CPU-only build on a GPU machine: every CUDA test
would skip and the run would look green). On a GPU it also runs one tiny forward+backward on
the CUDA kernels. Prints "### preflight ok: ..." otherwise.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    allow_no_gpu = "--allow-no-gpu" in argv
    import torch

    try:
        import lstm_fused
        from lstm_fused import functional

        reason = functional.backend_unavailable_reason("fused")
        if reason is not None:
            raise RuntimeError(reason)
    except Exception as e:  # noqa: BLE001 - reported, the run fails
        print(f"### preflight FAILED: lstm_fused does not load: {type(e).__name__}: {e}")
        return 1
    from lstm_fused import _build_info

    built = f"build: torch {_build_info.TORCH_VERSION}, CUDA kernels compiled: {_build_info.WITH_CUDA}"
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("lstm_fused::layer_forward", "CUDA")
    if not torch.cuda.is_available():
        if allow_no_gpu:
            print(f"### preflight ok: no GPU visible (dry run); {built}; CUDA kernels "
                  f"registered: {registered}")
            return 0
        print(f"### preflight FAILED: no GPU visible (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}); {built}")
        return 1
    if not registered:
        print(f"### preflight FAILED: a GPU is visible ({torch.cuda.get_device_name(0)}) but the "
              f"lstm_fused CUDA kernels are not registered ({built}); rebuild with nvcc and "
              "torch's CUDA headers")
        return 1
    torch.manual_seed(0)
    m = lstm_fused.LSTM(4, 8).cuda()
    x = torch.randn(3, 2, 4, device="cuda", requires_grad=True)
    out, _ = m(x)
    out.sum().backward()
    torch.cuda.synchronize()
    if not (torch.isfinite(out).all() and torch.isfinite(x.grad).all()):
        print("### preflight FAILED: the CUDA kernels returned non-finite values")
        return 1
    print(f"### preflight ok: {torch.cuda.get_device_name(0)}; {built}; one forward+backward "
          "ran on the CUDA kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
