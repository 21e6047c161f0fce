"""Tier 3: mla_decode through jax-triton on the GPU, full D1-D6 shapes against the reference: "triton" (the tl
kernels, and on a Hopper GPU the Gluon kernel for more than 32 query rows) and "gluon" (the Gluon kernel for every
call it can run: bf16 / fp16 caches, pages of 64 tokens or more)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashmla_jax as fm
from _util import rel_err

pytestmark = pytest.mark.gpu

# name: (B, N, H, S_q, ragged)
SHAPES = {
    "D1": (128, 4096, 16, 1, False),
    "D2": (64, 16384, 16, 1, False),
    "D3": (1, 65536, 16, 1, False),
    "D4": (128, 8192, 16, 1, True),
    "D5": (128, 4096, 128, 1, False),
    "D6": (64, 8192, 128, 2, False),
    "chunk": (1, 16384, 16, 1024, False),      # C1, the absorbed chunked prefill
}


def _inputs(b, n, h, s_q, ragged, seed):
    kq, kk, kl = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, s_q, h, 576), jnp.bfloat16)
    kv = jax.random.normal(kk, (b, n, 576), jnp.bfloat16)
    seqlens = (jax.random.randint(kl, (b,), 0, n + 1, jnp.int32) if ragged
               else jnp.full((b,), n, jnp.int32))
    return q, kv, seqlens


@pytest.mark.parametrize("implementation", ["triton", "gluon"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_decode_full_shapes(name, implementation):
    q, kv, sl = _inputs(*SHAPES[name], seed=hash(name) % 1000)
    kw = dict(softmax_scale=192 ** -0.5, return_lse=True)
    out, lse = fm.mla_decode(q, kv, sl, implementation=implementation, **kw)
    ref, ref_lse = fm.mla_decode(q, kv, sl, implementation="xla", **kw)
    assert rel_err(out, ref) < 1e-2
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isneginf(lse), ~finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-3, atol=1e-3)
    again, lse_again = fm.mla_decode(q, kv, sl, implementation=implementation, **kw)
    np.testing.assert_array_equal(np.asarray(out.view(jnp.uint16)), np.asarray(again.view(jnp.uint16)))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_again))


@pytest.mark.parametrize("implementation", ["triton", "gluon"])
@pytest.mark.parametrize("num_splits", [1, 7, 64])
def test_decode_splits_and_edge_lengths(num_splits, implementation):
    q, kv, _ = _inputs(6, 1024, 16, 2, False, seed=num_splits)
    sl = jnp.asarray([0, 1, 2, 63, 1024, 5000], jnp.int32)      # 5000 is clamped to the capacity
    out = fm.mla_decode(q, kv, sl, num_splits=num_splits, implementation=implementation)
    ref = fm.mla_decode(q, kv, jnp.minimum(sl, 1024), implementation="xla")
    assert rel_err(out, ref) < 1e-2
    assert np.all(np.asarray(out[0], np.float32) == 0)


def _nan_pages(kv, sl, page_size):
    """[B, N, 576] -> shuffled pages with NaN in the spare pages and past each length, and a block
    table with garbage indices past each length."""
    b, n, d = kv.shape
    per_seq = n // page_size
    perm = jax.random.permutation(jax.random.PRNGKey(6), b * per_seq + 4)
    pages = jnp.full((b * per_seq + 4, page_size, d), jnp.nan, kv.dtype)
    kv_valid = jnp.where(jnp.arange(n)[None, :, None] < sl[:, None, None], kv, jnp.nan)
    table = perm[: b * per_seq].astype(jnp.int32).reshape(b, per_seq)
    pages = pages.at[table.reshape(-1)].set(kv_valid.reshape(b * per_seq, page_size, d))
    unused = jnp.arange(per_seq)[None, :] * page_size >= sl[:, None]
    return pages, jnp.where(unused, jnp.int32(2 ** 30), table)


@pytest.mark.parametrize("implementation, page_size", [("triton", 16), ("triton", 64), ("triton", 256),
                                                       ("gluon", 64), ("gluon", 128)])
def test_decode_paged_nan_pages(page_size, implementation):
    b, n, h = 8, 2048, 16
    q, kv, _ = _inputs(b, n, h, 1, False, seed=page_size)
    sl = jax.random.randint(jax.random.PRNGKey(5), (b,), 0, n + 1, jnp.int32)
    pages, table = _nan_pages(kv, sl, page_size)
    out = fm.mla_decode(q, pages, sl, table, implementation=implementation)
    ref = fm.mla_decode(q, kv, sl, implementation="xla")
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("dtype, num_splits, page_size", [
    (jnp.bfloat16, None, None), (jnp.bfloat16, 7, None), (jnp.bfloat16, 64, None), (jnp.bfloat16, None, 16),
    (jnp.bfloat16, None, 64), (jnp.float16, None, None), (jnp.float32, None, None)])
def test_decode_wide_row_tiles(dtype, num_splits, page_size):
    """S_q * H = 128 rows (64-row tiles with the wide-tile options; float32 keeps 32-row tiles; on a Hopper GPU
    the bf16 / fp16 cases with pages of 64 or more run the Gluon kernel): lengths below S_q, mid-tile ends,
    split and paged variants."""
    q, kv, _ = _inputs(6, 2048, 16, 8, False, seed=11)
    q, kv = q.astype(dtype), kv.astype(dtype)
    sl = jnp.asarray([0, 3, 100, 1000, 2048, 1500], jnp.int32)
    kw = dict(softmax_scale=192 ** -0.5, return_lse=True)
    ref, ref_lse = fm.mla_decode(q, kv, sl, implementation="xla", **kw)
    if page_size:
        pages, table = _nan_pages(kv, sl, page_size)
        out, lse = fm.mla_decode(q, pages, sl, table, num_splits=num_splits, implementation="triton", **kw)
    else:
        out, lse = fm.mla_decode(q, kv, sl, num_splits=num_splits, implementation="triton", **kw)
    assert rel_err(out, ref) < (1e-3 if dtype == jnp.float32 else 1e-2)
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isneginf(lse), ~finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_decode_other_dtypes(dtype):
    q, kv, sl = _inputs(16, 2048, 16, 1, True, seed=3)
    q, kv = q.astype(dtype), kv.astype(dtype)
    out = fm.mla_decode(q, kv, sl, implementation="triton")
    ref = fm.mla_decode(q, kv, sl, implementation="xla")
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-3 if dtype == jnp.float32 else 1e-2)
