"""DeepSeek-V3.2 attention (DeepSeek Sparse Attention) as a Flax (nnx) layer and as a pure function.

A V3.2 layer is the V3 MLA layer of flashmla_jax/flax.py plus a lightning indexer that chooses, for every query,
the index_topk tokens it attends to (transformers' `DeepseekV32Attention` and `DeepseekV32Indexer`, DeepSeek's
inference `MLA` and `Indexer`). Shapes: B batch, S new tokens, M hidden size, H heads, C + R = 576 latent, H_I index
heads (64), D_I index head dim (128), K = index_topk (2048).

    q_latent    = RMSNorm(x · wq_a)                              [B, S, Q]   the MLA queries' latent
    q_I, k_I, w = indexer_projections(index params, x, q_latent)  flashmla_jax/indexer_math.py (half-split RoPE)
    score(s, t) = Σ_h w[s, h] · relu(q_I[s, h] · k_I[t])         for the tokens t that query s sees (causal)
    selected(s) = the K visible tokens with the largest scores, or every visible token when there are <= K
    out(s)      = MLA attention of query s over selected(s) only

transformers computes this as dense attention with every unselected key masked; DeepSeek's code and FlashMLA as
sparse attention over the selected tokens. Both give this. Which code runs is decided by static shapes:
- no cache, S <= K: every visible token is selected, so the layer is exactly V3's dense causal prefill
  (`mla_prefill`, non-absorbed); the index scores are not computed.
- no cache, S > K: `indexer_topk` over the S keys, then `mla_prefill_sparse` (absorbed) over the S latents.
- a `LatentCache` with indexer keys (`LatentCache.create(..., index_head_dim=D_I)`): the latents and index keys
  are appended in one jitted step, then
  - cache_empty (a prompt) and S <= K: V3's dense prefill over the stored latents;
  - a cache capacity <= K: no query ever sees more than K tokens: V3's dense absorbed `mla_decode`;
  - else `LatentCache.index_topk` over the cached keys (as stored: bfloat16 or "fp8_paged"), then
    `LatentCache.decode_sparse` (`mla_decode_sparse`, absorbed) over the chosen pool tokens, in place.
  A prompt longer than K with cache_empty takes this last path too, so it selects exactly what step-by-step
  decoding over the same cache selects.

Ties between index scores are broken towards the lower position (`indexer_topk`); transformers' torch.topk leaves
them unspecified, so the two agree whenever the K-th and (K+1)-th scores differ.

The public pieces: `DeepSeekSparseAttention` (the nnx module), `dsa_attention` (the layer as a pure function of a
parameter dict), `indexer_params`, `attend_sparse_prefill` and `attend_selected`. Parameters: `param_shapes(config)`
(flashmla_jax/config.py), the V3 names and the indexer's under the prefix "index_"; `init_params` makes them and
`flashmla_jax.checkpoint.load_mla_stack` reads them from a Hugging Face V3.2 checkpoint.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flashmla_jax.cache import LatentCache
from flashmla_jax.config import INDEX_PARAM_PREFIX, INDEXER_PARAMS, MLAConfig, YarnScaling
from flashmla_jax.flax import (MultiHeadLatentAttention, _checked_inputs, absorbed, attend_absorbed, attend_expanded,
                               project_latent, project_queries, query_latent)
from flashmla_jax.indexer_math import indexer_projections
from flashmla_jax.ops.indexer import indexer_topk
from flashmla_jax.ops.sparse import mla_prefill_sparse

__all__ = ["DeepSeekSparseAttention", "dsa_attention", "indexer_params", "attend_sparse_prefill", "attend_selected"]

SPARSE_LATENT_FORMATS = (None, "fp8_blockscale")     # the latent caches the sparse ops read


def indexer_params(params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The indexer's parameters of a layer's dict ("index_wq_b", ...) under indexer_math's names ("wq_b", ...)."""
    return {name: params[INDEX_PARAM_PREFIX + name] for name in INDEXER_PARAMS}


