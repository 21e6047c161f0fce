"""mla_decode: the jnp reference against a float64 NumPy loop (tier 1), the API's checks, and the Triton
kernels through Triton's interpreter on the CPU (tier 2). Tier 3 (full shapes on the GPU) is
tests/test_decode_gpu.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashmla_jax as fm
from flashmla_jax import reference
from flashmla_jax.ops.decode import choose_num_splits
from _util import attend_numpy, rel_err

TOL = {jnp.float32: 1e-3, jnp.bfloat16: 1e-2, jnp.float16: 1e-2}


def decode_numpy(q, kv, seqlens, head_dim_v, scale, causal):
    """float64 loop over (b, s, h): the definition, softmax(q · K^T * scale) over the visible keys times
    V = K[:, :head_dim_v]."""
    q = np.asarray(q, np.float64)
    kv = np.asarray(kv, np.float64)
    b_, s_q, h_, _ = q.shape
    out = np.zeros((b_, s_q, h_, head_dim_v))
    lse = np.full((b_, s_q, h_), -np.inf)
    for b in range(b_):
        n = int(np.clip(seqlens[b], 0, kv.shape[1]))
        for s in range(s_q):
            limit = max(n - s_q + s + 1, 0) if causal else n
            if limit == 0:
                continue
            for h in range(h_):
                out[b, s, h], lse[b, s, h], _ = attend_numpy(kv[b, :limit], q[b, s, h], scale, head_dim_v)
    return out, lse


def make_inputs(seed, b, s_q, h, d, n, dtype, seqlens):
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h, d), jnp.float32).astype(dtype)
    kv = jax.random.normal(kk, (b, n, d), jnp.float32).astype(dtype)
    return q, kv, jnp.asarray(seqlens, jnp.int32)


def to_pages(kv, page_size, seed):
    """[B, N, D] -> pages [B * N / page_size + 3, page_size, D] in shuffled order, NaN in the spare pages
    and past each sequence's length, and a block table with out-of-range entries past the used blocks."""
    b, n, d = kv.shape
    per_seq = n // page_size
    num_pages = b * per_seq + 3
    perm = np.random.default_rng(seed).permutation(num_pages)[: b * per_seq].reshape(b, per_seq)
    pages = np.full((num_pages, page_size, d), np.nan, np.float32)
    pages[perm.reshape(-1)] = np.asarray(kv, np.float32).reshape(b * per_seq, page_size, d)
    return jnp.asarray(pages).astype(kv.dtype), jnp.asarray(perm, jnp.int32)


# ---------------------------------------------------------------- tier 1: reference and API


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s_q", [1, 3])
def test_reference_matches_numpy_loop(causal, s_q):
    seqlens = [0, 1, 2, 37, 64, -4, 99]
    q, kv, sl = make_inputs(1, 7, s_q, 3, 48, 64, jnp.float32, seqlens)
    out, lse = reference.mla_decode_reference(q, kv, sl, head_dim_v=32, softmax_scale=0.3, causal=causal)
    want_out, want_lse = decode_numpy(q, kv, seqlens, 32, 0.3, causal)
    assert rel_err(out, want_out) < 1e-5
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], rtol=1e-5, atol=1e-5)
    assert not np.any(np.isnan(out))


