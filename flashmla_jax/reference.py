"""The jax.numpy ground truth for every kernel in this package (also the "xla" implementation).

It is itself checked against float64 NumPy loops, and the kernels against it (tests/_util.py lists the
hierarchy of references).

Shapes: B batch, S_q new query tokens per sequence, H heads, D = 576 latent width ([c_kv (512) ; k_pe (64)]),
D_v = head_dim_v (512: V is the first D_v columns of the latent), N the cache capacity per sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_pages(kv_cache: jax.Array, block_table: jax.Array) -> jax.Array:
    """Paged cache -> contiguous view.

    kv_cache: [num_blocks, page_size, D]; block_table: [B, max_blocks] int32.
    Returns [B, max_blocks * page_size, D]. Out-of-range block indices are clamped into range: whatever
    they point at lies past the sequence's length and is masked by the caller.
    """
    num_blocks, page_size, d = kv_cache.shape
    pages = jnp.take(kv_cache, jnp.clip(block_table, 0, num_blocks - 1), axis=0)
    return pages.reshape(block_table.shape[0], block_table.shape[1] * page_size, d)


def visible_key_limits(cache_seqlens: jax.Array, capacity: int, s_q: int, causal: bool) -> jax.Array:
    """[B] lengths -> [B, S_q] int32: query i sees keys at positions < limit[b, i].

    Lengths are clamped to [0, capacity]; causal: limit = seqlen - S_q + i + 1 (at least 0).
    """
    seqlen = jnp.clip(cache_seqlens.astype(jnp.int32), 0, capacity)
    if not causal:
        return jnp.broadcast_to(seqlen[:, None], (seqlen.shape[0], s_q))
    return jnp.maximum(seqlen[:, None] - s_q + 1 + jnp.arange(s_q, dtype=jnp.int32)[None, :], 0)


def mla_decode_reference(q: jax.Array, kv_cache: jax.Array, cache_seqlens: jax.Array,
                         block_table: jax.Array | None = None, *, head_dim_v: int = 512,
                         softmax_scale: float, causal: bool = True) -> tuple[jax.Array, jax.Array]:
    """Absorbed MLA decode: multi-query attention with one latent KV head whose V is K[..., :head_dim_v].

    q: [B, S_q, H, D]; kv_cache: [B, N, D], or [num_blocks, page_size, D] with block_table [B, max_blocks];
    cache_seqlens: [B] int32 (clamped to [0, N]).
    Returns out [B, S_q, H, head_dim_v] in q.dtype and lse [B, S_q, H] float32 (natural log). A row that
    sees no key gives out 0 and lse -inf. Scores and the softmax are float32; the probabilities meet V in
    the cache's dtype, as in the kernels.
    """
    kv = kv_cache if block_table is None else gather_pages(kv_cache, block_table)
    b, n, _ = kv.shape
    s_q = q.shape[1]
    # Zero what lies past each sequence: unused pages may hold anything, NaN included.
    seqlen = jnp.clip(cache_seqlens.astype(jnp.int32), 0, n)
    kv = jnp.where(jnp.arange(n)[None, :, None] < seqlen[:, None, None], kv, jnp.zeros((), kv.dtype))

    scores = jnp.einsum("bshd,bnd->bshn", q, kv, preferred_element_type=jnp.float32) * softmax_scale
    limits = visible_key_limits(cache_seqlens, n, s_q, causal)                         # [B, S_q]
    visible = jnp.arange(n)[None, None, None, :] < limits[:, :, None, None]            # [B, S_q, 1, N]
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bshn,bnd->bshd", p.astype(kv.dtype), kv[..., :head_dim_v],
                     preferred_element_type=jnp.float32)
    out = jnp.where(denom > 0, out / jnp.where(denom > 0, denom, 1.0), 0.0)
    lse = jnp.where(denom[..., 0] > 0, row_max[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
    return out.astype(q.dtype), lse


def mla_prefill_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, softmax_scale: float, causal: bool = True,
                          segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Non-absorbed MLA prefill: multi-head (or grouped-query) attention with d_qk != d_v allowed.

    q: [B, S, H, d_qk]; k: [B, S, H_kv, d_qk]; v: [B, S, H_kv, d_v]; H a multiple of H_kv (query head h
    reads KV head h // (H // H_kv)); segment_ids: None or [B, S] int32 (a token sees only keys of its own
    segment). causal: query i sees keys j <= i.
    Returns out [B, S, H, d_v] in q.dtype and lse [B, S, H] float32 (natural log; -inf for a row that sees
    no key, whose out is 0). Scores and the softmax are float32; the probabilities meet V in v's dtype, as
    in the kernels. Differentiable with jax.grad (it is the "xla" implementation).
    """
    b, s, h, d_qk = q.shape
    h_kv = k.shape[2]
    g = h // h_kv
    qg = q.reshape(b, s, h_kv, g, d_qk)
    scores = jnp.einsum("bqkgd,bnkd->bkgqn", qg, k, preferred_element_type=jnp.float32) * softmax_scale
    visible = jnp.ones((1, s, s), bool)
    if causal:
        visible = visible & (jnp.arange(s)[:, None] >= jnp.arange(s)[None, :])[None]
    if segment_ids is not None:
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)                      # [B, H_kv, G, S, S]
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgqn,bnkd->bqkgd", (p / safe).astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = jnp.where(denom[..., 0] > 0, row_max[..., 0] + jnp.log(safe[..., 0]), -jnp.inf)   # [B, H_kv, G, S]
    return out.reshape(b, s, h, v.shape[-1]).astype(q.dtype), lse.reshape(b, h, s).transpose(0, 2, 1)
