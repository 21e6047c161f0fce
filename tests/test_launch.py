"""The launch seam: device-side tensor descriptors (TMA) through `launch`, in Triton's interpreter and on the
GPU (jax-triton 0.3.1 with the global-scratch hook, flashmla_jax/ops/_jax_triton_scratch.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
import triton.language as tl

from flashmla_jax.ops import _jax_triton_scratch as scratch
from flashmla_jax.ops._launch import launch


@triton.jit
def _descriptor_scale_kernel(x_ptr, y_ptr, M: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    """y = 2 x through device-side tensor descriptors: x, y [M, N], one [BLOCK_M, BLOCK_N] tile per program."""
    m, n = tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N
    src = tl.make_tensor_descriptor(x_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    dst = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    dst.store([m, n], src.load([m, n]) * 2)


def _scale_through_descriptors(x, implementation):
    m, n = x.shape
    (y,) = launch(_descriptor_scale_kernel, x, out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
                  grid=(m // 32, n // 64), implementation=implementation, M=m, N=n, BLOCK_M=32, BLOCK_N=64)
    return y


def test_interpreter_runs_tensor_descriptors():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 128), jnp.float32)
    np.testing.assert_array_equal(_scale_through_descriptors(x, "interpret"), 2 * x)


def test_scratch_arguments_come_from_the_kernel_compiled_last():
    scratch._LAST_COMPILED.metadata = dict(name="k", scratch_size=256, scratch_align=128, num_warps=12)
    assert scratch.scratch_arguments("k", 8) == (12, dict(global_scratch_size=256, global_scratch_align=128))
    assert scratch.scratch_arguments("k", 8) == (8, {})                 # consumed: one kernel, one construction
    scratch._LAST_COMPILED.metadata = dict(name="other", scratch_size=256, scratch_align=128, num_warps=4)
    assert scratch.scratch_arguments("k", 8) == (8, {})                 # not the kernel being constructed
    scratch._LAST_COMPILED.metadata = dict(name="k", scratch_size=0, scratch_align=1, num_warps=None)
    assert scratch.scratch_arguments("k", 4) == (4, {})                 # no scratch: constructed as before


@pytest.mark.gpu
def test_gpu_tensor_descriptors_under_jit():
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 512), jnp.bfloat16)
    y = jax.jit(lambda x: _scale_through_descriptors(x, "triton"))(x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), 2 * np.asarray(x, np.float32))
