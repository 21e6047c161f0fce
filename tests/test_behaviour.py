"""One rule set for every implementation ("xla" and "interpret" here; "triton" and "gluon" under -m gpu):

  1. a NaN or inf in anything a row reads (its query, a key or V column it sees, the scale; an FP8 NaN code or
     scale in a token it sees) makes that row NaN, out and lse; unused slots and pages stay ignored;
  2. a block-table entry outside the pool, in a block a sequence uses, is a ValueError naming block_table when the
     values are concrete, and under jit NaN in the rows that would read it (never another page's data);
  3. empty batches, heads, queries and caches give empty or zero results; array-likes are accepted; a traced
     softmax_scale is a TypeError that names it; semantic checks (a positive scale) are the same everywhere; a limit
     only the kernels have says which implementation can run the call;
  4. error messages name the cause (q's width against the cache's; a uint8 cache without kv_format).
The clean exit of an interpreted sharded program is tests/test_sharding.py's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashmla_jax as fm
from _util import rel_err
from flashmla_jax.fp8 import latent_format

# NaN and inf are the inputs here: the interpreter's NumPy warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

IMPLS = ["xla", "interpret"]
D_V, D_R = 128, 64           # narrow latents keep the interpreter fast; the kernels' tiles are the same classes
D = D_V + D_R
SCALE = 0.1
PAGE = 32                    # the float32 key tile: a page holds exactly one


def _decode_inputs(seed=0, b=3, s_q=1, h=16, n=96, lengths=(70, 96, 0)):
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h, D), jnp.float32)
    kv = jax.random.normal(kk, (b, n, D), jnp.float32)
    return q, kv, jnp.asarray(lengths, jnp.int32)


def _decode(q, kv, lengths, table=None, impl="xla", **kw):
    kw = dict(dict(head_dim_v=D_V, softmax_scale=SCALE), **kw)
    return fm.mla_decode(q, kv, lengths, table, implementation=impl, return_lse=True, **kw)


def _nan_rows(out, lse) -> np.ndarray:
    """[...] bool: rows whose out is NaN in every column and whose lse is NaN."""
    return np.all(np.isnan(np.asarray(out, np.float32)), axis=-1) & np.isnan(np.asarray(lse))


def _assert_rows(got, clean, poisoned):
    """Rows where `poisoned` [...] are NaN (out and lse); every other row equals the clean result (NaN-free)."""
    out, lse = (np.asarray(x, np.float32) for x in got)
    ref, ref_lse = (np.asarray(x, np.float32) for x in clean)
    poisoned = np.broadcast_to(poisoned, lse.shape)
    assert not np.isnan(ref).any() and not np.isnan(ref_lse).any(), "the clean result holds NaN"
    np.testing.assert_array_equal(_nan_rows(out, lse), poisoned)
    np.testing.assert_allclose(out[~poisoned], ref[~poisoned], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse[~poisoned], ref_lse[~poisoned], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 1. NaN and inf propagate (decode)

# num_splits None: one split here; 3: merged by the last split in the kernel; 20: by the combine kernel.
SPLITS = [("xla", None), ("interpret", None), ("interpret", 3), ("interpret", 20)]


@pytest.mark.parametrize("impl, splits", SPLITS)
def test_nan_or_inf_in_a_query_reaches_its_row_only(impl, splits):
    q, kv, lengths = _decode_inputs(1)
    clean = _decode(q, kv, lengths, impl=impl, num_splits=splits)
    q = q.at[0, 0, 3, 7].set(jnp.nan).at[1, 0, 5, D_V + 2].set(jnp.inf).at[1, 0, 9, 0].set(-jnp.inf)
    poisoned = np.zeros((3, 1, 16), bool)
    poisoned[0, 0, 3] = poisoned[1, 0, 5] = poisoned[1, 0, 9] = True
    _assert_rows(_decode(q, kv, lengths, impl=impl, num_splits=splits), clean, poisoned)


_KEY_VALUES = [(np.nan, 5), (np.nan, D_V + 10), (np.inf, 5), (-np.inf, 40)]        # V columns, and a rope one


@pytest.mark.parametrize("impl, splits, value, column",
                         [("xla", None, *vc) for vc in _KEY_VALUES] +
                         [("interpret", splits, *vc) for splits, vc in zip((None, 3, 20, 3, 20),
                                                                           _KEY_VALUES[1:] + _KEY_VALUES[:2])])
def test_nan_or_inf_in_a_visible_key_reaches_every_row_of_its_sequence(impl, splits, value, column):
    """A key inside the length (NaN anywhere; inf in a V column: its score is inf, or its weight 0 meets the inf
    value) makes every row of that sequence NaN; the other sequences stay as they were."""
    q, kv, lengths = _decode_inputs(2)
    clean = _decode(q, kv, lengths, impl=impl, num_splits=splits)
    got = _decode(q, kv.at[0, 33, column].set(value), lengths, impl=impl, num_splits=splits)
    _assert_rows(got, clean, np.array([True, False, False])[:, None, None])


@pytest.mark.parametrize("impl, splits", SPLITS)
def test_all_scores_minus_inf_is_nan_not_an_empty_row(impl, splits):
    """-inf in q against keys all positive in that column: every visible score is -inf. The row saw keys, so it
    is NaN, not the 0 / -inf of a row that sees nothing."""
    q, kv, lengths = _decode_inputs(3)
    kv = kv.at[:, :, 0].set(jnp.abs(kv[:, :, 0]) + 0.5)
    clean = _decode(q, kv, lengths, impl=impl, num_splits=splits)
    poisoned = np.zeros((3, 1, 16), bool)
    poisoned[:2, 0, 4] = True                         # sequence 2 is empty: it reads no key, it stays 0 / -inf
    _assert_rows(_decode(q.at[:, 0, 4, 0].set(-jnp.inf), kv, lengths, impl=impl, num_splits=splits), clean,
                 poisoned)


@pytest.mark.parametrize("impl, splits", SPLITS)
def test_keys_scoring_minus_inf_in_one_split_only_get_no_weight(impl, splits):
    """Sequence 0's first 32 keys score -inf for every row (-inf in a rope column against a positive query
    column), the rest of its keys are finite: those keys get weight 0 and the rows are finite, also where the
    -inf keys fill whole splits of their own (3: one 32-key split each)."""
    q, kv, lengths = _decode_inputs(6)
    q = q.at[..., D_V + 1].set(jnp.abs(q[..., D_V + 1]) + 0.5)
    kv = kv.at[0, :32, D_V + 1].set(-jnp.inf)
    want = _decode(q, kv, lengths, impl="xla")
    assert np.isfinite(np.asarray(want[0])).all() and np.isfinite(np.asarray(want[1])[:2]).all()
    _assert_rows(_decode(q, kv, lengths, impl=impl, num_splits=splits), want, False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [np.nan, np.inf])
def test_nonfinite_scale_reaches_every_row_that_reads_a_key(impl, scale):
    q, kv, lengths = _decode_inputs(4)
    clean = _decode(q, kv, lengths, impl=impl)
    _assert_rows(_decode(q, kv, lengths, impl=impl, softmax_scale=scale), clean,
                 np.array([True, True, False])[:, None, None])


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_rows_see_a_nan_only_from_their_own_keys(impl):
    """S_q 2: a NaN in the last new token reaches the row of the query that sees it. (The earlier query cannot see
    it; whether 0 · NaN reaches that row depends on the tiles, and is not part of the rule.)"""
    q, kv, lengths = _decode_inputs(5, s_q=2)
    clean = _decode(q, kv, lengths, impl=impl)
    got = _decode(q, kv.at[1, 95, 3].set(jnp.nan), lengths, impl=impl)
    assert _nan_rows(*got)[1, 1].all()
    _assert_rows([np.asarray(x)[[0, 2]] for x in got], [np.asarray(x)[[0, 2]] for x in clean], False)


@pytest.mark.parametrize("impl", IMPLS)
def test_unused_slots_and_pages_stay_ignored(impl):
    """NaN and inf past each length and in pages no sequence uses, garbage table entries past the last used
    block: the result is the clean one."""
    q, kv, lengths = _decode_inputs(6)
    clean = _decode(q, kv, lengths, impl=impl)
    junk = kv.at[0, 70:].set(jnp.nan).at[2, :].set(jnp.inf)
    _assert_rows(_decode(q, junk, lengths, impl=impl), clean, False)
    pages = jnp.concatenate([junk.reshape(9, PAGE, D), jnp.full((2, PAGE, D), jnp.nan)])
    # Sequence 0's third page holds its tokens 64..95, of which it uses 64..69; sequence 2 uses no block.
    table = jnp.array([[0, 1, 2], [3, 4, 5], [-7, 10 ** 6, 2 ** 31 - 1]], jnp.int32)
    _assert_rows(_decode(q, pages, lengths, table, impl=impl), clean, False)


def _fp8_inputs(kv_format, seed=7):
    q, kv, lengths = _decode_inputs(seed)
    kv = kv * 0.5
    if kv_format == "fp8_blockscale":
        return q, fm.quantize_latent(kv, kv_format), lengths, None
    packed, scale = fm.quantize_latent(kv, kv_format)
    return q, packed, lengths, scale


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kv_format", ["fp8_blockscale", "fp8_pertensor"])
def test_fp8_nan_code_or_scale_in_a_used_token(impl, kv_format):
    q, packed, lengths, scale = _fp8_inputs(kv_format)
    kw = dict(kv_format=kv_format, kv_scale=scale)
    clean = _decode(q, packed, lengths, impl=impl, **kw)
    fmt = latent_format(kv_format, D_V, D_R)
    seq0 = np.array([True, False, False])[:, None, None]
    # An e4m3 NaN code (0x7F) in a used token of sequence 0, and the same in an unused one of sequence 0 and 2.
    coded = packed.at[0, 12, 3].set(0x7F)
    _assert_rows(_decode(q, coded, lengths, impl=impl, **kw), clean, seq0)
    _assert_rows(_decode(q, packed.at[0, 80, 3].set(0x7F).at[2, 5, 0].set(0xFF), lengths, impl=impl, **kw), clean,
                 False)
    if kv_format == "fp8_blockscale":        # a NaN scale (float32 0x7FC00000, little-endian) in a used token
        nan_scale = packed.at[0, 40, fmt.scale_offset:fmt.scale_offset + 4].set(jnp.array([0, 0, 0xC0, 0x7F],
                                                                                         jnp.uint8))
        _assert_rows(_decode(q, nan_scale, lengths, impl=impl, **kw), clean, seq0)
    else:                                    # the per-tensor scale itself
        got = _decode(q, packed, lengths, impl=impl, kv_format=kv_format, kv_scale=jnp.float32(jnp.nan))
        _assert_rows(got, clean, np.array([True, True, False])[:, None, None])


@pytest.mark.parametrize("impl", IMPLS)
def test_cache_decode_propagates_a_nan_latent(impl):
    cache = fm.LatentCache.create(2, 64, dim=D, dtype=jnp.float32, page_size=PAGE)
    kv = jax.random.normal(jax.random.PRNGKey(8), (2, 40, D), jnp.float32)
    q = jax.random.normal(jax.random.PRNGKey(9), (2, 1, 16, D), jnp.float32)
    kw = dict(head_dim_v=D_V, softmax_scale=SCALE, implementation=impl, return_lse=True)
    clean = cache.append(kv).decode(q, **kw)
    got = cache.append(kv.at[1, 39, 0].set(jnp.nan)).decode(q, **kw)
    _assert_rows(got, clean, np.array([False, True])[:, None, None])


# ---------------------------------------------------------------- 1. prefill


def _prefill_inputs(seed=10, b=2, s=40, h=2, d_qk=64, d_v=32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q, k = (jax.random.normal(key, (b, s, h, d_qk), jnp.float32) for key in ks[:2])
    return q, k, jax.random.normal(ks[2], (b, s, h, d_v), jnp.float32)


def _prefill(q, k, v, impl, scale=SCALE, **kw):
    return fm.mla_prefill(q, k, v, softmax_scale=scale, implementation=impl, return_lse=True, **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_nan_reaches_the_rows_that_see_it(impl):
    """A NaN in q reaches its row; a NaN in the key at position 20 reaches the rows at and after 20 (causal), not
    the earlier ones; an inf in q and a NaN scale reach the rows that read them."""
    q, k, v = _prefill_inputs()
    clean = _prefill(q, k, v, impl)
    poisoned = np.zeros((2, 40, 2), bool)
    poisoned[1, 7, 0] = poisoned[0, 12, 1] = True
    _assert_rows(_prefill(q.at[1, 7, 0, 3].set(jnp.nan).at[0, 12, 1, 9].set(jnp.inf), k, v, impl), clean, poisoned)
    poisoned = np.zeros((2, 40, 2), bool)
    poisoned[0, 20:, 1] = True
    _assert_rows(_prefill(q, k.at[0, 20, 1, 5].set(jnp.nan), v, impl), clean, poisoned)
    _assert_rows(_prefill(q, k, v, impl, scale=np.nan), clean, True)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_all_scores_minus_inf_is_nan(impl):
    """Every prefill row sees its own token, so a row whose scores are all -inf (q -inf against positive keys in
    that column) is NaN, not an empty row: in the kernels' masked tiles too (the first rows of the diagonal)."""
    q, k, v = _prefill_inputs(11)
    k = k.at[..., 0].set(jnp.abs(k[..., 0]) + 0.5)
    clean = _prefill(q, k, v, impl)
    poisoned = np.zeros((2, 40, 2), bool)
    poisoned[0, [1, 30], 1] = True
    _assert_rows(_prefill(q.at[0, [1, 30], 1, 0].set(-jnp.inf), k, v, impl), clean, poisoned)


