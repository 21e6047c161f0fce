"""DeepSeek Sparse Attention: `mla_decode_sparse` and `mla_prefill_sparse`.

The jnp reference against a float64 NumPy loop; the Triton kernel in the interpreter and the "xla" path against
the reference (paged bf16 and fp8_blockscale pools whose unused pages and tokens hold NaN / inf garbage, -1 and
out-of-range indices, topk_length 0 and partial, duplicates, S_q > 1, H not a multiple of the row tile, split
index lists, jit, vmap, stacked pools); the kernels compiled for sm_90 (no spills, shared memory, wgmma); GPU
tests at DeepSeek sizes. Interpreted shapes use D_V 128 and D_R 64 (a 260-byte blockscale token)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashmla_jax as fm
from flashmla_jax import reference
from flashmla_jax.fp8 import dequantize_latent, latent_format, quantize_latent
from flashmla_jax.kernels import _compile
from flashmla_jax.ops import sparse as sparse_ops
from _util import attend_numpy, rel_err, run_python

D_V, D_R = 128, 64
D = D_V + D_R
FP8 = "fp8_blockscale"
FORMATS = (None, FP8)
INT_MIN, INT_MAX = -(2 ** 31), 2 ** 31 - 1


def _queries(seed, shape, dtype=jnp.bfloat16):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _latents(seed, shape):
    """float32 latents [..., D] with per-token magnitudes 0.1 .. 10."""
    kk, km = jax.random.split(jax.random.PRNGKey(seed))
    lat = jax.random.normal(kk, shape, jnp.float32)
    return lat * 10.0 ** jax.random.uniform(km, shape[:-1] + (1,), minval=-1.0, maxval=1.0)


def _garbage(kv_format, width, dtype):
    """One token of garbage: NaN / inf values (float pool), or 0xFF e4m3 NaN codes, infinite scales and NaN
    k_pe bytes (fp8_blockscale)."""
    if kv_format is None:
        token = np.full((width,), np.nan, np.float32)
        token[::3] = np.inf
        return token.astype(dtype)
    fmt = latent_format(kv_format, D_V if width < 656 else 512, D_R)
    token = np.full((width,), 0xFF, np.uint8)
    token[fmt.scale_offset:fmt.rope_offset] = np.tile(np.array([0, 0, 0x80, 0x7F], np.uint8), fmt.num_scales)
    return token


def _pool(lat, kv_format, used, dtype=jnp.bfloat16):
    """Latents [num_blocks, page_size, D] -> the pool in kv_format (None: dtype) with garbage in every token
    that `used` ([num_blocks, page_size] bool) marks unused."""
    packed = lat.astype(dtype) if kv_format is None else quantize_latent(lat, kv_format)
    data = np.array(packed)
    data[~np.asarray(used)] = _garbage(kv_format, data.shape[-1], data.dtype)
    return jnp.asarray(data)


def _indices(seed, shape, used, invalid_fraction=0.2):
    """int32 [..., topk] indices of used tokens (flat [N] bool), with about invalid_fraction of the slots -1 or
    out of range (N, huge, INT_MIN)."""
    rng = np.random.default_rng(seed)
    good = np.flatnonzero(np.asarray(used).reshape(-1))
    idx = rng.choice(good, size=shape)
    bad = rng.random(shape) < invalid_fraction
    junk = rng.choice(np.array([-1, -7, used.size, used.size + 5, INT_MAX, INT_MIN], np.int64), size=shape)
    return jnp.asarray(np.where(bad, junk, idx), jnp.int32)


def _decode_case(seed, b=2, s_q=2, h=4, num_blocks=6, page=16, topk=80, kv_format=None, dtype=jnp.bfloat16):
    """(q, pool, indices, used): pages 0 and 3 unused (garbage), a few unused tokens in the others."""
    lat = _latents(seed, (num_blocks, page, D))
    used = np.ones((num_blocks, page), bool)
    used[[0, 3]] = False
    used[1, page // 2:] = False
    pool = _pool(lat, kv_format, used, dtype)
    return _queries(seed + 1, (b, s_q, h, D), dtype), pool, _indices(seed + 2, (b, s_q, topk), used), used


def _check(got, want, tol=1e-2):
    out, lse = got[:2]
    ref, ref_lse = want[:2]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < tol
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=2e-3, atol=2e-3)


def _xla(q, pool, indices, topk_length=None, **kw):
    return fm.mla_decode_sparse(q, pool, indices, topk_length, head_dim_v=D_V, implementation="xla", **kw)


# ---------------------------------------------------------------- tier 1: the reference


def sparse_numpy(q, tokens, indices, topk_length, scale, d_v):
    """float64 loop: q [B, S_q, H, D], tokens [N, D] float64, indices [B, S_q, topk] -> (out, lse, max_logits)."""
    b, s_q, h, _ = q.shape
    n = tokens.shape[0]
    out = np.zeros((b, s_q, h, d_v))
    lse = np.full((b, s_q, h), -np.inf)
    mx = np.full((b, s_q, h), -np.inf)
    for i in range(b):
        length = indices.shape[-1] if topk_length is None else min(max(int(topk_length[i]), 0), indices.shape[-1])
        for s in range(s_q):
            keys = [int(t) for t in indices[i, s, :length] if 0 <= t < n]
            if not keys:
                continue
            for j in range(h):
                out[i, s, j], lse[i, s, j], mx[i, s, j] = attend_numpy(tokens[keys], q[i, s, j], scale, d_v)
    return out, lse, mx


@pytest.mark.parametrize("kv_format", FORMATS)
def test_reference_matches_numpy_loop(kv_format):
    """float32 queries (the FP8 pool dequantized to float32): the reference equals the loop to float32
    rounding, with -1 and out-of-range indices, duplicates, a partial and an empty topk_length."""
    q, pool, idx, _ = _decode_case(0, b=3, topk=40, kv_format=kv_format, dtype=jnp.float32)
    idx = idx.at[0, 0, :6].set(idx[0, 0, 7])                         # duplicates
    lengths = jnp.asarray([40, 17, 0], jnp.int32)
    out, lse, mx = reference.mla_sparse_reference(q, pool, idx, lengths, head_dim_v=D_V, softmax_scale=0.07,
                                                  kv_format=kv_format)
    flat = pool.reshape(-1, pool.shape[-1])
    tokens = flat if kv_format is None else dequantize_latent(flat, kv_format, dtype=jnp.float32)
    tokens = np.asarray(tokens, np.float64)
    want = sparse_numpy(np.asarray(q, np.float64), tokens, np.asarray(idx), np.asarray(lengths), 0.07, D_V)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mx, want[2], rtol=1e-5, atol=1e-5)
    assert np.all(out[2] == 0) and np.all(np.isneginf(lse[2])) and np.all(np.isneginf(mx[2]))


def test_duplicate_indices_count_once_per_slot():
    """[a, a, b] weighs token a twice: out = (2 e^s_a v_a + e^s_b v_b) / (2 e^s_a + e^s_b)."""
    q, pool, _, _ = _decode_case(1, b=1, s_q=1, h=4)
    a, b_ = 20, 37
    idx = jnp.asarray([[[a, a, b_] + [-1] * 13]], jnp.int32)
    flat = np.asarray(pool.reshape(-1, D), np.float64)
    qq = np.asarray(q, np.float64)[0, 0]
    s_a, s_b = qq @ flat[a] * 0.1, qq @ flat[b_] * 0.1                    # [H]
    w_a, w_b = 2 * np.exp(s_a), np.exp(s_b)
    want = (w_a[:, None] * flat[a, :D_V] + w_b[:, None] * flat[b_, :D_V]) / (w_a + w_b)[:, None]
    for impl in ("xla", "interpret"):
        out, lse = fm.mla_decode_sparse(q, pool, idx, softmax_scale=0.1, head_dim_v=D_V, implementation=impl)
        assert rel_err(out[0, 0], want) < 1e-2
        np.testing.assert_allclose(lse[0, 0], np.log(w_a + w_b), rtol=1e-4)


# ---------------------------------------------------------------- tier 2: the kernel in the interpreter


@pytest.mark.parametrize("kv_format", FORMATS)
def test_paged_pool_with_garbage(kv_format):
    """S_q 2; garbage pages and tokens, -1 and out-of-range indices, a partial topk_length: no NaN, equal to the
    reference; the xla path agrees too."""
    q, pool, idx, _ = _decode_case(2, kv_format=kv_format)
    lengths = jnp.asarray([80, 37], jnp.int32)
    want = reference.mla_sparse_reference(q, pool, idx, lengths, head_dim_v=D_V, softmax_scale=D ** -0.5,
                                          kv_format=kv_format)
    assert np.all(np.isfinite(np.asarray(want[0], np.float32)))
    for impl in ("interpret", "xla"):
        got = fm.mla_decode_sparse(q, pool, idx, lengths, kv_format=kv_format, head_dim_v=D_V, implementation=impl)
        _check(got, want)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_rows_without_a_valid_index(kv_format):
    """topk_length 0 for one sequence and all slots invalid for one query of the other: out 0, lse -inf."""
    q, pool, idx, _ = _decode_case(3, kv_format=kv_format, topk=24)
    idx = idx.at[1, 0].set(jnp.asarray([-1, INT_MAX, INT_MIN, 96] * 6, jnp.int32))
    lengths = jnp.asarray([0, 24], jnp.int32)
    out, lse = fm.mla_decode_sparse(q, pool, idx, lengths, kv_format=kv_format, head_dim_v=D_V,
                                    implementation="interpret")
    assert np.all(np.asarray(out[0], np.float32) == 0) and np.all(np.isneginf(lse[0]))
    assert np.all(np.asarray(out[1, 0], np.float32) == 0) and np.all(np.isneginf(lse[1, 0]))
    _check((out, lse), _xla(q, pool, idx, lengths, kv_format=kv_format))


@pytest.mark.parametrize("num_splits", [1, 3, 20])
def test_split_index_lists(num_splits):
    """Split-K over the index list: merged by the last split (3) or by the combine kernel (20 > 16); None
    (the planner's choice) splits these small grids too."""
    q, pool, idx, _ = _decode_case(4, s_q=1, topk=64 * 20)
    lengths = jnp.asarray([64 * 20, 300], jnp.int32)
    plan = sparse_ops.plan_sparse(q.shape, q.dtype, D_V, 64 * 20, pool.shape[0] * pool.shape[1], 0, None, num_splits,
                                  132)
    assert plan.num_splits == num_splits and (plan.combine_grid is not None) == (num_splits > 16)
    got = fm.mla_decode_sparse(q, pool, idx, lengths, head_dim_v=D_V, num_splits=num_splits,
                               implementation="interpret")
    _check(got, _xla(q, pool, idx, lengths))
    assert sparse_ops.plan_sparse(q.shape, q.dtype, D_V, 64 * 20, 96, 0, None, None, 132).num_splits > 1


@pytest.mark.parametrize("h,dtype", [(20, jnp.bfloat16), (72, jnp.bfloat16), (6, jnp.float16)])
def test_heads_not_a_multiple_of_the_tile(h, dtype):
    """H 20 (one 32-row tile), 72 (two 64-row tiles, the second partial), float16 H 6 (a 16-row tile)."""
    q, pool, idx, _ = _decode_case(5, b=1, s_q=2, h=h, topk=40, dtype=dtype)
    got = fm.mla_decode_sparse(q, pool, idx, head_dim_v=D_V, implementation="interpret")
    _check(got, _xla(q, pool, idx))


def test_float32_queries_are_exact():
    """float32 queries and pool: the interpreter equals the reference to float32 rounding. The two sum in
    different orders (torch on the CPU, XLA), so an output may differ by a few dozen float32 ulps of the largest
    output; a wrong key, weight or column differs by far more."""
    q, pool, idx, _ = _decode_case(6, s_q=1, topk=40, dtype=jnp.float32)
    got = fm.mla_decode_sparse(q, pool, idx, head_dim_v=D_V, implementation="interpret")
    want = _xla(q, pool, idx)
    ulps = 32 * np.finfo(np.float32).eps * float(np.max(np.abs(want[0])))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=ulps)


