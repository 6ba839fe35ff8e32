"""Build lstm_fused._C: C++ ops always, CUDA kernels when torch has CUDA and nvcc is found.

Install against the torch that is already installed (build isolation would fetch another):

    pip install --no-build-isolation -e .        # or: ./dev build

Environment:
    LSTM_FUSED_NO_CUDA=1     CPU-only build even when torch has CUDA and nvcc exists
    LSTM_FUSED_NATIVE=1      add -march=native to the C++ flags (not portable)
    LSTM_FUSED_DEBUG=1       -O0 -g (C++) / -O0 -g -G (CUDA)
    CUDA_HOME                toolkit root (else found from `nvcc --dryrun`, then /usr/local/cuda*)
    TORCH_CUDA_ARCH_LIST     CUDA architectures; "8.0;9.0" when unset
    LSTM_FUSED_CPU_SIMD      avx512|avx2|none: build that SIMD level only (default: one library
                             per level, avx512, avx2 and none on x86-64, the best the CPU has
                             picked at run time; LSTM_FUSED_CPU_CAPABILITY forces one then)
    MAX_JOBS                 parallel compile jobs (default: available cores, at most 8)
    LSTM_FUSED_TEMP_BUILD=1  objects in a throwaway folder instead of build/temp.* (no reuse)
    LSTM_FUSED_SANITIZE=1    AddressSanitizer + UndefinedBehaviorSanitizer build (CPU only; the
                             runtime must be preloaded: ./dev sanitize does it all)

The library has no Python module init: it only registers TORCH_LIBRARY ops and is loaded
with torch.ops.load_library (see lstm_fused/_loader.py).
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import find_packages, setup

import torch
import torch.utils.cpp_extension as cpp_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
PKG = "lstm_fused"
CSRC = os.path.join(ROOT, "csrc")


def log(msg):
    print(f"[lstm_fused setup] {msg}", flush=True)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_version():
    with open(os.path.join(ROOT, PKG, "__init__.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    if not m:
        raise RuntimeError("__version__ not found in lstm_fused/__init__.py")
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# CUDA toolkit discovery
# ---------------------------------------------------------------------------------------------
def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and any(
        os.path.isfile(os.path.join(root, sub, "cuda_runtime.h"))
        for sub in ("include", os.path.join("targets", "x86_64-linux", "include"),
                    os.path.join("targets", "sbsa-linux", "include"))
    )


def _toolkit_from_nvcc_dryrun(nvcc):
    """`nvcc --dryrun` prints `#$ TOP=<root>` even when nvcc is a wrapper script."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(d, "p.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (out.stdout + out.stderr).splitlines():
        m = re.match(r"#\$\s*TOP=(.*)$", line.strip())
        if m:
            return os.path.realpath(m.group(1).strip().strip('"'))
    return None


def find_cuda_home():
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(("$" + var, os.environ[var]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        top = _toolkit_from_nvcc_dryrun(nvcc)
        if top:
            candidates.append(("nvcc --dryrun TOP", top))
        candidates.append(("nvcc on PATH", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))))
    candidates.append(("/usr/local/cuda", "/usr/local/cuda"))
    for d in sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        candidates.append((d, d))
    for how, root in candidates:
        if _is_toolkit(root):
            return os.path.realpath(root), how
        if how.startswith("$"):
            log(f"ignoring {how}={root}: no bin/nvcc + include/cuda_runtime.h there")
    return None, None


