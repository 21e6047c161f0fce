"""FP8 latent caches through decode (issue 13): `mla_decode(kv_format=...)` in Triton's interpreter against
the reference on the dequantized cache, the "xla" path, `LatentCache(kv_format=...)`, the Flax layer, and the
quantization error itself against a bfloat16 cache. Interpreted shapes use D_V 128 (one blockscale group)
and D_R 64, so a token is 128 + 4 + 128 = 260 bytes (blockscale) or 192 (pertensor)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashmla_jax as fm
from flashmla_jax import LatentCache
from flashmla_jax.fp8 import dequantize_latent, latent_format, quantize_latent
from flashmla_jax.ops import decode as decode_ops
from _util import rel_err

D_V, D_R = 128, 64
D = D_V + D_R
FORMATS = ("fp8_blockscale", "fp8_pertensor")


def _inputs(seed, b, s_q, h, n, seqlens, dtype=jnp.bfloat16, d_v=D_V):
    """q [B, S_q, H, d_v + D_R] of dtype, latents [B, N, d_v + D_R] float32 spanning magnitudes, lengths."""
    kq, kk, km = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, s_q, h, d_v + D_R), jnp.float32).astype(dtype)
    lat = jax.random.normal(kk, (b, n, d_v + D_R), jnp.float32)
    lat = lat * 10.0 ** jax.random.uniform(km, (b, n, 1), minval=-1.0, maxval=1.0)    # per-token magnitudes
    return q, lat, jnp.asarray(seqlens, jnp.int32)


def _pack(lat, kv_format, scale=None):
    """(uint8 cache, kv_scale or None)."""
    if kv_format == "fp8_blockscale":
        return quantize_latent(lat, kv_format), None
    return quantize_latent(lat, kv_format, scale)


def _want(q, kv, sl, kv_format, kv_scale, table=None, **kw):
    """The reference on the dequantized cache (in q's dtype), as a float cache: (out, lse)."""
    deq = dequantize_latent(kv, kv_format, kv_scale, q.dtype)
    return fm.mla_decode(q, deq, sl, table, implementation="xla", return_lse=True, **kw)


def _check(got, want, tol=1e-2):
    out, lse = got
    ref, ref_lse = want
    assert rel_err(out, ref) < tol
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=2e-3, atol=2e-3)


def _garbage_pages(kv, kv_format, page_size, seqlens, seed):
    """Contiguous bytes [B, N, W] -> (pages [B * N / page_size + 2, page_size, W] shuffled, table): spare
    pages and every token past its sequence's length hold 0xFF (e4m3 NaN) c_kv bytes and, blockscale,
    infinite scales and NaN k_pe."""
    b, n, w = kv.shape
    fmt = latent_format(kv_format, D_V, D_R)
    junk = np.full((w,), 0xFF, np.uint8)
    if fmt.scale_offset is not None:
        junk[fmt.scale_offset:fmt.rope_offset] = np.tile(np.array([0, 0, 0x80, 0x7F], np.uint8), fmt.num_scales)
    per_seq = n // page_size
    num_pages = b * per_seq + 2
    perm = np.random.default_rng(seed).permutation(num_pages)[: b * per_seq].reshape(b, per_seq)
    data = np.array(kv)
    data[np.arange(n)[None, :] >= np.asarray(seqlens)[:, None]] = junk
    pages = np.broadcast_to(junk, (num_pages, page_size, w)).copy()
    pages[perm.reshape(-1)] = data.reshape(b * per_seq, page_size, w)
    return jnp.asarray(pages), jnp.asarray(perm, jnp.int32)