def test_flat_pool_and_deepseek_widths():
    """The real 512 + 64 latent (656-byte tokens), H 16, a flat [N, 656] pool equal to its paged view."""
    lat = _latents(7, (4, 64, 576))
    used = np.ones((4, 64), bool)
    used[2] = False
    pool = _pool(lat, FP8, used)
    q = _queries(8, (1, 2, 16, 576))
    idx = _indices(9, (1, 2, 128), used)
    want = fm.mla_decode_sparse(q, pool, idx, softmax_scale=192 ** -0.5, kv_format=FP8, implementation="xla")
    for p in (pool, pool.reshape(-1, 656)):
        got = fm.mla_decode_sparse(q, p, idx, softmax_scale=192 ** -0.5, kv_format=FP8, implementation="interpret")
        _check(got, want)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_jit_and_vmap(implementation):
    """Under jit; vmap over q and a batched pool (members' indices offset to their own tokens, invalid ones kept
    invalid), and over indices and topk_length with a shared pool."""
    q, pool, idx, used = _decode_case(10, s_q=1, topk=32, kv_format=FP8)
    call = lambda q, p, i, n: fm.mla_decode_sparse(q, p, i, n, kv_format=FP8, head_dim_v=D_V,  # noqa: E731
                                                   implementation=implementation)
    lengths = jnp.asarray([32, 11], jnp.int32)
    _check(jax.jit(call)(q, pool, idx, lengths), _xla(q, pool, idx, lengths, kv_format=FP8))
    pools = jnp.stack([pool, _pool(_latents(11, (6, 16, D)), FP8, used)])
    qs, idxs = jnp.stack([q, -q]), jnp.stack([idx, _indices(12, idx.shape, used)])
    lens = jnp.asarray([[32, 11], [5, 0]], jnp.int32)
    got = jax.vmap(call)(qs, pools, idxs, lens)
    got_shared = jax.vmap(call, in_axes=(None, None, 0, 0))(q, pool, idxs, lens)
    for m in range(2):
        _check((got[0][m], got[1][m]), _xla(qs[m], pools[m], idxs[m], lens[m], kv_format=FP8))
        _check((got_shared[0][m], got_shared[1][m]), _xla(q, pool, idxs[m], lens[m], kv_format=FP8))


