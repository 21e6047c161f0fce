"""The launch seam (flashmla_jax/ops/_launch.py and the jax-triton 0.3.1 hooks in ops/_jax_triton_hooks.py):
device-side tensor descriptors in Triton's interpreter, the jax-triton lowering of tl and Gluon kernels for
CUDA on this machine (a stand-in for jaxlib's GPU module, tests/jax_triton_lowering_checks.py), and the same
kernels under jit on the GPU."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashmla_jax.ops import _jax_triton_hooks as hooks
from flashmla_jax.ops._launch import launch
from _util import subprocess_env
from launch_kernels_for_checks import descriptor_scale_kernel, gluon_scale_kernel, helper_scale_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scale_through_descriptors(x, implementation):
    m, n = x.shape
    (y,) = launch(descriptor_scale_kernel, x, out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
                  grid=(m // 32, n // 64), implementation=implementation, M=m, N=n, BLOCK_M=32, BLOCK_N=64)
    return y


def _scale_with_gluon(x, scale, implementation):
    m, n = x.shape
    (y,) = launch(gluon_scale_kernel, x, np.float32(scale), out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)],
                  grid=(m // 64, n // 256), implementation=implementation, M=m, N=n, BLOCK_M=64, BLOCK_N=256)
    return y


def test_interpreter_runs_tensor_descriptors():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 128), jnp.float32)
    np.testing.assert_array_equal(_scale_through_descriptors(x, "interpret"), 2 * x)


def test_interpreted_kernels_leave_triton_language_as_it_was(monkeypatch, tmp_path):
    """After interpreted kernels that call @triton.jit helpers (the decode kernels'), a kernel compiled in the same
    process compiles: the interpreter's patches of triton.language are undone (Triton 3.6's interpreter alone
    leaves some of them bound to itself, and a Gluon compile then fails in code generation). The compile cache is
    a fresh folder, so the compile runs."""
    import flashmla_jax as fm
    from flashmla_jax.kernels import _compile

    q = jax.random.normal(jax.random.PRNGKey(3), (2, 1, 16, 576), jnp.float32)
    kv = jax.random.normal(jax.random.PRNGKey(4), (2, 128, 576), jnp.float32)
    out = fm.mla_decode(q, kv, jnp.asarray([128, 7], jnp.int32), num_splits=2, implementation="interpret")
    assert np.all(np.isfinite(np.asarray(out)))
    (y,) = launch(helper_scale_kernel, q.reshape(-1)[:64], out_shape=[jax.ShapeDtypeStruct((64,), jnp.float32)],
                  grid=(1,), implementation="interpret", N=64)
    np.testing.assert_array_equal(y, 2 * q.reshape(-1)[:64])
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compiled = _compile.compile_for_hopper(gluon_scale_kernel, dict(x_ptr="bf16", y_ptr="bf16"),
                                           dict(M=256, N=512, BLOCK_M=64, BLOCK_N=256), num_warps=4,
                                           scalar_types=dict(scale="fp32"))
    assert _compile.facts(compiled).count("UTMALDG") > 0


def test_interpreter_refuses_gluon_kernels():
    x = jnp.ones((64, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="Gluon kernel"):
        _scale_with_gluon(x, 2.0, "interpret")


def test_hooks_are_for_jax_triton_below_0_4():
    assert hooks.hooks_needed((0, 3, 1))
    assert not hooks.hooks_needed((0, 4, 0))
    assert not hooks.hooks_needed((1, 0))


def test_scratch_arguments_come_from_the_kernel_compiled_last():
    hooks._LAST_COMPILED.metadata = dict(name="k", scratch_size=256, scratch_align=128, num_warps=12)
    assert hooks.scratch_arguments("k", 8) == (12, dict(global_scratch_size=256, global_scratch_align=128))
    assert hooks.scratch_arguments("k", 8) == (8, {})                 # consumed: one kernel, one construction
    hooks._LAST_COMPILED.metadata = dict(name="other", scratch_size=256, scratch_align=128, num_warps=4)
    assert hooks.scratch_arguments("k", 8) == (8, {})                 # not the kernel being constructed
    hooks._LAST_COMPILED.metadata = dict(name="k", scratch_size=0, scratch_align=1, num_warps=None)
    assert hooks.scratch_arguments("k", 4) == (4, {})                 # no scratch: constructed as before


def test_jax_triton_lowers_gluon_and_tl_kernels_for_cuda():
    """The whole jax-triton path under jit, lowered for sm_90 here: what jaxlib's TritonKernel receives."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "jax_triton_lowering_checks.py")],
                         capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["hooks_needed"] and got["custom_call"]
    gluon = got["gluon"]
    # Built as Gluon (TMA in the PTX), launched with the compiled warp count (4 + a padded 1-warp partition)
    # that the PTX demands, and given the descriptors' global scratch (128 B each, two of them).
    assert gluon["name"] == "gluon_scale_kernel" and gluon["capability"] == 90 and gluon["tma"]
    assert gluon["num_warps"] == 8 and gluon["reqntid"] == 8 * 32
    assert gluon["global_scratch_size"] == 256
    tl_descriptors = got["tl_descriptors"]
    assert tl_descriptors["num_warps"] == 4 and tl_descriptors["global_scratch_size"] == 256
    plain = got["tl_plain"]
    assert plain["num_warps"] == 4 and "global_scratch_size" not in plain and not plain["tma"]


@pytest.mark.gpu
def test_gpu_tensor_descriptors_under_jit():
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 512), jnp.bfloat16)
    y = jax.jit(lambda x: _scale_through_descriptors(x, "triton"))(x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), 2 * np.asarray(x, np.float32))


@pytest.mark.gpu
def test_gpu_gluon_kernel_under_jit():
    x = jax.random.normal(jax.random.PRNGKey(2), (256, 512), jnp.bfloat16)
    y = jax.jit(lambda x: _scale_with_gluon(x, 0.5, "triton"))(x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), 0.5 * np.asarray(x, np.float32))