def test_reference_paged_ignores_nan_pages():
    q, kv, sl = make_inputs(2, 3, 1, 4, 48, 64, jnp.float32, [5, 64, 33])
    pages, table = to_pages(kv, 16, seed=0)
    kv_nan = jnp.where(jnp.arange(64)[None, :, None] < sl[:, None, None], kv, jnp.nan)
    want = reference.mla_decode_reference(q, kv, sl, head_dim_v=32, softmax_scale=0.2)
    got = reference.mla_decode_reference(q, pages, sl, table, head_dim_v=32, softmax_scale=0.2)
    got_nan = reference.mla_decode_reference(q, kv_nan, sl, head_dim_v=32, softmax_scale=0.2)
    for g in (got, got_nan):
        np.testing.assert_allclose(g[0], want[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(g[1], want[1])


def test_default_implementation_on_cpu_is_xla():
    q, kv, sl = make_inputs(3, 2, 1, 4, 96, 32, jnp.float32, [7, 32])
    out = fm.mla_decode(q, kv, sl, head_dim_v=64)
    ref, _ = reference.mla_decode_reference(q, kv, sl, head_dim_v=64, softmax_scale=96 ** -0.5)
    assert out.shape == (2, 1, 4, 64) and out.dtype == q.dtype
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must be"),
    (lambda a: {**a, "q": a["q"].astype(jnp.int32)}, TypeError, "q must be float16"),
    (lambda a: {**a, "kv_cache": a["kv_cache"].astype(jnp.float16)}, TypeError, "kv_cache dtype"),
    (lambda a: {**a, "kv_cache": a["kv_cache"][..., :64]}, ValueError, "q is 96 wide but kv_cache's tokens are 64"),
    (lambda a: {**a, "kv_cache": a["kv_cache"][None]}, ValueError, "kv_cache must be"),
    (lambda a: {**a, "kv_cache": a["kv_cache"][:1]}, ValueError, "contiguous kv_cache"),
    (lambda a: {**a, "cache_seqlens": a["cache_seqlens"].astype(jnp.float32)}, TypeError, "cache_seqlens"),
    (lambda a: {**a, "cache_seqlens": a["cache_seqlens"][:1]}, ValueError, "cache_seqlens"),
    (lambda a: {**a, "head_dim_v": 96}, ValueError, "head_dim_v"),
    (lambda a: {**a, "num_splits": 0}, ValueError, "num_splits"),
    (lambda a: {**a, "num_splits": 2.0}, TypeError, "num_splits"),
    (lambda a: {**a, "num_splits": True}, TypeError, "num_splits"),
    (lambda a: {**a, "head_dim_v": 64.0}, TypeError, "head_dim_v"),
    (lambda a: {**a, "softmax_scale": "0.1"}, TypeError, "softmax_scale"),
    (lambda a: {**a, "implementation": 1}, TypeError, "implementation must be"),
    (lambda a: {**a, "num_splits": 257}, ValueError, "num_splits"),
    (lambda a: {**a, "implementation": "cuda"}, ValueError, "implementation must be"),
    pytest.param(lambda a: {**a, "implementation": "triton"}, ValueError, "need a CUDA GPU as JAX.s default backend", marks=pytest.mark.no_gpu),
    (lambda a: {**a, "block_table": jnp.zeros((2, 2), jnp.int32), "kv_cache": a["kv_cache"].reshape(4, 16, 96)[:, :12]},
     ValueError, "page_size"),
    (lambda a: {**a, "block_table": jnp.zeros((3, 2), jnp.int32)}, ValueError, "block_table"),
    (lambda a: {**a, "block_table": jnp.zeros((2, 2), jnp.int16)}, TypeError, "block_table"),
    (lambda a: {**a, "head_dim_v": 48, "implementation": "interpret"}, ValueError, "powers of two"),
])
def test_bad_input_raises(mutate, error, match):
    q, kv, sl = make_inputs(4, 2, 1, 4, 96, 32, jnp.float32, [7, 32])
    args = mutate(dict(q=q, kv_cache=kv, cache_seqlens=sl, head_dim_v=64))
    with pytest.raises(error, match=match):
        fm.mla_decode(**args)


def test_numpy_integer_arguments_are_accepted():
    q, kv, sl = make_inputs(5, 2, 1, 4, 96, 64, jnp.float32, [7, 64])
    want = fm.mla_decode(q, kv, sl, head_dim_v=64, num_splits=2, implementation="interpret")
    got = fm.mla_decode(q, kv, sl, head_dim_v=np.int64(64), num_splits=np.int64(2), softmax_scale=np.float32(96 ** -0.5),
                        implementation="interpret")
    np.testing.assert_array_equal(got, want)


def test_num_splits_heuristic():
    # One long sequence: split it across the SMs; a full batch: no split.
    assert choose_num_splits(1, 1, 65536, 64, 132) >= 32
    assert choose_num_splits(128, 1, 4096, 64, 132) == 1
    assert choose_num_splits(2, 1, 64, 64, 132) == 1          # never more splits than key blocks