def attend_sparse_prefill(params: Mapping[str, jax.Array], q_nope: jax.Array, q_pe: jax.Array, latent: jax.Array,
                          indices: jax.Array, config: MLAConfig, implementation: str | None = None) -> jax.Array:
    """Absorbed attention of S tokens to their chosen tokens among themselves (`mla_prefill_sparse`).

    q_nope [B, S, H, Dn]; q_pe [B, S, H, R]; latent [B, S, C+R] (`project_latent`); indices [B, S, K] int32, rows
    b · S + t of latent.reshape(B · S, C+R) (what `indexer_topk` returns over contiguous [B, S, D_I] keys), -1
    unused. Returns [B, S, H, Dv] in q_nope's dtype.
    """
    b, s = latent.shape[:2]

    def attend(q_abs):
        out, _, _ = mla_prefill_sparse(q_abs.reshape((b * s,) + q_abs.shape[2:]), latent.reshape(b * s, -1),
                                       indices.reshape(b * s, -1), softmax_scale=config.softmax_scale,
                                       head_dim_v=config.kv_lora_rank, implementation=implementation)
        return out.reshape((b, s) + out.shape[1:])

    return absorbed(params, q_nope, q_pe, config, latent.dtype, attend)


def attend_selected(params: Mapping[str, jax.Array], q_nope: jax.Array, q_pe: jax.Array, cache: LatentCache,
                    indices: jax.Array, config: MLAConfig, implementation: str | None = None,
                    layer: int | jax.Array | None = None) -> jax.Array:
    """Absorbed attention of S new queries to the cached tokens their indices name (`LatentCache.decode_sparse`).

    q_nope [B, S, H, Dn]; q_pe [B, S, H, R]; indices [B, S, K] int32 pool indices (`LatentCache.index_topk`), -1
    unused; layer: a stacked cache's layer. The absorbed query is cast to the cache's dtype (bfloat16 over
    "fp8_blockscale"). Returns [B, S, H, Dv] in q_nope's dtype.
    """
    def attend(q_abs):
        return cache.decode_sparse(q_abs, indices, layer=layer, softmax_scale=config.softmax_scale,
                                   head_dim_v=config.kv_lora_rank, return_lse=False, implementation=implementation)

    return absorbed(params, q_nope, q_pe, config, cache.dtype if cache.kv_format is None else jnp.bfloat16, attend)


def _check_index_cache(cache, config: MLAConfig):
    if cache is None:
        return
    if cache.index_head_dim != config.index_head_dim:
        got = "none" if cache.index_head_dim is None else f"index_head_dim {cache.index_head_dim}"
        raise ValueError(f"a DeepSeek-V3.2 layer needs a cache with indexer keys of index_head_dim="
                         f"{config.index_head_dim} (LatentCache.create(..., index_head_dim=)), got {got}")
    if cache.kv_format not in SPARSE_LATENT_FORMATS:
        raise ValueError(f"a DeepSeek-V3.2 layer reads latents in the cache's float dtype or 'fp8_blockscale' (the "
                         f"sparse ops' pools), got kv_format={cache.kv_format!r}")