# ---------------------------------------------------------------- the kernels in the interpreter


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("kv_format", FORMATS)
def test_contiguous(kv_format, num_splits):
    """One query per sequence; a full, a ragged and an empty sequence (out 0, lse -inf)."""
    q, lat, sl = _inputs(1, 3, 1, 4, 96, [96, 37, 0])
    kv, scale = _pack(lat, kv_format)
    got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, num_splits=num_splits, kv_format=kv_format, kv_scale=scale,
                        implementation="interpret", return_lse=True)
    _check(got, _want(q, kv, sl, kv_format, scale, head_dim_v=D_V))
    assert got[0].dtype == jnp.bfloat16 and got[0].shape == (3, 1, 4, D_V)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_paged_garbage_in_unused_pages(kv_format):
    """S_q 2, pages of 32 in shuffled order; spare pages and tokens past each length hold NaN bytes and
    infinite scales: neither the kernel nor the xla path lets them into the output."""
    q, lat, sl = _inputs(2, 2, 2, 4, 128, [128, 45])
    kv, scale = _pack(lat, kv_format, scale=jnp.float32(0.05))
    want = _want(q, kv, sl, kv_format, scale, head_dim_v=D_V)
    pages, table = _garbage_pages(kv, kv_format, 32, sl, seed=3)
    for impl, splits in (("interpret", 2), ("interpret", None), ("xla", None)):
        got = fm.mla_decode(q, pages, sl, table, head_dim_v=D_V, num_splits=splits, kv_format=kv_format,
                            kv_scale=scale, implementation=impl, return_lse=True)
        _check(got, want)


def test_many_splits_use_the_combine_kernel():
    splits = decode_ops.MAX_SPLITS_MERGED_IN_KERNEL + 4
    plan = decode_ops.plan_decode((2, 1, 4, D), jnp.bfloat16, D_V, True, (2, 96, 260), None, splits, 132,
                                  kv_format="fp8_blockscale")
    assert plan.combine_grid is not None and plan.constexprs["KV_FORMAT"] == 1
    q, lat, sl = _inputs(3, 2, 1, 4, 96, [96, 50])
    kv, _ = _pack(lat, "fp8_blockscale")
    got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, num_splits=splits, kv_format="fp8_blockscale",
                        implementation="interpret", return_lse=True)
    _check(got, _want(q, kv, sl, "fp8_blockscale", None, head_dim_v=D_V))


def test_wide_row_tiles():
    """S_q * H = 40 rows: 64-row tiles with the wide-tile options (unmasked tiles, then masked ones)."""
    s_q, h = 10, 4
    plan = decode_ops.plan_decode((2, s_q, h, D), jnp.bfloat16, D_V, True, (2, 160, 260), None, 3, 132,
                                  kv_format="fp8_blockscale")
    assert plan.constexprs["BLOCK_M"] == 64 and plan.constexprs["SPLIT_MASKED"]
    q, lat, sl = _inputs(4, 2, s_q, h, 160, [160, 75])
    kv, _ = _pack(lat, "fp8_blockscale")
    got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, num_splits=3, kv_format="fp8_blockscale",
                        implementation="interpret", return_lse=True)
    _check(got, _want(q, kv, sl, "fp8_blockscale", None, head_dim_v=D_V))


@pytest.mark.parametrize("kv_format", FORMATS)
def test_stacked_cache(kv_format):
    """A layer-stacked cache [L, B, N, W] read at a layer; pertensor with one scale per layer."""
    layers = 3
    q, lat, sl = _inputs(5, 2, 1, 4, 64, [64, 21])
    lat = jnp.stack([lat * (i + 1) for i in range(layers)])
    scales = jnp.asarray([0.01, 0.02, 0.04], jnp.float32) if kv_format == "fp8_pertensor" else None
    kv = jnp.stack([_pack(lat[i], kv_format, None if scales is None else scales[i])[0] for i in range(layers)])
    for layer in (0, 2):
        one = None if scales is None else scales[layer]
        for impl in ("interpret", "xla"):
            got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, layer=layer, num_splits=2, kv_format=kv_format,
                                kv_scale=scales, implementation=impl, return_lse=True)
            _check(got, _want(q, kv[layer], sl, kv_format, one, head_dim_v=D_V))


