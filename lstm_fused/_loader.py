"""Find and load the compiled op library (lstm_fused/_C*.so) with torch.ops.load_library.

The library has no Python module init; it only registers the `lstm_fused::` ops. Every
failure becomes an ImportError that says what is wrong and how to rebuild.
"""

from __future__ import annotations

import importlib.machinery
import os
import threading

import torch

__all__ = ["load_library", "library_path", "build_info", "REBUILD_HINT"]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_DIR = os.path.dirname(_PKG_DIR)
REBUILD_HINT = (
    "Rebuild against the running torch: from the repository root "
    f"({_REPO_DIR}) run `./dev build`, or `pip install --no-build-isolation -e .` "
    "in the environment you run Python from."
)

_lock = threading.Lock()
_loaded_path: str | None = None


def library_path() -> str | None:
    """Path of the compiled `_C` library next to this file, or None when not built."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = os.path.join(_PKG_DIR, "_C" + suffix)
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
        path = library_path()
        if path is None:
            raise ImportError(
                f"lstm_fused: the compiled extension is not built (no _C library in {_PKG_DIR}). "
                + REBUILD_HINT
            )
        info = build_info()
        built_for = getattr(info, "TORCH_VERSION", None)
        if built_for is None:
            raise ImportError(
                f"lstm_fused: {path} has no build record (lstm_fused/_build_info.py is missing), "
                f"so it may not match the running torch {torch.__version__}. " + REBUILD_HINT
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
