"""The narrow hooks that let jax-triton 0.3.1 launch what Triton 3.6 builds for Hopper.

`install()` (idempotent; `launch` calls it before every jax-triton call) installs two hooks, and only for
jax-triton < 0.4 (`HOOKS_BELOW`): 0.4 and later compile Gluon and pass the scratch size themselves (and need
triton >= 3.7). Plain @triton.jit kernels without descriptors are compiled and constructed exactly as before.

1. Gluon kernels (`triton.experimental.gluon`: explicit layouts, TMA, wgmma, warp specialization). jax-triton
   0.3.1 always builds a plain `ASTSource` and runs `make_ttir` -> `make_ttgir`. For a function whose
   `is_gluon()` is true the hook
   - replaces the module jax-triton sees as `triton_lib.code_gen` by a proxy whose `ast_to_ttir` builds the
     module with `GluonASTSource(...).make_ir` (the ttg.* module attributes first, as Triton's own Gluon
     compile does), and notes the module;
   - wraps `triton_lib.compile_ttir_to_ptx_inplace` so that a noted module skips `make_ttir` and runs the
     backend's `gluon_to_ttgir` as its `make_ttgir`. The real `make_llir` / `make_ptx` run.
2. Global scratch and the compiled warp count. A kernel that builds tensor descriptors on the device
   (`tl.make_tensor_descriptor`, Gluon's `tma.make_tensor_descriptor`) needs a per-program global scratch
   buffer to hold them (128 B a descriptor), whose size the compiled kernel's metadata gives
   (`global_scratch_size`, `global_scratch_align`, set by Triton's `make_llir`); jaxlib (0.11.2 on the H200)
   allocates it when its `TritonKernel` is told the size, but jax-triton 0.3.1 does not tell it, so such
   a kernel would fault. Warp specialization also raises the warp count the kernel is compiled for (the PTX
   demands `.reqntid`): jaxlib must launch that many. The hook wraps
   - Triton's `CUDABackend.make_ptx`, the last compile step jax-triton runs, to note the metadata of the
     kernel just compiled (name, scratch size and alignment, warp count);
   - the `TritonKernel` constructor as jax-triton's module sees it, to pass them for the kernel it constructs
     next, which jax-triton does right after compiling it. A kernel that needs scratch on a jaxlib whose
     `TritonKernel` cannot take it raises, rather than launching a kernel that would fault.
"""
from __future__ import annotations

import threading
from typing import Any

HOOKS_BELOW = (0, 4)      # jax-triton versions from this one on need neither hook

_INSTALLED = False
_LOCK = threading.Lock()
_LAST_COMPILED = threading.local()      # metadata of the kernel this thread compiled last
_GLUON_MODULES = threading.local()      # ids of modules this thread built from Gluon functions, not yet compiled


def hooks_needed(version_info) -> bool:
    """True for the jax-triton versions (a `__version_info__` tuple) that need these hooks."""
    return tuple(version_info[:2]) < HOOKS_BELOW


def install() -> None:
    """Installs both hooks once per process (nothing for jax-triton >= 0.4)."""
    global _INSTALLED
    if _INSTALLED:
        return
    with _LOCK:
        if _INSTALLED:
            return
        import jax_triton
        from jax_triton import triton_lib
        from triton.backends.nvidia import compiler as nvidia_compiler

        if hooks_needed(jax_triton.__version_info__):
            triton_lib.code_gen = _CodeGenWithGluon(triton_lib.code_gen)
            triton_lib.compile_ttir_to_ptx_inplace = _gluon_aware(triton_lib.compile_ttir_to_ptx_inplace)
            nvidia_compiler.CUDABackend.make_ptx = _noting_metadata(nvidia_compiler.CUDABackend.make_ptx)
            triton_lib.triton_kernel_call_lib = _KernelLibWithScratch(triton_lib.triton_kernel_call_lib)
        _INSTALLED = True


# ---------------------------------------------------------------------------------------------- Gluon


def _gluon_ids() -> set:
    if not hasattr(_GLUON_MODULES, "ids"):
        _GLUON_MODULES.ids = set()
    return _GLUON_MODULES.ids


def is_gluon(fn) -> bool:
    """True for a `triton.experimental.gluon.jit` function."""
    return bool(getattr(fn, "is_gluon", lambda: False)())


class _CodeGenWithGluon:
    """triton.compiler.code_generator as jax-triton sees it, with Gluon functions built as Gluon modules."""

    def __init__(self, module: Any):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def ast_to_ttir(self, fn, src, *, options, codegen_fns, context, module_map, **kwargs):
        if not is_gluon(fn):
            return self._module.ast_to_ttir(fn, src, options=options, codegen_fns=codegen_fns, context=context,
                                            module_map=module_map, **kwargs)
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource

        capability = int(str(options.arch).removeprefix("sm").rstrip("a"))
        module = GluonASTSource(fn, src.signature, constexprs=src.constants, attrs=src.attrs).make_ir(
            GPUTarget("cuda", capability, options.warp_size), options, codegen_fns, module_map, context)
        _gluon_ids().add(id(module))
        return module


class _GluonStages:
    """A CUDABackend whose TTIR stage is the identity and whose TTGIR stage is `gluon_to_ttgir`."""

    def __init__(self, backend: Any):
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def make_ttir(self, module, metadata, options, capability):
        return module

    def make_ttgir(self, module, metadata, options, capability):
        return self._backend.gluon_to_ttgir(module, metadata, options, capability)


def _gluon_aware(compile_ttir_to_ptx_inplace):
    def compile_gluon_or_triton(ttir, cuda_backend, cuda_options, compute_capability):
        if id(ttir) not in _gluon_ids():
            return compile_ttir_to_ptx_inplace(ttir, cuda_backend, cuda_options, compute_capability)
        _gluon_ids().discard(id(ttir))
        return compile_ttir_to_ptx_inplace(ttir, _GluonStages(cuda_backend), cuda_options, compute_capability)

    return compile_gluon_or_triton


# ---------------------------------------------------------------------------------------------- scratch


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
                               "device-side tensor descriptors") from e