def test_fp8_native_conversion_in_the_interpreter(monkeypatch):
    """FP8_NATIVE=True (the GPU's float8e4nv conversion) runs in the interpreter for finite bytes; the
    garbage of unused pages is masked before any conversion."""
    monkeypatch.setitem(decode_ops.FP8_NATIVE, "interpret", True)
    jax.clear_caches()          # traces made with the bit-arithmetic decode must not be reused
    try:
        for kv_format in FORMATS:
            q, lat, sl = _inputs(6, 2, 1, 4, 64, [64, 33])
            kv, scale = _pack(lat, kv_format)
            want = _want(q, kv, sl, kv_format, scale, head_dim_v=D_V)
            pages, table = _garbage_pages(kv, kv_format, 16, sl, seed=4)
            got = fm.mla_decode(q, pages, sl, table, head_dim_v=D_V, num_splits=2, kv_format=kv_format,
                                kv_scale=scale, implementation="interpret", return_lse=True)
            _check(got, want)
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.float16, 1e-2)])
def test_float32_and_float16_queries(dtype, tol):
    """Tiles are dequantized to q's dtype: exact in float32."""
    q, lat, sl = _inputs(7, 2, 1, 4, 64, [64, 10], dtype=dtype)
    kv, _ = _pack(lat, "fp8_blockscale")
    got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, kv_format="fp8_blockscale", implementation="interpret",
                        return_lse=True)
    assert got[0].dtype == dtype
    _check(got, _want(q, kv, sl, "fp8_blockscale", None, head_dim_v=D_V), tol)


def test_deepseek_dims_paged():
    """The real 512 + 64 latent (656-byte tokens), H 16, pages of 64."""
    q, lat, sl = _inputs(8, 2, 1, 16, 128, [128, 70], d_v=512)
    kv = quantize_latent(lat, "fp8_blockscale")
    assert kv.shape[-1] == 656
    want = _want(q, kv, sl, "fp8_blockscale", None, softmax_scale=192 ** -0.5)
    pages, table = _garbage_pages_512(kv, sl)
    got = fm.mla_decode(q, pages, sl, table, kv_format="fp8_blockscale", softmax_scale=192 ** -0.5,
                        implementation="interpret", return_lse=True)
    _check(got, want)