# ---------------------------------------------------------------- 1. sparse attention


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_decode_nan_in_a_listed_token_or_the_query(impl):
    q, kv, _ = _decode_inputs(12, b=2, n=64)
    pool = kv.reshape(-1, D)
    idx = jnp.asarray(np.random.default_rng(0).permutation(128)[:64].reshape(2, 1, 32), jnp.int32)
    idx = idx.at[1, 0, 5:].set(-1)
    kw = dict(softmax_scale=SCALE, head_dim_v=D_V, implementation=impl)
    clean = fm.mla_decode_sparse(q, pool, idx, **kw)
    listed = int(idx[0, 0, 3])
    _assert_rows(fm.mla_decode_sparse(q, pool.at[listed, 2].set(jnp.nan), idx, **kw), clean,
                 np.array([True, False])[:, None, None])
    unlisted = sorted(set(range(128)) - set(np.asarray(idx).ravel().tolist()))[0]
    _assert_rows(fm.mla_decode_sparse(q, pool.at[unlisted].set(jnp.nan), idx, **kw), clean, False)
    poisoned = np.zeros((2, 1, 16), bool)
    poisoned[1, 0, 2] = True
    _assert_rows(fm.mla_decode_sparse(q.at[1, 0, 2, 0].set(jnp.nan), pool, idx, **kw), clean, poisoned)


