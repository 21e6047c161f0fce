"""The lightning indexer: the jnp reference against float64 NumPy loops, the "fp8_paged" key format against
hand-built bytes, the Triton kernels (scores and the radix-select top-k) in Triton's interpreter against the
reference, the projections of a V3.2 layer against an independent NumPy forward (and transformers'
DeepseekV32Indexer where it is installed), the kernels compiled for sm_90, and GPU tests at row I1's size.

Top-k tests draw integer-valued queries, keys and dyadic weights: every product and sum is exact in float32, so
kernels and reference compute the same scores bit for bit and the selected set is defined, ties included (there
are many, which is what the tie rule needs). FP8 tests use random floats and check the margin first."""
import dataclasses
import inspect
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import triton
import triton.language as tl

import flashmla_jax as fm
from flashmla_jax import fp8, indexer_math, reference
from flashmla_jax.kernels import _compile
from flashmla_jax.kernels import indexer as kernels
from flashmla_jax.ops import _launch
from flashmla_jax.ops import indexer as ix
from _util import rel_err, run_python

E4M3 = ml_dtypes.float8_e4m3fn
D = 128


def _rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------- NumPy ground truth


def scores_numpy(q, w, keys, seqlens):
    """float64 loop: q [B, S_q, H, D], w [B, S_q, H], keys [B, N, D] -> [B, S_q, N], -inf past each causal limit."""
    q, w, keys = (np.asarray(a, np.float64) for a in (q, w, keys))
    b_, s_q, h_, _ = q.shape
    n = keys.shape[1]
    out = np.full((b_, s_q, n), -np.inf)
    for b in range(b_):
        seqlen = int(np.clip(seqlens[b], 0, n))
        for s in range(s_q):
            for t in range(max(seqlen - s_q + s + 1, 0)):
                out[b, s, t] = sum(w[b, s, h] * max(float(q[b, s, h] @ keys[b, t]), 0.0) for h in range(h_))
    return out


def topk_numpy(scores, seqlens, topk):
    """[B, S_q, N] scores -> positions [B, S_q, topk]: best first by (score desc, position asc), listed in
    ascending position order, -1 padded."""
    b_, s_q, n = scores.shape
    out = np.full((b_, s_q, topk), -1, np.int64)
    for b in range(b_):
        for s in range(s_q):
            limit = max(int(np.clip(seqlens[b], 0, n)) - s_q + s + 1, 0)
            row = np.asarray(scores[b, s, :limit], np.float64)
            order = np.lexsort((np.arange(limit), -row))[:topk]
            out[b, s, :len(order)] = np.sort(order)
    return out