@pytest.mark.parametrize("kv_format", FORMATS)
def test_stacked_pool(kv_format):
    """A stack [L, num_blocks, page_size, W] at a static layer, a traced one (jit; out of range clamped), under
    vmap over layers and under vmap over queries at one layer: equal to the layer's own pool."""
    cases = [_decode_case(20 + i, s_q=1, topk=32, kv_format=kv_format) for i in range(3)]
    q, _, idx, _ = cases[0]
    stack = jnp.stack([c[1] for c in cases])
    at = jax.jit(lambda i: fm.mla_decode_sparse(q, stack, idx, kv_format=kv_format, head_dim_v=D_V, layer=i,
                                                implementation="interpret"))
    for layer, want_layer in ((2, 2), (jnp.int32(1), 1)):
        got = fm.mla_decode_sparse(q, stack, idx, kv_format=kv_format, head_dim_v=D_V, layer=layer,
                                   implementation="interpret")
        _check(got, _xla(q, stack[want_layer], idx, kv_format=kv_format))
    _check(at(jnp.int32(7)), _xla(q, stack[2], idx, kv_format=kv_format))
    _check(at(jnp.int32(-3)), _xla(q, stack[0], idx, kv_format=kv_format))
    _check(_xla(q, stack, idx, kv_format=kv_format, layer=1), _xla(q, stack[1], idx, kv_format=kv_format))
    got = jax.vmap(lambda i: fm.mla_decode_sparse(q, stack, idx, kv_format=kv_format, head_dim_v=D_V, layer=i,
                                                  implementation="interpret"))(jnp.asarray([2, 0], jnp.int32))
    _check((got[0][0], got[1][0]), _xla(q, stack[2], idx, kv_format=kv_format))
    _check((got[0][1], got[1][1]), _xla(q, stack[0], idx, kv_format=kv_format))
    qs = jnp.stack([q, -q])                   # the layer shared by the members: the stack is read in place
    got = jax.vmap(lambda q: fm.mla_decode_sparse(q, stack, idx, kv_format=kv_format, head_dim_v=D_V, layer=1,
                                                  implementation="interpret"))(qs)
    for m in range(2):
        _check((got[0][m], got[1][m]), _xla(qs[m], stack[1], idx, kv_format=kv_format))