# ---------------------------------------------------------------- 2. bad block-table entries


def _paged(lengths=(33, 64)):
    q, kv, lengths = _decode_inputs(13, b=2, s_q=2, n=64, lengths=lengths)
    pages = kv.reshape(4, PAGE, D)
    return q, pages, lengths, jnp.array([[0, 1], [2, 3]], jnp.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("entry", [4, 17, -1])
def test_bad_block_table_entry_is_a_value_error_when_concrete(impl, entry):
    q, pages, lengths, table = _paged()
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        _decode(q, pages, lengths, table.at[0, 1].set(entry), impl=impl)
    with pytest.raises(ValueError, match="block_table"):        # numpy and lists: concrete too
        _decode(q, pages, np.asarray(lengths), np.asarray(table.at[1, 0].set(entry)), impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_entries_past_the_last_used_block_may_hold_anything(impl):
    q, pages, lengths, table = _paged(lengths=(20, 64))
    clean = _decode(q, pages, lengths, table, impl=impl)
    _assert_rows(_decode(q, pages, lengths, table.at[0, 1].set(-12345), impl=impl), clean, False)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_block_table_entry_under_jit_gives_nan_rows(impl):
    """Sequence 0 (length 33, S_q 2) has a bad entry in block 1, which only its second query reads (its first sees
    tokens 0..31): that row is NaN, never another page's data; sequence 1 and the first query are as before."""
    q, pages, lengths, table = _paged()
    decode = jax.jit(lambda q, p, l, t: _decode(q, p, l, t, impl=impl))
    clean = decode(q, pages, lengths, table)
    poisoned = np.zeros((2, 2, 16), bool)
    poisoned[0, 1] = True
    for entry in (4, -1, 2 ** 31 - 1):
        _assert_rows(decode(q, pages, lengths, table.at[0, 1].set(entry)), clean, poisoned)
    out, lse = decode(q, pages[:0], lengths.at[1].set(0), table)        # a pool of no pages: every used block
    assert _nan_rows(out, lse)[0].all() and not np.asarray(out[1]).any() and np.isneginf(lse[1]).all()


def test_cache_decode_checks_its_block_table():
    table = jnp.array([[0, 1], [2, 9]], jnp.int32)
    cache = fm.LatentCache.create(2, 64, dim=D, dtype=jnp.float32, page_size=PAGE, num_blocks=4, block_table=table)
    cache = cache.append(jax.random.normal(jax.random.PRNGKey(14), (2, 40, D), jnp.float32))
    q = jax.random.normal(jax.random.PRNGKey(15), (2, 1, 16, D), jnp.float32)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
        cache.decode(q, head_dim_v=D_V, implementation="xla")
    out = jax.jit(lambda c, q: c.decode(q, head_dim_v=D_V, implementation="xla"))(cache, q)
    assert np.isnan(np.asarray(out[1])).all() and np.isfinite(np.asarray(out[0])).all()


# ---------------------------------------------------------------- 3. what every implementation accepts


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b, s_q, h, n", [(0, 1, 16, 64), (2, 0, 16, 64), (2, 1, 0, 64), (2, 1, 16, 0)])
def test_decode_empty_batch_queries_heads_or_cache(impl, b, s_q, h, n):
    q = jnp.ones((b, s_q, h, D), jnp.float32)
    out, lse = _decode(q, jnp.ones((b, n, D), jnp.float32), jnp.full((b,), 5, jnp.int32), impl=impl)
    assert out.shape == (b, s_q, h, D_V) and lse.shape == (b, s_q, h)
    assert not np.asarray(out).any() and np.isneginf(np.asarray(lse)).all()
    paged = _decode(q, jnp.ones((4, PAGE, D), jnp.float32), jnp.full((b,), 5, jnp.int32),
                    jnp.zeros((b, 0), jnp.int32), impl=impl)            # no blocks at all: capacity 0
    assert paged[0].shape == (b, s_q, h, D_V) and not np.asarray(paged[0]).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b, s, h", [(0, 16, 2), (2, 0, 2), (2, 16, 0)])
def test_prefill_empty_batch_sequence_or_heads(impl, b, s, h):
    q = jnp.ones((b, s, h, 32), jnp.float32)
    out, lse = _prefill(q, q, jnp.ones((b, s, h, 16), jnp.float32), impl)
    assert out.shape == (b, s, h, 16) and lse.shape == (b, s, h)


@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_empty_batch_pool_or_index_list(impl):
    q = jnp.ones((2, 1, 16, D), jnp.float32)
    kw = dict(softmax_scale=SCALE, head_dim_v=D_V, implementation=impl)
    for q_, pool, idx in ((q[:0], jnp.ones((8, D)), jnp.zeros((0, 1, 4), jnp.int32)),
                          (q, jnp.ones((0, D)), jnp.zeros((2, 1, 4), jnp.int32)),
                          (q, jnp.ones((8, D)), jnp.zeros((2, 1, 0), jnp.int32))):
        out, lse = fm.mla_decode_sparse(q_, pool, idx, **kw)
        assert out.shape == q_.shape[:3] + (D_V,) and not np.asarray(out).any() and np.isneginf(lse).all()
    out, max_logits, lse = fm.mla_prefill_sparse(q[:, 0], jnp.ones((0, D)), jnp.zeros((2, 4), jnp.int32), **kw)
    assert out.shape == (2, 16, D_V) and np.isneginf(max_logits).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_array_likes_are_accepted(impl):
    q, kv, lengths = _decode_inputs(16, b=2, n=64, lengths=(40, 64))
    want = _decode(q, kv, lengths, impl=impl)
    _assert_rows(_decode(np.asarray(q), np.asarray(kv), [40, 64], impl=impl), want, False)
    pages = kv.reshape(4, PAGE, D)
    _assert_rows(_decode(q, np.asarray(pages), [40, 64], [[0, 1], [2, 3]], impl=impl), want, False)
    pq, pk, pv = _prefill_inputs(b=1, s=20)
    want = _prefill(pq, pk, pv, impl)
    _assert_rows(_prefill(np.asarray(pq), np.asarray(pk), np.asarray(pv), impl, segment_ids=[[0] * 20]), want, False)
    pool = kv.reshape(-1, D)
    want = fm.mla_decode_sparse(q, pool, jnp.tile(jnp.arange(8, dtype=jnp.int32), (2, 1, 1)), head_dim_v=D_V,
                                implementation=impl)
    _assert_rows(fm.mla_decode_sparse(np.asarray(q), np.asarray(pool), [[list(range(8))]] * 2, head_dim_v=D_V,
                                      implementation=impl), want, False)


def test_narrowed_numpy_dtypes_are_named_not_converted():
    q, kv, lengths = _decode_inputs(17, b=2, n=64, lengths=(40, 64))
    with pytest.raises(TypeError, match="cache_seqlens must be int32, got int64"):
        _decode(q, kv, np.array([40, 64], np.int64))
    with pytest.raises(TypeError, match="q must be float16, bfloat16 or float32, got float64"):
        _decode(np.asarray(q, np.float64), kv, lengths)


def test_a_traced_softmax_scale_is_a_type_error_that_names_it():
    q, kv, lengths = _decode_inputs(18, b=2, n=64, lengths=(40, 64))
    pq, pk, pv = _prefill_inputs(b=1, s=16)
    calls = [lambda s: fm.mla_decode(q, kv, lengths, head_dim_v=D_V, softmax_scale=s),
             lambda s: fm.mla_prefill(pq, pk, pv, softmax_scale=s),
             lambda s: fm.mla_decode_sparse(q, kv.reshape(-1, D), jnp.zeros((2, 1, 4), jnp.int32), head_dim_v=D_V,
                                            softmax_scale=s),
             lambda s: fm.mla_prefill_sparse(q[:, 0], kv[0], jnp.zeros((2, 4), jnp.int32), head_dim_v=D_V,
                                             softmax_scale=s)]
    for call in calls:
        with pytest.raises(TypeError, match="softmax_scale must be a Python float"):
            jax.jit(call)(jnp.float32(0.1))
        call(jnp.float32(0.1))           # a concrete 0-d array is its value


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [0.0, -0.1, -np.inf])
def test_a_scale_that_is_not_positive_is_refused_everywhere(impl, scale):
    q, kv, lengths = _decode_inputs(19, b=2, n=64, lengths=(40, 64))
    with pytest.raises(ValueError, match="softmax_scale must be > 0"):
        _decode(q, kv, lengths, impl=impl, softmax_scale=scale)
    pq, pk, pv = _prefill_inputs(b=1, s=16)
    with pytest.raises(ValueError, match="softmax_scale must be > 0"):
        fm.mla_prefill(pq, pk, pv, softmax_scale=scale, implementation=impl)


def test_kernel_only_limits_say_which_implementation_runs_the_call():
    q = jnp.ones((1, 1, 16, 640), jnp.float32)
    kv = jnp.ones((1, 32, 640), jnp.float32)
    lengths = jnp.array([8], jnp.int32)
    assert fm.mla_decode(q, kv, lengths, head_dim_v=500, implementation="xla").shape == (1, 1, 16, 500)
    with pytest.raises(ValueError, match=r"powers of two.*'xla' can"):
        fm.mla_decode(q, kv, lengths, head_dim_v=500, implementation="interpret")
    pq = jnp.ones((1, 16, 2, 100), jnp.float32)
    assert fm.mla_prefill(pq, pq, pq, implementation="xla").shape == pq.shape
    with pytest.raises(ValueError, match=r"multiple of 16.*'xla' can"):
        fm.mla_prefill(pq, pq, pq, implementation="interpret")


@pytest.mark.parametrize("impl", IMPLS)
def test_indexer_empty_inputs_array_likes_and_block_table(impl):
    kw = dict(implementation=impl)
    for b, s_q in ((0, 1), (2, 0)):
        q, w = jnp.ones((b, s_q, 16, 128)), jnp.ones((b, s_q, 16))
        keys, lengths = jnp.ones((b, 64, 128)), jnp.full((b,), 3, jnp.int32)
        assert fm.indexer_scores(q, w, keys, lengths, **kw).shape == (b, s_q, 64)
        assert fm.indexer_topk(q, w, keys, lengths, topk=4, **kw).shape == (b, s_q, 4)
    q = jax.random.normal(jax.random.PRNGKey(24), (2, 1, 16, 128), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(25), (2, 1, 16), jnp.float32)
    pages = jax.random.normal(jax.random.PRNGKey(26), (4, 16, 128), jnp.float32)
    want = fm.indexer_topk(q, w, pages, jnp.array([20, 32], jnp.int32), jnp.array([[0, 1], [2, 3]], jnp.int32),
                           topk=8, **kw)
    got = fm.indexer_topk(np.asarray(q), np.asarray(w), np.asarray(pages), [20, 32], [[0, 1], [2, 3]], topk=8, **kw)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\]"):
        fm.indexer_scores(q, w, pages, [20, 32], [[0, 1], [2, 4]], **kw)


