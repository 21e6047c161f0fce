"""The lightning indexer's projections in a DeepSeek-V3.2 attention layer, as pure JAX functions (no Flax).

Shapes: B batch, S tokens, M hidden size, Q = q_lora_rank (the layer's query latent: RMSNorm(x · wq_a)),
H index heads (64), D index head dim (128), R = qk_rope_head_dim (64, the layer's rotary width).

Per token, as transformers' `DeepseekV32Indexer` and DeepSeek's inference code (`Indexer`) compute it:

    q_I[h] = rope(q_latent · wq_b[:, h, :])               [H, D]   RoPE on features [0, R), the rest as is
    k_I    = rope(LayerNorm(x · wk; k_norm, k_norm_bias))  [D]      the same RoPE (eps 1e-6)
    w[h]   = (x · weights_proj)[h] · H^-½ · D^-½           [H]      float32

so that index_score(s, t) = Σ_h w[h] · relu(q_I[s, h] · k_I[t]) is transformers' Σ_h weights_h ·
relu(q · k · D^-½) (relu commutes with the positive D^-½). The indexer's RoPE is half-split (non-interleaved):
the pair (x[i], x[i + R/2]) turns by position · inv_freq[i], with the layer's own inv_freq (YaRN included) and
cos / sin magnitude; the main MLA's RoPE rotates interleaved pairs (flashmla_jax/flax.py). The rotary features
come first in the index head, last in the MLA head.

DeepSeek's kernel also multiplies q_I and k_I by a normalized 128 × 128 Hadamard matrix before rounding them to
FP8: an orthogonal map, so every dot product (and every score) is unchanged in exact arithmetic, while outliers
spread over all features and FP8's per-token scale fits them better. `indexer_projections(..., rotate=True)`
does the same (`hadamard_rotate`); keys cached rotated must meet queries rotated.

Parameters (a dict, the layer's `indexer.*` weights; Hugging Face Linear weights transposed):
    wq_b [Q, H, D], wk [M, D], k_norm [D], k_norm_bias [D], weights_proj [M, H]
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax.config import INDEXER_PARAMS, indexer_param_shapes

__all__ = ["INDEXER_PARAMS", "indexer_param_shapes", "init_indexer_params", "rope_half_split", "layer_norm",
           "hadamard_matrix", "hadamard_rotate", "index_weight_scale", "indexer_projections"]

LAYER_NORM_EPS = 1e-6        # DeepSeek's LayerNorm default, and transformers' k_norm


def init_indexer_params(key: jax.Array, hidden_size: int, q_lora_rank: int, n_heads: int = 64, head_dim: int = 128,
                        dtype=jnp.float32) -> dict:
    """Fresh parameters: projections ~ N(0, 1/fan_in), k_norm weight 1 and bias 0 (LayerNorm's start)."""
    shapes = indexer_param_shapes(hidden_size, q_lora_rank, n_heads, head_dim)
    keys = dict(zip(INDEXER_PARAMS, jax.random.split(key, len(INDEXER_PARAMS))))
    params = {}
    for name, shape in shapes.items():
        if name == "k_norm":
            params[name] = jnp.ones(shape, dtype)
        elif name == "k_norm_bias":
            params[name] = jnp.zeros(shape, dtype)
        else:
            params[name] = (jax.random.normal(keys[name], shape, jnp.float32) * shape[0] ** -0.5).astype(dtype)
    return params


def rope_half_split(x: jax.Array, positions: jax.Array, inv_freq, magnitude: float = 1.0) -> jax.Array:
    """Half-split RoPE on the first R = 2 · len(inv_freq) features of x; the others pass through.

    x: [B, S, ..., F] with F >= R (any axes between S and F, e.g. heads); positions: [B, S] integers;
    inv_freq: [R / 2]; magnitude multiplies cos and sin. For i < R/2, with a = position · inv_freq[i]:
    out[i] = x[i] cos a - x[i + R/2] sin a and out[i + R/2] = x[i + R/2] cos a + x[i] sin a.
    Returns x's shape and dtype; computed in float32.
    """
    half = int(np.shape(inv_freq)[0])
    if x.shape[-1] < 2 * half:
        raise ValueError(f"x's last axis ({x.shape[-1]}) is narrower than the rotary width {2 * half}")
    lead = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 3)
    theta = (positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)).reshape(lead + (half,))
    c, s = jnp.cos(theta) * magnitude, jnp.sin(theta) * magnitude
    xf = x.astype(jnp.float32)
    lo, hi, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
    return jnp.concatenate([lo * c - hi * s, hi * c + lo * s, rest], axis=-1).astype(x.dtype)


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float = LAYER_NORM_EPS) -> jax.Array:
    """LayerNorm over the last axis (biased variance), computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def hadamard_matrix(n: int) -> np.ndarray:
    """The n × n Sylvester Hadamard matrix scaled by n^-½ (orthogonal, symmetric), float32; n a power of two.
    Row order as fast_hadamard_transform's: H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def hadamard_rotate(x: jax.Array) -> jax.Array:
    """x [..., D] times the normalized D × D Hadamard matrix (D a power of two), in float32, x's dtype back."""
    h = jnp.asarray(hadamard_matrix(x.shape[-1]))
    return jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def index_weight_scale(n_heads: int, head_dim: int) -> float:
    """n_heads^-½ · head_dim^-½: transformers' weights scale and the scores' softmax_scale, folded together."""
    return float(n_heads) ** -0.5 * float(head_dim) ** -0.5


