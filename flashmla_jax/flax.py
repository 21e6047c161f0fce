"""DeepSeek-V2/V3 Multi-head Latent Attention as a Flax (nnx) layer, with matrix absorption for decode.

Shapes: B batch, S new tokens per call, H heads, C = kv_lora_rank (512), R = qk_rope_head_dim (64),
Dn = qk_nope_head_dim (128), Dv = v_head_dim (128), M = hidden size; one token's latent is [c_kv ; k_pe],
C + R = 576 numbers for all heads together.

Two ways to attend, one set of weights:
- non-absorbed (no cache, or a cache known to be empty): k_nope_h = c_kv · W_UK_h, v_h = c_kv · W_UV_h,
  k_h = [k_nope_h ; k_pe], ordinary causal multi-head attention through `flashmla_jax.mla_prefill`;
- absorbed (a `LatentCache`): q̃_h = [q_nope_h · W_UK_hᵀ ; q_pe_h] (C + R), attention against the cached
  latents through `flashmla_jax.mla_decode` (one shared KV head, V = its first C columns), and the latent
  output o_lat_h (C) is mapped back with W_UV_h.
W_UK and W_UV are slices of the `wkv_b` parameter taken inside the traced function: nothing is precomputed
in Python and nothing has to be refreshed when the parameters change.

The public pieces: `MultiHeadLatentAttention` (the nnx module), `mla_attention` (the same layer as a pure
function of a parameter dict, for Linen, Equinox or plain JAX), `MLAConfig` / `YarnScaling` (its
hyperparameters, from flashmla_jax/config.py, which needs no Flax), `init_params`, and the absorption helpers
`absorb_query` / `absorb_output`.

RoPE convention: interleaved pairs, as DeepSeek's own inference code. Within the R rotary features, the
pair (x[2i], x[2i+1]) is rotated by the angle position · inv_freq[i], and the result keeps that layout.
The Hugging Face DeepSeek code for interleaved checkpoints (`rope_interleave: true`, the default and what
DeepSeek publishes) rotates the same pairs and then stores them de-interleaved; the two differ only by one
fixed permutation of the R features applied to both q_pe and k_pe, which leaves every score unchanged, so
those checkpoints load as they are. `rope_interleave: false` checkpoints rotate the pairs (x[i], x[i+R/2])
instead; `flashmla_jax.checkpoint` permutes their rotary weight rows ([0, R/2, 1, R/2+1, …]) when it loads
them. (Only the k_pe part of this layer's cache is in the interleaved layout.)
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import _checks
from flashmla_jax._extras import require
from flashmla_jax.cache import LatentCache
from flashmla_jax.config import MLAConfig, YarnScaling, param_shapes
from flashmla_jax.ops.decode import mla_decode
from flashmla_jax.ops.prefill import mla_prefill

nnx = require("flax.nnx", "flashmla_jax.flax")

__all__ = ["MLAConfig", "YarnScaling", "MultiHeadLatentAttention", "mla_attention", "init_params",
           "param_shapes", "absorb_query", "absorb_output", "split_wkv_b", "apply_rope", "rms_norm",
           "project_queries", "project_latent", "query_latent", "attend_expanded", "attend_absorbed", "absorbed"]


# ---------------------------------------------------------------- parameters

@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(config: MLAConfig, key: jax.Array, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Fresh parameters (shapes as `param_shapes`): projections ~ N(0, 1/fan_in), norm weights 1, norm biases 0.
    Jitted."""
    shapes = param_shapes(config)
    keys = jax.random.split(key, len(shapes))
    params = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        if name.endswith("_norm"):
            params[name] = jnp.ones(shape, dtype)
        elif name.endswith("_bias"):
            params[name] = jnp.zeros(shape, dtype)
        else:
            fan_in = shape[0] if name != "wo" else shape[0] * shape[1]
            params[name] = (jax.random.normal(k, shape, jnp.float32) * fan_in ** -0.5).astype(dtype)
    return params