# ---------------------------------------------------------------- 4. error messages name the cause


def test_width_mismatch_names_the_query_and_cache_widths():
    q = jnp.ones((1, 1, 16, 512), jnp.bfloat16)
    kv = jnp.ones((1, 64, 576), jnp.bfloat16)
    with pytest.raises(ValueError, match="q is 512 wide but kv_cache's tokens are 576 wide"):
        fm.mla_decode(q, kv, jnp.array([8], jnp.int32))
    with pytest.raises(ValueError, match="q is 512 wide but pool's tokens are 576 wide"):
        fm.mla_decode_sparse(q, kv[0], jnp.zeros((1, 1, 4), jnp.int32))


def test_a_uint8_cache_without_kv_format_mentions_kv_format():
    q = jnp.ones((1, 1, 16, 576), jnp.bfloat16)
    packed = fm.quantize_latent(jnp.ones((1, 64, 576), jnp.float32), "fp8_blockscale")
    with pytest.raises(TypeError, match="kv_cache is uint8.*pass kv_format"):
        fm.mla_decode(q, packed, jnp.array([8], jnp.int32))
    with pytest.raises(TypeError, match="pool is uint8.*pass kv_format"):
        fm.mla_decode_sparse(q, packed[0], jnp.zeros((1, 1, 4), jnp.int32))
    keys = fm.quantize_index_keys(jnp.ones((2, 16, 128), jnp.float32))
    with pytest.raises(TypeError, match="k_cache is uint8.*pass kv_format"):
        fm.indexer_scores(jnp.ones((1, 1, 16, 128)), jnp.ones((1, 1, 16)), keys, [8], [[0]])


