"""`launch(..., implementation="triton")` lowered for CUDA on a CPU-only machine, through jax-triton 0.3.1 and
the hooks of flashmla_jax/ops/_jax_triton_hooks.py, with a stand-in for jaxlib's GPU Triton module.

jaxlib's CPU build has a `gpu_triton` module without the CUDA plugin's functions, so jax-triton cannot be
imported; the stand-in gives it those functions, reports compute capability 9.0, and records what
jax-triton hands to `TritonKernel` (name, warp count, shared memory, PTX, scratch keywords) instead of loading
anything. `jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))` then runs jax-triton's lowering rule:
the kernel is compiled for sm_90 by Triton here, as on the GPU. Run as a script (tests/test_launch.py does, in
a subprocess: the stand-in and the hooks change the process); prints one JSON object.
"""
from __future__ import annotations

import json
import sys

CONSTRUCTED: list[dict] = []     # what each TritonKernel was given


class _Kernel:
    def __init__(self, name, num_warps, num_ctas, shared, ptx, ttir, capability, **kwargs):
        CONSTRUCTED.append(dict(name=name, num_warps=num_warps, num_ctas=num_ctas, shared=shared,
                                capability=capability, wgmma="wgmma.mma_async" in ptx,
                                tma="cp.async.bulk.tensor" in ptx, reqntid=_reqntid(ptx), **kwargs))


def _reqntid(ptx: str) -> int | None:
    for line in ptx.splitlines():
        if line.strip().startswith(".reqntid"):
            return int(line.split()[1].split(",")[0])
    return None


class _KernelCall:
    def __init__(self, kernel, *grid_and_params):
        self.kernel = kernel

    def to_proto(self, name, metadata):
        return b"kernel call"


def stand_in_for_jaxlib() -> None:
    """Gives jaxlib.gpu_triton the CUDA plugin's functions (recording, capability 9.0)."""
    from jaxlib import gpu_triton

    stand_in = dict(TritonKernel=_Kernel, TritonKernelCall=_KernelCall, TritonAutotunedKernelCall=_KernelCall,
                    create_array_parameter=lambda zeroed_bytes, alignment: ("array", zeroed_bytes, alignment),
                    create_scalar_parameter=lambda value, dtype: ("scalar", value, dtype),
                    get_compute_capability=lambda device: 90, get_arch_details=lambda device: "sm_90",
                    get_custom_call=lambda: None, get_serialized_metadata=lambda blob: b"")
    for name, value in stand_in.items():
        setattr(gpu_triton, name, value)


def main() -> None:
    stand_in_for_jaxlib()
    import jax
    import jax.numpy as jnp
    import jax_triton
    import numpy as np

    from flashmla_jax.ops import _jax_triton_hooks, _launch
    from launch_kernels_for_checks import descriptor_scale_kernel, gluon_scale_kernel

    def lower(fn, *args):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    out = [jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)]
    results = dict(hooks_needed=_jax_triton_hooks.hooks_needed(jax_triton.__version_info__))
    text = lower(lambda x: _launch.launch(gluon_scale_kernel, x, np.float32(2.0), out_shape=out, grid=(4, 2),
                                          implementation="triton", num_warps=4, M=256, N=512, BLOCK_M=64,
                                          BLOCK_N=256), x)
    results["gluon"] = CONSTRUCTED[-1]
    results["custom_call"] = "triton_kernel_call" in text
    lower(lambda x: _launch.launch(descriptor_scale_kernel, x, out_shape=out, grid=(8, 8), implementation="triton",
                                   num_warps=4, M=256, N=512, BLOCK_M=32, BLOCK_N=64), x)
    results["tl_descriptors"] = CONSTRUCTED[-1]
    results["tl_plain"] = _plain_tl_kernel(lower, x, out)
    json.dump(results, sys.stdout)


def _plain_tl_kernel(lower, x, out):
    import triton
    import triton.language as tl

    from flashmla_jax.ops import _launch

    @triton.jit
    def double_kernel(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.program_id(0) * N + tl.arange(0, N)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2)

    lower(lambda x: _launch.launch(double_kernel, x, out_shape=out, grid=(256,), implementation="triton",
                                   num_warps=4, N=512), x)
    return CONSTRUCTED[-1]


if __name__ == "__main__":
    main()