def test_tile_classes():
    """Rows = S_q * H pick the tile class; float32 stops at 32-row tiles (a 64-row query tile and two key
    tiles of it are 288 KB of shared memory, over the H100's 227 KB); the wide-tile options only at 64."""
    from flashmla_jax.ops.decode import plan_decode

    def plan(s_q, dtype):
        return plan_decode((2, s_q, 16, 576), dtype, 512, True, (2, 1024, 576), None, None, 132).constexprs

    assert plan(1, jnp.bfloat16)["BLOCK_M"] == 16 and not plan(1, jnp.bfloat16)["UNCHAIN_SCORES"]
    wide = plan(8, jnp.bfloat16)
    assert wide["BLOCK_M"] == 64 and wide["UNCHAIN_SCORES"] and wide["SPLIT_MASKED"] and wide["LATE_ROW_SUM"]
    assert plan(8, jnp.float32)["BLOCK_M"] == 32 and not plan(8, jnp.float32)["LATE_ROW_SUM"]


# ---------------------------------------------------------------- tier 2: kernels in the interpreter

SMALL = dict(d=96, head_dim_v=64)                              # same kernel, 64 + 32 wide: fast to interpret


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_interpret_matches_reference(dtype, s_q, num_splits):
    seqlens = [0, 1, 70, 130, 2, 128]
    q, kv, sl = make_inputs(10 + s_q + num_splits, 6, s_q, 5, SMALL["d"], 130, dtype, seqlens)
    kw = dict(head_dim_v=SMALL["head_dim_v"], softmax_scale=0.25, return_lse=True)
    out, lse = fm.mla_decode(q, kv, sl, num_splits=num_splits, implementation="interpret", **kw)
    ref, ref_lse = fm.mla_decode(q, kv, sl, implementation="xla", **kw)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=2e-3, atol=2e-3)
    # seqlen 0: nothing visible, so out 0 and lse -inf (never NaN)
    assert np.all(np.asarray(out[0], np.float32) == 0) and np.all(np.isneginf(lse[0]))


def test_interpret_more_splits_than_blocks_and_noncausal():
    q, kv, sl = make_inputs(20, 3, 2, 16, SMALL["d"], 80, jnp.bfloat16, [3, 80, 17])
    for causal in (True, False):
        kw = dict(head_dim_v=SMALL["head_dim_v"], causal=causal, return_lse=True)
        out, lse = fm.mla_decode(q, kv, sl, num_splits=7, implementation="interpret", **kw)
        ref, ref_lse = fm.mla_decode(q, kv, sl, implementation="xla", **kw)
        assert rel_err(out, ref) < 1e-2
        np.testing.assert_allclose(lse, ref_lse, rtol=2e-3, atol=2e-3)


def test_interpret_many_splits_use_the_combine_kernel():
    """More splits than the split kernel merges itself (16): the separate combine kernel merges them."""
    from flashmla_jax.ops.decode import MAX_SPLITS_MERGED_IN_KERNEL

    splits = MAX_SPLITS_MERGED_IN_KERNEL + 4
    q, kv, sl = make_inputs(25, 2, 1, 2, SMALL["d"], 32 * splits, jnp.float32, [32 * splits, 300])
    kw = dict(head_dim_v=SMALL["head_dim_v"], return_lse=True)
    out, lse = fm.mla_decode(q, kv, sl, num_splits=splits, implementation="interpret", **kw)
    ref, ref_lse = fm.mla_decode(q, kv, sl, implementation="xla", **kw)
    assert rel_err(out, ref) < 1e-3
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-3, atol=1e-3)


def test_interpret_lengths_past_capacity_are_clamped():
    q, kv, sl = make_inputs(21, 2, 1, 4, SMALL["d"], 64, jnp.float32, [1000, -7])
    out = fm.mla_decode(q, kv, sl, head_dim_v=64, num_splits=2, implementation="interpret")
    ref = fm.mla_decode(q, kv, jnp.asarray([64, 0], jnp.int32), head_dim_v=64, implementation="xla")
    assert rel_err(out, ref) < 1e-3


