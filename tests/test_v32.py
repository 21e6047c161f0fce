"""The DeepSeek-V3.2 layer (flashmla_jax.flax_v32): its config fields, the indexer keys in LatentCache, the layer
against an independent float64 NumPy forward that follows transformers' DeepseekV32Attention (dense attention with
every unselected key masked), prefill == step-by-step decode (FP8 caches included), stacked caches, the loader on a
synthetic V3.2 checkpoint, and transformers' DeepseekV32Attention itself when it is installed.

Data are drawn so that the top-k has no ties: every check of a selection first asserts a gap between each query's
K-th and (K+1)-th index score, so the selected sets are well defined and must match exactly."""
import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import flashmla_jax as fm  # noqa: E402
from flashmla_jax import checkpoint as ck  # noqa: E402
from flashmla_jax import flax as fmx  # noqa: E402
from flashmla_jax import flax_v32 as v32  # noqa: E402
from flashmla_jax.config import MLAConfig, param_shapes  # noqa: E402
from flashmla_jax.fp8 import dequantize_index_keys  # noqa: E402
from flashmla_jax.indexer_math import indexer_projections  # noqa: E402
from _util import rel_err  # noqa: E402

# Small dims the kernels take (C and R powers of two >= 16, index heads of 128), a small RoPE base and a short
# YaRN context so that positions < 40 turn the frequencies; mscale != mscale_all_dim puts a magnitude on cos/sin.
DIMS = dict(hidden_size=32, num_heads=2, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
            v_head_dim=16, rope_theta=100.0, index_n_heads=8, index_head_dim=128, index_topk=8)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=8.0, beta_slow=1.0, mscale=0.9,
            mscale_all_dim=0.7)
CONFIG = MLAConfig(**DIMS, rope_scaling=YARN)
WIDE = dataclasses.replace(CONFIG, kv_lora_rank=128)          # "fp8_blockscale" latents need C % 128 == 0
K = DIMS["index_topk"]
TOL = 1e-5


def make_params(seed, config=CONFIG):
    """init_params with the norm weights and the LayerNorm bias randomised too (a skipped one then fails)."""
    params = dict(fmx.init_params(config, jax.random.key(seed)))
    rng = np.random.default_rng(seed + 100)
    for name in ("q_norm", "kv_norm", "index_k_norm"):
        params[name] = jnp.asarray(1.0 + 0.3 * rng.standard_normal(params[name].shape), jnp.float32)
    params["index_k_norm_bias"] = jnp.asarray(0.3 * rng.standard_normal(params["index_k_norm_bias"].shape),
                                              jnp.float32)
    return params


def make_tokens(seed, b, s, start=0, hidden=DIMS["hidden_size"]):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((b, s, hidden)), jnp.float32)
    return x, jnp.asarray(np.broadcast_to(start + np.arange(s, dtype=np.int32), (b, s)))


# ---------------------------------------------------------------- the independent forward (transformers' math)