def _check_params(params: Mapping[str, jax.Array]) -> tuple[int, int, int, int]:
    """(M, Q, H, D) from the parameter shapes, which must agree with each other."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    missing = [n for n in INDEXER_PARAMS if n not in params]
    if missing:
        raise ValueError(f"params lacks {missing} (the indexer's parameters are {list(INDEXER_PARAMS)})")
    if params["wq_b"].ndim != 3 or params["wk"].ndim != 2:
        raise ValueError(f"params['wq_b'] must be [Q, H, D] and params['wk'] [M, D], got "
                         f"{params['wq_b'].shape} and {params['wk'].shape}")
    q_rank, h, d = params["wq_b"].shape
    m = params["wk"].shape[0]
    want = indexer_param_shapes(m, q_rank, h, d)
    for name, shape in want.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] must have shape {shape} (M={m}, Q={q_rank}, H={h}, D={d}), got "
                             f"{tuple(params[name].shape)}")
    return m, q_rank, h, d


def indexer_projections(params: Mapping[str, jax.Array], x: jax.Array, q_latent: jax.Array, positions: jax.Array, *,
                        inv_freq, rope_magnitude: float = 1.0, norm_eps: float = LAYER_NORM_EPS,
                        rotate: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The indexer's queries, keys and head weights for S tokens (module docstring).

    params: the indexer's parameters; x: [B, S, M] hidden states (after the layer's input norm); q_latent:
    [B, S, Q], the layer's RMSNorm(x · wq_a) (the same latent the MLA queries come from); positions: [B, S]
    integer; inv_freq: [R / 2], the layer's RoPE frequencies (MLAConfig.rope_inv_freq()); rope_magnitude: its
    cos / sin factor (MLAConfig.rope_magnitude); rotate: also apply `hadamard_rotate` to queries and keys (what
    DeepSeek does before FP8; scores unchanged).
    Returns q_I [B, S, H, D] and k_I [B, S, D] in x's dtype (products accumulated in float32), and
    w [B, S, H] float32 with H^-½ · D^-½ folded in: the inputs of `indexer_scores` / `indexer_topk`, k_I being
    what the indexer's key cache stores for each token.
    """
    m, q_rank, h, d = _check_params(params)
    if x.ndim != 3 or x.shape[-1] != m:
        raise ValueError(f"x must be [B, S, M={m}], got shape {x.shape}")
    if q_latent.ndim != 3 or q_latent.shape != x.shape[:2] + (q_rank,):
        raise ValueError(f"q_latent must be [B, S, Q={q_rank}] with x's B and S, got shape {q_latent.shape}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must be [B, S] = {x.shape[:2]}, got shape {positions.shape}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions must be integers, got {positions.dtype}")
    dtype = x.dtype
    q = jnp.einsum("bsq,qhd->bshd", q_latent, params["wq_b"], preferred_element_type=jnp.float32).astype(dtype)
    k = jnp.einsum("bsm,md->bsd", x, params["wk"], preferred_element_type=jnp.float32).astype(dtype)
    k = layer_norm(k, params["k_norm"], params["k_norm_bias"], norm_eps)
    q = rope_half_split(q, positions, inv_freq, rope_magnitude)
    k = rope_half_split(k, positions, inv_freq, rope_magnitude)
    if rotate:
        q, k = hadamard_rotate(q), hadamard_rotate(k)
    w = jnp.einsum("bsm,mh->bsh", x.astype(jnp.float32), params["weights_proj"].astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * index_weight_scale(h, d)
    return q, k, w