def pool_indices(positions, table, page_size, n):
    """Positions [B, S_q, K] (-1 kept) -> pool indices through a block table (None: b * n + t)."""
    b_idx = np.arange(positions.shape[0])[:, None, None]
    safe = np.maximum(positions, 0)
    if table is None:
        pool = b_idx * n + safe
    else:
        pool = np.asarray(table)[b_idx, safe // page_size] * page_size + safe % page_size
    return np.where(positions >= 0, pool, -1)


def to_pages(keys, page_size, rng, fill=np.nan, seqlens=None):
    """[B, N, D] -> (pool [B * N / page_size + 2, page_size, D], block table [B, N / page_size], unused
    [num_pages, page_size] bool) in shuffled page order; the spare pages, and tokens past each length, hold `fill`
    (`unused` marks them); table entries past each length are garbage (out of range, or a spare page)."""
    b, n, d = keys.shape
    per_seq = n // page_size
    num_pages = b * per_seq + 2
    perm = rng.permutation(num_pages)[: b * per_seq].reshape(b, per_seq)
    seqlens = np.full(b, n) if seqlens is None else np.asarray(seqlens)
    past = np.arange(n)[None, :] >= seqlens[:, None]
    keys = np.where(past[..., None], fill, np.asarray(keys, np.float32))
    pool = np.full((num_pages, page_size, d), fill, np.float32)
    pool[perm.reshape(-1)] = keys.reshape(b * per_seq, page_size, d)
    unused = np.ones((num_pages, page_size), bool)
    unused[perm.reshape(-1)] = past.reshape(b * per_seq, page_size)
    spare = np.setdiff1d(np.arange(num_pages), perm)
    table = perm.copy()
    for i, sl in enumerate(seqlens):
        used = -(-max(int(sl), 0) // page_size)
        table[i, used:] = rng.choice([-7, 10 ** 6, int(spare[0])], size=per_seq - used)
    return pool, table.astype(np.int32), unused


def poison_fp8_tokens(packed, unused):
    """uint8 "fp8_paged" pages [num_pages, P * 132] with the codes and scales of `unused` tokens set to 0xFF
    (e4m3 NaN, a NaN scale)."""
    p = unused.shape[1]
    packed = np.array(packed)
    packed[:, :p * D][np.repeat(unused, D, axis=1)] = 0xFF
    packed[:, p * D:][np.repeat(unused, 4, axis=1)] = 0xFF
    return packed


def integer_inputs(rng, b, s_q, h, n, lo=-3, hi=3):
    """Integer-valued q, keys in [lo, hi] and weights in multiples of 1/8: exact float32 scores, many ties."""
    q = rng.integers(lo, hi + 1, (b, s_q, h, D)).astype(np.float32)
    keys = rng.integers(lo, hi + 1, (b, n, D)).astype(np.float32)
    w = (rng.integers(-4, 9, (b, s_q, h)) / 8).astype(np.float32)
    return q, w, keys


def small_tiles(**kw) -> ix.IndexerTiles:
    """Tiles small enough that a short cache spans several score splits and several top-k chunks."""
    tiles = ix.IndexerTiles(block_n=32, split=64, num_warps=4, num_stages=2, chunk=64, tile=32)
    return dataclasses.replace(tiles, **kw)


# ---------------------------------------------------------------- tier 1: reference


@pytest.mark.parametrize("s_q", [1, 3])
def test_reference_scores_match_numpy_loop(request, s_q):
    rng = _rng(request)
    seqlens = np.array([0, 1, 37, 64, -4, 99], np.int32)              # empty, one, ragged, full, negative, past N
    q = rng.standard_normal((6, s_q, 3, 16)).astype(np.float32)
    w = rng.standard_normal((6, s_q, 3)).astype(np.float32)
    keys = rng.standard_normal((6, 64, 16)).astype(np.float32)
    got = reference.indexer_scores_reference(jnp.asarray(q), jnp.asarray(w), jnp.asarray(keys), jnp.asarray(seqlens))
    want = scores_numpy(q, w, keys, seqlens)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    assert rel_err(np.asarray(got)[finite], want[finite]) < 1e-6


def test_reference_scores_paged_ignore_nan_pages(request):
    rng = _rng(request)
    seqlens = np.array([5, 64, 33], np.int32)
    q = rng.standard_normal((3, 2, 4, 16)).astype(np.float32)
    w = rng.standard_normal((3, 2, 4)).astype(np.float32)
    keys = rng.standard_normal((3, 64, 16)).astype(np.float32)
    pool, table, _ = to_pages(keys, 16, rng, seqlens=seqlens)
    got = reference.indexer_scores_reference(jnp.asarray(q), jnp.asarray(w), jnp.asarray(pool), jnp.asarray(seqlens),
                                             jnp.clip(jnp.asarray(table), 0, pool.shape[0] - 1))
    want = scores_numpy(q, w, keys, seqlens)
    assert not np.any(np.isnan(got))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    assert rel_err(np.asarray(got)[finite], want[finite]) < 1e-6


def test_reference_topk_matches_numpy_with_ties_and_padding(request):
    rng = _rng(request)
    scores = rng.integers(-3, 4, (3, 2, 40)).astype(np.float32)        # many ties
    scores[0, 0, 5] = -0.0                                              # -0.0 ranks as +0.0
    seqlens = np.array([40, 9, 0], np.int32)
    limits = reference.visible_key_limits(jnp.asarray(seqlens), 40, 2, causal=True)
    for topk in (1, 8, 50):
        idx, vals = reference.indexer_topk_reference(jnp.asarray(scores), limits, topk)
        want = topk_numpy(scores, seqlens, topk)
        np.testing.assert_array_equal(idx, pool_indices(want, None, None, 40))
        picked = np.where(want >= 0, np.take_along_axis(scores, np.maximum(want, 0), -1), -np.inf)
        np.testing.assert_array_equal(vals, picked)


def test_reference_topk_pool_indices_through_a_block_table(request):
    rng = _rng(request)
    scores = rng.standard_normal((2, 1, 64)).astype(np.float32)
    table = rng.permutation(8).astype(np.int32).reshape(2, 4)
    limits = jnp.asarray([[64], [30]], jnp.int32)
    idx, _ = reference.indexer_topk_reference(jnp.asarray(scores), limits, 12, jnp.asarray(table), 16)
    want = topk_numpy(scores, np.array([64, 30]), 12)
    np.testing.assert_array_equal(idx, pool_indices(want, table, 16, 64))


ORDERED = np.array([-np.inf, -3e38, -1.0, -1e-30, -1e-45, -0.0, 0.0, 1e-45, 1e-30, 1.0, 3e38, np.inf], np.float32)


def test_order_keys_follow_the_float_order():
    keys = np.asarray(reference.index_order_keys(jnp.asarray(ORDERED)))
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    assert keys[5] == keys[6]                                             # -0.0 == +0.0
    assert np.all(np.diff(np.delete(keys, 5).astype(np.int64)) > 0)
    nans = np.array([np.nan, -np.nan, np.float32(np.nan) * -1], np.float32)
    nan_keys = np.asarray(reference.index_order_keys(jnp.asarray(nans)))
    assert np.all(nan_keys == nan_keys[0]) and nan_keys[0] > keys.max()


@triton.jit
def _order_keys_kernel(x_ptr, o_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(o_ptr + offs, kernels.order_keys(tl.load(x_ptr + offs)).to(tl.int32, bitcast=True))


def test_kernel_order_keys_equal_the_reference(request):
    x = np.concatenate([ORDERED, [np.nan, -np.nan], _rng(request).standard_normal(50).astype(np.float32)])
    x = np.pad(x, (0, 64 - x.size)).astype(np.float32)
    (got,) = _launch.launch(_order_keys_kernel, jnp.asarray(x), out_shape=[jax.ShapeDtypeStruct((64,), jnp.int32)],
                            grid=(1,), implementation="interpret", N=64)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), reference.index_order_keys(jnp.asarray(x)))


def test_histogram_bins_match_the_kernels():
    assert ix.HIST_BINS == (int(kernels.BINS1), int(kernels.BINS2), int(kernels.BINS3))
    assert np.log2(ix.HIST_BINS).sum() == 32 and int(kernels.SHIFT1) == 21 and int(kernels.SHIFT2) == 10


# ---------------------------------------------------------------- tier 1: the "fp8_paged" key format


def _np_fp8_pages(keys):
    """[..., P, 128] float -> uint8 [..., P * 132] built by hand: each page's e4m3 bytes, then its little-endian
    float32 scales (scale = max(amax · fl(1/448), 2^-126), codes x · fl(1/scale) clipped, nearest even)."""
    keys = np.asarray(keys, np.float32)
    scales = np.maximum(np.abs(keys).max(-1) * np.float32(1 / 448), np.float32(fp8.SCALE_FLOOR)).astype(np.float32)
    codes = np.clip(keys * (np.float32(1) / scales[..., None]), -448, 448).astype(E4M3).view(np.uint8)
    lead, p = keys.shape[:-2], keys.shape[-2]
    return np.concatenate([codes.reshape(*lead, p * D), scales.astype("<f4").view(np.uint8).reshape(*lead, p * 4)], -1)


def test_fp8_pages_match_hand_built_bytes(request):
    rng = _rng(request)
    keys = rng.standard_normal((3, 16, D)).astype(np.float32) * (10.0 ** rng.uniform(-3, 3, (3, 16, 1)))
    keys[1, 4] = 0.0                                                     # an all-zero token: the floor scale
    packed = np.asarray(fm.quantize_index_keys(jnp.asarray(keys)))
    assert packed.shape == (3, 16 * 132) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, _np_fp8_pages(keys))
    scales = packed[:, 16 * D:].copy().view("<f4")                         # where the layout says
    assert scales[1, 4] == np.float32(fp8.SCALE_FLOOR) and not packed[1, 4 * D:5 * D].any()
    np.testing.assert_allclose(scales[0], np.abs(keys[0]).max(-1) / 448, rtol=2.0 ** -22)