def v32_numpy(params, x, positions, config):
    """float64 DeepSeek-V3.2 attention over the whole sequence x [B, T, M] (query i sees keys <= i), written from
    transformers' DeepseekV32Attention / DeepseekV32Indexer: non-absorbed MLA with interleaved RoPE (complex
    numbers here), the indexer with rotate_half RoPE on its first R features, LayerNorm keys, weights ·
    H_I^-½, scores relu(q·k · D_I^-½); every key outside the causal top-K masked.
    Returns (y [B, T, M], index scores [B, T, T] with -inf where not visible, selected [B, T, T] bool)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    pos = np.asarray(positions, np.float64)
    c = config
    b, t, _ = x.shape
    inv_freq, mag = c.rope_inv_freq(), c.rope_magnitude
    angle = pos[..., None] * inv_freq                                    # [B, T, R/2]

    def rms(v, w):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + c.rms_norm_eps) * w

    def rope_pairs(v):                                                   # v [B, T, ..., R], pairs (2i, 2i+1)
        z = (v[..., 0::2] + 1j * v[..., 1::2]) * mag * np.exp(1j * angle).reshape(
            (b, t) + (1,) * (v.ndim - 3) + angle.shape[-1:])
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    def rope_half(v):                                                    # rotate_half on the first R features
        r = c.qk_rope_head_dim
        emb = np.concatenate([angle, angle], axis=-1).reshape((b, t) + (1,) * (v.ndim - 3) + (r,))
        rot = v[..., :r]
        half = np.concatenate([-rot[..., r // 2:], rot[..., :r // 2]], axis=-1)
        return np.concatenate([rot * np.cos(emb) * mag + half * np.sin(emb) * mag, v[..., r:]], axis=-1)

    q_resid = rms(x @ p["wq_a"], p["q_norm"])
    q = np.einsum("bsq,qhd->bshd", q_resid, p["wq_b"])
    q = np.concatenate([q[..., :c.qk_nope_head_dim], rope_pairs(q[..., c.qk_nope_head_dim:])], axis=-1)
    kv_a = x @ p["wkv_a"]
    c_kv = rms(kv_a[..., :c.kv_lora_rank], p["kv_norm"])
    k_pe = rope_pairs(kv_a[..., c.kv_lora_rank:])
    kv = np.einsum("bsc,chd->bshd", c_kv, p["wkv_b"])
    k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
    k = np.concatenate([k_nope, np.broadcast_to(k_pe[:, :, None], k_nope.shape[:3] + k_pe.shape[-1:])], axis=-1)

    qi = rope_half(np.einsum("bsq,qhd->bshd", q_resid, p["index_wq_b"]))
    ki = x @ p["index_wk"]
    ki = (ki - ki.mean(-1, keepdims=True)) / np.sqrt(ki.var(-1, keepdims=True) + 1e-6)
    ki = rope_half(ki * p["index_k_norm"] + p["index_k_norm_bias"])
    w = (x @ p["index_weights_proj"]) * c.index_n_heads ** -0.5
    relu = np.maximum(np.einsum("bshd,btd->bsht", qi, ki) * c.index_head_dim ** -0.5, 0.0)
    visible = np.tril(np.ones((t, t), bool))
    index_scores = np.where(visible, np.einsum("bsh,bsht->bst", w, relu), -np.inf)
    order = np.argsort(-index_scores, axis=-1, kind="stable")
    selected = np.zeros((b, t, t), bool)
    np.put_along_axis(selected, order[..., :c.index_topk], True, axis=-1)
    selected &= visible

    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * c.softmax_scale
    scores = np.where(selected[:, None], scores, -np.inf)
    prob = np.exp(scores - scores.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", prob, v)
    return np.einsum("bshv,hvm->bsm", o, p["wo"]), index_scores, selected


def assert_no_ties(index_scores, k, rel_gap=1e-3):
    """Each query that sees more than k keys has a gap between its k-th and (k+1)-th score (float32 rounding of
    the scores then cannot change the selected set). Returns how many queries the top-k really cut."""
    cut = 0
    for row in index_scores.reshape(-1, index_scores.shape[-1]):
        vis = np.sort(row[np.isfinite(row)])[::-1]
        if vis.size > k:
            cut += 1
            assert vis[k - 1] - vis[k] > rel_gap * np.abs(vis).max(), "data with a near-tie in the top-k"
    return cut


@functools.lru_cache(maxsize=None)
def reference(seed, b, t, config=CONFIG, rel_gap=1e-3):
    """(params, x, positions, y) of v32_numpy for `seed`, with the no-tie check and a top-k that cuts."""
    params = make_params(seed, config)
    x, pos = make_tokens(seed + 1, b, t, hidden=config.hidden_size)
    y, scores, _ = v32_numpy(params, x, pos, config)
    assert assert_no_ties(scores, config.index_topk, rel_gap) > 0
    return params, x, pos, y


@functools.partial(jax.jit, static_argnames=("config", "cache_empty", "implementation"))
def step(params, x, pos, cache, *, config=CONFIG, cache_empty=False, implementation="xla"):
    return v32.dsa_attention(params, x, pos, cache, config=config, cache_empty=cache_empty,
                             implementation=implementation)


def run_cached(params, x, pos, cache, prefill, chunks, implementation="xla", layer=None, config=CONFIG,
               cache_empty=True):
    """Prefill the first `prefill` tokens into the empty cache (with the cache_empty promise unless told not to),
    then the rest in pieces of the sizes in `chunks` (1: token-by-token decode). Returns (y [B, T, M], cache)."""
    def fn(params, x, pos, cache, layer, cache_empty=False):
        return v32.dsa_attention(params, x, pos, cache, config=config, cache_empty=cache_empty,
                                 implementation=implementation, layer=layer)

    first = jax.jit(functools.partial(fn, cache_empty=cache_empty))
    later = jax.jit(fn)                                   # the layer index (if any) is traced
    y, cache = first(params, x[:, :prefill], pos[:, :prefill], cache, layer)
    ys, at = [y], prefill
    for n in chunks:
        y, cache = later(params, x[:, at:at + n], pos[:, at:at + n], cache, layer)
        ys.append(y)
        at += n
    assert at == x.shape[1]
    return jnp.concatenate(ys, axis=1), cache


def new_cache(b, capacity, page_size=16, dtype=jnp.float32, config=CONFIG, **kw):
    return fm.LatentCache.create(b, capacity, dim=config.latent_dim, dtype=dtype, page_size=page_size,
                                 index_head_dim=config.index_head_dim, **kw)


# ---------------------------------------------------------------- config

V32_CONFIG = {"model_type": "deepseek_v32", "hidden_size": 7168, "num_attention_heads": 128, "q_lora_rank": 1536,
              "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
              "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048, "num_hidden_layers": 61,
              "rope_theta": 10000, "max_position_embeddings": 163840,
              "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "original_max_position_embeddings": 4096, "type": "yarn"}}


def test_config_reads_the_indexer():
    cfg = MLAConfig.from_hf_config(V32_CONFIG)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 2048) and cfg.has_indexer
    # transformers' defaults fill a deepseek_v32 config's missing keys; a V3 config has no indexer
    bare = {k: v for k, v in V32_CONFIG.items() if not k.startswith("index_")}
    assert MLAConfig.from_hf_config(bare) == cfg
    v3 = MLAConfig.from_hf_config({**bare, "model_type": "deepseek_v3"})
    assert not v3.has_indexer and v3.index_n_heads is None and v3 == MLAConfig.from_hf_config(
        {**bare, "model_type": "deepseek_v3", "index_topk": None})
    assert MLAConfig.from_hf_config({**V32_CONFIG, "index_topk": 0}).index_topk is None
    assert MLAConfig(64, 4, index_topk=0) == MLAConfig(64, 4)
    with pytest.raises(ValueError, match="model_type"):
        MLAConfig.from_hf_config({**V32_CONFIG, "model_type": "glm_moe_dsa"})
    shapes = param_shapes(cfg)
    assert shapes["index_wq_b"] == (1536, 64, 128) and shapes["index_weights_proj"] == (7168, 64)
    assert shapes["index_k_norm_bias"] == (128,) and "index_wk" not in param_shapes(v3)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(index_topk=8, index_n_heads=4), ValueError, "index_head_dim"),
    (dict(index_n_heads=4, index_head_dim=128), ValueError, "index_topk"),
    (dict(index_topk=8, index_n_heads=4, index_head_dim=32), ValueError, "index_head_dim"),
    (dict(index_topk=-1, index_n_heads=4, index_head_dim=128), ValueError, "index_topk"),
    (dict(index_topk=8.0, index_n_heads=4, index_head_dim=128), TypeError, "index_topk"),
    (dict(index_topk=8, index_n_heads=0, index_head_dim=128), ValueError, "index_n_heads"),
    (dict(q_lora_rank=None, index_topk=8, index_n_heads=4, index_head_dim=128), ValueError, "q_lora_rank"),
])
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLAConfig(**{**dict(hidden_size=32, num_heads=2, q_lora_rank=16, qk_rope_head_dim=64), **kwargs})


# ---------------------------------------------------------------- the indexer keys in LatentCache

def test_cache_without_indexer_keys_is_unchanged():
    plain = fm.LatentCache.create(2, 40, dim=48, page_size=16)
    assert plain.index_k is None and plain.index_head_dim is None and len(jax.tree_util.tree_leaves(plain)) == 3
    with pytest.raises(ValueError, match="index_keys needs"):
        plain.append(jnp.ones((2, 1, 48)), index_keys=jnp.ones((2, 1, 128)))
    with pytest.raises(ValueError, match="no indexer keys"):
        plain.index_topk(jnp.ones((2, 1, 4, 128)), jnp.ones((2, 1, 4)))


@pytest.mark.parametrize("page_size, index_kv_format, num_layers", [
    (None, None, None), (16, None, None), (None, "fp8_paged", None), (16, "fp8_paged", None), (16, "fp8_paged", 2),
    (None, None, 2)])
def test_cache_appends_index_keys_beside_latents(page_size, index_kv_format, num_layers):
    """Ragged appends (num_new) write each key where its latent goes, as stored (cast / FP8 per token), past
    capacity dropped; a stacked cache writes only the layer asked for."""
    b, cap, d = 2, 40, 48
    cache = fm.LatentCache.create(b, cap, dim=d, dtype=jnp.float32, page_size=page_size, num_layers=num_layers,
                                  index_head_dim=128, index_kv_format=index_kv_format)
    layer = None if num_layers is None else 1
    rng = np.random.default_rng(0)
    written = [[] for _ in range(b)]
    for s, num_new in ((5, [5, 3]), (30, [30, 30]), (9, [9, 0])):          # the last one overflows sequence 0
        kv = jnp.asarray(rng.standard_normal((b, s, d)), jnp.float32)
        keys = jnp.asarray(rng.standard_normal((b, s, 128)) * 3, jnp.float32)
        cache = cache.append(kv, num_new=jnp.asarray(num_new, jnp.int32), layer=layer, index_keys=keys)
        for i in range(b):
            written[i] += list(np.asarray(keys[i, :num_new[i]]))
    lengths = np.asarray(cache.lengths(layer))
    np.testing.assert_array_equal(lengths, [cap, 33])
    index_k = cache.index_k if layer is None else cache.index_k[layer]
    keys = index_k if index_kv_format is None else dequantize_index_keys(index_k)       # [rows, P, 128]
    keys = np.asarray(keys).reshape(-1, 128)
    for i in range(b):
        for t in range(lengths[i]):
            row = i * cap + t if page_size is None else (int(cache.block_table[i, t // page_size]) * page_size
                                                         + t % page_size)
            want = written[i][t]
            if index_kv_format is not None:          # one float32 scale per token: e4m3's relative step 2^-3
                assert np.max(np.abs(keys[row] - want)) <= np.abs(want).max() * 2.0 ** -4
            else:
                np.testing.assert_array_equal(keys[row], want)
    if num_layers is not None:
        assert not np.any(np.asarray(cache.index_k[0])) and not np.any(np.asarray(cache.lengths(0)))


@pytest.mark.parametrize("page_size, index_kv_format", [(None, None), (64, None), (64, "fp8_paged")])
def test_donated_append_with_index_keys_copies_no_buffer(page_size, index_kv_format):
    """Donated, the append updates the latents and the index keys in place: both outputs alias their inputs, no
    temporary buffer near their size, no HLO copy/convert of a whole buffer (float32: XLA's CPU backend widens
    bfloat16 scatters)."""
    cache = fm.LatentCache.create(4, 1024, 576, jnp.float32, page_size=page_size, index_head_dim=128,
                                  index_kv_format=index_kv_format)
    f = jax.jit(lambda c, x, k: c.append(x, index_keys=k), donate_argnums=0)
    compiled = f.lower(cache, jnp.ones((4, 2, 576)), jnp.ones((4, 2, 128))).compile()
    mem = compiled.memory_analysis()
    sizes = {cache.kv.size, cache.index_k.size}
    copies = [line for line in compiled.as_text().splitlines()
              if (m := re.search(r"= \w+\[([\d,]*)\]\S* (copy|convert)\(", line))
              and np.prod([int(n) for n in m.group(1).split(",") if n]) in sizes]
    nbytes = cache.kv.nbytes + cache.index_k.nbytes
    assert mem.alias_size_in_bytes >= nbytes and mem.temp_size_in_bytes < cache.index_k.nbytes // 16, mem
    assert not copies, copies


def test_cache_index_errors():
    with pytest.raises(ValueError, match="index_head_dim"):
        fm.LatentCache.create(2, 16, index_kv_format="fp8_paged")
    with pytest.raises(ValueError, match="128"):
        fm.LatentCache.create(2, 16, index_head_dim=64, index_kv_format="fp8_paged")
    with pytest.raises(ValueError, match="index_kv_format"):
        fm.LatentCache.create(2, 16, index_head_dim=128, index_kv_format="fp8_blockscale")
    cache = fm.LatentCache.create(2, 16, dim=48, index_head_dim=128)
    with pytest.raises(ValueError, match="pass index_keys"):
        cache.append(jnp.ones((2, 1, 48)))
    with pytest.raises(ValueError, match="index_keys must be"):
        cache.append(jnp.ones((2, 1, 48)), index_keys=jnp.ones((2, 2, 128)))
    with pytest.raises(TypeError, match="index_keys"):
        cache.append(jnp.ones((2, 1, 48)), index_keys=jnp.ones((2, 1, 128), jnp.int32))


# ---------------------------------------------------------------- the layer against the NumPy forward

@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("t", [24, 7])
def test_prefill_matches_numpy(implementation, t):
    """No cache: T > K runs the indexer's top-k and the sparse prefill, T <= K the dense prefill."""
    params, x, pos, want = reference(0, 2, 24)
    y, cache = step(params, x[:, :t], pos[:, :t], None, implementation=implementation)
    assert cache is None
    # the first t rows of the reference see only keys < t: the same as a forward of t tokens
    assert rel_err(y, want[:, :t]) < TOL


