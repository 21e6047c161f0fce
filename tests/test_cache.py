"""LatentCache (contiguous and paged): create, append (ragged, S > 1, past capacity, bad block-table
entries), decode against it with the reference and with the Triton kernels in the interpreter, decode loops
in lax.scan / fori_loop against a step-by-step loop, and in-place donated appends. CPU only, small shapes,
except one GPU test."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashmla_jax as fm
from flashmla_jax import reference
from _util import rel_err

D, DV = 96, 64                                      # the kernels' 64 + 32 latent: fast in the interpreter
TOL = {jnp.float32: 1e-3, jnp.bfloat16: 1e-2}


def randn(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def logical_rows(cache):
    """The cache as [B, capacity, D] float32 NumPy (pages gathered), and seqlens as NumPy."""
    kv = cache.kv if cache.block_table is None else reference.gather_pages(cache.kv, cache.block_table)
    return np.array(kv[:, :cache.capacity], np.float32), np.array(cache.seqlens)


def shuffled_table(seed, batch, max_blocks, spare, seqlens, page_size, bad):
    """A permuted block table over batch * max_blocks + spare pages; entries past each sequence's last
    used block hold `bad` (out of range, e.g. 10**6 or -5)."""
    num_pages = batch * max_blocks + spare
    table = np.random.default_rng(seed).permutation(num_pages)[: batch * max_blocks].reshape(batch, max_blocks)
    used = -(-np.asarray(seqlens) // page_size)
    table = np.where(np.arange(max_blocks)[None, :] < used[:, None], table, bad)
    return jnp.asarray(table, jnp.int32), num_pages


def poisoned(cache, value=np.nan, seed=None):
    """The same cache with every latent row replaced by `value` (or fresh random rows when seed is given)."""
    kv = (jnp.full(cache.kv.shape, value, cache.dtype) if seed is None
          else randn(seed, cache.kv.shape, cache.dtype))
    return dataclasses.replace(cache, kv=kv)


def caches_with(seed, seqlens, capacity, page_size, dtype=jnp.float32, dim=D, bad=10 ** 6, unused=np.nan):
    """(contiguous, paged, data): both caches filled with the same random rows data [B, capacity, D] by one
    ragged append; the paged one has a shuffled table, `bad` entries past each sequence, and `unused` (NaN,
    or a seed for random rows) in every page and page tail it does not use. The contiguous cache has NaN
    past each sequence's length."""
    b = len(seqlens)
    data = randn(seed, (b, capacity, dim), dtype)
    n = jnp.asarray(seqlens, jnp.int32)
    flat = poisoned(fm.LatentCache.create(b, capacity, dim, dtype)).append(data, num_new=n)
    max_blocks = -(-capacity // page_size)
    table, num_pages = shuffled_table(seed, b, max_blocks, 3, seqlens, page_size, bad)
    paged = fm.LatentCache.create(b, capacity, dim, dtype, page_size=page_size, num_blocks=num_pages,
                                  block_table=table)
    paged = (poisoned(paged) if isinstance(unused, float) else poisoned(paged, seed=unused)).append(data, num_new=n)
    return flat, paged, data


# ---------------------------------------------------------------- create


def test_create_shapes_and_pytree():
    flat = fm.LatentCache.create(3, 100, dim=D, dtype=jnp.float32)
    assert flat.kv.shape == (3, 100, D) and flat.block_table is None and flat.capacity == 100
    assert flat.seqlens.dtype == jnp.int32 and np.all(np.asarray(flat.seqlens) == 0) and not flat.paged
    paged = fm.LatentCache.create(3, 100, page_size=32)
    assert paged.kv.shape == (12, 32, 576) and paged.kv.dtype == jnp.bfloat16 and paged.paged
    np.testing.assert_array_equal(paged.block_table, np.arange(12).reshape(3, 4))
    assert paged.block_table.dtype == jnp.int32 and paged.capacity == 100 and paged.page_size == 32
    # data fields are leaves, page_size and capacity are static (part of the tree structure)
    leaves, treedef = jax.tree_util.tree_flatten(paged)
    assert len(leaves) == 3 and len(jax.tree_util.tree_leaves(flat)) == 2
    assert jax.tree_util.tree_unflatten(treedef, leaves).page_size == 32
    assert treedef != jax.tree_util.tree_structure(fm.LatentCache.create(3, 99, page_size=32))
    own = fm.LatentCache.create(2, 64, page_size=16, num_blocks=9, block_table=np.array([[8, 0, 3, 1, 5]] * 2,
                                                                                       np.int32))
    assert own.kv.shape == (9, 16, 576) and own.block_table.shape == (2, 5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(batch=0), ValueError, "batch"),
    (dict(max_len=2.5), TypeError, "max_len"),
    (dict(batch=True), TypeError, "batch"),
    (dict(page_size=16.0), TypeError, "page_size"),
    (dict(page_size=16, num_blocks=8.0), TypeError, "num_blocks"),
    (dict(dtype=jnp.int32), TypeError, "dtype"),
    (dict(page_size=48), ValueError, "page_size"),
    (dict(page_size=8), ValueError, "page_size"),
    (dict(page_size=512), ValueError, "page_size"),
    (dict(num_blocks=10), ValueError, "num_blocks"),
    (dict(block_table=np.zeros((2, 4), np.int32)), ValueError, "block_table"),
    (dict(page_size=16, num_blocks=7), ValueError, "num_blocks"),
    (dict(page_size=16, block_table=np.zeros((2, 4), np.int64)), TypeError, "block_table"),
    (dict(page_size=16, block_table=np.zeros((2, 3), np.int32)), ValueError, "block_table"),
    (dict(page_size=16, block_table=np.zeros((3, 4), np.int32)), ValueError, "block_table"),
])
def test_create_bad_arguments(kwargs, error, match):
    args = dict(batch=2, max_len=64, dim=D) | kwargs
    with pytest.raises(error, match=match):
        fm.LatentCache.create(**args)


