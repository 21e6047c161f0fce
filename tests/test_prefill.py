"""mla_prefill: the jnp reference against a float64 NumPy loop and the API's checks (tier 1), the Triton
kernels forward and backward through Triton's interpreter (tier 2), full P1/P2 shapes on the GPU (tier 3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashmla_jax as fm
from flashmla_jax import reference
from flashmla_jax.ops.prefill import split_head_dim
from _util import rel_err

TOL = {jnp.float32: 1e-3, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}


def prefill_numpy(q, k, v, scale, causal, segment_ids=None):
    """float64 loop over (b, h, i): softmax(q_i · K^T * scale) V over the visible keys."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, s_, h_, _ = q.shape
    g = h_ // k.shape[2]
    out = np.zeros((b_, s_, h_, v.shape[-1]))
    lse = np.full((b_, s_, h_), -np.inf)
    for b in range(b_):
        for i in range(s_):
            keys = np.arange(s_)
            if causal:
                keys = keys[keys <= i]
            if segment_ids is not None:
                seg = np.asarray(segment_ids)[b]
                keys = keys[seg[keys] == seg[i]]
            if keys.size == 0:
                continue
            for h in range(h_):
                scores = k[b, keys, h // g] @ q[b, i, h] * scale
                m = scores.max()
                p = np.exp(scores - m)
                out[b, i, h] = p @ v[b, keys, h // g] / p.sum()
                lse[b, i, h] = m + np.log(p.sum())
    return out, lse


def make_inputs(seed, b, s, h, h_kv, d_qk, d_v, dtype, segments=None):
    kq, kk, kv, ko, ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(kq, (b, s, h, d_qk), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, h_kv, d_qk), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, h_kv, d_v), jnp.float32).astype(dtype)
    dout = jax.random.normal(ko, (b, s, h, d_v), jnp.float32).astype(dtype)
    seg = None
    if segments:
        # sorted random ids: runs of variable length, `segments` distinct values at most per row
        seg = jnp.sort(jax.random.randint(ks, (b, s), 0, segments), axis=1).astype(jnp.int32)
    return q, k, v, dout, seg


def grads(impl, q, k, v, dout, dlse, **kw):
    """(out, lse) and d(sum(out * dout) + sum(lse * dlse)) / d(q, k, v)."""
    def loss(q, k, v):
        out, lse = fm.mla_prefill(q, k, v, return_lse=True, implementation=impl, **kw)
        return (jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)) + jnp.sum(lse * dlse)), (out, lse)
    (_, (out, lse)), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, g