def _check_params(params: Mapping[str, jax.Array], config: MLAConfig):
    expected = param_shapes(config)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"params must have exactly the keys {sorted(expected)} for this config; "
                         f"missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape}, got {tuple(params[name].shape)}")


# ---------------------------------------------------------------- pure building blocks

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32. x [..., K], weight [K] -> [..., K] in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, magnitude: float = 1.0) -> jax.Array:
    """Interleaved RoPE: the pair (x[2i], x[2i+1]) is rotated by positions · inv_freq[i].

    x: [B, S, ..., R] (any number of axes between S and R, e.g. heads); positions: [B, S] integer;
    inv_freq: [R / 2]; magnitude multiplies cos and sin (YaRN's mscale ratio). Returns x's shape and dtype;
    angles and the rotation are float32.
    """
    b, s, r = x.shape[0], x.shape[1], x.shape[-1]
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)   # [B, S, R/2]
    angle = angle.reshape((b, s) + (1,) * (x.ndim - 3) + (r // 2,))
    cos, sin = jnp.cos(angle) * magnitude, jnp.sin(angle) * magnitude
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (r // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def split_wkv_b(wkv_b: jax.Array, qk_nope_head_dim: int) -> tuple[jax.Array, jax.Array]:
    """wkv_b [C, H, Dn+Dv] -> (w_uk [C, H, Dn], w_uv [C, H, Dv]): slices, traced with the caller."""
    return wkv_b[..., :qk_nope_head_dim], wkv_b[..., qk_nope_head_dim:]


def absorb_query(q_nope: jax.Array, q_pe: jax.Array, w_uk: jax.Array) -> jax.Array:
    """Folds W_UK into the query: q̃_h = [q_nope_h · W_UK_hᵀ ; q_pe_h].

    q_nope: [B, S, H, Dn]; q_pe: [B, S, H, R] (RoPE applied); w_uk: [C, H, Dn].
    Returns [B, S, H, C + R] (576 for DeepSeek) in the promoted dtype of q_nope and w_uk, accumulated in
    float32; q̃_h · [c_kv ; k_pe] equals q_h · k_h of the non-absorbed form.
    """
    if q_nope.ndim != 4 or q_pe.ndim != 4 or q_nope.shape[:3] != q_pe.shape[:3]:
        raise ValueError(f"q_nope [B, S, H, Dn] and q_pe [B, S, H, R] must agree on B, S, H; got "
                         f"{q_nope.shape} and {q_pe.shape}")
    if w_uk.ndim != 3 or w_uk.shape[1:] != q_nope.shape[2:]:
        raise ValueError(f"w_uk must be [C, H={q_nope.shape[2]}, Dn={q_nope.shape[3]}], got {w_uk.shape}")
    dtype = jnp.result_type(q_nope, w_uk)
    q_lat = jnp.einsum("bshn,chn->bshc", q_nope, w_uk, preferred_element_type=jnp.float32)
    return jnp.concatenate([q_lat.astype(dtype), q_pe.astype(dtype)], axis=-1)


def absorb_output(o_latent: jax.Array, w_uv: jax.Array) -> jax.Array:
    """Applies W_UV to the attention output in latent space: out_h = o_lat_h · W_UV_h.

    o_latent: [B, S, H, C] (softmax · c_kv, as `mla_decode` returns with head_dim_v = C); w_uv: [C, H, Dv].
    Returns [B, S, H, Dv] in the promoted dtype of o_latent and w_uv, accumulated in float32.
    """
    if o_latent.ndim != 4 or w_uv.ndim != 3 or w_uv.shape[:2] != (o_latent.shape[3], o_latent.shape[2]):
        raise ValueError(f"o_latent [B, S, H, C] and w_uv [C, H, Dv] do not match: {o_latent.shape}, {w_uv.shape}")
    out = jnp.einsum("bshc,chv->bshv", o_latent, w_uv, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(o_latent, w_uv))


def query_latent(params: Mapping[str, jax.Array], x: jax.Array, config: MLAConfig) -> jax.Array:
    """x [B, S, M] -> the query latent RMSNorm(x · wq_a) [B, S, Q] (q_lora_rank set), x's dtype."""
    return rms_norm(x @ params["wq_a"], params["q_norm"], config.rms_norm_eps)


def project_queries(params: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array, config: MLAConfig,
                    q_latent: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [B, S, M], positions [B, S] -> (q_nope [B, S, H, Dn], q_pe [B, S, H, R] with RoPE), x's dtype.
    q_latent: `query_latent(params, x, config)` when the caller has it already (None: computed here)."""
    if config.q_lora_rank is None:
        q = jnp.einsum("bsm,mhd->bshd", x, params["wq"])
    else:
        q_a = query_latent(params, x, config) if q_latent is None else q_latent
        q = jnp.einsum("bsq,qhd->bshd", q_a, params["wq_b"])
    q_nope, q_pe = q[..., :config.qk_nope_head_dim], q[..., config.qk_nope_head_dim:]
    return q_nope, apply_rope(q_pe, positions, config.rope_inv_freq(), config.rope_magnitude)


def project_latent(params: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array,
                   config: MLAConfig) -> jax.Array:
    """x [B, S, M], positions [B, S] -> the per-token latent [B, S, C + R] = [RMSNorm(c_kv) ; RoPE(k_pe)].

    This is exactly what the cache stores (576 numbers per token for DeepSeek), in x's dtype.
    """
    kv_a = x @ params["wkv_a"]
    c_kv = rms_norm(kv_a[..., :config.kv_lora_rank], params["kv_norm"], config.rms_norm_eps)
    k_pe = apply_rope(kv_a[..., config.kv_lora_rank:], positions, config.rope_inv_freq(), config.rope_magnitude)
    return jnp.concatenate([c_kv, k_pe], axis=-1)


def attend_expanded(params: Mapping[str, jax.Array], q_nope: jax.Array, q_pe: jax.Array, latent: jax.Array,
                    config: MLAConfig, implementation: str | None = None) -> jax.Array:
    """Non-absorbed causal self-attention over the S tokens of this call (through `mla_prefill`).

    q_nope [B, S, H, Dn]; q_pe [B, S, H, R]; latent [B, S, C + R] (from `project_latent`).
    k_h = [c_kv · W_UK_h ; k_pe] [B, S, H, Dn+R] (k_pe repeated over heads), v_h = c_kv · W_UV_h
    [B, S, H, Dv]. Returns [B, S, H, Dv] in q_nope's dtype.
    """
    b, s, h, _ = q_nope.shape
    w_uk, w_uv = split_wkv_b(params["wkv_b"], config.qk_nope_head_dim)
    c_kv, k_pe = latent[..., :config.kv_lora_rank], latent[..., config.kv_lora_rank:]
    dtype = q_nope.dtype
    k_nope = jnp.einsum("bsc,chn->bshn", c_kv, w_uk, preferred_element_type=jnp.float32).astype(dtype)
    v = jnp.einsum("bsc,chv->bshv", c_kv, w_uv, preferred_element_type=jnp.float32).astype(dtype)
    k_pe = jnp.broadcast_to(k_pe[:, :, None, :].astype(dtype), (b, s, h, config.qk_rope_head_dim))
    q = jnp.concatenate([q_nope, q_pe.astype(dtype)], axis=-1)
    k = jnp.concatenate([k_nope, k_pe], axis=-1)
    return mla_prefill(q, k, v, causal=True, softmax_scale=config.softmax_scale, implementation=implementation)


def attend_absorbed(params: Mapping[str, jax.Array], q_nope: jax.Array, q_pe: jax.Array, kv_cache: jax.Array,
                    cache_seqlens: jax.Array, block_table: jax.Array | None, config: MLAConfig,
                    implementation: str | None = None, layer: int | jax.Array | None = None,
                    kv_format: str | None = None, kv_scale: jax.Array | None = None) -> jax.Array:
    """Absorbed attention of S new queries against a latent cache that already holds their latents.

    q_nope [B, S, H, Dn]; q_pe [B, S, H, R]; kv_cache [B, N, C+R] or pages [P, page_size, C+R] with
    block_table [B, max_blocks] int32; cache_seqlens [B] int32, the S new tokens included (query i sees
    keys < seqlen - S + i + 1). The absorbed query is cast to the cache's dtype for `mla_decode`, or to
    bfloat16 for an FP8 cache (kv_format, kv_scale as in `mla_decode`: kv_cache then holds uint8 bytes).
    layer: None, or the layer of a stacked kv_cache [L, ...] (read in place; see `mla_decode`).
    Returns [B, S, H, Dv] in q_nope's dtype.
    """
    def attend(q_abs):
        return mla_decode(q_abs, kv_cache, cache_seqlens, block_table, head_dim_v=config.kv_lora_rank,
                          softmax_scale=config.softmax_scale, causal=True, implementation=implementation, layer=layer,
                          kv_format=kv_format, kv_scale=kv_scale)

    return absorbed(params, q_nope, q_pe, config, kv_cache.dtype if kv_format is None else jnp.bfloat16, attend)


def absorbed(params: Mapping[str, jax.Array], q_nope: jax.Array, q_pe: jax.Array, config: MLAConfig, q_dtype,
             attend) -> jax.Array:
    """Absorbed attention around `attend`: q̃ = absorb_query(q_nope, q_pe, W_UK) [B, S, H, C+R] cast to q_dtype,
    o_lat = attend(q̃) [B, S, H, C] (any latent attention: dense, sparse), then absorb_output(o_lat, W_UV).
    Returns [B, S, H, Dv] in q_nope's dtype."""
    w_uk, w_uv = split_wkv_b(params["wkv_b"], config.qk_nope_head_dim)
    o_lat = attend(absorb_query(q_nope, q_pe, w_uk).astype(q_dtype))
    return absorb_output(o_lat, w_uv.astype(q_nope.dtype)).astype(q_nope.dtype)


# ---------------------------------------------------------------- the layer as a function

def _checked_inputs(params, x, positions, cache, config: MLAConfig, cache_empty: bool, dtype, implementation,
                    keep=()):
    """The checks every layer function makes, then (x, params, dtype) in the computation dtype (None: x's);
    parameters named in `keep` keep their own dtype."""
    _check_params(params, config)
    _check_call(x, positions, cache, config, cache_empty, implementation)
    dtype = jnp.dtype(dtype) if dtype is not None else x.dtype
    params = {k: jnp.asarray(v) if k in keep else jnp.asarray(v).astype(dtype) for k, v in params.items()}
    return x.astype(dtype), params, dtype


def _check_call(x, positions, cache, config: MLAConfig, cache_empty: bool, implementation):
    if not hasattr(x, "ndim") or x.ndim != 3 or x.shape[-1] != config.hidden_size:
        raise ValueError(f"x must be [B, S, hidden_size={config.hidden_size}], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating array, got {x.dtype}")
    if not hasattr(positions, "shape") or tuple(positions.shape) != tuple(x.shape[:2]):
        raise ValueError(f"positions must be [B, S] = {tuple(x.shape[:2])}, got "
                         f"{getattr(positions, 'shape', type(positions).__name__)}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be an integer array (int32), got {positions.dtype}")
    _checks.implementation(implementation)
    if cache is None:
        if cache_empty:
            raise ValueError("cache_empty=True needs a cache")
        return
    if not isinstance(cache, LatentCache):
        raise TypeError(f"cache must be a flashmla_jax.LatentCache (or None), got {type(cache).__name__}")
    seqlens = cache.seqlens
    if cache.dim != config.latent_dim:
        raise ValueError(f"cache latent width {cache.dim} must be kv_lora_rank + qk_rope_head_dim = "
                         f"{config.latent_dim}")
    if seqlens.ndim < 1 or seqlens.shape[-1] != x.shape[0]:
        raise ValueError(f"cache holds {seqlens.shape[-1] if seqlens.ndim else '?'} sequences but x has batch "
                         f"{x.shape[0]}")
    if cache_empty and not isinstance(seqlens, jax.core.Tracer) and bool(np.any(np.asarray(seqlens) != 0)):
        raise ValueError("cache_empty=True but the cache already holds tokens")


def mla_attention(params: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array, cache=None, *,
                  config: MLAConfig, cache_empty: bool = False, dtype=None,
                  implementation: str | None = None, layer: int | jax.Array | None = None):
    """DeepSeek-V2/V3 MLA as a pure function: the whole layer, projections included.

    Args:
      params: dict of arrays with the shapes of `param_shapes(config)` (make one with `init_params`).
      x: [B, S, M] hidden states of S new tokens per sequence.
      positions: [B, S] integer positions of those tokens (RoPE). With a cache they are normally
        cache.seqlens[:, None] + arange(S); the layer does not check this.
      cache: None, or a `flashmla_jax.LatentCache` of width C + R.
        None: causal self-attention among the S tokens through `mla_prefill` (non-absorbed).
        A cache: the S latents [B, S, C+R] are appended (at each sequence's length), then the S queries
        attend, absorbed, through `mla_decode` to everything cached, causally among themselves.
      config: an MLAConfig (static).
      cache_empty: a static promise that every sequence in `cache` is empty before this call (a prompt's
        prefill): the latents are still appended, but attention runs non-absorbed through `mla_prefill`
        over the S tokens, which costs (Dn+R+Dv) instead of (2C+R) FLOPs per key and head. The tokens
        attend to the latents as rounded to the cache's dtype, exactly as later decode steps see them.
      dtype: computation dtype (x and params are cast to it); None means x's dtype.
      implementation: passed to `mla_prefill` / `mla_decode`: "triton", "xla", "interpret" or None (the
        default for the device).
      layer: with a layer-stacked cache (`LatentCache.create(num_layers=L)`), this layer's index: a Python
        int or a traced int32 scalar (e.g. the step of a `lax.scan` / `nnx.scan` over stacked layers).
        The latents go into that layer's rows and attention reads them in place. None otherwise.

    Returns:
      (y [B, S, M] in the computation dtype, the cache with S more tokens per sequence, or None).
    """
    if not isinstance(config, MLAConfig):
        raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
    if config.has_indexer:
        raise ValueError(f"config has a lightning indexer (index_topk={config.index_topk}): a DeepSeek-V3.2 layer, "
                         "which flashmla_jax.flax_v32.dsa_attention runs")
    x, params, dtype = _checked_inputs(params, x, positions, cache, config, cache_empty, dtype, implementation)

    q_nope, q_pe = project_queries(params, x, positions, config)
    latent = project_latent(params, x, positions, config)
    if cache is None:
        o = attend_expanded(params, q_nope, q_pe, latent, config, implementation)
    else:
        cache = cache.append(latent, layer=layer)       # cast to the cache's dtype, or quantized (FP8)
        if cache_empty:
            o = attend_expanded(params, q_nope, q_pe, cache.as_stored(latent, layer), config, implementation)
        else:
            o = attend_absorbed(params, q_nope, q_pe, cache.kv, cache.lengths(layer), cache.block_table, config,
                                implementation, layer=layer, kv_format=cache.kv_format, kv_scale=cache.kv_scale)
    y = jnp.einsum("bshv,hvm->bsm", o.astype(dtype), params["wo"], preferred_element_type=jnp.float32)
    return y.astype(dtype), cache


# ---------------------------------------------------------------- the nnx module

class MultiHeadLatentAttention(nnx.Module):
    """DeepSeek-V2/V3 Multi-head Latent Attention (flax.nnx); `mla_attention` does the work.

    Hyperparameters as `MLAConfig` (hidden_size, num_heads, q_lora_rank=None for V2-Lite style, kv_lora_rank
    512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, rope_theta, rope_scaling: DeepSeek's
    YaRN dict, rms_norm_eps). dtype: computation dtype (None: the input's); param_dtype: storage dtype of
    the parameters; implementation: passed to the attention ops ("triton", "xla", "interpret", None).
    Parameters are nnx.Param attributes named as in `param_shapes`.

    `layer(x [B, S, M], positions [B, S] int32, cache=None, cache_empty=False, layer=None)` -> (y [B, S, M],
    cache); see `mla_attention` for what a cache changes, and `layer` (a stacked cache's layer index).

    A model of L layers is scanned with stacked parameters (built with `nnx.vmap`) and one stacked cache:

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs): return MultiHeadLatentAttention(hidden_size, num_heads, ..., rngs=rngs)
        stack = make(nnx.Rngs(0))
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(attn, carry):
            x, cache, i = carry
            y, cache = attn(x, positions, cache, layer=i)
            return x + y, cache, i + 1
        x, cache, _ = run(stack, (x, cache, jnp.int32(0)))

    Compile that step with `flashmla_jax.scanned_step.jit_scanned_step` (jax.jit with
    SCANNED_STEP_COMPILER_OPTIONS, for this executable only): XLA's default GPU compile copies every layer's
    weights out of the stacks on every step; with the options its GEMMs read them in place (cuBLAS instead
    of XLA's Triton GEMMs; see the README's "Inside a model"):

        graphdef, state = nnx.split(stack)
        step = jit_scanned_step(
            lambda state, x, cache: run(nnx.merge(graphdef, state), (x, cache, jnp.int32(0)))[:2],
            donate_argnums=2)
        x, cache = step(state, x, cache)
    """

    def __init__(self, hidden_size: int, num_heads: int, *, q_lora_rank: int | None = None,
                 kv_lora_rank: int = 512, qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64,
                 v_head_dim: int = 128, rope_theta: float = 10000.0,
                 rope_scaling: Mapping[str, Any] | YarnScaling | None = None, rms_norm_eps: float = 1e-6,
                 dtype=None, param_dtype=jnp.float32, implementation: str | None = None, rngs: nnx.Rngs):
        self._setup(MLAConfig(hidden_size=hidden_size, num_heads=num_heads, q_lora_rank=q_lora_rank,
                              kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                              qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, rope_theta=rope_theta,
                              rope_scaling=rope_scaling, rms_norm_eps=rms_norm_eps),
                    dtype, param_dtype, implementation, rngs)

    def _setup(self, config: MLAConfig, dtype, param_dtype, implementation, rngs: nnx.Rngs):
        """Stores the settings and creates the parameters (`init_params`) as nnx.Param attributes."""
        _checks.implementation(implementation)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.implementation = implementation
        self._param_names = tuple(param_shapes(self.config))
        for name, value in init_params(self.config, rngs.params(), param_dtype).items():
            setattr(self, name, nnx.Param(value))

    def params_dict(self) -> dict[str, jax.Array]:
        """The current parameter values, as the dict `mla_attention` takes."""
        return {name: getattr(self, name)[...] for name in self._param_names}

    def __call__(self, x: jax.Array, positions: jax.Array, cache=None, *, cache_empty: bool = False,
                 layer: int | jax.Array | None = None):
        """x [B, S, M], positions [B, S] int32, cache None | LatentCache, layer (stacked cache) ->
        (y [B, S, M], cache)."""
        return mla_attention(self.params_dict(), x, positions, cache, config=self.config, cache_empty=cache_empty,
                             dtype=self.dtype, implementation=self.implementation, layer=layer)