def test_create_takes_numpy_integers():
    cache = fm.LatentCache.create(np.int64(2), np.int32(64), dim=np.int64(D), page_size=np.int64(16),
                                  num_blocks=np.int64(9))
    assert cache.kv.shape == (9, 16, D) and cache.page_size == 16 and type(cache.page_size) is int
    assert cache.capacity == 64 and type(cache.capacity) is int


def test_append_bad_arguments():
    cache = fm.LatentCache.create(2, 32, dim=D, dtype=jnp.float32)
    with pytest.raises(ValueError, match="kv_new"):
        cache.append(jnp.ones((2, 1, 64)))
    with pytest.raises(ValueError, match="kv_new"):
        cache.append(jnp.ones((3, 1, D)))
    with pytest.raises(ValueError, match="kv_new"):
        cache.append(jnp.ones((2, 0, D)))
    with pytest.raises(TypeError, match="kv_new"):
        cache.append(jnp.ones((2, 1, D), jnp.int32))
    with pytest.raises(ValueError, match="num_new"):
        cache.append(jnp.ones((2, 1, D)), num_new=jnp.ones((3,), jnp.int32))
    with pytest.raises(TypeError, match="num_new"):
        cache.append(jnp.ones((2, 1, D)), num_new=jnp.ones((2,), jnp.float32))


# ---------------------------------------------------------------- append


def model_append(model, seqlens, new, num_new, capacity):
    """NumPy model of append: model [B, capacity, D], seqlens [B]; returns the updated pair."""
    model, seqlens = model.copy(), seqlens.copy()
    for b in range(model.shape[0]):
        for s in range(min(num_new[b], new.shape[1])):
            if seqlens[b] < capacity:
                model[b, seqlens[b]] = new[b, s]
                seqlens[b] += 1
    return model, seqlens