@pytest.mark.parametrize("page_size, prefill, chunks", [
    (16, 12, [1] * 12),          # sparse prefill through the cache, then token-by-token sparse decode
    (None, 6, [1] * 6 + [3, 5, 4]),   # dense prefill (6 <= K), decode, then chunks with causal queries
])
def test_prefill_then_decode_matches_numpy(page_size, prefill, chunks):
    params, x, pos, want = reference(0, 2, 24)
    y, cache = run_cached(params, x, pos, new_cache(2, 32, page_size), prefill, chunks)
    assert rel_err(y, want) < TOL
    np.testing.assert_array_equal(cache.lengths(), [24, 24])


def test_cache_no_larger_than_topk_attends_densely():
    """A cache of capacity <= K: every visible token is selected, the dense absorbed decode runs."""
    params, x, pos, want = reference(0, 2, 24)
    y, _ = run_cached(params, x[:, :8], pos[:, :8], new_cache(2, 8), 3, [1] * 5)
    assert rel_err(y, want[:, :8]) < TOL


def test_interpreted_kernels_through_a_cache():
    """The indexer's top-k and the sparse decode kernels in Triton's interpreter, against the NumPy forward."""
    params, x, pos, want = reference(0, 2, 24)
    y, _ = run_cached(params, x[:, :14], pos[:, :14], new_cache(2, 32), 11, [1, 2], implementation="interpret")
    assert rel_err(y, want[:, :14]) < TOL


