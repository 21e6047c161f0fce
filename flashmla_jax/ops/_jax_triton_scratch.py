"""Global scratch for jax-triton 0.3.1: the narrow hook that lets device-side tensor descriptors (TMA) run.

Triton gives a kernel that builds tensor descriptors on the device (`tl.make_tensor_descriptor`) a per-program
global scratch buffer to hold them: the compiled kernel's metadata says how large (`global_scratch_size`,
`global_scratch_align`, set by Triton's `make_llir`) and the launcher must allocate it. jaxlib (0.11.2 on the
lent GPUs) allocates it when its `TritonKernel` is told the size, but jax-triton 0.3.1 builds `TritonKernel`
without it, so such a kernel fails. jax-triton >= 0.4 passes the size itself (and needs triton >= 3.7).

`install()` (idempotent; `launch` calls it before every jax-triton call) wraps two functions, and only for
jax-triton < 0.4:
- Triton's `CUDABackend.make_ptx`, the last compile step jax-triton runs, to note the metadata of the kernel
  just compiled (its name, scratch size and alignment, and its warp count, which warp specialization may raise);
- the `TritonKernel` constructor as jax-triton's module sees it, to pass that scratch size and alignment (and
  the compiled warp count) for the kernel it constructs next, which jax-triton does right after compiling it.
A kernel without scratch is constructed exactly as before. A kernel that needs scratch on a jaxlib whose
`TritonKernel` cannot take it raises, rather than launching a kernel that would fault.
"""
from __future__ import annotations

import threading
from typing import Any

_INSTALLED = False
_LOCK = threading.Lock()
_LAST_COMPILED = threading.local()      # metadata of the kernel this thread compiled last


def install() -> None:
    """Installs the hook once per process (no-op for jax-triton >= 0.4)."""
    global _INSTALLED
    if _INSTALLED:
        return
    with _LOCK:
        if _INSTALLED:
            return
        import jax_triton
        from jax_triton import triton_lib
        from triton.backends.nvidia import compiler as nvidia_compiler

        if tuple(jax_triton.__version_info__[:2]) < (0, 4):
            nvidia_compiler.CUDABackend.make_ptx = _noting_metadata(nvidia_compiler.CUDABackend.make_ptx)
            triton_lib.triton_kernel_call_lib = _KernelLibWithScratch(triton_lib.triton_kernel_call_lib)
        _INSTALLED = True


def _noting_metadata(make_ptx):
    def make_ptx_noting_metadata(self, src, metadata, options, capability):
        ptx = make_ptx(self, src, metadata, options, capability)
        _LAST_COMPILED.metadata = dict(name=metadata.get("name"),
                                       scratch_size=metadata.get("global_scratch_size") or 0,
                                       scratch_align=metadata.get("global_scratch_align") or 1,
                                       num_warps=metadata.get("num_warps"))
        return ptx

    return make_ptx_noting_metadata


def scratch_arguments(kernel_name: str, num_warps: int) -> tuple[int, dict[str, int]]:
    """(num_warps, extra TritonKernel keywords) for `kernel_name`, from the metadata of the kernel this thread
    compiled last (consumed); (num_warps, {}) when that kernel needs no scratch or was not noted."""
    noted = getattr(_LAST_COMPILED, "metadata", None)
    _LAST_COMPILED.metadata = None
    if noted is None or noted["name"] != kernel_name:
        return num_warps, {}
    warps = noted["num_warps"] or num_warps
    if not noted["scratch_size"]:
        return warps, {}
    return warps, dict(global_scratch_size=int(noted["scratch_size"]), global_scratch_align=int(noted["scratch_align"]))


class _KernelLibWithScratch:
    """jaxlib's gpu_triton module as jax-triton sees it, with `TritonKernel` passing the noted scratch."""

    def __init__(self, lib: Any):
        self._lib = lib

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def TritonKernel(self, kernel_name, num_warps, *args, **kwargs):  # noqa: N802 (jaxlib's name)
        num_warps, scratch = scratch_arguments(kernel_name, num_warps)
        if not scratch:
            return self._lib.TritonKernel(kernel_name, num_warps, *args, **kwargs)
        try:
            return self._lib.TritonKernel(kernel_name, num_warps, *args, **kwargs, **scratch)
        except TypeError as e:
            raise RuntimeError(f"Triton kernel {kernel_name} needs {scratch['global_scratch_size']} B of global "
                               "scratch (device-side tensor descriptors), and this jaxlib's TritonKernel does not "
                               "take global_scratch_size: use jaxlib >= 0.11 or a kernel without "
                               "tl.make_tensor_descriptor") from e