def test_return_lse_false_and_grad_raises():
    q, pool, idx, _ = _decode_case(30, s_q=1, topk=16)
    out = fm.mla_decode_sparse(q, pool, idx, head_dim_v=D_V, return_lse=False, implementation="xla")
    assert out.shape == (2, 1, 4, D_V)
    loss = lambda q: fm.mla_decode_sparse(q, pool, idx, head_dim_v=D_V, implementation="xla")[0].sum()  # noqa: E731
    with pytest.raises(TypeError, match="inference-only"):
        jax.grad(loss)(q.astype(jnp.float32).astype(jnp.bfloat16))


def test_decode_errors():
    q, pool, idx, _ = _decode_case(31, s_q=1, topk=16)
    fp8_pool = quantize_latent(pool.astype(jnp.float32), FP8)
    call = lambda **kw: fm.mla_decode_sparse(**{"q": q, "pool": pool, "indices": idx, "head_dim_v": D_V,  # noqa: E731
                                                "implementation": "xla", **kw})
    with pytest.raises(ValueError, match=r"q must be \[B, S_q, H, D\]"):
        call(q=q[0])
    with pytest.raises(TypeError, match="q must be float16"):
        call(q=q.astype(jnp.int32))
    with pytest.raises(TypeError, match="pool dtype"):
        call(pool=pool.astype(jnp.float32))
    with pytest.raises(TypeError, match="pool must be uint8"):
        call(kv_format=FP8)
    with pytest.raises(ValueError, match=r"pool must be \[num_blocks, page_size, 260\]"):
        call(pool=fp8_pool[..., :200], kv_format=FP8)
    with pytest.raises(ValueError, match=r"pool must be \[num_blocks, page_size, 192\] or \[N, 192\]"):
        call(pool=pool[None])
    with pytest.raises(ValueError, match="kv_format"):
        call(kv_format="fp8_pertensor")
    with pytest.raises(ValueError, match="kv_format"):
        call(kv_format="int8")
    with pytest.raises(ValueError, match=r"indices must be int32 \[B=2, S_q=1, topk\]"):
        call(indices=idx[0])
    with pytest.raises(TypeError, match="indices must be int32"):
        call(indices=idx.astype(jnp.int16))
    with pytest.raises(ValueError, match=r"topk_length must be int32 \[B=2\]"):
        call(topk_length=jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeError, match="topk_length must be int32"):
        call(topk_length=jnp.zeros((2,), jnp.float32))
    with pytest.raises(ValueError, match="head_dim_v"):
        call(head_dim_v=D)
    with pytest.raises(ValueError, match=r"layer must be an int \[0, 1\]"):
        call(pool=jnp.stack([pool, pool]), layer=2)
    with pytest.raises(ValueError, match=r"pool must be \[L, num_blocks"):
        call(pool=pool.reshape(-1, D)[0], layer=0)
    with pytest.raises(TypeError, match="layer"):
        call(pool=jnp.stack([pool, pool]), layer=1.0)
    with pytest.raises(ValueError, match="num_splits"):
        call(num_splits=0)
    with pytest.raises(ValueError, match="implementation"):
        call(implementation="cuda")
    with pytest.raises(ValueError, match="powers of two"):
        fm.mla_decode_sparse(jnp.zeros((2, 1, 4, 200), jnp.bfloat16), jnp.zeros((8, 200), jnp.bfloat16), idx,
                             head_dim_v=D_V, implementation="interpret")