@pytest.mark.parametrize("page_size", [None, 16, 32])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_appends_match_numpy_model(page_size, dtype):
    """Ragged lengths, S = 1, 3 and 7 per append, ragged num_new, up to and past capacity (50)."""
    b, cap = 4, 50
    if page_size is None:
        cache = fm.LatentCache.create(b, cap, D, dtype)
    else:
        table, num_pages = shuffled_table(7, b, -(-cap // page_size), 2, [cap] * b, page_size, 0)
        cache = fm.LatentCache.create(b, cap, D, dtype, page_size=page_size, num_blocks=num_pages, block_table=table)
    cache = poisoned(cache, seed=1)                 # random rows, not zeros, where nothing was written
    before = np.asarray(cache.kv, np.float32)
    model, seqlens = np.full((b, cap, D), np.nan, np.float32), np.zeros(b, np.int32)
    append = jax.jit(lambda c, x, n: c.append(x, num_new=n))
    rng = np.random.default_rng(0)
    for step, s in enumerate([3, 1, 7, 7, 1, 3, 7, 7, 7, 7, 3, 1, 7, 7, 7]):
        new = randn(100 + step, (b, s, D), dtype)
        num_new = rng.integers(0, s + 1, size=b).astype(np.int32) if step % 2 else np.full(b, s, np.int32)
        cache = append(cache, new, jnp.asarray(num_new))
        model, seqlens = model_append(model, seqlens, np.asarray(new, np.float32), num_new, cap)
        got, got_len = logical_rows(cache)
        np.testing.assert_array_equal(got_len, seqlens)
        for i in range(b):
            np.testing.assert_array_equal(got[i, :seqlens[i]], model[i, :seqlens[i]])
    assert np.all(seqlens == cap), "the loop must reach capacity"
    # Pages no sequence owns (the spare ones) are untouched: nothing was written out of place.
    if page_size is not None:
        spare = np.setdiff1d(np.arange(cache.kv.shape[0]), np.asarray(cache.block_table))
        np.testing.assert_array_equal(np.asarray(cache.kv, np.float32)[spare], before[spare])


@pytest.mark.parametrize("page_size", [None, 16])
def test_append_at_and_over_capacity_drops_tokens(page_size):
    b, cap = 3, 40                                  # 40 = 2.5 pages of 16: the last page has a tail
    cache = poisoned(fm.LatentCache.create(b, cap, D, jnp.float32, page_size=page_size), seed=2)
    cache = cache.append(randn(3, (b, 38, D)), num_new=jnp.asarray([38, 40 - 3, 0], jnp.int32))
    kv_before = np.asarray(cache.kv)
    new = randn(4, (b, 5, D))
    after = cache.append(new)                       # room for 2, 3 and 5 tokens
    np.testing.assert_array_equal(after.seqlens, [cap, cap, 5])
    rows, _ = logical_rows(after)
    np.testing.assert_array_equal(rows[0, 38:40], new[0, :2])
    np.testing.assert_array_equal(rows[1, 37:40], new[1, :3])
    np.testing.assert_array_equal(rows[2, :5], new[2])
    # Everything else, page tails past capacity included, is untouched.
    changed = np.any(np.asarray(after.kv) != kv_before, axis=-1)
    assert changed.sum() == 2 + 3 + 5
    # A full cache stays full and unchanged.
    full = after.append(new, num_new=jnp.asarray([5, 5, 0], jnp.int32))
    np.testing.assert_array_equal(full.seqlens, after.seqlens)
    np.testing.assert_array_equal(full.kv, after.kv)


@pytest.mark.parametrize("bad", [10 ** 6, -5, -1])
def test_append_through_out_of_range_block_is_dropped(bad):
    table = jnp.asarray([[2, bad], [0, 1]], jnp.int32)
    cache = fm.LatentCache.create(2, 32, D, jnp.float32, page_size=16, num_blocks=3, block_table=table)
    cache = poisoned(cache, seed=5)
    before = np.asarray(cache.kv)
    new = randn(6, (2, 20, D))
    after = cache.append(new)                       # sequence 0 crosses into its bad block at token 16
    np.testing.assert_array_equal(after.seqlens, [20, 20])
    kv = np.asarray(after.kv)
    np.testing.assert_array_equal(kv[2], new[0, :16])
    np.testing.assert_array_equal(kv[0], new[1, :16])
    np.testing.assert_array_equal(kv[1, :4], new[1, 16:])
    np.testing.assert_array_equal(kv[1, 4:], before[1, 4:])


# ---------------------------------------------------------------- decode against the cache


@pytest.mark.parametrize("page_size", [16, 32, 64])
@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_paged_equals_contiguous(page_size, implementation):
    """Shuffled tables, NaN in spare pages and page tails, 10**6 in unused table entries; S_q = 2."""
    seqlens = [1, 37, 128, 0, 64 + 5]
    flat, paged, _ = caches_with(11 + page_size, seqlens, 128, page_size, jnp.bfloat16)
    q = randn(12, (5, 2, 4, D), jnp.bfloat16)
    kw = dict(head_dim_v=DV, softmax_scale=0.3, return_lse=True)
    want, want_lse = flat.decode(q, implementation="xla", **kw)
    got, lse = paged.decode(q, implementation=implementation, num_splits=None if implementation == "xla" else 2,
                            **kw)
    assert got.shape == (5, 2, 4, DV) and not np.any(np.isnan(np.asarray(got, np.float32)))
    assert rel_err(got, want) < (1e-6 if implementation == "xla" else 1e-2)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    assert np.all(np.asarray(got[3], np.float32) == 0)          # seqlen 0: zeros, not NaN


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("bad", [10 ** 6, -5])
def test_nan_in_unused_pages_changes_nothing(implementation, bad):
    """The same cache with NaN or with random rows in every unused page and page tail, and out-of-range
    entries in every unused block-table entry: identical outputs."""
    seqlens = [17, 64, 3, 50]
    _, nan_paged, _ = caches_with(21, seqlens, 96, 16, jnp.float32, bad=bad)
    _, rnd_paged, _ = caches_with(21, seqlens, 96, 16, jnp.float32, bad=0, unused=22)
    assert np.isnan(np.asarray(nan_paged.kv)).any()
    q = randn(23, (4, 1, 3, D))
    kw = dict(head_dim_v=DV, return_lse=True, implementation=implementation)
    out_nan, lse_nan = nan_paged.decode(q, **kw)
    out_rnd, lse_rnd = rnd_paged.decode(q, **kw)
    np.testing.assert_array_equal(out_nan, out_rnd)
    np.testing.assert_array_equal(lse_nan, lse_rnd)
    assert np.all(np.isfinite(np.asarray(out_nan)))


def test_decode_method_is_mla_decode():
    _, paged, _ = caches_with(31, [5, 40], 64, 32, jnp.float32)
    q = randn(32, (2, 1, 2, D))
    kw = dict(head_dim_v=DV, softmax_scale=0.2, causal=False)
    np.testing.assert_array_equal(paged.decode(q, **kw),
                                  fm.mla_decode(q, paged.kv, paged.seqlens, paged.block_table, **kw))


def test_deepseek_dims_paged_interpret():
    """D = 576 (512 + 64), H = 16, page 64, through append and the interpreted kernels."""
    flat, paged, _ = caches_with(41, [130, 7], 192, 64, jnp.bfloat16, dim=576)
    q = randn(42, (2, 1, 16, 576), jnp.bfloat16)
    kw = dict(softmax_scale=192 ** -0.5)
    want = flat.decode(q, implementation="xla", **kw)
    got = paged.decode(q, implementation="interpret", num_splits=2, **kw)
    assert got.shape == (2, 1, 16, 512) and rel_err(got, want) < 1e-2


# ---------------------------------------------------------------- decode loops


def decode_step(cache, x, q, implementation):
    """One decode step: append x [B, S, D], then attend q [B, S, H, D] -> (cache, out [B, S, H, DV])."""
    cache = cache.append(x)
    return cache, cache.decode(q, head_dim_v=DV, softmax_scale=0.25, implementation=implementation)


@pytest.mark.parametrize("implementation, s, page_size", [("xla", 1, 16), ("xla", 2, None), ("interpret", 1, 16)])
def test_scan_loop_equals_python_loop(implementation, s, page_size):
    """A jitted, donated lax.scan over T steps == the same steps one jitted call at a time; the loop runs
    the cache into its capacity (62 = 3.9 pages of 16) so the last appends are dropped."""
    b, cap, t = 3, 62, 6
    cache = fm.LatentCache.create(b, cap, D, jnp.float32, page_size=page_size)
    cache = poisoned(cache, seed=50).append(randn(51, (b, 60, D)), num_new=jnp.asarray([3, 60, 51], jnp.int32))
    xs = randn(52, (t, b, s, D))
    qs = randn(53, (t, b, s, 4, D))

    def scan_loop(cache, xs, qs):
        return jax.lax.scan(lambda c, xq: decode_step(c, *xq, implementation), cache, (xs, qs))

    step = jax.jit(lambda c, x, q: decode_step(c, x, q, implementation))
    ref_cache, ref_outs = cache, []
    for i in range(t):
        ref_cache, out = step(ref_cache, xs[i], qs[i])
        ref_outs.append(out)
    got_cache, outs = jax.jit(scan_loop, donate_argnums=0)(cache, xs, qs)
    assert np.all(np.asarray(got_cache.seqlens) == np.minimum([3 + t * s, cap, 51 + t * s], cap))
    np.testing.assert_array_equal(got_cache.seqlens, ref_cache.seqlens)
    np.testing.assert_array_equal(got_cache.kv, ref_cache.kv)
    np.testing.assert_allclose(outs, np.stack(ref_outs), rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(outs)))


def test_fori_loop_appends_equal_one_append():
    """Appending one token at a time in lax.fori_loop (a while loop) == one append of all of them."""
    cache = poisoned(fm.LatentCache.create(2, 48, D, jnp.float32, page_size=16), seed=60)
    cache = cache.append(randn(61, (2, 5, D)), num_new=jnp.asarray([5, 0], jnp.int32))
    new = randn(62, (2, 30, D))
    looped = jax.jit(lambda c: jax.lax.fori_loop(0, 30, lambda i, c: c.append(
        jax.lax.dynamic_slice_in_dim(new, i, 1, axis=1)), c))(cache)
    at_once = cache.append(new)
    np.testing.assert_array_equal(looped.seqlens, [35, 30])
    np.testing.assert_array_equal(looped.kv, at_once.kv)


# ---------------------------------------------------------------- in place under donation


def append_buffers(cache, x, donate):
    """(temp bytes, aliased bytes, full-cache copies) of the compiled `cache.append(x)`, donated or not.

    A full-cache copy is an HLO `copy` or `convert` (anywhere, fused computations included) whose result
    has as many elements as the cache."""
    f = jax.jit(lambda c, x: c.append(x), donate_argnums=(0,) if donate else ())
    compiled = f.lower(cache, x).compile()
    mem = compiled.memory_analysis()
    copies = [line.strip() for line in compiled.as_text().splitlines()
              if (m := re.search(r"= \w+\[([\d,]*)\]\S* (copy|convert)\(", line))
              and np.prod([int(n) for n in m.group(1).split(",") if n]) == cache.kv.size]
    return mem.temp_size_in_bytes, mem.alias_size_in_bytes, copies


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("page_size", [None, 64])
def test_donated_append_has_no_full_cache_copy(dtype, page_size):
    """Criteria: the output cache aliases the donated input buffer, XLA allocates no temporary buffer
    anywhere near the cache's size, and the compiled HLO has no copy/convert of a full cache.
    bfloat16 is left out on the CPU: XLA's CPU backend widens a bfloat16 scatter to float32 (see
    cache.py); the GPU test checks bfloat16."""
    cache = fm.LatentCache.create(4, 1024, 576, dtype, page_size=page_size)
    x = jnp.ones((4, 2, 576), dtype)
    nbytes = cache.kv.nbytes
    temp, alias, copies = append_buffers(cache, x, donate=True)
    assert alias >= nbytes and temp < nbytes // 16 and not copies, (temp, alias, nbytes, copies)
    # The criteria do see a copy: without donation XLA copies the cache into a fresh output buffer.
    temp, alias, copies = append_buffers(cache, x, donate=False)
    assert alias < nbytes and copies


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_paged_d1_with_nan_pages():
    """D1 (B 128, N 4096, H 16, 576/512, bf16, page 64) through LatentCache on the GPU: Triton vs the
    reference, NaN in spare pages, 10**6 in unused table entries, ragged lengths; and a donated bfloat16
    append without a full-cache copy."""
    b, n = 128, 4096
    seqlens = np.random.default_rng(0).integers(1, n + 1, size=b)
    seqlens[:4] = [n, 1, 64, 65]
    flat, paged, _ = caches_with(71, seqlens.tolist(), n, 64, jnp.bfloat16, dim=576)
    q = randn(72, (b, 1, 16, 576), jnp.bfloat16)
    kw = dict(softmax_scale=192 ** -0.5)
    want = flat.decode(q, implementation="xla", **kw)
    got = paged.decode(q, implementation="triton", **kw)
    assert rel_err(got, want) < 1e-2
    temp, alias, copies = append_buffers(paged, jnp.ones((b, 1, 576), jnp.bfloat16), donate=True)
    assert alias >= paged.kv.nbytes and temp < paged.kv.nbytes // 16 and not copies, (temp, alias, copies)


# ---------------------------------------------------------------- the example


@pytest.mark.parametrize("extra", [[], ["--scan"]])
def test_decode_loop_example_runs(extra, capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "decode_loop.py"
    spec = importlib.util.spec_from_file_location("decode_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--batch", "2", "--heads", "2", "--prompt", "40", "--steps", "3", "--page-size", "16", *extra])
    assert "tokens/s" in capsys.readouterr().out