@pytest.mark.parametrize("page_size", [16, 32])
def test_interpret_paged_with_nan_pages(page_size):
    q, kv, sl = make_inputs(22, 3, 2, 4, SMALL["d"], 64, jnp.bfloat16, [5, 64, 40])
    pages, table = to_pages(kv, page_size, seed=page_size)
    table = jnp.where(jnp.arange(table.shape[1])[None, :] * page_size < sl[:, None], table, 10 ** 6)
    out = fm.mla_decode(q, pages, sl, table, head_dim_v=64, num_splits=2, implementation="interpret")
    ref = fm.mla_decode(q, kv, sl, head_dim_v=64, implementation="xla")
    assert rel_err(out, ref) < 1e-2


def test_plan_names_the_split_outputs():
    """The split kernel's outputs by name: with a few splits the last one merges and only its arrival
    counters start at 0; with many the combine kernel reads the splits each sequence took."""
    from flashmla_jax.ops import decode as decode_ops

    few = decode_ops.plan_decode((2, 1, 4, SMALL["d"]), jnp.float32, 64, True, (2, 256, SMALL["d"]), None, 4, 132)
    assert few.split_outputs._fields == ("out", "lse", "o_part", "lse_part", "splits_taken", "arrivals")
    assert few.zeroed == ("arrivals",) and few.zeroed_outputs == (5,) and few.combine_grid is None
    assert few.split_outputs.arrivals.shape == (2 * few.grid[0],) and few.split_outputs.o_part.shape == (2, 4, 4, 64)
    many = decode_ops.plan_decode((2, 1, 4, SMALL["d"]), jnp.float32, 64, True, (2, 256, SMALL["d"]), None,
                                  decode_ops.MAX_SPLITS_MERGED_IN_KERNEL + 1, 132)
    assert many.zeroed == () and many.zeroed_outputs == () and many.combine_grid is not None
    assert many.split_outputs.splits_taken.shape == (2,) and many.split_outputs.arrivals.shape == (1,)


def test_tile_rules_are_static_asserts(monkeypatch):
    """A plan that breaks a tile rule the kernels document (here a key tile wider than a page, which would
    read the next page's rows) stops at the kernel's tl.static_assert instead of answering."""
    from flashmla_jax.ops import decode as decode_ops

    monkeypatch.setattr(decode_ops, "decode_tiles", lambda *args: decode_ops.DecodeTiles.with_defaults(16, 32, 4, 1))
    jax.clear_caches()              # traces planned with the real tiles must not be reused
    try:
        q, kv, sl = make_inputs(23, 2, 1, 4, SMALL["d"], 64, jnp.float32, [64, 20])
        pages, table = to_pages(kv, 16, seed=5)
        with pytest.raises(Exception, match="BLOCK_N <= PAGE_SIZE"):
            jax.block_until_ready(fm.mla_decode(q, pages, sl, table, head_dim_v=64, implementation="interpret"))
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("seqlens", [[0, 256, 37, 1, 190, 250, 70, 9, 130], [256] * 8 + [250],
                                     [-3, 10 ** 6, 64, 0, 129, 5, 256, 256, 33]],
                         ids=["ragged", "uniform", "clamped"])