def dsa_attention(params: Mapping[str, jax.Array], x: jax.Array, positions: jax.Array, cache=None, *,
                  config: MLAConfig, cache_empty: bool = False, dtype=None, implementation: str | None = None,
                  layer: int | jax.Array | None = None):
    """DeepSeek-V3.2 attention as a pure function: the whole layer, projections and indexer included.

    Args:
      params: dict of arrays with the shapes of `param_shapes(config)` (`init_params` makes one): the V3 layer's and
        the indexer's ("index_wq_b", "index_wk", "index_k_norm", "index_k_norm_bias", "index_weights_proj").
      x: [B, S, M] hidden states of S new tokens per sequence.
      positions: [B, S] integer positions (RoPE, for the MLA and the indexer alike); with a cache normally
        cache.seqlens[:, None] + arange(S) (not checked).
      cache: None, or a `LatentCache` of width C + R with indexer keys of config.index_head_dim (bfloat16/float
        or "fp8_paged"; latents in a float dtype or "fp8_blockscale"). None: causal attention among the S tokens.
        A cache: the S latents and index keys are appended, then the S queries attend to what the cache holds,
        causally among themselves. The module docstring lists the paths.
      config: an MLAConfig with an indexer (config.has_indexer; static).
      cache_empty: a static promise that every sequence in `cache` is empty before this call (a prompt): with
        S <= index_topk the prompt attends densely and non-absorbed (`mla_prefill`), as V3's layer does.
      dtype: computation dtype (x and the parameters are cast to it, index_weights_proj excepted: its product
        is float32 as transformers keeps it); None means x's dtype.
      implementation: passed to every op ("triton", "xla", "interpret" or None: the device's default).
      layer: a layer-stacked cache's layer index (a Python int or traced int32), as for `mla_attention`.

    Returns:
      (y [B, S, M] in the computation dtype, the cache with S more tokens per sequence, or None).
    """
    if not isinstance(config, MLAConfig):
        raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
    if not config.has_indexer:
        raise ValueError("config has no lightning indexer (index_topk is None): a V2/V3 layer, which "
                         "flashmla_jax.flax.mla_attention runs")
    x, params, dtype = _checked_inputs(params, x, positions, cache, config, cache_empty, dtype, implementation,
                                       keep=(INDEX_PARAM_PREFIX + "weights_proj",))
    _check_index_cache(cache, config)
    b, s = x.shape[:2]
    topk = config.index_topk

    q_latent = query_latent(params, x, config)
    q_nope, q_pe = project_queries(params, x, positions, config, q_latent)
    latent = project_latent(params, x, positions, config)
    q_index, k_index, weights = indexer_projections(indexer_params(params), x, q_latent, positions,
                                                    inv_freq=config.rope_inv_freq(),
                                                    rope_magnitude=config.rope_magnitude)
    if cache is None:
        if s <= topk:
            o = attend_expanded(params, q_nope, q_pe, latent, config, implementation)
        else:
            indices = indexer_topk(q_index, weights, k_index, jnp.full((b,), s, jnp.int32), topk=topk,
                                   implementation=implementation)
            o = attend_sparse_prefill(params, q_nope, q_pe, latent, indices, config, implementation)
    else:
        cache = cache.append(latent, layer=layer, index_keys=k_index)
        if cache_empty and s <= topk:
            o = attend_expanded(params, q_nope, q_pe, cache.as_stored(latent, layer), config, implementation)
        elif cache.capacity <= topk:
            o = attend_absorbed(params, q_nope, q_pe, cache.kv, cache.lengths(layer), cache.block_table, config,
                                implementation, layer=layer, kv_format=cache.kv_format)
        else:
            if cache.index_kv_format is None:
                q_index = q_index.astype(cache.index_k.dtype)
            indices = cache.index_topk(q_index, weights, layer=layer, topk=topk, implementation=implementation)
            o = attend_selected(params, q_nope, q_pe, cache, indices, config, implementation, layer)
    y = jnp.einsum("bshv,hvm->bsm", o.astype(dtype), params["wo"], preferred_element_type=jnp.float32)
    return y.astype(dtype), cache


class DeepSeekSparseAttention(MultiHeadLatentAttention):
    """DeepSeek-V3.2 attention (flax.nnx): MLA over each query's top-k tokens; `dsa_attention` does the work.

    Hyperparameters as `MLAConfig`: those of `MultiHeadLatentAttention` (q_lora_rank is required: the indexer's
    queries come from the query latent) and index_n_heads (64), index_head_dim (128), index_topk (2048). dtype,
    param_dtype and implementation as there. Parameters are nnx.Param attributes named as in `param_shapes`.

    `layer(x [B, S, M], positions [B, S] int32, cache=None, cache_empty=False, layer=None)` -> (y [B, S, M],
    cache): the cache must carry indexer keys, e.g. `LatentCache.create(B, N, page_size=64,
    index_head_dim=128, index_kv_format="fp8_paged")`. Layers stack and scan as `MultiHeadLatentAttention`'s do.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, q_lora_rank: int, kv_lora_rank: int = 512,
                 qk_nope_head_dim: int = 128, qk_rope_head_dim: int = 64, v_head_dim: int = 128,
                 rope_theta: float = 10000.0, rope_scaling: Mapping[str, Any] | YarnScaling | None = None,
                 rms_norm_eps: float = 1e-6, index_n_heads: int = 64, index_head_dim: int = 128,
                 index_topk: int = 2048, dtype=None, param_dtype=jnp.float32, implementation: str | None = None,
                 rngs: nnx.Rngs):
        config = MLAConfig(hidden_size=hidden_size, num_heads=num_heads, q_lora_rank=q_lora_rank,
                           kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                           qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, rope_theta=rope_theta,
                           rope_scaling=rope_scaling, rms_norm_eps=rms_norm_eps, index_n_heads=index_n_heads,
                           index_head_dim=index_head_dim, index_topk=index_topk)
        if not config.has_indexer:
            raise ValueError(f"index_topk must be >= 1 for a DeepSeek-V3.2 layer, got {index_topk!r}")
        self._setup(config, dtype, param_dtype, implementation, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache=None, *, cache_empty: bool = False,
                 layer: int | jax.Array | None = None):
        """x [B, S, M], positions [B, S] int32, cache None | LatentCache with indexer keys, layer (stacked cache)
        -> (y [B, S, M], cache)."""
        return dsa_attention(self.params_dict(), x, positions, cache, config=self.config, cache_empty=cache_empty,
                             dtype=self.dtype, implementation=self.implementation, layer=layer)