def test_fp8_pages_dequantize_a_deepgemm_buffer(request):
    """A DeepGEMM-style paged buffer assembled byte by byte (arbitrary non-NaN codes, positive scales) reads
    back as e4m3 · scale, token by token."""
    rng = _rng(request)
    codes = rng.integers(0, 256, (2, 64, D), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x21
    scales = (10.0 ** rng.uniform(-4, 2, (2, 64))).astype(np.float32)
    buf = np.concatenate([codes.reshape(2, -1), scales.astype("<f4").view(np.uint8).reshape(2, -1)], -1)
    got = np.asarray(fm.dequantize_index_keys(jnp.asarray(buf)))
    np.testing.assert_array_equal(got, codes.view(E4M3).astype(np.float32) * scales[..., None])
    assert fm.dequantize_index_keys(jnp.asarray(buf), dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_e4m3_lookup_matches_every_byte():
    """The lookup the reference reads its FP8 queries with (so that XLA keeps their rounding) gives ml_dtypes'
    value of each of the 256 bytes, jitted or not."""
    b = np.arange(256, dtype=np.uint8)
    want = b.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    for f in (fp8.e4m3_values_by_lookup, jax.jit(fp8.e4m3_values_by_lookup)):
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(b))), want)


def test_fp8_round_trip_and_token_quantization(request):
    rng = _rng(request)
    keys = rng.standard_normal((4, 32, D)).astype(np.float32)
    back = np.asarray(fm.dequantize_index_keys(fm.quantize_index_keys(jnp.asarray(keys))))
    amax = np.abs(keys).max(-1, keepdims=True)
    assert np.all(np.abs(back - keys) <= amax / 448 * 16 + 1e-30)      # half an e4m3 ulp at most (2^-4 relative)
    codes, scales = fp8.quantize_index_tokens(jnp.asarray(keys))
    pages = np.asarray(fm.quantize_index_keys(jnp.asarray(keys)))
    np.testing.assert_array_equal(np.asarray(codes).reshape(4, -1), pages[:, :32 * D])
    np.testing.assert_array_equal(np.asarray(scales).astype("<f4").view(np.uint8).reshape(4, -1), pages[:, 32 * D:])