@pytest.mark.parametrize("kv_format, index_kv_format, page_size", [
    ("fp8_blockscale", "fp8_paged", 16), (None, "fp8_paged", None), ("fp8_blockscale", None, 16)])
def test_fp8_prefill_equals_step_by_step_decode(kv_format, index_kv_format, page_size):
    """With FP8 latents and/or FP8 index keys, a long prompt's prefill selects and reads what token-by-token
    decoding of the same tokens does (both see the values as stored, both round the absorbed queries to bfloat16
    over an FP8 pool: the first token too, without the cache_empty promise); and it stays near the float forward."""
    kv_dims = dict(kv_format=kv_format, rope_dim=WIDE.qk_rope_head_dim) if kv_format else {}
    params, x, pos, want = reference(0, 2, 24, WIDE)
    x, pos, want = x[:, :14], pos[:, :14], want[:, :14]
    make = functools.partial(new_cache, 2, 32, page_size, jnp.bfloat16 if kv_format else jnp.float32, WIDE,
                             index_kv_format=index_kv_format, **kv_dims)
    y_prefill, c1 = run_cached(params, x, pos, make(), 14, [], config=WIDE)
    y_steps, c2 = run_cached(params, x, pos, make(), 1, [1] * 13, config=WIDE, cache_empty=False)
    assert rel_err(y_prefill, y_steps) < TOL
    np.testing.assert_array_equal(np.asarray(c1.index_k), np.asarray(c2.index_k))
    np.testing.assert_array_equal(np.asarray(c1.kv), np.asarray(c2.kv))
    assert rel_err(y_prefill, want) < 0.1