def reference_grads(q, k, v, dout, dlse, **kw):
    """The xla implementation on float32 copies of the inputs: the truth low-precision kernels are held to."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
    return grads("xla", *f32[:3], f32[3], dlse, **kw)


# ---------------------------------------------------------------- tier 1: reference and API


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h, h_kv, segments", [(4, 4, None), (4, 2, None), (2, 1, 3)])
def test_reference_matches_numpy_loop(causal, h, h_kv, segments):
    q, k, v, _, seg = make_inputs(1, 2, 19, h, h_kv, 48, 32, jnp.float32, segments)
    out, lse = reference.mla_prefill_reference(q, k, v, softmax_scale=0.3, causal=causal, segment_ids=seg)
    want_out, want_lse = prefill_numpy(q, k, v, 0.3, causal, seg)
    assert out.shape == (2, 19, h, 32) and lse.shape == (2, 19, h)
    assert rel_err(out, want_out) < 1e-5
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_default_implementation_on_cpu_is_xla_and_scale_default():
    q, k, v, _, _ = make_inputs(2, 1, 8, 2, 2, 48, 32, jnp.float32)
    out = fm.mla_prefill(q, k, v)
    want, _ = prefill_numpy(q, k, v, 48 ** -0.5, True)
    assert out.dtype == q.dtype and out.shape == (1, 8, 2, 32)
    assert rel_err(out, want) < 1e-5


def test_split_head_dim():
    assert split_head_dim(192) == (128, 64, False)
    assert split_head_dim(128) == (64, 64, False)
    assert split_head_dim(80) == (64, 16, False)
    assert split_head_dim(112) == (64, 64, True)
    assert split_head_dim(16) == (16, 16, True)
    assert split_head_dim(256) == (128, 128, False)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must be"),
    (lambda a: {**a, "q": a["q"].astype(jnp.int32)}, TypeError, "q must be float16"),
    (lambda a: {**a, "k": a["k"].astype(jnp.float16)}, TypeError, "k dtype"),
    (lambda a: {**a, "v": a["v"].astype(jnp.bfloat16)}, TypeError, "v dtype"),
    (lambda a: {**a, "k": a["k"][..., :32]}, ValueError, "k must be"),
    (lambda a: {**a, "k": a["k"][:, :, :3]}, ValueError, "k must be"),
    (lambda a: {**a, "k": a["k"][:, :5]}, ValueError, "k must be"),
    (lambda a: {**a, "v": a["v"][:, :, :2]}, ValueError, "v must be"),
    (lambda a: {**a, "segment_ids": jnp.zeros((2, 8), jnp.float32)}, TypeError, "segment_ids"),
    (lambda a: {**a, "segment_ids": jnp.zeros((2, 7), jnp.int32)}, ValueError, "segment_ids"),
    (lambda a: {**a, "softmax_scale": True}, TypeError, "softmax_scale"),
    (lambda a: {**a, "implementation": "cuda"}, ValueError, "implementation must be"),
    pytest.param(lambda a: {**a, "implementation": "triton"}, ValueError, "need a CUDA GPU as JAX.s default backend", marks=pytest.mark.no_gpu),
    (lambda a: {**a, "v": a["v"][..., :24], "implementation": "interpret"}, ValueError, "d_v"),
    (lambda a: {**a, "q": jnp.zeros((2, 8, 4, 272)), "k": jnp.zeros((2, 8, 4, 272)),
                "implementation": "interpret"}, ValueError, "d_qk"),
])
def test_bad_input_raises(mutate, error, match):
    q, k, v, _, _ = make_inputs(3, 2, 8, 4, 4, 48, 32, jnp.float32)
    args = mutate(dict(q=q, k=k, v=v))
    with pytest.raises(error, match=match):
        fm.mla_prefill(**args)


def test_plan_prefill():
    """The launch layout from static shapes alone: grids, warps, stages and constexprs of the four kernels,
    the tile table's choice, a `tiles` override of one kernel, and the interpreter's tiles."""
    import dataclasses

    from flashmla_jax.ops import prefill as prefill_ops

    shapes = ((2, 300, 16, 192), (2, 300, 4, 192), (2, 300, 4, 128))
    plan = prefill_ops.plan_prefill(*shapes, jnp.bfloat16, True, False, "triton")
    assert plan == prefill_ops.plan_prefill(*shapes, jnp.bfloat16, True, False, "triton")     # pure
    assert plan.implementation == "triton"
    assert (plan.fwd.grid, plan.fwd.num_warps, plan.fwd.num_stages) == ((3, 32), 8, 3)
    assert plan.fwd.constexprs == dict(S=300, H=16, H_KV=4, D_QK=192, QA=128, QB=64, QK_MASK_B=False, D_V=128,
                                       VA=64, VB=64, V_MASK_B=False, CAUSAL=True, HAS_SEG=False, PRECISE=False,
                                       BLOCK_M=128, BLOCK_N=64)
    assert plan.dkdv.grid == (3, 8) and plan.dkdv.constexprs["BLOCK_M"] == 64 and plan.dkdv.constexprs["BLOCK_N"] == 128
    assert plan.dq.grid == (3, 32) and plan.dq.constexprs["BLOCK_M"] == 128
    assert (plan.preprocess.grid, plan.preprocess.num_warps, plan.preprocess.num_stages) == ((5, 32), 4, 1)
    assert plan.preprocess.constexprs == dict(S=300, H=16, D_V=128, VA=64, VB=64, V_MASK_B=False, BLOCK_M=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fwd = plan.dq

    tiles = dataclasses.replace(prefill_ops.prefill_tiles("triton", jnp.bfloat16, 192, 128),
                                fwd=prefill_ops.KernelTiles(64, 32, 4, 2))
    own = prefill_ops.plan_prefill(*shapes, jnp.bfloat16, True, False, "triton", tiles=tiles)
    assert (own.fwd.grid, own.fwd.num_warps, own.fwd.num_stages) == ((5, 32), 4, 2)
    assert own.dkdv == plan.dkdv and own.dq == plan.dq and own.preprocess == plan.preprocess

    interp = prefill_ops.plan_prefill(*shapes, jnp.float32, False, True, "interpret")
    assert interp.fwd.constexprs["BLOCK_M"] == 32 and interp.preprocess.constexprs["BLOCK_M"] == 16
    assert interp.fwd.constexprs["PRECISE"] and interp.fwd.constexprs["HAS_SEG"] and not interp.fwd.constexprs["CAUSAL"]
    # float32 at 256 wide: the table's tiles trimmed to fit shared memory
    wide = prefill_ops.prefill_tiles("triton", jnp.float32, 256, 256)
    for kind in ("fwd", "dkdv", "dq"):
        t = getattr(wide, kind)
        assert prefill_ops._smem_bytes(kind, t.block_m, t.block_n, t.num_stages, 256, 256, 6) <= prefill_ops.SMEM_BUDGET


# ---------------------------------------------------------------- tier 2: kernels in the interpreter
# Interpreter tiles: forward 32 x 16, dK/dV 16 x 32, dQ 32 x 16; S = 45 / 70 leaves partial blocks.


def check_against_reference(seed, b, s, h, h_kv, d_qk, d_v, dtype, causal, segments=None, impl="interpret"):
    q, k, v, dout, seg = make_inputs(seed, b, s, h, h_kv, d_qk, d_v, dtype, segments)
    dlse = jax.random.normal(jax.random.PRNGKey(seed + 1000), (b, s, h), jnp.float32) * 0.1
    kw = dict(causal=causal, segment_ids=seg, softmax_scale=d_qk ** -0.5 * 1.3)
    out, lse, (dq, dk, dv) = grads(impl, q, k, v, dout, dlse, **kw)
    ref, ref_lse, (rq, rk, rv) = reference_grads(q, k, v, dout, dlse, **kw)
    tol = TOL[dtype]
    assert out.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
    errs = dict(out=rel_err(out, ref), dq=rel_err(dq, rq), dk=rel_err(dk, rk), dv=rel_err(dv, rv))
    assert all(e < tol for e in errs.values()), errs
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-3, atol=2e-3)
    return errs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_interpret_mla_dims(dtype, causal):
    """d_qk 192 = 128 + 64, d_v 128 = 64 + 64: the DeepSeek prefill dims, S not a multiple of any block."""
    check_against_reference(10, 1, 45, 2, 2, 192, 128, dtype, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_interpret_gqa_and_segments(causal):
    check_against_reference(20, 2, 70, 4, 2, 64, 32, jnp.bfloat16, causal, segments=4)


def test_interpret_gqa_fp32_masked_chunk_dims():
    """d_qk 112 = 64 + 64 with 16 columns masked, d_v 80 = 64 + 16; H = 3 query heads on 1 KV head."""
    check_against_reference(30, 1, 33, 3, 1, 112, 80, jnp.float32, True)


def test_interpret_tiny_dims_single_block():
    """d = 16 (the all-masked second chunk), S smaller than one block, segments in fp16."""
    check_against_reference(40, 2, 9, 2, 1, 16, 16, jnp.float16, True, segments=2)


# ---------------------------------------------------------------- tier 3: the GPU, full shapes


@pytest.mark.gpu
@pytest.mark.parametrize("name, b, s, h", [("P1", 1, 8192, 128), ("P2", 4, 4096, 16)])
def test_gpu_full_shapes(name, b, s, h):
    """Forward and grads at the benchmark shapes (bf16, causal, 192/128); the reference runs on 4 heads
    (heads are independent without GQA: the loss is a sum over heads)."""
    q, k, v, dout, _ = make_inputs(50, b, s, h, h, 192, 128, jnp.bfloat16)
    dlse = jnp.zeros((b, s, h), jnp.float32)
    out, _, (dq, dk, dv) = jax.jit(lambda *a: grads("triton", *a))(q, k, v, dout, dlse)
    sl = slice(0, 4)
    ref, _, (rq, rk, rv) = jax.jit(reference_grads)(q[:, :, sl], k[:, :, sl], v[:, :, sl], dout[:, :, sl],
                                                     dlse[:, :, sl])
    errs = dict(out=rel_err(out[:, :, sl], ref), dq=rel_err(dq[:, :, sl], rq), dk=rel_err(dk[:, :, sl], rk),
                dv=rel_err(dv[:, :, sl], rv))
    assert all(e < 1e-2 for e in errs.values()), (name, errs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, causal, h_kv, segments, s", [
    (jnp.bfloat16, False, 8, None, 1000),
    (jnp.float16, True, 2, 5, 777),
    (jnp.float32, True, 8, None, 515),
    (jnp.bfloat16, True, 8, 3, 2049),
])
def test_gpu_variants(dtype, causal, h_kv, segments, s):
    check_against_reference(60, 2, s, 8, h_kv, 192, 128, dtype, causal, segments, impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("d_qk, d_v, dtype, causal, h_kv, segments", [
    (128, 128, jnp.bfloat16, True, 4, None),
    (80, 48, jnp.bfloat16, True, 2, 3),
    (256, 256, jnp.bfloat16, False, 4, None),
    (64, 64, jnp.float32, True, 1, 2),
])
def test_gpu_other_dims(d_qk, d_v, dtype, causal, h_kv, segments):
    """Other tile classes (narrow, masked chunks, 256 wide with trimmed tiles, float32) on the GPU."""
    check_against_reference(70 + d_qk, 2, 300, 4, h_kv, d_qk, d_v, dtype, causal, segments, impl="triton")


def test_plan_follows_the_arrays_of_a_shard():
    """A partitioned call runs the kernels on shards with the plan made for the whole arrays: the launchers
    re-plan for the shapes they get (a stale grid over the global B * H would run past a shard's arrays)."""
    from flashmla_jax.ops import prefill as prefill_ops

    b, s, h, d = 4, 32, 4, 32
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.float32) for kk in keys)
    whole = prefill_ops.plan_prefill(q.shape, k.shape, v.shape, q.dtype, True, False, "interpret")
    shard = (slice(0, 2), slice(None), slice(2, 4))                      # half the batch, half the heads
    out, lse = prefill_ops._forward(q[shard], k[shard], v[shard], None, 0.3, whole)
    want, want_lse = reference.mla_prefill_reference(q[shard], k[shard], v[shard], softmax_scale=0.3, causal=True)
    assert rel_err(out, want) < 1e-3
    assert rel_err(lse.transpose(0, 2, 1), want_lse) < 1e-4