# ---------------------------------------------------------------- the GPU implementations (-m gpu)


def _gpu_decode_inputs(seed, b, s_q, h, n):
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = jax.random.normal(kq, (b, s_q, h, 576), jnp.bfloat16)
    kv = jax.random.normal(kk, (b, n, 576), jnp.bfloat16)
    return q, kv, jnp.array([n, n - 100, 0][:b], jnp.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("impl, s_q, splits", [("triton", 1, 1), ("triton", 1, 4), ("triton", 1, 32),
                                               ("triton", 1, None), ("triton", 4, 1), ("triton", 4, 4),
                                               ("gluon", 1, 1), ("gluon", 1, 4),
                                               ("gluon", 4, 1)])
def test_gpu_decode_nan_reaches_its_rows(impl, s_q, splits):
    """16 query rows (the tl kernels, or Gluon where the registry picks it) and 64 (Gluon on a Hopper GPU), one
    split and several (the Gluon epilogue, like the tl kernels', reads a NaN row sum as NaN, not as an empty
    split that the combine would weigh 0)."""
    q, kv, lengths = _gpu_decode_inputs(20, 3, s_q, 16, 2048)
    kw = dict(softmax_scale=192 ** -0.5, num_splits=splits, implementation=impl, return_lse=True)
    clean = fm.mla_decode(q, kv, lengths, **kw)
    got = fm.mla_decode(q.at[1, -1, 3, 7].set(jnp.nan), kv.at[0, 1000, 400].set(jnp.nan), lengths, **kw)
    rows = _nan_rows(*got)
    holds = bool(rows[0].all() and rows[1, -1, 3] and rows[1].sum() == 1 and not rows[2].any())
    assert holds, rows.sum(axis=(1, 2))
    assert np.isfinite(np.asarray(got[0], np.float32)[1, :-1]).all()
    np.testing.assert_array_equal(np.asarray(got[0])[2], np.asarray(clean[0])[2])


@pytest.mark.gpu
@pytest.mark.parametrize("impl, h, splits", [("triton", 16, 1), ("triton", 16, 4), ("triton", 16, 32),
                                             ("gluon", 16, 1), ("gluon", 16, 4), ("gluon", 64, 1), ("gluon", 64, 4)])
def test_gpu_minus_inf_scores(impl, h, splits):
    """A row whose every visible score is -inf is NaN (it saw keys); keys scoring -inf that fill whole splits of
    a sequence whose other keys are finite get no weight, and its rows stay finite (the xla result)."""
    q, kv, lengths = _gpu_decode_inputs(24, 3, 1, h, 2048)
    kw = dict(softmax_scale=192 ** -0.5, num_splits=splits, implementation=impl, return_lse=True)
    kv = kv.at[..., 0].set(jnp.abs(kv[..., 0]) + 0.5)
    rows = _nan_rows(*fm.mla_decode(q.at[:, 0, 4, 0].set(-jnp.inf), kv, lengths, **kw))
    want = np.zeros(rows.shape, bool)
    want[:2, 0, 4] = True                           # sequence 2 is empty: 0 and -inf
    np.testing.assert_array_equal(rows, want)
    q = q.at[..., 512 + 1].set(jnp.abs(q[..., 512 + 1]) + 0.5)
    kv = kv.at[0, :1024, 512 + 1].set(-jnp.inf)     # the first half of sequence 0: two whole splits of 4
    out, lse = fm.mla_decode(q, kv, lengths, **kw)
    ref, ref_lse = fm.mla_decode(q, kv, lengths, **dict(kw, implementation="xla"))
    assert np.isfinite(np.asarray(ref, np.float32)).all() and np.isfinite(np.asarray(lse)[:2]).all()
    assert rel_err(out, ref) < 1e-2
    np.testing.assert_allclose(np.asarray(lse)[:2], np.asarray(ref_lse)[:2], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "gluon"])