def test_cached_keys_and_latents_equal_a_recompute():
    """After prefill and decode, every token's latent and index key in the cache are the layer's projections of
    that token (recomputed here), at the place the block table gives it."""
    params, x, pos, _ = reference(0, 2, 24)
    _, cache = run_cached(params, x, pos, new_cache(2, 32, 16, index_kv_format="fp8_paged"), 12, [1] * 4 + [8])
    latent = fmx.project_latent(params, x, pos, CONFIG)
    q_latent = fmx.query_latent(params, x, CONFIG)
    _, k_index, _ = indexer_projections(v32.indexer_params(params), x, q_latent, pos,
                                            inv_freq=CONFIG.rope_inv_freq(), rope_magnitude=CONFIG.rope_magnitude)
    keys = np.asarray(dequantize_index_keys(cache.index_k)).reshape(-1, 128)
    want_keys = np.asarray(dequantize_index_keys(fm.quantize_index_keys(k_index)))      # [B, T, 128] per token
    kv = np.asarray(cache.kv).reshape(-1, CONFIG.latent_dim)
    for b in range(2):
        rows = np.asarray(cache.block_table[b, np.arange(24) // 16]) * 16 + np.arange(24) % 16
        np.testing.assert_allclose(keys[rows], want_keys[b], rtol=0, atol=1e-6)
        np.testing.assert_allclose(kv[rows], np.asarray(latent[b]), rtol=1e-6, atol=1e-6)


def test_stacked_cache_equals_a_single_one():
    """A layer of a stacked cache (traced layer index, inside jit) gives what its own cache gives; the other
    layer is untouched."""
    params, x, pos, _ = reference(0, 2, 24)
    x, pos = x[:, :12], pos[:, :12]
    single, c1 = run_cached(params, x, pos, new_cache(2, 32, index_kv_format="fp8_paged"), 10, [1, 1])
    stacked, c2 = run_cached(params, x, pos, new_cache(2, 32, num_layers=2, index_kv_format="fp8_paged"), 10, [1, 1],
                             layer=jnp.int32(1))
    assert rel_err(stacked, single) < TOL
    np.testing.assert_array_equal(np.asarray(c2.index_k[1]), np.asarray(c1.index_k))
    assert not np.any(np.asarray(c2.index_k[0])) and not np.any(np.asarray(c2.kv[0]))


def test_module_equals_function_and_bf16_is_close():
    layer = v32.DeepSeekSparseAttention(**{k: v for k, v in DIMS.items()}, rope_scaling=YARN, implementation="xla",
                                        rngs=nnx.Rngs(3))
    assert set(layer.params_dict()) == set(param_shapes(layer.config)) and layer.config == CONFIG
    np.testing.assert_array_equal(layer.index_k_norm_bias[...], 0.0)
    params, x, pos, want = reference(0, 2, 24)
    for name, value in params.items():
        getattr(layer, name)[...] = value
    y, _ = nnx.jit(lambda m, x, p: m(x, p))(layer, x, pos)
    assert rel_err(y, want) < TOL
    layer.dtype = jnp.bfloat16            # bfloat16 scores may rank near keys otherwise: compare where none is cut
    y16, _ = layer(x[:, :K].astype(jnp.bfloat16), pos[:, :K])
    assert y16.dtype == jnp.bfloat16 and rel_err(y16, want[:, :K]) < 0.02


def test_layer_errors():
    params, x, pos, _ = reference(0, 2, 24)
    v3 = MLAConfig(**{k: v for k, v in DIMS.items() if not k.startswith("index_")})
    with pytest.raises(ValueError, match="no lightning indexer"):
        v32.dsa_attention(fmx.init_params(v3, jax.random.key(0)), x, pos, config=v3)
    with pytest.raises(ValueError, match="flax_v32"):
        fmx.mla_attention(params, x, pos, config=CONFIG)
    with pytest.raises(ValueError, match="indexer keys"):
        v32.dsa_attention(params, x, pos, fm.LatentCache.create(2, 32, dim=CONFIG.latent_dim), config=CONFIG)
    with pytest.raises(ValueError, match="index_head_dim=128"):
        v32.dsa_attention(params, x, pos, fm.LatentCache.create(2, 32, dim=CONFIG.latent_dim, index_head_dim=64),
                          config=CONFIG)
    pertensor = new_cache(2, 32, kv_format="fp8_pertensor", rope_dim=CONFIG.qk_rope_head_dim)
    with pytest.raises(ValueError, match="fp8_blockscale"):
        v32.dsa_attention(params, x, pos, pertensor, config=CONFIG)
    with pytest.raises(ValueError, match="params"):
        v32.dsa_attention({k: v for k, v in params.items() if k != "index_wk"}, x, pos, config=CONFIG)
    with pytest.raises(ValueError, match="index_topk"):
        v32.DeepSeekSparseAttention(**{**DIMS, "index_topk": 0}, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- the loader

def hf_state_dict(params, config, prefix="model.layers.0.self_attn."):
    """Our parameters written back in Hugging Face names and [out, in] layouts (the inverse of the loader)."""
    p = {k: np.asarray(v, np.float32) for k, v in params.items()}
    h, q = config.num_heads, config.q_lora_rank
    sd = {"q_a_proj.weight": p["wq_a"].T, "q_a_layernorm.weight": p["q_norm"],
          "q_b_proj.weight": p["wq_b"].reshape(q, -1).T, "kv_a_proj_with_mqa.weight": p["wkv_a"].T,
          "kv_a_layernorm.weight": p["kv_norm"], "kv_b_proj.weight": p["wkv_b"].reshape(config.kv_lora_rank, -1).T,
          "o_proj.weight": p["wo"].reshape(h * config.v_head_dim, -1).T,
          "indexer.wq_b.weight": p["index_wq_b"].reshape(q, -1).T, "indexer.wk.weight": p["index_wk"].T,
          "indexer.k_norm.weight": p["index_k_norm"], "indexer.k_norm.bias": p["index_k_norm_bias"],
          "indexer.weights_proj.weight": p["index_weights_proj"].T}
    return {prefix + k: np.ascontiguousarray(v) for k, v in sd.items()}


def hf_config_dict(config=CONFIG, layers=1):
    return {"model_type": "deepseek_v32", "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_heads, "q_lora_rank": config.q_lora_rank,
            "kv_lora_rank": config.kv_lora_rank, "qk_nope_head_dim": config.qk_nope_head_dim,
            "qk_rope_head_dim": config.qk_rope_head_dim, "v_head_dim": config.v_head_dim,
            "index_n_heads": config.index_n_heads, "index_head_dim": config.index_head_dim,
            "index_topk": config.index_topk, "num_hidden_layers": layers, "rope_theta": config.rope_theta,
            "rope_scaling": dict(YARN), "max_position_embeddings": 64}


def test_loader_reads_the_indexer(tmp_path):
    """A two-layer synthetic V3.2 checkpoint (indexer.wq_b in FP8 with its block scales, weights_proj in
    bfloat16, an MTP layer's weights past num_hidden_layers) loads into the stacked parameters (FP8 dequantized
    to float32, the rest as stored); the loaded layer equals the NumPy forward."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    import ml_dtypes

    layers = [make_params(7), make_params(8)]
    sd = {}
    for i, p in enumerate(layers):
        sd.update(hf_state_dict(p, CONFIG, f"model.layers.{i}.self_attn."))
    sd.update(hf_state_dict(make_params(9), CONFIG, "model.layers.2.self_attn."))          # the MTP layer
    for i, p in enumerate(layers):
        # indexer.wq_b [H_I·D_I, Q] = [1024, 24] as e4m3, one float32 scale per 128 x 128 block (DeepSeek's FP8
        # release); weights_proj in bfloat16, as stored there
        pre = f"model.layers.{i}.self_attn.indexer."
        w = sd[pre + "wq_b.weight"]
        scale = np.abs(w).reshape(8, 128, 24).max(axis=(1, 2))[:, None] / 448.0                # [8, 1]
        codes = (w / np.repeat(scale, 128, 0)).astype(ml_dtypes.float8_e4m3fn)
        sd[pre + "wq_b.weight"], sd[pre + "wq_b.weight_scale_inv"] = codes, scale.astype(np.float32)
        p["index_wq_b"] = jnp.asarray((codes.astype(np.float32) * np.repeat(scale, 128, 0)).T.reshape(
            CONFIG.q_lora_rank, CONFIG.index_n_heads, CONFIG.index_head_dim))
        sd[pre + "weights_proj.weight"] = sd[pre + "weights_proj.weight"].astype(ml_dtypes.bfloat16)
        p["index_weights_proj"] = jnp.asarray(sd[pre + "weights_proj.weight"].astype(np.float32).T)
    safetensors_numpy.save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(layers=2)))

    config, stack = ck.load_mla_stack(tmp_path)
    assert config == CONFIG and set(stack) == set(param_shapes(CONFIG))
    assert stack["index_wq_b"].dtype == np.float32 and stack["index_weights_proj"].dtype == ml_dtypes.bfloat16
    for i, p in enumerate(layers):
        for k, v in p.items():
            np.testing.assert_allclose(np.asarray(stack[k][i], np.float32), np.asarray(v), rtol=0, atol=0, err_msg=k)
    x, pos = make_tokens(5, 2, 20)
    loaded = {k: jnp.asarray(v[1]) for k, v in stack.items()}
    y, scores, _ = v32_numpy(loaded, x, pos, config)
    assert assert_no_ties(scores, K) > 0
    assert rel_err(step(loaded, x, pos, None)[0], y) < TOL


def test_loader_errors():
    params = make_params(7)
    sd = hf_state_dict(params, CONFIG)
    missing = {k: v for k, v in sd.items() if "k_norm.bias" not in k}
    with pytest.raises(ValueError, match="k_norm.bias"):
        ck.mla_params_from_state_dict(missing, CONFIG, 0)
    v3 = MLAConfig(**{k: v for k, v in DIMS.items() if not k.startswith("index_")})
    with pytest.raises(ValueError, match="index_topk"):
        ck.mla_params_from_state_dict(sd, v3, 0)
    with pytest.raises(ValueError, match="interleaved"):
        ck.mla_params_from_state_dict(sd, CONFIG, 0, rope_interleave=False)
    with pytest.raises(ValueError, match="rope_interleave"):
        ck.read_hf_config({**hf_config_dict(), "rope_interleave": False})
    bad = dict(sd)
    bad["model.layers.0.self_attn.indexer.wk.weight"] = sd["model.layers.0.self_attn.indexer.wk.weight"][:, :8]
    with pytest.raises(ValueError, match="indexer.wk.weight"):
        ck.mla_params_from_state_dict(bad, CONFIG, 0)


# ---------------------------------------------------------------- transformers itself, when installed

TRANSFORMERS_WITH_V32 = (5, 11)       # the first release that ships models/deepseek_v32


def transformers_v32():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    if version < TRANSFORMERS_WITH_V32:
        pytest.skip(f"transformers {transformers.__version__} has no deepseek_v32 (it arrived in 5.11)")
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf
    return transformers, torch, hf


def test_matches_transformers_deepseek_v32_attention():
    """transformers' DeepseekV32Attention (eager, float32) with random weights, read through the loader and its
    config through from_hf_config: the whole sequence (top-k cutting), and our prefill + decode through a cache."""
    transformers, torch, hf = transformers_v32()
    rope = {"rope_type": "yarn", "rope_theta": CONFIG.rope_theta,
            **{k: v for k, v in YARN.items() if k != "type"}}
    tconf = transformers.DeepseekV32Config(
        hidden_size=CONFIG.hidden_size, num_attention_heads=CONFIG.num_heads, num_key_value_heads=CONFIG.num_heads,
        q_lora_rank=CONFIG.q_lora_rank, kv_lora_rank=CONFIG.kv_lora_rank, qk_nope_head_dim=CONFIG.qk_nope_head_dim,
        qk_rope_head_dim=CONFIG.qk_rope_head_dim, v_head_dim=CONFIG.v_head_dim, index_n_heads=CONFIG.index_n_heads,
        index_head_dim=CONFIG.index_head_dim, index_topk=K, rope_parameters=rope, max_position_embeddings=64,
        num_hidden_layers=1, vocab_size=64, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8,
        n_group=1, topk_group=1, num_experts_per_tok=2)
    tconf._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = hf.DeepseekV32Attention(tconf, layer_idx=0).eval()
    with torch.no_grad():
        for norm in (attn.q_a_layernorm, attn.kv_a_layernorm, attn.indexer.k_norm):
            norm.weight.add_(0.3 * torch.randn_like(norm.weight))
        attn.indexer.k_norm.bias.copy_(0.3 * torch.randn_like(attn.indexer.k_norm.bias))
    sd = {"model.layers.0.self_attn." + k: v.detach().numpy() for k, v in attn.state_dict().items()}
    config = MLAConfig.from_hf_config(tconf.to_dict())
    assert config == CONFIG
    params = {k: jnp.asarray(v) for k, v in ck.mla_params_from_state_dict(sd, config, 0).items()}

    x, pos = make_tokens(21, 2, 20)
    _, scores, _ = v32_numpy(params, x, pos, config)
    assert assert_no_ties(scores, K) > 0
    xt = torch.from_numpy(np.array(x))
    rotary = hf.DeepseekV32RotaryEmbedding(config=tconf)
    s = x.shape[1]
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None].expand(x.shape[0], 1, s, s)
    with torch.no_grad():
        want = attn(xt, rotary(xt, torch.from_numpy(np.asarray(pos, np.int64))), mask)[0].numpy()
    assert rel_err(step(params, x, pos, None)[0], want) < TOL
    y, _ = run_cached(params, x, pos, new_cache(2, 32), 12, [1] * 5 + [3])
    assert rel_err(y, want) < TOL


# ---------------------------------------------------------------- the GPU (DeepSeek's head and latent widths)

GPU_CONFIG = MLAConfig(hidden_size=256, num_heads=16, q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0, index_n_heads=64, index_head_dim=128,
                       index_topk=64)


def gpu_case(implementation, dtype=jnp.float32, **cache_kw):
    """(no-cache output, prefill 80 + decode 4 + a chunk of 12 through a paged cache, the float64 forward)
    over 96 tokens whose top-64 has a 1e-4 gap (the kernels' float32 scores are ~1e-6 close)."""
    params, x, pos, want = reference(0, 2, 96, GPU_CONFIG, 1e-4)
    params = {k: v.astype(dtype) for k, v in params.items()}
    x = x.astype(dtype)
    y, _ = step(params, x, pos, None, config=GPU_CONFIG, implementation=implementation)
    cache = new_cache(2, 128, 64, dtype, GPU_CONFIG, **cache_kw)
    cached, _ = run_cached(params, x, pos, cache, 80, [1] * 4 + [12], implementation, config=GPU_CONFIG)
    return y, cached, want


@pytest.mark.gpu
def test_layer_on_gpu_matches_numpy():
    # float32 projections: full float32 products (a GPU's default is TF32, whose 1e-3 errors in the index
    # queries and keys exceed the top-64's 1e-4 gap and change the selected sets).
    with jax.default_matmul_precision("highest"):
        y, cached, want = gpu_case("triton")
    assert rel_err(y, want) < 5e-3 and rel_err(cached, want) < 5e-3


@pytest.mark.gpu
def test_layer_on_gpu_with_fp8_caches():
    """bfloat16 with FP8 latents and FP8 index keys: the kernels' layer against the "xla" layer on the same data
    (the same stored values; rankings may differ only where bfloat16 scores nearly tie), and near the float64
    forward."""
    kw = dict(kv_format="fp8_blockscale", rope_dim=64, index_kv_format="fp8_paged")
    y, cached, want = gpu_case("triton", jnp.bfloat16, **kw)
    y_xla, cached_xla, _ = gpu_case("xla", jnp.bfloat16, **kw)
    assert rel_err(y, y_xla) < 2e-2 and rel_err(cached, cached_xla) < 2e-2
    assert rel_err(cached, want) < 0.1
