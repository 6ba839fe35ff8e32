"""Find and load the compiled op library (lstm_fused/_C_<level>*.so, one per SIMD level) with
torch.ops.load_library.

The library has no Python module init; it only registers the `lstm_fused::` ops. Every
failure becomes an ImportError that says what is wrong and how to rebuild.
"""

from __future__ import annotations

import importlib.machinery
import os
import threading

import torch

__all__ = ["load_library", "library_path", "build_info", "cpu_simd_level", "REBUILD_HINT"]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_PKG_DIR)
REBUILD_HINT = (
    "Rebuild against the running torch: from the repository root "
    f"({_REPO_DIR}) run `./dev build`, or `pip install --no-build-isolation -e .` "
    "in the environment you run Python from."
)

_lock = threading.Lock()
_loaded_path: str | None = None


# SIMD levels, best first, and what torch.backends.cpu.get_cpu_capability() (ATen's own run-time
# choice, which ATEN_CPU_CAPABILITY can lower) allows of them.
_LEVELS = ("avx512", "avx2", "default")
_ALLOWED = {"AVX512": {"avx512", "avx2", "default"}, "AVX2": {"avx2", "default"}}


def cpu_simd_level(built=None) -> str:
    """The SIMD level of the library to load: LSTM_FUSED_CPU_CAPABILITY when set (avx512, avx2
    or default; for testing the fallbacks), else the best of the built levels that this CPU
    has. Raises ImportError when the forced level was not built or the CPU lacks it."""
    if built is None:
        built = list(getattr(build_info(), "CPU_SIMD", None) or ())
    capability = torch.backends.cpu.get_cpu_capability()
    allowed = _ALLOWED.get(capability, {"default"})
    forced = os.environ.get("LSTM_FUSED_CPU_CAPABILITY", "").strip().lower()
    if forced:
        if forced not in _LEVELS:
            raise ImportError(f"lstm_fused: LSTM_FUSED_CPU_CAPABILITY must be one of "
                              f"{', '.join(_LEVELS)}, got {forced!r}")
        if forced not in built:
            raise ImportError(f"lstm_fused: LSTM_FUSED_CPU_CAPABILITY={forced}, but the build has "
                              f"only {', '.join(built) or 'no level'}. " + REBUILD_HINT)
        if forced not in allowed:
            raise ImportError(f"lstm_fused: LSTM_FUSED_CPU_CAPABILITY={forced}, but this CPU does "
                              f"not support it (torch reports {capability})")
        return forced
    for level in _LEVELS:
        if level in built and level in allowed:
            return level
    raise ImportError(f"lstm_fused: no built SIMD level ({', '.join(built) or 'none'}) runs on "
                      f"this CPU (torch reports {capability}). " + REBUILD_HINT)


def library_path() -> str | None:
    """Path of the compiled `_C_<level>` library next to this file for this CPU (see
    cpu_simd_level), or None when not built."""
    if build_info() is None:
        return None
    level = cpu_simd_level()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = os.path.join(_PKG_DIR, f"_C_{level}" + suffix)
        if os.path.isfile(p):
            return p
    return None


def build_info():
    """The lstm_fused._build_info module written by setup.py, or None."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


def load_library() -> str:
    """Load the op library once; return its path. Raises ImportError with advice."""
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    with _lock:
        if _loaded_path is not None:
            return _loaded_path
        info = build_info()
        path = library_path()
        if path is None:
            raise ImportError(
                f"lstm_fused: the compiled extension is not built (no _C library"
                + ("" if info is None else f" for SIMD level {cpu_simd_level()}")
                + f" in {_PKG_DIR}" + ("" if info is not None else
                                      ", or lstm_fused/_build_info.py is missing") + "). "
                + REBUILD_HINT
            )
        built_for = getattr(info, "TORCH_VERSION", None)
        if built_for is None:
            raise ImportError(
                f"lstm_fused: {path} has no build record (lstm_fused/_build_info.py has no "
                f"TORCH_VERSION), so it may not match the running torch {torch.__version__}. "
                + REBUILD_HINT
            )
        if built_for != torch.__version__:
            raise ImportError(
                f"lstm_fused: the extension was built for torch {built_for} "
                f"(CUDA {getattr(info, 'CUDA_VERSION', None)}) but torch {torch.__version__} "
                f"(CUDA {torch.version.cuda}) is running. " + REBUILD_HINT
            )
        try:
            torch.ops.load_library(path)
        except OSError as e:
            # torch wraps the dlopen error; the useful part (undefined symbol, missing
            # libc10_cuda.so, ...) is in the chained exception.
            detail = "; ".join(str(x) for x in (e, e.__cause__ or e.__context__) if x)
            raise ImportError(
                f"lstm_fused: loading {path} failed: {detail}. The library does not fit the running "
                f"torch {torch.__version__} (CUDA {torch.version.cuda}); it was built for torch "
                f"{built_for} (CUDA {getattr(info, 'CUDA_VERSION', None)}). " + REBUILD_HINT
            ) from e
        _loaded_path = path
        return path