@pytest.mark.parametrize("paged", [False, True])
def test_interpret_device_schedule(monkeypatch, seqlens, paged):
    """num_splits=None on a 12-SM GPU: a split cap above the static choice (1), so the kernels schedule
    from the lengths. Ragged: one or more splits per sequence, merged in place by the combine; uniform: one
    split each, written by the split kernel, which the combine leaves alone."""
    from flashmla_jax.ops import decode as decode_ops

    monkeypatch.setattr(decode_ops, "num_sms", lambda implementation: 12)
    plan = decode_ops.plan_decode((9, 1, 4, SMALL["d"]), jnp.float32, 64, True, (9, 256, SMALL["d"]), None,
                                  None, 12)
    assert plan.constexprs["BALANCE"] and plan.num_splits > 1 == plan.constexprs["UNIFORM_SPLITS"]
    q, kv, sl = make_inputs(24, 9, 1, 4, SMALL["d"], 256, jnp.float32, seqlens)
    kw = dict(head_dim_v=64, return_lse=True)
    ref, ref_lse = fm.mla_decode(q, kv, jnp.clip(sl, 0, 256), implementation="xla", **kw)
    if paged:
        kv, table = to_pages(kv, 32, seed=3)
        out, lse = fm.mla_decode(q, kv, sl, table, implementation="interpret", **kw)
    else:
        out, lse = fm.mla_decode(q, kv, sl, implementation="interpret", **kw)
    assert rel_err(out, ref) < 1e-3
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_interpret_wide_row_tiles(num_splits, causal):
    """S_q * H > 32 rows: 64-row tiles and the wide-tile options (scores split between warp groups,
    unmasked tiles then masked ones, late row sums). Two row tiles per sequence, the last one partly
    padding; lengths below S_q leave early rows with no key; tiles end mid-way and at the diagonal."""
    from flashmla_jax.ops import decode as decode_ops

    s_q, h = 20, 4
    plan = decode_ops.plan_decode((3, s_q, h, SMALL["d"]), jnp.bfloat16, SMALL["head_dim_v"], causal,
                                  (3, 200, SMALL["d"]), None, num_splits, 132)
    assert plan.constexprs["BLOCK_M"] == 64 and plan.grid[0] == 2
    assert plan.constexprs["UNCHAIN_SCORES"] and plan.constexprs["SPLIT_MASKED"] and plan.constexprs["LATE_ROW_SUM"]
    q, kv, sl = make_inputs(26 + (num_splits or 0), 3, s_q, h, SMALL["d"], 200, jnp.bfloat16, [200, 141, 7])
    kw = dict(head_dim_v=SMALL["head_dim_v"], causal=causal, return_lse=True)
    out, lse = fm.mla_decode(q, kv, sl, num_splits=num_splits, implementation="interpret", **kw)
    ref, ref_lse = fm.mla_decode(q, kv, sl, implementation="xla", **kw)
    assert rel_err(out, ref) < 1e-2
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=2e-3, atol=2e-3)


def test_interpret_deepseek_dims():
    """The real 512 + 64 latent with H = 16 heads and S_q = 2, paged at 64."""
    q, kv, sl = make_inputs(23, 2, 2, 16, 576, 128, jnp.bfloat16, [128, 71])
    kw = dict(softmax_scale=192 ** -0.5, return_lse=True)
    out, lse = fm.mla_decode(q, kv, sl, num_splits=2, implementation="interpret", **kw)
    ref, ref_lse = fm.mla_decode(q, kv, sl, implementation="xla", **kw)
    assert out.shape == (2, 2, 16, 512)
    assert rel_err(out, ref) < 1e-2
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-3, atol=2e-3)
    pages, table = to_pages(kv, 64, seed=1)
    out_paged = fm.mla_decode(q, pages, sl, table, implementation="interpret", **kw)[0]
    assert rel_err(out_paged, ref) < 1e-2


# ---------------------------------------------------------------- JAX transformations


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_vmap_folds_into_batch(implementation):
    v, b, n = 3, 2, 64
    kq, kk, kl = jax.random.split(jax.random.PRNGKey(30), 3)
    q = jax.random.normal(kq, (v, b, 1, 4, SMALL["d"]), jnp.float32)
    kv = jax.random.normal(kk, (v, b, n, SMALL["d"]), jnp.float32)
    sl = jax.random.randint(kl, (v, b), 0, n + 1, jnp.int32)
    decode = lambda q, kv, sl: fm.mla_decode(q, kv, sl, head_dim_v=64, num_splits=2,  # noqa: E731
                                             implementation=implementation, return_lse=True)
    out, lse = jax.vmap(decode)(q, kv, sl)
    for i in range(v):
        ref, ref_lse = fm.mla_decode(q[i], kv[i], sl[i], head_dim_v=64, implementation="xla", return_lse=True)
        assert rel_err(out[i], ref) < 1e-3
        np.testing.assert_allclose(lse[i], ref_lse, rtol=1e-3, atol=1e-3)
    # a shared (unbatched) cache under a batched query
    out_shared = jax.vmap(decode, in_axes=(0, None, None))(q, kv[0], sl[0])[0]
    for i in range(v):
        assert rel_err(out_shared[i], fm.mla_decode(q[i], kv[0], sl[0], head_dim_v=64, implementation="xla")) < 1e-3


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_vmap_paged(implementation):
    v, b, n, page = 2, 2, 64, 16
    kq, kk = jax.random.split(jax.random.PRNGKey(31))
    q = jax.random.normal(kq, (v, b, 1, 4, SMALL["d"]), jnp.float32)
    kv = jax.random.normal(kk, (v, b, n, SMALL["d"]), jnp.float32)
    sl = jnp.asarray([[64, 17], [3, 40]], jnp.int32)
    paged = [to_pages(kv[i], page, seed=i) for i in range(v)]
    pages = jnp.stack([p for p, _ in paged])
    tables = jnp.stack([t for _, t in paged])
    out = jax.vmap(lambda q, p, sl, t: fm.mla_decode(q, p, sl, t, head_dim_v=64, implementation=implementation)
                   )(q, pages, sl, tables)
    for i in range(v):
        assert rel_err(out[i], fm.mla_decode(q[i], kv[i], sl[i], head_dim_v=64, implementation="xla")) < 1e-3