def test_write_index_keys_places_tokens(request):
    """Tokens written one by one, in shuffled order, into zeroed pages give the pages quantized whole; the
    bf16 cache too; a block past the pool is dropped."""
    rng = _rng(request)
    keys = rng.standard_normal((3, 16, D)).astype(np.float32)
    order = rng.permutation(48)
    blocks, slots = jnp.asarray(order // 16, jnp.int32), jnp.asarray(order % 16, jnp.int32)
    tokens = jnp.asarray(keys.reshape(48, D)[order])
    write = jax.jit(fp8.write_index_keys, static_argnames="kv_format")
    packed = write(jnp.zeros((3, 16 * 132), jnp.uint8), tokens, blocks, slots, kv_format="fp8_paged")
    np.testing.assert_array_equal(packed, fm.quantize_index_keys(jnp.asarray(keys)))
    plain = write(jnp.zeros((3, 16, D), jnp.bfloat16), tokens, blocks, slots)
    np.testing.assert_array_equal(plain, jnp.asarray(keys).astype(jnp.bfloat16))
    dropped = write(packed, tokens[:1] * 2, jnp.asarray([3], jnp.int32), slots[:1], kv_format="fp8_paged")
    np.testing.assert_array_equal(dropped, packed)
    with pytest.raises(ValueError, match="pages"):
        fp8.write_index_keys(jnp.zeros((3, 100), jnp.uint8), tokens, blocks, slots, "fp8_paged")


def test_fp8_format_errors():
    with pytest.raises(ValueError, match="kv_format"):
        fm.quantize_index_keys(jnp.zeros((2, 4, D)), "fp8_blockscale")
    with pytest.raises(TypeError, match="kv_format"):
        fm.quantize_index_keys(jnp.zeros((2, 4, D)), 8)
    with pytest.raises(ValueError, match="nothing to"):
        fm.dequantize_index_keys(jnp.zeros((2, 132), jnp.uint8), None)
    with pytest.raises(ValueError, match="keys"):
        fm.quantize_index_keys(jnp.zeros((2, 4, 64)))
    with pytest.raises(TypeError, match="keys"):
        fm.quantize_index_keys(jnp.zeros((2, 4, D), jnp.int32))
    with pytest.raises(TypeError, match="packed"):
        fm.dequantize_index_keys(jnp.zeros((2, 132), jnp.int8))
    with pytest.raises(ValueError, match="132"):
        fm.dequantize_index_keys(jnp.zeros((2, 130), jnp.uint8))
    assert fp8.index_page_bytes(64) == 64 * 132


# ---------------------------------------------------------------- tier 2: kernels in the interpreter


def _case(rng, b, s_q, h, n, page_size, seqlens, kv_format, integer):
    """(args for the ops, float64 keys [B, N, D] as the reference should see them, block table or None)."""
    if integer:
        q, w, keys = integer_inputs(rng, b, s_q, h, n)
    else:
        q = rng.standard_normal((b, s_q, h, D)).astype(np.float32)
        w = rng.standard_normal((b, s_q, h)).astype(np.float32)
        keys = rng.standard_normal((b, n, D)).astype(np.float32)
    table = None
    if page_size:
        cache, table, unused = to_pages(keys, page_size, rng, seqlens=seqlens)
    else:
        cache, unused = keys, np.arange(n)[None, :] >= np.asarray(seqlens)[:, None]
        cache = np.where(unused[..., None], np.nan, cache)
    if kv_format:
        cache = np.asarray(fm.quantize_index_keys(jnp.asarray(np.nan_to_num(cache, nan=7.0)), kv_format))
        cache = poison_fp8_tokens(cache.reshape(-1, cache.shape[-1]), unused.reshape(cache.shape[0], -1))
    else:
        cache = cache.astype(ml_dtypes.bfloat16)
    q = q.astype(ml_dtypes.bfloat16)
    args = (jnp.asarray(q), jnp.asarray(w), jnp.asarray(cache), jnp.asarray(seqlens, jnp.int32),
            None if table is None else jnp.asarray(table))
    return args, keys, table


@pytest.mark.parametrize("kv_format,page_size,s_q,h", [(None, 16, 1, 16), (None, None, 3, 8), ("fp8_paged", 64, 2, 16),
                                                       ("fp8_paged", None, 1, 64)])
def test_scores_interpret_match_reference(request, kv_format, page_size, s_q, h):
    rng = _rng(request)
    seqlens = [0, 200, 256, 77]
    args, _, _ = _case(rng, 4, s_q, h, 256, page_size, seqlens, kv_format, integer=False)
    kw = dict(kv_format=kv_format)
    got = np.asarray(fm.indexer_scores(*args, implementation="interpret", **kw))
    want = np.asarray(fm.indexer_scores(*args, implementation="xla", **kw))
    assert got.shape == (4, s_q, 256) and got.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    assert finite.sum() > 0 and rel_err(got[finite], want[finite]) < 1e-5


@pytest.mark.parametrize("page_size,s_q,topk", [(16, 1, 24), (64, 3, 40), (None, 2, 300)])
def test_topk_interpret_exact_on_integer_scores(request, page_size, s_q, topk):
    """Exact float32 scores with many ties: the kernels' indices equal the float64 loop's, -1 padding included
    (topk 300 > every length), over several splits and chunks (small tiles) and across query chunks."""
    rng = _rng(request)
    seqlens = np.array([256, 0, 129, 40], np.int32)
    args, keys, table = _case(rng, 4, s_q, 16, 256, page_size, seqlens, None, integer=True)
    q, w = np.asarray(args[0], np.float32), np.asarray(args[1])
    want = pool_indices(topk_numpy(scores_numpy(q, w, keys, seqlens), seqlens, topk), table, page_size, 256)
    ref = fm.indexer_topk(*args, topk=topk, implementation="xla")
    np.testing.assert_array_equal(ref, want)
    got = fm.indexer_topk(*args, topk=topk, implementation="interpret")
    np.testing.assert_array_equal(got, want)
    tiles = small_tiles(query_chunk=2 if s_q > 1 else None)
    got_small, vals = jax.jit(lambda *a: ix.topk_with_tiles(tiles, *a, topk=topk, return_scores=True,
                                                            implementation="interpret"))(*args)
    np.testing.assert_array_equal(got_small, want)
    _, ref_vals = fm.indexer_topk(*args, topk=topk, return_scores=True, implementation="xla")
    np.testing.assert_array_equal(vals, ref_vals)


def test_topk_ties_straddle_chunks(request):
    """All keys equal: every score ties, so the top-k is the lowest positions, taken across chunk boundaries."""
    rng = _rng(request)
    q = jnp.asarray(rng.integers(1, 3, (2, 1, 16, D)), jnp.bfloat16)
    w = jnp.full((2, 1, 16), 0.5, jnp.float32)
    keys = jnp.ones((2, 256, D), jnp.bfloat16)
    seqlens = jnp.asarray([256, 200], jnp.int32)
    for topk in (70, 130):
        got = jax.jit(lambda *a: ix.topk_with_tiles(small_tiles(), *a, topk=topk, implementation="interpret"))(
            q, w, keys, seqlens)
        want = np.stack([np.arange(topk), 256 + np.arange(topk)])[:, None]
        np.testing.assert_array_equal(got, want)


def test_topk_fp8_interpret_matches_reference(request):
    rng = _rng(request)
    seqlens = np.array([256, 150, 3], np.int32)
    args, _, _ = _case(rng, 3, 2, 32, 256, 64, seqlens, "fp8_paged", integer=False)
    kw = dict(kv_format="fp8_paged", topk=48, return_scores=True)
    ref_idx, ref_vals = fm.indexer_topk(*args, implementation="xla", **kw)
    scores = np.asarray(fm.indexer_scores(*args, kv_format="fp8_paged", implementation="xla"))
    for row in scores.reshape(-1, 256):                                  # the set is well defined: a clear margin
        visible = np.sort(row[np.isfinite(row)])[::-1]
        if visible.size > 48:
            assert visible[47] - visible[48] > 1e-4 * np.abs(visible).max()
    idx, vals = fm.indexer_topk(*args, implementation="interpret", **kw)
    np.testing.assert_array_equal(idx, ref_idx)
    finite = np.isfinite(np.asarray(ref_vals))
    np.testing.assert_array_equal(np.isfinite(vals), finite)
    assert rel_err(np.asarray(vals)[finite], np.asarray(ref_vals)[finite]) < 1e-5


def test_stacked_layer_reads_its_layer(request):
    rng = _rng(request)
    seqlens = np.array([100, 256], np.int32)
    args, _, _ = _case(rng, 2, 1, 16, 256, 64, seqlens, "fp8_paged", integer=False)
    q, w, cache, sl, table = args
    stack = jnp.stack([jnp.full_like(cache, 0xFF), cache, jnp.zeros_like(cache)])
    kw = dict(kv_format="fp8_paged", topk=32)
    want = fm.indexer_topk(q, w, cache, sl, table, implementation="xla", **kw)
    np.testing.assert_array_equal(fm.indexer_topk(q, w, stack, sl, table, layer=1, implementation="interpret", **kw),
                                  want)
    traced = jax.jit(lambda i: fm.indexer_topk(q, w, stack, sl, table, layer=i, implementation="xla", **kw))
    np.testing.assert_array_equal(traced(jnp.int32(1)), want)
    with pytest.raises(ValueError, match="layer"):
        fm.indexer_topk(q, w, stack, sl, table, layer=3, **kw)


def _run_write_kernel_on_sentinels(args, topk, tiles):
    """The write kernel run by Triton's interpreter on outputs that start as 12345 / NaN (the interpreter's own
    poison for int outputs is -1, the padding value): returns (indices, scores) as the kernel left them."""
    import torch

    q, w, cache, sl, table = args
    layout = ix._layout(q, w, cache, sl, table, None, None)
    q_k, w_k = ix._kernel_inputs(q, w, None)
    b, s_q = q.shape[:2]
    scores, hist1 = ix._score_launch(q_k, w_k, cache, sl, table, None, 0, s_q, layout, tiles, "interpret", topk)
    steps = ix.plan_topk(b * s_q, s_q, s_q, layout, topk, tiles, True)
    thr, counts = ix.threshold_and_counts(steps, scores, hist1, sl, 0, "interpret")
    inputs = [_launch._to_torch(np.asarray(a)) for a in (scores, sl, sl if table is None else table, thr, counts)]
    idx = torch.full((b * s_q, topk), 12345, dtype=torch.int32)
    vals = torch.full((b * s_q, topk), float("nan"), dtype=torch.float32)
    step = steps["write"]
    with _launch._interpreting_jit_calls():
        _launch._interpreted(kernels.indexer_topk_write_kernel)[step.grid](*inputs, 0, idx, vals, **step.constexprs)
    return idx.numpy().reshape(b, s_q, topk), vals.numpy().reshape(b, s_q, topk)


def test_write_kernel_fills_every_slot(request):
    rng = _rng(request)
    seqlens = np.array([256, 5, 0], np.int32)
    args, keys, _ = _case(rng, 3, 1, 16, 256, None, seqlens, None, integer=True)
    idx, vals = _run_write_kernel_on_sentinels(args, 40, small_tiles())
    want = fm.indexer_topk(*args, topk=40, return_scores=True, implementation="xla")
    np.testing.assert_array_equal(idx, want[0])
    np.testing.assert_array_equal(vals, want[1])


@pytest.mark.no_gpu
def test_triton_needs_a_gpu(request):
    args, _, _ = _case(_rng(request), 2, 1, 16, 64, 16, np.array([64, 3], np.int32), None, integer=False)
    with pytest.raises(ValueError, match="triton"):
        fm.indexer_topk(*args, implementation="triton")


def test_op_errors(request):
    rng = _rng(request)
    args, _, _ = _case(rng, 2, 1, 16, 64, 16, np.array([64, 3], np.int32), None, integer=False)
    q, w, cache, sl, table = args
    with pytest.raises(ValueError, match="q must be"):
        fm.indexer_scores(q[0], w, cache, sl, table)
    with pytest.raises(ValueError, match="weights"):
        fm.indexer_scores(q, w[:, :, :3], cache, sl, table)
    with pytest.raises(TypeError, match="weights"):
        fm.indexer_scores(q, w.astype(jnp.int32), cache, sl, table)
    with pytest.raises(TypeError, match="k_cache"):
        fm.indexer_scores(q, w, cache.astype(jnp.float32), sl, table)
    with pytest.raises(ValueError, match="k_cache"):
        fm.indexer_scores(q, w, cache[..., :64], sl, table)
    with pytest.raises(TypeError, match="cache_seqlens"):
        fm.indexer_scores(q, w, cache, sl.astype(jnp.int16), table)
    with pytest.raises(TypeError, match="block_table"):
        fm.indexer_scores(q, w, cache, sl, table.astype(jnp.float32))
    with pytest.raises(ValueError, match="page_size"):
        fm.indexer_scores(q, w, cache[:, :12], sl, table)
    with pytest.raises(ValueError, match="contiguous"):
        fm.indexer_scores(q, w, cache, sl)
    with pytest.raises(ValueError, match="kv_format"):
        fm.indexer_scores(q, w, cache, sl, table, kv_format="fp8_blockscale")
    with pytest.raises(TypeError, match="uint8"):
        fm.indexer_scores(q, w, cache, sl, table, kv_format="fp8_paged")
    with pytest.raises(ValueError, match="k_cache"):
        fm.indexer_scores(q, w, jnp.zeros((5, 100), jnp.uint8), sl, table, kv_format="fp8_paged")
    with pytest.raises(ValueError, match="topk"):
        fm.indexer_topk(q, w, cache, sl, table, topk=0)
    with pytest.raises(TypeError, match="topk"):
        fm.indexer_topk(q, w, cache, sl, table, topk=2.0)
    with pytest.raises(TypeError, match="return_scores"):
        fm.indexer_topk(q, w, cache, sl, table, return_scores=1)
    with pytest.raises(ValueError, match="implementation"):
        fm.indexer_topk(q, w, cache, sl, table, implementation="cuda")
    wide = jnp.zeros((2, 1, 256, D), jnp.bfloat16)
    with pytest.raises(ValueError, match="index heads"):
        fm.indexer_scores(wide, jnp.zeros((2, 1, 256)), cache, sl, table, implementation="interpret")
    narrow = jnp.zeros((2, 1, 16, 64), jnp.bfloat16)
    narrow_keys = jnp.zeros((cache.shape[0], 16, 64), jnp.bfloat16)      # the same pages, 64 wide
    with pytest.raises(ValueError, match="D=128"):
        fm.indexer_scores(narrow, w, narrow_keys, sl, table, implementation="interpret")
    # The reference takes any head dim.
    assert fm.indexer_scores(narrow, w, narrow_keys, sl, table,
                             implementation="xla").shape == (2, 1, 64)


# ---------------------------------------------------------------- the V3.2 layer's indexer projections


def _projections_numpy(params, x, q_latent, positions, inv_freq):
    """float64: q_I [B, S, H, D], k_I [B, S, D], w [B, S, H] by the formulas, written out separately."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x, q_latent = np.asarray(x, np.float64), np.asarray(q_latent, np.float64)
    h, d = p["wq_b"].shape[1:]
    q = np.einsum("bsq,qhd->bshd", q_latent, p["wq_b"])
    k = x @ p["wk"]
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6) * p["k_norm"] + p["k_norm_bias"]
    half = len(inv_freq)
    ang = np.asarray(positions, np.float64)[..., None] * np.asarray(inv_freq, np.float64)    # [B, S, R/2]

    def rope(v, a):
        out = v.copy()
        for i in range(half):
            c, s = np.cos(a[..., i]), np.sin(a[..., i])
            out[..., i] = v[..., i] * c - v[..., i + half] * s
            out[..., i + half] = v[..., i + half] * c + v[..., i] * s
        return out

    q = rope(q, ang[:, :, None, :])
    k = rope(k, ang)
    w = x @ p["weights_proj"] / np.sqrt(h) / np.sqrt(d)
    return q, k, w


def _layer_inputs(rng, b=2, s=12, m=64, q_rank=32, h=4):
    params = indexer_math.init_indexer_params(jax.random.PRNGKey(int(rng.integers(1 << 30))), m, q_rank, h, D)
    params["k_norm"] = jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.float32)
    params["k_norm_bias"] = jnp.asarray(rng.standard_normal(D) * 0.1, jnp.float32)
    x = jnp.asarray(rng.standard_normal((b, s, m)), jnp.float32)
    q_latent = jnp.asarray(rng.standard_normal((b, s, q_rank)), jnp.float32)
    positions = jnp.asarray(np.arange(s)[None, :] + np.array([[0], [5]])[:b], jnp.int32)
    inv_freq = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    return params, x, q_latent, positions, inv_freq


def test_projections_match_numpy_forward(request):
    params, x, q_latent, positions, inv_freq = _layer_inputs(_rng(request))
    q, k, w = indexer_math.indexer_projections(params, x, q_latent, positions, inv_freq=inv_freq)
    want_q, want_k, want_w = _projections_numpy(params, x, q_latent, positions, inv_freq)
    assert q.shape == (2, 12, 4, D) and k.shape == (2, 12, D) and w.shape == (2, 12, 4) and w.dtype == jnp.float32
    for got, want in ((q, want_q), (k, want_k), (w, want_w)):
        assert rel_err(got, want) < 1e-5
    # The rotary features are the first 64: the last 64 are the projections as they are.
    np.testing.assert_allclose(np.asarray(k)[..., 64:], want_k[..., 64:], rtol=1e-4, atol=1e-5)


def test_projections_feed_the_topk_as_a_numpy_forward(request):
    """Layer-to-indices: the projections' keys in a contiguous cache, causal top-k over a prefill of 12 tokens."""
    params, x, q_latent, positions, inv_freq = _layer_inputs(_rng(request))
    q, k, w = indexer_math.indexer_projections(params, x, q_latent, positions, inv_freq=inv_freq)
    seqlens = np.array([12, 12], np.int32)
    got = fm.indexer_topk(q, w, k, jnp.asarray(seqlens), topk=5, implementation="xla")
    want_q, want_k, want_w = _projections_numpy(params, x, q_latent, positions, inv_freq)
    scores = scores_numpy(want_q, want_w, want_k, seqlens)
    for row in scores.reshape(-1, 12):
        vis = np.sort(row[np.isfinite(row)])[::-1]
        if vis.size > 5:
            assert vis[4] - vis[5] > 1e-4 * np.abs(vis).max()
    np.testing.assert_array_equal(got, pool_indices(topk_numpy(scores, seqlens, 5), None, None, 12))


def test_hadamard_rotation_keeps_scores(request):
    h = indexer_math.hadamard_matrix(D)
    np.testing.assert_allclose(h @ h.T, np.eye(D), atol=1e-6)
    i, j = np.meshgrid(np.arange(D), np.arange(D), indexing="ij")
    sign = np.vectorize(lambda v: bin(v).count("1") % 2)(i & j)
    np.testing.assert_array_equal(np.sign(h), np.where(sign, -1.0, 1.0))
    params, x, q_latent, positions, inv_freq = _layer_inputs(_rng(request))
    plain = indexer_math.indexer_projections(params, x, q_latent, positions, inv_freq=inv_freq)
    rotated = indexer_math.indexer_projections(params, x, q_latent, positions, inv_freq=inv_freq, rotate=True)
    seqlens = jnp.asarray([12, 12], jnp.int32)
    a = np.asarray(fm.indexer_scores(plain[0], plain[2], plain[1], seqlens, implementation="xla"))
    b = np.asarray(fm.indexer_scores(rotated[0], rotated[2], rotated[1], seqlens, implementation="xla"))
    finite = np.isfinite(a)
    assert rel_err(b[finite], a[finite]) < 1e-5
    assert not np.allclose(np.asarray(rotated[1]), np.asarray(plain[1]))


def test_projection_errors(request):
    params, x, q_latent, positions, inv_freq = _layer_inputs(_rng(request))
    kw = dict(inv_freq=inv_freq)
    with pytest.raises(ValueError, match="params lacks"):
        indexer_math.indexer_projections({k: v for k, v in params.items() if k != "wk"}, x, q_latent, positions, **kw)
    with pytest.raises(ValueError, match="weights_proj"):
        indexer_math.indexer_projections(dict(params, weights_proj=params["weights_proj"][:, :3]), x, q_latent,
                                         positions, **kw)
    with pytest.raises(ValueError, match="q_latent"):
        indexer_math.indexer_projections(params, x, q_latent[..., :8], positions, **kw)
    with pytest.raises(TypeError, match="positions"):
        indexer_math.indexer_projections(params, x, q_latent, positions.astype(jnp.float32), **kw)
    with pytest.raises(ValueError, match="rotary"):
        indexer_math.rope_half_split(jnp.zeros((1, 2, 32)), positions[:1, :2], inv_freq)


def test_projections_match_transformers_indexer(request):
    """transformers' DeepseekV32Indexer (transformers >= 5.2) with our weights selects the same keys."""
    transformers = pytest.importorskip("transformers", minversion="5.2")
    modeling = pytest.importorskip("transformers.models.deepseek_v32.modeling_deepseek_v32")
    import torch

    rng = _rng(request)
    params, x, q_latent, positions, inv_freq = _layer_inputs(rng, b=2, s=16, m=64, q_rank=32, h=4)
    positions = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    config = transformers.DeepseekV32Config(
        vocab_size=32, hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=64,
        qk_nope_head_dim=16, v_head_dim=16, index_n_heads=4, index_head_dim=D, index_topk=6, n_routed_experts=4,
        n_group=1, topk_group=1, num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    module = modeling.DeepseekV32Indexer(config, 0).float().eval()
    t = lambda a: torch.from_numpy(np.array(a, np.float32))       # noqa: E731
    with torch.no_grad():
        module.wq_b.weight.copy_(t(params["wq_b"]).reshape(32, -1).T)
        module.wk.weight.copy_(t(params["wk"]).T)
        module.k_norm.weight.copy_(t(params["k_norm"]))
        module.k_norm.bias.copy_(t(params["k_norm_bias"]))
        module.weights_proj.weight.copy_(t(params["weights_proj"]).T)
        position_ids = torch.from_numpy(np.asarray(positions, np.int64))
        rotary = modeling.DeepseekV32RotaryEmbedding(config)
        cos, sin = rotary(t(x), position_ids)
        mask = torch.tril(torch.ones(16, 16, dtype=torch.bool))[None].expand(2, 16, 16)
        kwargs = dict(hidden_states=t(x), q_resid=t(q_latent), position_embeddings=(cos, sin), attention_mask=mask,
                      position_ids=position_ids)
        accepted = inspect.signature(module.forward).parameters
        theirs = module(**{k: v for k, v in kwargs.items() if k in accepted}).numpy()
    q, k, w = indexer_math.indexer_projections(params, x, q_latent, positions,
                                               inv_freq=10000.0 ** (-np.arange(0, 64, 2) / 64))
    ours = np.asarray(fm.indexer_topk(q, w, k, jnp.asarray([16, 16], jnp.int32), topk=6, implementation="xla"))
    ours = ours.reshape(2, 16, 6) - 16 * np.arange(2)[:, None, None]
    for s in range(5, 16):                        # rows that see at least 6 keys (theirs pick masked keys otherwise)
        for b in range(2):
            assert sorted(theirs[b, s].tolist()) == ours[b, s].tolist(), (b, s)


# ---------------------------------------------------------------- compiled for sm_90 (CPU)


_COMPILE_SCRIPT = """
import json
from flashmla_jax.ops.indexer import hopper_facts
print(json.dumps([dict(kv_format=kv_format, name=name, stack=f.stack, shared=f.shared, hgmma=f.count("HGMMA"),
                       qgmma=f.count("QGMMA")) for kv_format in (None, "fp8_paged")
                  for name, f in hopper_facts(kv_format).items()]))
"""


def test_kernels_compile_for_sm90_without_spills():
    """Every launch of `indexer_topk` at row I1 (bf16 and fp8_paged keys), as the ops plan it, compiles for sm_90
    with no spills and within Hopper's 227 KB of shared memory, the scores on the wgmma units (bf16: HGMMA, FP8:
    QGMMA). In a fresh process: after Triton's interpreter has run a kernel, a process cannot compile it."""
    import json

    report = json.loads(run_python(_COMPILE_SCRIPT).strip().splitlines()[-1])
    assert [r["name"] for r in report] == ["scores", "threshold1", "refine2", "threshold2", "refine3", "threshold3",
                                           "count", "write"] * 2
    for use in report:
        assert use["stack"] == 0, use
        assert use["shared"] <= _compile.SHARED_MEMORY_LIMIT, use
        if use["name"] == "scores":
            assert use["qgmma" if use["kv_format"] else "hgmma"] > 0, use


# ---------------------------------------------------------------- tier 3: GPU at row I1's size


def _i1_inputs(kv_format, seed, b=64, n=131072, h=64, s_q=1, ragged=False):
    kq, kw, kk, kt, kl = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(kq, (b, s_q, h, D), jnp.bfloat16)
    w = jax.random.normal(kw, (b, s_q, h), jnp.float32) * (h * D) ** -0.5
    pages = jax.random.normal(kk, (b * n // 64, 64, D), jnp.bfloat16)
    if kv_format:
        pages = fm.quantize_index_keys(pages, kv_format)
    table = jax.random.permutation(kt, b * n // 64).astype(jnp.int32).reshape(b, n // 64)
    seqlens = (jax.random.randint(kl, (b,), 0, n + 1, jnp.int32) if ragged else jnp.full((b,), n, jnp.int32))
    return q, w, pages, seqlens, table


def _assert_topk_correct(idx, vals, ref_scores, table, topk, tol):
    """A valid top-k: as many picks as visible keys (up to topk), the picked scores equal the reference's at those
    keys, and none below the reference's topk-th best score by more than tol (near-ties may swap)."""
    idx, vals = np.asarray(idx).reshape(-1, topk), np.asarray(vals).reshape(-1, topk)
    ref_scores = np.asarray(ref_scores)
    b_, s_q, n = ref_scores.shape
    inverse = np.full(int(np.asarray(table).max()) + 1, -1, np.int64)
    inverse[np.asarray(table).reshape(-1)] = np.arange(np.asarray(table).size)
    for r, (row_idx, row_vals) in enumerate(zip(idx, vals)):
        b = r // s_q
        visible = np.isfinite(ref_scores[b, r % s_q])
        taken = row_idx >= 0
        assert taken.sum() == min(topk, visible.sum())
        assert np.all(row_idx[taken.sum():] == -1)
        if not visible.any():            # a query that sees no key: nothing picked (checked above), no scores
            continue
        blocks = inverse[row_idx[taken] // 64] - b * (n // 64)
        pos = blocks * 64 + row_idx[taken] % 64
        assert np.all(np.diff(pos) > 0)
        row = ref_scores[b, r % s_q]
        np.testing.assert_allclose(row_vals[taken], row[pos], rtol=tol, atol=tol * np.abs(row[visible]).max())
        if visible.sum() > topk:
            kth = np.sort(row[visible])[::-1][topk - 1]
            assert row[pos].min() >= kth - tol * np.abs(row[visible]).max()


# The GPU's FP8 score products accumulate in the FP8 wgmma's reduced-precision adder (IndexerTiles.fp8_acc_depth):
# 1.3e-4 relative error against float64 on the H200, bf16 keys 1e-6.
GPU_TOL = {None: 1e-4, "fp8_paged": 5e-4}


@pytest.mark.gpu
@pytest.mark.parametrize("kv_format", [None, "fp8_paged"])
def test_i1_scores_and_topk_on_gpu(kv_format):
    q, w, pages, seqlens, table = _i1_inputs(kv_format, seed=1)
    kw = dict(kv_format=kv_format)
    scores = fm.indexer_scores(q, w, pages, seqlens, table, implementation="triton", **kw)
    ref = fm.indexer_scores(q, w, pages, seqlens, table, implementation="xla", **kw)
    assert rel_err(scores, ref) < GPU_TOL[kv_format]
    idx, vals = fm.indexer_topk(q, w, pages, seqlens, table, topk=2048, return_scores=True, implementation="triton",
                                **kw)
    _assert_topk_correct(idx, vals, ref, table, 2048, GPU_TOL[kv_format])
    again = fm.indexer_topk(q, w, pages, seqlens, table, topk=2048, implementation="triton", **kw)
    np.testing.assert_array_equal(idx, again)                                 # deterministic


@pytest.mark.gpu
def test_ragged_mtp_garbage_pages_on_gpu():
    """S_q 2 (MTP), ragged lengths with 0 and short rows, NaN / 0xFF bytes in every page past the lengths."""
    for kv_format in (None, "fp8_paged"):
        q, w, pages, seqlens, table = _i1_inputs(kv_format, seed=2, b=16, n=16384, s_q=2, ragged=True)
        seqlens = seqlens.at[:3].set(jnp.asarray([0, 1, 2048], jnp.int32))
        poison = jnp.asarray(0xFF, jnp.uint8) if kv_format else jnp.asarray(jnp.nan, jnp.bfloat16)
        blocks = np.asarray(table)
        used = np.zeros(pages.shape[0], bool)
        for b, sl in enumerate(np.asarray(seqlens)):
            used[blocks[b, : -(-int(sl) // 64)]] = True
        pages = jnp.where(jnp.asarray(used).reshape((-1,) + (1,) * (pages.ndim - 1)), pages, poison)
        kw = dict(kv_format=kv_format)
        ref = fm.indexer_scores(q, w, pages, seqlens, table, implementation="xla", **kw)
        got = fm.indexer_scores(q, w, pages, seqlens, table, implementation="triton", **kw)
        finite = np.isfinite(np.asarray(ref))
        np.testing.assert_array_equal(np.isfinite(got), finite)
        assert rel_err(np.asarray(got)[finite], np.asarray(ref)[finite]) < GPU_TOL[kv_format]
        idx, vals = fm.indexer_topk(q, w, pages, seqlens, table, topk=2048, return_scores=True,
                                    implementation="triton", **kw)
        _assert_topk_correct(idx, vals, ref, table, 2048, GPU_TOL[kv_format])
