"""Compile, load and register the CPU convolution kernels (``conv2d.cc``) with XLA, once per machine.

The kernels are C++ against XLA's FFI headers (shipped with jaxlib, ``jax.ffi.include_dir()``). They
are compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``),
for this CPU (``-march=native``, falling back to no architecture flag), into a cache directory
(``$PROSPR_JAX_CACHE``, else ``$XDG_CACHE_HOME/prospr_jax``, else ``~/.cache/prospr_jax``). The library's
file name digests the source, the flags, the compiler, the jaxlib version and the CPU's model and
feature flags, so a home directory shared by different machines never loads code built for another
CPU. Concurrent first uses (``pytest -n 2``) each write to a temporary file and rename it into place.

:func:`kernels_available` is ``False`` (and says why once, as a warning) when there is no compiler,
the compilation fails, or this jax has no ``jax.ffi``: the project then runs XLA's own convolutions,
exactly as before the kernels existed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional

SOURCE = pathlib.Path(__file__).with_name("conv2d.cc")
TARGETS = {"prospr_conv2d_forward": "ProsprConv2dForward", "prospr_conv2d_kernel_grad": "ProsprConv2dKernelGrad"}
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
_ARCH_FLAGS = (("-march=native",), ())


def cache_dir() -> pathlib.Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get("PROSPR_JAX_CACHE"):
        return pathlib.Path(os.environ["PROSPR_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "prospr_jax"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux), else what ``platform`` knows."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
        keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compile(compiler: str, include: str) -> pathlib.Path:
    import jaxlib

    source = SOURCE.read_bytes()
    errors = []
    for arch in _ARCH_FLAGS:
        flags = (*_BASE_FLAGS, *arch)
        digest = hashlib.sha256(b"\0".join([
            source, " ".join(flags).encode(), compiler.encode(), jaxlib.__version__.encode(),
            _cpu_signature().encode(),
        ])).hexdigest()[:16]
        target = cache_dir() / f"libprospr_conv2d-{digest}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = pathlib.Path(tmp) / target.name
            cmd = [compiler, *flags, f"-I{include}", str(SOURCE), "-o", str(out)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(out, target)
                return target
            errors.append(f"{' '.join(cmd)}:\n{result.stderr[-2000:]}")
    raise RuntimeError("compiling the CPU convolution kernels failed:\n" + "\n".join(errors))


@functools.cache
def _load() -> Optional[str]:
    """Registers the kernels with XLA; ``None`` on success, else why not (said once, as a warning)."""
    why = _register()
    if why is not None:
        warnings.warn(f"prospr_jax: CPU convolution kernels unavailable, using XLA's convolutions ({why})",
                      stacklevel=4)
    return why


def _register() -> Optional[str]:
    try:
        import jax
        import jax.ffi
    except ImportError as e:  # a jax without the FFI module
        return f"this jax has no jax.ffi ({e})"
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found ($CXX, c++, g++, clang++)"
    try:
        library = ctypes.cdll.LoadLibrary(str(_compile(compiler, jax.ffi.include_dir())))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except Exception as e:  # compilation, loading or registration
        return str(e)
    return None


def kernels_available() -> bool:
    """Whether the kernels are compiled and registered (compiles them at the first call)."""
    return _load() is None


__all__ = ["SOURCE", "TARGETS", "cache_dir", "kernels_available"]