# ---------------------------------------------------------------- sparse prefill


def _prefill_case(seed, t=6, h=4, n=70, topk=48, dtype=jnp.bfloat16):
    """(q [T, H, D], kv [N, D] with NaN garbage in its last 10 rows, indices [T, topk] into its first N - 10)."""
    used = np.arange(n) < n - 10
    kv = _pool(_latents(seed, (n, D)), None, used, dtype)
    return _queries(seed + 1, (t, h, D), dtype), kv, _indices(seed + 2, (t, topk), used), used


@pytest.mark.parametrize("h", [4, 20])
def test_prefill_against_reference_and_numpy(h):
    """out, max_logits (the scaled maximum) and lse against the float64 loop; a token with topk_length 0 and one
    with no valid slot give 0, -inf, -inf; the interpreter and xla agree."""
    q, kv, idx, _ = _prefill_case(40, h=h)
    idx = idx.at[1].set(-1)
    lengths = jnp.asarray([48, 48, 0, 5, 30, 47], jnp.int32)
    # topk_length is per token in prefill: the loop takes it as cut index rows.
    cut = np.where(np.arange(48)[None, :] < np.asarray(lengths)[:, None], np.asarray(idx), -1)
    want = [w[:, 0] for w in sparse_numpy(np.asarray(q, np.float64)[:, None], np.asarray(kv, np.float64),
                                           cut[:, None], None, 0.05, D_V)]
    for impl in ("xla", "interpret"):
        out, max_logits, lse = fm.mla_prefill_sparse(q, kv, idx, lengths, softmax_scale=0.05, head_dim_v=D_V,
                                                     implementation=impl)
        assert out.shape == (6, h, D_V) and out.dtype == q.dtype and max_logits.shape == lse.shape == (6, h)
        assert rel_err(out, want[0]) < 1e-2
        for row in (1, 2):
            assert np.all(np.asarray(out[row], np.float32) == 0)
            assert np.all(np.isneginf(lse[row])) and np.all(np.isneginf(max_logits[row]))
        ok = np.isfinite(want[1])
        np.testing.assert_allclose(np.asarray(lse)[ok], want[1][ok], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(np.asarray(max_logits)[ok], want[2][ok], rtol=2e-3, atol=2e-3)


def test_prefill_jit_vmap_errors_and_grad():
    q, kv, idx, used = _prefill_case(50)
    call = lambda q, kv, i: fm.mla_prefill_sparse(q, kv, i, head_dim_v=D_V, implementation="interpret")  # noqa: E731
    want = fm.mla_prefill_sparse(q, kv, idx, head_dim_v=D_V, implementation="xla")
    for got in (jax.jit(call)(q, kv, idx), [g[1] for g in jax.vmap(call)(jnp.stack([-q, q]),
                                                                         jnp.stack([kv, kv]),
                                                                         jnp.stack([idx, idx]))]):
        assert rel_err(got[0], want[0]) < 1e-2
        np.testing.assert_allclose(got[1], want[1], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(got[2], want[2], rtol=2e-3, atol=2e-3)
    bad = lambda **kw: fm.mla_prefill_sparse(**{"q": q, "kv": kv, "indices": idx, "head_dim_v": D_V,  # noqa: E731
                                                "implementation": "xla", **kw})
    with pytest.raises(ValueError, match=r"q must be \[T, H, D\]"):
        bad(q=q[None])
    with pytest.raises(ValueError, match=r"kv must be \[N, 192\]"):
        bad(kv=kv[None])
    with pytest.raises(TypeError, match="kv dtype"):
        bad(kv=kv.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"indices must be int32 \[T=6, topk\]"):
        bad(indices=idx[:, None])
    with pytest.raises(ValueError, match=r"topk_length must be int32 \[T=6\]"):
        bad(topk_length=jnp.zeros((2,), jnp.int32))
    with pytest.raises(TypeError, match="inference-only"):
        jax.grad(lambda q: bad(q=q)[0].astype(jnp.float32).sum())(q)


# ---------------------------------------------------------------- compiled for sm_90 (no GPU needed)


# (dtype, kv_format, H, prefill): the DSA rows (S1 / S3 H 128 / 64 FP8, SP), TP-sharded heads, other dtypes.
COMPILED = [("bfloat16", FP8, 128, False), ("bfloat16", None, 128, True), ("bfloat16", FP8, 16, False),
            ("bfloat16", FP8, 32, False), ("bfloat16", None, 32, False), ("float16", None, 128, False),
            ("float16", FP8, 128, False), ("float32", None, 128, False), ("float32", None, 16, False)]

# Run in a fresh process: Triton 3.6's interpreter leaves triton.language patched after a kernel calls @triton.jit
# helpers (InterpretedFunction.__call__ never restores its _patch_lang), and a kernel compiled afterwards in the same
# process fails to compile.
_COMPILE_SCRIPT = """
import json, os, sys
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import jax.numpy as jnp
import compile_report
from flashmla_jax.kernels import _compile
out = {}
for dtype, kv_format, h, prefill in json.loads(CONFIGS):
    compiled, plan = compile_report.compile_sparse_kernel((4096 if prefill else 128, 1, h, 2048, 1 << 22),
                                                          getattr(jnp, dtype), kv_format, prefill)
    facts = _compile.facts(compiled)
    out[repr((dtype, kv_format, h, prefill))] = dict(
        stack=facts.stack, shared=facts.shared, hgmma=facts.count("HGMMA"),
        wgmma_waits=facts.count("WARPGROUP.DEPBAR"), block_m=plan.constexprs["BLOCK_M"])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled_sparse_kernels():
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"ROOT = {root!r}\nCONFIGS = {json.dumps(COMPILED)!r}\n" + _COMPILE_SCRIPT
    return json.loads(run_python(code).strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,kv_format,h,prefill", COMPILED)
def test_kernel_compiles_for_sm90(compiled_sparse_kernels, dtype, kv_format, h, prefill):
    """As planned for each class: no spills, shared memory within Hopper's 227 KB, and 64-row tiles issue their
    wgmma without one wait each (ptxas serializes them when registers run out)."""
    usage = compiled_sparse_kernels[repr((dtype, kv_format, h, prefill))]
    assert usage["stack"] == 0, usage
    assert usage["shared"] <= _compile.SHARED_MEMORY_LIMIT, usage
    if usage["block_m"] == 64:
        assert usage["hgmma"] > 0 and usage["wgmma_waits"] < usage["hgmma"] // 4, usage


# ---------------------------------------------------------------- tier 3: the GPU, DeepSeek sizes


def test_triton_takes_the_gluon_sparse_kernel_on_hopper(monkeypatch):
    """On a Hopper GPU (faked: the choice is static) "triton" runs mla_decode_sparse on the Gluon kernel for more
    than 32 heads with a bf16 / fp16 pool or an fp8_blockscale one under bf16 queries, and so mla_prefill_sparse
    (with its max_logits); the tl kernel otherwise."""
    from flashmla_jax.ops import _registry
    from flashmla_jax.ops import sparse as ops

    monkeypatch.setattr(ops, "cuda_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(_registry, "has_cuda_gpu", lambda: True)

    def chosen(h, dtype=jnp.bfloat16, kv_format=None, with_max=False, registry=ops.SPARSE_DECODE):
        return registry.select("triton", ops.SparseCall((8, 1, h, 576), dtype, 512, kv_format, False, with_max)).name

    assert chosen(128, kv_format="fp8_blockscale") == "gluon"        # S1, S2
    assert chosen(64, kv_format="fp8_blockscale") == "gluon"         # S3
    assert chosen(128) == "gluon" and chosen(128, jnp.float16) == "gluon"
    assert chosen(16, kv_format="fp8_blockscale") == "triton"        # 16 heads: the tl kernel
    assert chosen(128, jnp.float16, "fp8_blockscale") == "triton"
    assert chosen(128, jnp.float32) == "triton"
    assert chosen(128, with_max=True, registry=ops.SPARSE_PREFILL) == "gluon"      # SP
    assert chosen(16, with_max=True, registry=ops.SPARSE_PREFILL) == "triton"


def _deepseek_decode(b, s_q, h, kv_format, context=32768, topk=2048, seed=0):
    """q [B, S_q, H, 576], a pool of B * context / 64 pages of 64 (plus a garbage page), indices into each
    sequence's own shuffled pages with a few -1 and out-of-range entries."""
    pages = b * context // 64
    lat = jax.random.normal(jax.random.PRNGKey(seed), (pages + 1, 64, 576), jnp.float32)
    used = np.ones((pages + 1, 64), bool)
    used[-1] = False
    pool = _pool(lat, kv_format, used)
    rng = np.random.default_rng(seed)
    table = rng.permutation(pages).reshape(b, context // 64)
    pos = np.stack([rng.choice(context, size=(s_q, topk), replace=True) for _ in range(b)])
    idx = np.take_along_axis(table[:, None, :], pos // 64, axis=2) * 64 + pos % 64
    idx[:, :, ::97] = -1
    idx[:, :, 5::211] = pool.shape[0] * 64 + 3
    return _queries(seed + 1, (b, s_q, h, 576)), pool, jnp.asarray(idx, jnp.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("b,s_q,h", [(16, 2, 128), (16, 1, 64), (8, 1, 16)])
@pytest.mark.parametrize("kv_format", FORMATS)
def test_gpu_sparse_decode(b, s_q, h, kv_format):
    """S1 / S3-like shapes at a smaller batch (and H 16, TP-sharded), triton vs xla, a partial topk_length."""
    q, pool, idx = _deepseek_decode(b, s_q, h, kv_format)
    lengths = jnp.asarray(np.linspace(0, 2048, b).astype(np.int32))
    kw = dict(softmax_scale=192 ** -0.5, kv_format=kv_format)
    got = fm.mla_decode_sparse(q, pool, idx, lengths, implementation="triton", **kw)
    want = fm.mla_decode_sparse(q, pool, idx, lengths, implementation="xla", **kw)
    _check(got, want)


@pytest.mark.gpu
def test_gpu_sparse_decode_stacked_under_jit():
    """A stacked FP8 pool read in place at a traced layer. The second layer holds the same pages in reverse
    order, its garbage page still last and unused (reversing the whole pool had put that page under the
    indices, so the rows that read it were rightly NaN)."""
    q, pool, idx = _deepseek_decode(8, 1, 128, FP8)
    stack = jnp.stack([pool, jnp.concatenate([pool[-2::-1], pool[-1:]])])
    f = jax.jit(lambda i: fm.mla_decode_sparse(q, stack, idx, kv_format=FP8, layer=i, implementation="triton"))
    for layer in (0, 1):
        want = fm.mla_decode_sparse(q, stack[layer], idx, kv_format=FP8, implementation="xla")
        assert np.isfinite(np.asarray(want[1])).all()
        _check(f(jnp.int32(layer)), want)


@pytest.mark.gpu
def test_gpu_sparse_prefill():
    """SP-like: T 512, H 128, top-k 2048 over 32K bf16 tokens."""
    t, n = 512, 32768
    kv = jax.random.normal(jax.random.PRNGKey(3), (n, 576), jnp.float32).astype(jnp.bfloat16)
    q = _queries(4, (t, 128, 576))
    idx = jnp.asarray(np.stack([np.random.default_rng(i).permutation(n)[:2048] for i in range(t)]), jnp.int32)
    idx = idx.at[:, ::101].set(-1)
    got = fm.mla_prefill_sparse(q, kv, idx, softmax_scale=192 ** -0.5, implementation="triton")
    want = fm.mla_prefill_sparse(q, kv, idx, softmax_scale=192 ** -0.5, implementation="xla")
    assert rel_err(got[0], want[0]) < 1e-2
    np.testing.assert_allclose(got[1], want[1], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got[2], want[2], rtol=2e-3, atol=2e-3)