def _garbage_pages_512(kv, sl):
    """As _garbage_pages, for 656-byte tokens: pages of 64, NaN bytes past each length and in a spare page."""
    b, n, w = kv.shape
    data = np.array(kv)
    data[np.arange(n)[None, :] >= np.asarray(sl)[:, None]] = 0xFF
    pages = np.full((b * n // 64 + 1, 64, w), 0xFF, np.uint8)
    pages[1:] = data.reshape(-1, 64, w)
    return jnp.asarray(pages), jnp.arange(1, b * n // 64 + 1, dtype=jnp.int32).reshape(b, n // 64)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_vmap(implementation):
    """vmap folds members into the batch; pertensor members with their own scales run one by one."""
    q, lat, sl = _inputs(9, 2, 1, 4, 32, [32, 9])
    qs = jnp.stack([q, -q])
    kv_b = quantize_latent(lat, "fp8_blockscale")
    f = jax.vmap(lambda q: fm.mla_decode(q, kv_b, sl, head_dim_v=D_V, kv_format="fp8_blockscale",
                                         implementation=implementation))
    got = f(qs)
    for i in range(2):
        assert rel_err(got[i], _want(qs[i], kv_b, sl, "fp8_blockscale", None, head_dim_v=D_V)[0]) < 1e-2
    packed = [quantize_latent(lat * (i + 1), "fp8_pertensor") for i in range(2)]
    kvs, scales = jnp.stack([p[0] for p in packed]), jnp.stack([p[1] for p in packed])
    got = jax.vmap(lambda kv, s: fm.mla_decode(q, kv, sl, head_dim_v=D_V, kv_format="fp8_pertensor", kv_scale=s,
                                               implementation=implementation))(kvs, scales)
    for i in range(2):
        assert rel_err(got[i], _want(q, kvs[i], sl, "fp8_pertensor", scales[i], head_dim_v=D_V)[0]) < 1e-2


def test_errors():
    q, lat, sl = _inputs(10, 2, 1, 4, 32, [32, 9])
    kv, scale = _pack(lat, "fp8_pertensor")
    kvb, _ = _pack(lat, "fp8_blockscale")
    call = lambda **kw: fm.mla_decode(**{"q": q, "kv_cache": kv, "cache_seqlens": sl, "head_dim_v": D_V,  # noqa: E731
                                         "kv_format": "fp8_pertensor", "kv_scale": scale, **kw})
    with pytest.raises(ValueError, match="kv_format"):
        call(kv_format="fp8")
    with pytest.raises(TypeError, match="kv_format"):
        call(kv_format=1)
    with pytest.raises(TypeError, match="kv_cache must be uint8"):
        call(kv_cache=lat.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"kv_cache must be \[B, N, 192\]"):
        call(kv_cache=kvb)
    with pytest.raises(ValueError, match="needs kv_scale"):
        call(kv_scale=None)
    with pytest.raises(ValueError, match="kv_scale is only"):
        call(kv_cache=kvb, kv_format="fp8_blockscale")
    with pytest.raises(ValueError, match="kv_scale must be a scalar"):
        call(kv_scale=jnp.ones((2,), jnp.float32))
    with pytest.raises(TypeError, match="kv_scale"):
        call(kv_scale="1.0")
    with pytest.raises(ValueError, match="head_dim_v=64"):
        call(kv_cache=kvb, kv_format="fp8_blockscale", kv_scale=None, head_dim_v=64)
    with pytest.raises(TypeError, match="kv_cache dtype"):
        call(kv_format=None, kv_scale=None)


# ---------------------------------------------------------------- LatentCache and the Flax layer


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("page_size", [None, 16])
def test_cache_append_decode(kv_format, page_size):
    """Two appends (a ragged prompt, then one token) in a jitted, donated step equal quantize_latent of
    the same latents; decode equals the reference on the dequantized cache."""
    q, lat, _ = _inputs(11, 2, 1, 4, 24, [0, 0])
    scale = 0.02 if kv_format == "fp8_pertensor" else None
    cache = LatentCache.create(2, 48, dim=D, page_size=page_size, kv_format=kv_format, kv_scale=scale)
    assert cache.dim == D and cache.kv.dtype == jnp.uint8 and cache.kv.shape[-1] == cache.format.bytes_per_token
    step = jax.jit(lambda c, x, n: c.append(x, num_new=n), donate_argnums=0)
    cache = step(cache, lat[:, :20], jnp.asarray([20, 13], jnp.int32))
    cache = step(cache, lat[:, 20:21], jnp.asarray([1, 1], jnp.int32))
    np.testing.assert_array_equal(cache.seqlens, [21, 14])
    rows = jnp.concatenate([lat[:, :13], lat[:, 20:21]], axis=1)
    want_bytes, _ = _pack(rows[1:], kv_format, scale)
    view = cache.kv if page_size is None else fm.reference.gather_pages(cache.kv, cache.block_table)
    np.testing.assert_array_equal(view[1:, :14], want_bytes)
    for impl in ("interpret", "xla"):
        got = cache.decode(q, head_dim_v=D_V, implementation=impl, return_lse=True)
        _check(got, _want(q, view, cache.seqlens, kv_format, cache.kv_scale, head_dim_v=D_V))


@pytest.mark.parametrize("kv_format", FORMATS)
def test_stacked_cache_equals_separate_caches(kv_format):
    layers = 2
    q, lat, _ = _inputs(12, 2, 1, 4, 16, [0, 0])
    scales = [0.01, 0.05]
    kw = dict(page_size=16, kv_format=kv_format)
    scale_of = (lambda i: scales[i]) if kv_format == "fp8_pertensor" else (lambda i: None)    # noqa: E731
    stacked = LatentCache.create(2, 32, dim=D, num_layers=layers, kv_scale=scale_of(0) and jnp.asarray(scales), **kw)
    singles = [LatentCache.create(2, 32, dim=D, kv_scale=scale_of(i), **kw) for i in range(layers)]
    for i in range(layers):
        stacked = stacked.append(lat * (i + 1), layer=i)
        singles[i] = singles[i].append(lat * (i + 1))
    for i in range(layers):
        np.testing.assert_array_equal(stacked.kv[i], singles[i].kv)
        got = stacked.decode(q, layer=i, head_dim_v=D_V, implementation="interpret")
        want = singles[i].decode(q, head_dim_v=D_V, implementation="xla")
        assert rel_err(got, want) < 1e-2


def test_cache_errors():
    with pytest.raises(ValueError, match="kv_format"):
        LatentCache.create(1, 16, kv_format="int8")
    with pytest.raises(TypeError, match="kv_format"):
        LatentCache.create(1, 16, kv_format=8)
    with pytest.raises(ValueError, match="kv_scale is only"):
        LatentCache.create(1, 16, kv_format="fp8_blockscale", kv_scale=1.0)
    with pytest.raises(ValueError, match="kv_scale is only"):
        LatentCache.create(1, 16, kv_scale=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        LatentCache.create(1, 16, dim=96, kv_format="fp8_blockscale")
    with pytest.raises(ValueError, match=r"kv_scale must be a scalar or \[L\]"):
        LatentCache.create(1, 16, num_layers=2, kv_format="fp8_pertensor", kv_scale=jnp.ones(3))
    cache = LatentCache.create(1, 16, kv_format="fp8_blockscale")
    assert cache.kv.shape == (1, 16, 656) and cache.dim == 576 and cache.kv_scale is None


@pytest.mark.parametrize("kv_format", FORMATS)
def test_flax_layer_with_an_fp8_cache(kv_format):
    """Prefill (cache_empty) then one decode step through the Flax layer: the FP8 cache's output is close
    to the bfloat16 cache's, and its prefill attends to the latents as the cache stores them."""
    from flashmla_jax.flax import MLAConfig, init_params, mla_attention

    config = MLAConfig(hidden_size=64, num_heads=2, kv_lora_rank=D_V, qk_nope_head_dim=32, qk_rope_head_dim=D_R,
                       v_head_dim=32)
    params = init_params(config, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 64), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    outs = {}
    for fmt in (None, kv_format):
        cache = LatentCache.create(2, 16, dim=D, dtype=jnp.bfloat16, kv_format=fmt,
                                   kv_scale=0.01 if fmt == "fp8_pertensor" else None)
        kw = dict(config=config, dtype=jnp.bfloat16, implementation="xla")
        y0, cache = mla_attention(params, x[:, :8], pos[:, :8], cache, cache_empty=True, **kw)
        y1, cache = mla_attention(params, x[:, 8:], pos[:, 8:], cache, implementation="interpret",
                                  config=config, dtype=jnp.bfloat16)
        outs[fmt] = (y0, y1)
    assert rel_err(outs[kv_format][0], outs[None][0]) < 0.1
    assert rel_err(outs[kv_format][1], outs[None][1]) < 0.1


# ---------------------------------------------------------------- the quantization error, measured


def _quantization_error(q, lat, kv_format):
    """rel err of decode over the FP8 cache of `lat` against decode over its bfloat16 cache (xla)."""
    sl = jnp.full((lat.shape[0],), lat.shape[1], jnp.int32)
    kv, scale = _pack(lat, kv_format)
    kw = dict(softmax_scale=192 ** -0.5, implementation="xla", head_dim_v=lat.shape[-1] - D_R)
    fp8 = fm.mla_decode(q, kv, sl, kv_format=kv_format, kv_scale=scale, **kw)
    bf16 = fm.mla_decode(q, lat.astype(jnp.bfloat16), sl, **kw)
    return rel_err(fp8, bf16)


# Bounds a little above what was measured (README, "FP8 latent cache"); printed with -s.
QUANT_BOUNDS = {"unit": 0.05, "spread": 0.08, "flax": 0.035}


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("latents", ["unit", "spread"])
def test_quantization_error_random_latents(kv_format, latents):
    """DeepSeek widths, B 2, N 1024, H 16: queries N(0, 1), latents N(0, 1) ("unit") or with per-token
    magnitudes 0.1 .. 10 ("spread")."""
    q, lat, _ = _inputs(13, 2, 1, 16, 1024, [0, 0], d_v=512)
    if latents == "unit":
        lat = jax.random.normal(jax.random.PRNGKey(14), lat.shape, jnp.float32)
    err = _quantization_error(q, lat, kv_format)
    print(f"quantization error, random latents ({latents}), {kv_format}: {err:.4f}")
    assert err < QUANT_BOUNDS[latents]


@pytest.mark.parametrize("kv_format", FORMATS)
def test_quantization_error_flax_latents(kv_format):
    """Latents from the Flax layer (project_latent of random hidden states: RMS-normed c_kv, RoPE'd k_pe)
    and its absorbed queries, DeepSeek-V2-Lite widths."""
    from flashmla_jax.flax import MLAConfig, absorb_query, init_params, project_latent, project_queries, split_wkv_b

    config = MLAConfig(hidden_size=512, num_heads=16)
    params = init_params(config, jax.random.PRNGKey(2))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 1024, 512), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(1024, dtype=jnp.int32), (2, 1024))
    lat = project_latent(params, x, pos, config)
    q_nope, q_pe = project_queries(params, x[:, -1:], pos[:, -1:], config)
    w_uk, _ = split_wkv_b(params["wkv_b"], config.qk_nope_head_dim)
    q = absorb_query(q_nope, q_pe, w_uk).astype(jnp.bfloat16)
    err = _quantization_error(q, lat, kv_format)
    print(f"quantization error, Flax-layer latents, {kv_format}: {err:.4f}")
    assert err < QUANT_BOUNDS["flax"]


# ---------------------------------------------------------------- tier 3: the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_fp8_d1(kv_format, paged):
    """D1-like: B 128, N 4096, H 16, S_q 1 (and H 128 for the compute-bound tiles), triton vs xla on the
    dequantized cache, with garbage in unused pages when paged."""
    for b, h, s_q in ((128, 16, 1), (32, 128, 2)):
        n = 4096
        kq, kk, kl = jax.random.split(jax.random.PRNGKey(b + h), 3)
        q = jax.random.normal(kq, (b, s_q, h, 576), jnp.float32).astype(jnp.bfloat16)
        lat = jax.random.normal(kk, (b, n, 576), jnp.float32)
        sl = jax.random.randint(kl, (b,), 1, n + 1).astype(jnp.int32)
        kv, scale = _pack(lat, kv_format)
        table = None
        if paged:
            perm = np.random.default_rng(0).permutation(b * n // 64 + 4)
            pages = np.full((b * n // 64 + 4, 64, kv.shape[-1]), 0xFF, np.uint8)
            pages[perm[: b * n // 64]] = np.asarray(kv).reshape(-1, 64, kv.shape[-1])
            kv, table = jnp.asarray(pages), jnp.asarray(perm[: b * n // 64].reshape(b, n // 64), jnp.int32)
        kw = dict(softmax_scale=192 ** -0.5, kv_format=kv_format, kv_scale=scale, return_lse=True)
        out, lse = fm.mla_decode(q, kv, sl, table, implementation="triton", **kw)
        ref, ref_lse = fm.mla_decode(q, kv, sl, table, implementation="xla", **kw)
        assert rel_err(out, ref) < 1e-2, (b, h, s_q)
        np.testing.assert_allclose(lse, ref_lse, rtol=2e-3, atol=2e-3)