def test_gpu_bad_block_table_entry_under_jit(impl):
    q, kv, lengths = _gpu_decode_inputs(21, 2, 1, 16, 1024)
    pages = kv.reshape(32, 64, 576)
    table = jnp.arange(32, dtype=jnp.int32).reshape(2, 16)
    decode = jax.jit(lambda t: fm.mla_decode(q, pages, lengths, t, softmax_scale=0.05, implementation=impl))
    clean = decode(table)
    got = np.asarray(decode(table.at[0, 3].set(32)), np.float32)
    assert np.isnan(got[0]).all() and np.isfinite(got[1]).all()
    np.testing.assert_array_equal(got[1], np.asarray(clean, np.float32)[1])
    with pytest.raises(ValueError, match="block_table"):
        fm.mla_decode(q, pages, lengths, table.at[0, 3].set(-1), implementation=impl)


@pytest.mark.gpu
def test_gpu_fp8_nan_code_reaches_its_sequence():
    q, kv, lengths = _gpu_decode_inputs(22, 3, 1, 16, 1024)
    packed = fm.quantize_latent(kv, "fp8_blockscale")
    kw = dict(softmax_scale=0.05, kv_format="fp8_blockscale", implementation="triton", return_lse=True)
    got = fm.mla_decode(q, packed.at[1, 500, 9].set(0x7F).at[0, 1023, 0].set(0xFF), lengths, **kw)
    rows = _nan_rows(*got)
    assert rows[0].all() and rows[1].all() and not rows[2].any()


@pytest.mark.gpu
def test_gpu_prefill_nan_reaches_the_rows_that_see_it():
    ks = jax.random.split(jax.random.PRNGKey(23), 3)
    q, k = (jax.random.normal(key, (1, 1024, 16, 192), jnp.bfloat16) for key in ks[:2])
    v = jax.random.normal(ks[2], (1, 1024, 16, 128), jnp.bfloat16)
    out, lse = fm.mla_prefill(q, k.at[0, 300, 4, 0].set(jnp.nan), v, implementation="triton", return_lse=True)
    rows = _nan_rows(out, lse)
    assert rows[0, 300:, 4].all() and not rows[0, :300].any() and not rows[0, :, 5].any()
    k = k.at[..., 0].set(jnp.abs(k[..., 0]) + 1)
    out, lse = fm.mla_prefill(q.at[0, 5, 2, 0].set(-jnp.inf), k, v, implementation="triton", return_lse=True)
    assert _nan_rows(out, lse)[0, 5, 2] and _nan_rows(out, lse).sum() == 1