def nvidia_wheel_include_dirs():
    """Headers of the nvidia-* pip wheels (cublas_v2.h, cusparse.h, ...) that torch's CUDA
    headers include and a minimal toolkit may lack."""
    dirs = []
    torch_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    for sp in dict.fromkeys([torch_site, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        base = os.path.join(sp, "nvidia")
        for inc in sorted(glob.glob(os.path.join(base, "cu*", "include"))) + \
                sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


# ---------------------------------------------------------------------------------------------
# Sources and flags
# ---------------------------------------------------------------------------------------------
def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


cpp_sources = rel(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
cu_sources = rel(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
depends = rel(glob.glob(os.path.join(CSRC, "**", "*.h"), recursive=True)
              + glob.glob(os.path.join(CSRC, "**", "*.cuh"), recursive=True))

sanitize = env_flag("LSTM_FUSED_SANITIZE")
with_cuda = False
reason = ""
if env_flag("LSTM_FUSED_NO_CUDA"):
    reason = "LSTM_FUSED_NO_CUDA is set"
elif sanitize:
    reason = "LSTM_FUSED_SANITIZE is set (the sanitizer build is CPU only)"
elif torch.version.cuda is None:
    reason = f"torch {torch.__version__} is built without CUDA"
elif not cu_sources:
    reason = "no CUDA sources in csrc/cuda/"
else:
    cuda_home, how = find_cuda_home()
    if cuda_home is None:
        reason = "no CUDA toolkit found (set CUDA_HOME to the folder with bin/nvcc)"
    else:
        with_cuda = True
        log(f"CUDA toolkit: {cuda_home} (from {how})")
        # torch guessed CUDA_HOME at import time (wrong when nvcc is a wrapper script).
        os.environ["CUDA_HOME"] = cuda_home
        cpp_ext.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        log(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")

if not with_cuda:
    log(f"CPU-only build: {reason}")
if not cpp_sources and not cu_sources:
    sys.exit("[lstm_fused setup] no sources in csrc/ (expected csrc/*.cpp)")

def machine_simd_level():
    """The best SIMD level of the build machine's CPU: avx512, avx2 or default."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        flags = set()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


# The compiler flags of each SIMD level. at::vec::Vectorized (with Sleef exp/tanh from
# libtorch) only uses AVX2/AVX-512 when CPU_CAPABILITY says so; otherwise it falls back to
# scalar loops, 2-5x slower.
SIMD_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "default": [],
}


def cpu_simd_levels():
    """The SIMD levels to build a library for, best first. A portable build has one library
    per level (lstm_fused/_C_<level>*.so) and the loader picks, at run time, the best one the
    running CPU has (lstm_fused/_loader.py, as ATen picks its kernels), so a library built on
    an AVX-512 machine also runs on an AVX2-only one. LSTM_FUSED_CPU_SIMD=avx512|avx2|none
    builds that level only; sanitizer and debug builds build the machine's level only."""
    choice = os.environ.get("LSTM_FUSED_CPU_SIMD", "").strip().lower()
    if choice == "none":
        choice = "default"
    if choice:
        if choice not in SIMD_FLAGS:
            raise SystemExit(f"LSTM_FUSED_CPU_SIMD must be one of avx512, avx2, none; got {choice!r}")
        return [choice]
    if env_flag("LSTM_FUSED_SANITIZE") or env_flag("LSTM_FUSED_DEBUG"):
        return [machine_simd_level()]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["avx512", "avx2", "default"]
    return ["default"]


debug = env_flag("LSTM_FUSED_DEBUG")
# The sanitizer build at -O1 (AddressSanitizer's recommended level): at -O3 the instrumented
# lstm_steps_cpu.cpp alone took 9 minutes to compile, at -O1 3 (2 cores, 2026-12-02).
opt = ["-O0", "-g"] if debug else (["-O1", "-g"] if sanitize else ["-O3"])
# torch 2.13+ headers need C++20; BuildExtension adds -std=c++20 itself, so no -std here.
# -fopenmp: ATen's at::parallel_for is header-inline and only runs in parallel when the
# extension is compiled with OpenMP (else it silently runs serial). The runtime libgomp.so.1
# resolves to the copy torch already loaded (same soname).
cxx_flags = opt + ["-fopenmp", "-Wall", "-Wno-unused-function",
                   "-Wno-unknown-pragmas",
                   # gcc 12 false positives inside its own AVX-512 intrinsics headers (at::vec)
                   "-Wno-maybe-uninitialized"]
if env_flag("LSTM_FUSED_NATIVE"):
    cxx_flags.append("-march=native")
# Every finding aborts (no recovery), so a test that triggers one fails.
sanitizer_flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                   "-fno-omit-frame-pointer"] if sanitize else []
if sanitize:
    # gcc 12's false positive inside its AVX-512 intrinsics at -O1 (as -Wmaybe-uninitialized's)
    cxx_flags.append("-Wno-uninitialized")
if sanitize:
    log("sanitizers: address, undefined")
cxx_flags += sanitizer_flags
simd_levels = cpu_simd_levels()
log(f"CPU SIMD levels: {', '.join(simd_levels)}")
nvcc_flags = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + [
    "-Xptxas=-v",            # register / spill report per kernel into the build log
    "-Xcompiler=-fopenmp",
    # no --use_fast_math: results must match nn.LSTM
]
define_macros = []
include_dirs = [CSRC]
extra_link_args = ["-fopenmp"] + sanitizer_flags
extra_cxx_tail = []
if with_cuda:
    define_macros.append(("LSTM_FUSED_WITH_CUDA", None))
    # -idirafter: the toolkit's own headers win; the wheels only fill the gaps.
    for inc in nvidia_wheel_include_dirs():
        extra_cxx_tail += ["-idirafter", inc]
        nvcc_flags += [f"-Xcompiler=-idirafter{inc}"]  # nvcc itself has no -idirafter

# One library per SIMD level. The CUDA sources are compiled once, into the first, and their
# objects linked into the others (BuildExt.build_extension): host code without SIMD flags.
ext_modules = []
for index, level in enumerate(simd_levels):
    flags = cxx_flags + SIMD_FLAGS[level] + [f"-DLSTM_FUSED_CPU_SIMD_LEVEL={level}"]
    kwargs = dict(
        sources=cpp_sources + (cu_sources if with_cuda and index == 0 else []),
        include_dirs=include_dirs,
        define_macros=define_macros,
        depends=depends,
        extra_link_args=extra_link_args,
    )
    name = f"{PKG}._C_{level}"
    if with_cuda:
        ext_modules.append(cpp_ext.CUDAExtension(
            name, extra_compile_args={"cxx": flags + extra_cxx_tail, "nvcc": nvcc_flags},
            **kwargs))
    else:
        ext_modules.append(cpp_ext.CppExtension(name, extra_compile_args={"cxx": flags},
                                                **kwargs))


def write_build_info(path):
    text = (
        "# Written by setup.py at build time; do not edit, do not commit.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CPU_SIMD = {simd_levels!r}\n"
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class BuildExt(cpp_ext.BuildExtension):
    def finalize_options(self):
        super().finalize_options()
        # A persistent object folder (pip's editable build uses a fresh temp dir each time),
        # one per python/torch/variant, so ninja recompiles only what changed.
        if not os.environ.get("LSTM_FUSED_TEMP_BUILD"):
            tag = "{}-py{}{}-torch{}-{}{}".format(
                sysconfig.get_platform(), sys.version_info[0], sys.version_info[1],
                torch.__version__.replace("+", "_"), "cuda" if with_cuda else "cpu",
                "-sanitize" if sanitize else "")
            self.build_temp = os.path.join(ROOT, "build", "temp." + tag)

    def build_extension(self, ext):
        # Each SIMD level's objects in a folder of its own; the CUDA objects of the first
        # library go into the others too.
        base = getattr(self, "_base_temp", None) or self.build_temp
        self._base_temp = base
        level = ext.name.rsplit("_C_", 1)[-1]
        self.build_temp = os.path.join(base, level)
        if with_cuda and ext is not ext_modules[0]:
            first = os.path.join(base, simd_levels[0])
            ext.extra_objects = list(self.compiler.object_filenames(cu_sources, output_dir=first))
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base

    def copy_file(self, infile, outfile, *args, **kwargs):
        # Replace the library by unlinking it first (new inode): overwriting it in place would
        # crash processes that have it loaded (a test run during a rebuild).
        if str(outfile).endswith(".so") and os.path.lexists(outfile):
            os.unlink(outfile)
        return super().copy_file(infile, outfile, *args, **kwargs)

    def run(self):
        super().run()
        # After a successful compile, so the info always describes the library next to it.
        # In-place/editable builds put the library in the source tree, wheels in build_lib.
        targets = set()
        if self.inplace or getattr(self, "editable_mode", False):
            targets.add(os.path.join(ROOT, PKG, "_build_info.py"))
        if self.build_lib:
            targets.add(os.path.join(self.build_lib, PKG, "_build_info.py"))
        for t in targets:
            write_build_info(t)
            # libraries of earlier builds that this one did not make (another SIMD set, the
            # single _C of older versions) must not be loaded
            keep = {os.path.basename(self.get_ext_fullpath(e.name)) for e in ext_modules}
            for stale in glob.glob(os.path.join(os.path.dirname(t), "_C*.so")):
                if os.path.basename(stale) not in keep:
                    os.unlink(stale)
        log(f"built {PKG}._C ({', '.join(simd_levels)}): torch {torch.__version__}, CUDA "
            f"{torch.version.cuda if with_cuda else 'off'}")


# One compile job per available core (2 on the dev box), at most 8 (nvcc needs ~1-2 GB each).
os.environ.setdefault("MAX_JOBS", str(max(1, min(8, len(os.sched_getaffinity(0))
                                                 if hasattr(os, "sched_getaffinity")
                                                 else (os.cpu_count() or 2)))))
# ninja (pip package) lives next to the interpreter; the venv may not be activated.
_bindir = os.path.dirname(sys.executable)
if _bindir not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bindir + os.pathsep + os.environ.get("PATH", "")


def _ninja_available():
    try:
        cpp_ext.verify_ninja_availability()
        return True
    except RuntimeError:
        log("ninja not found: slow serial build (pip install ninja)")
        return False


setup(
    name=PKG,
    version=read_version(),
    packages=find_packages(include=[PKG, f"{PKG}.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=_ninja_available())},
    zip_safe=False,
)