def test_grad_raises_clear_error():
    q, kv, sl = make_inputs(32, 2, 1, 4, SMALL["d"], 32, jnp.float32, [7, 32])
    with pytest.raises(TypeError, match="inference-only"):
        jax.grad(lambda q: fm.mla_decode(q, kv, sl, head_dim_v=64).sum())(q)


def test_triton_takes_the_gluon_kernel_where_it_is_faster(monkeypatch):
    """On a Hopper GPU (faked here: the choice is static), "triton" runs the Gluon kernel for more than 32 query
    rows, for fewer unless the static schedule splits each sequence more than 8 ways, for fp8_blockscale caches with
    bf16 queries and for fp8_pertensor caches, the tl kernels otherwise; "gluon" runs it wherever it can and says
    why where it cannot."""
    from flashmla_jax.ops import _registry
    from flashmla_jax.ops import decode as ops

    monkeypatch.setattr(ops, "cuda_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(ops, "num_sms", lambda runner: 132)
    monkeypatch.setattr(_registry, "has_cuda_gpu", lambda: True)

    def chosen(b, s_q, h, n, page_size=None, dtype=jnp.bfloat16, kv_format=None, implementation="triton"):
        return ops.DECODE.select(implementation, ops.DecodeCall((b, s_q, h, 576), dtype, 512, page_size, kv_format, n))

    assert chosen(128, 1, 128, 4096).name == "gluon"                 # D5
    assert chosen(64, 2, 128, 8192).name == "gluon"                  # D6
    assert chosen(1, 1024, 16, 16384).name == "gluon"                # C1
    assert chosen(64, 1, 16, 16384).name == "gluon"                  # D2: two splits a sequence
    assert chosen(64, 1, 16, 16384, page_size=64).name == "gluon"    # D2-paged
    assert chosen(128, 1, 16, 4096).name == "gluon"                  # D1: one split
    assert chosen(128, 1, 16, 8192).name == "gluon"                  # D4's shape
    assert chosen(1, 1, 16, 65536).name == "triton"                  # D3: 128 splits
    assert chosen(128, 1, 128, 4096, page_size=16).name == "triton"  # pages below 64 tokens
    assert chosen(128, 1, 128, 4096, dtype=jnp.float32).name == "triton"
    assert chosen(128, 1, 128, 4096, kv_format="fp8_blockscale").name == "gluon"     # D5-fp8
    assert chosen(128, 1, 16, 4096, kv_format="fp8_blockscale").name == "gluon"      # D1-fp8: one split, still
    assert chosen(128, 1, 16, 4096, kv_format="fp8_pertensor").name == "gluon"
    assert chosen(128, 1, 16, 4096, dtype=jnp.float16, kv_format="fp8_pertensor").name == "gluon"
    assert chosen(128, 1, 128, 4096, dtype=jnp.float16, kv_format="fp8_blockscale").name == "triton"
    with pytest.raises(ValueError, match="fp8_blockscale caches with bfloat16 queries, not float16"):
        chosen(128, 1, 16, 4096, dtype=jnp.float16, kv_format="fp8_blockscale", implementation="gluon")
    assert chosen(128, 1, 16, 4096, implementation="gluon").name == "gluon"
    with pytest.raises(ValueError, match="implementation='gluon' cannot run this call: .*page_size 16 < 64.*'triton'"):
        chosen(128, 1, 128, 4096, page_size=16, implementation="gluon")
