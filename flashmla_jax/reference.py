"""The jax.numpy ground truth for every kernel in this package (also the "xla" implementation).

It is itself checked against float64 NumPy loops, and the kernels against it (tests/_util.py lists the
hierarchy of references).

Shapes: B batch, S_q new query tokens per sequence, H heads, D = 576 latent width ([c_kv (512) ; k_pe (64)]),
D_v = head_dim_v (512: V is the first D_v columns of the latent), N the cache capacity per sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flashmla_jax.fp8 import dequantize_latent


def gather_pages(kv_cache: jax.Array, block_table: jax.Array) -> jax.Array:
    """Paged cache -> contiguous view.

    kv_cache: [num_blocks, page_size, D]; block_table: [B, max_blocks] int32.
    Returns [B, max_blocks * page_size, D]. Out-of-range block indices are clamped into range: past a
    sequence's last block whatever they point at is masked by the caller; in a used block `mla_decode` refuses
    them (concrete values) or makes the rows that read them NaN (under jit).
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
                         softmax_scale: float, causal: bool = True,
                         mergeable: bool = False) -> tuple[jax.Array, jax.Array]:
    """Absorbed MLA decode: multi-query attention with one latent KV head whose V is K[..., :head_dim_v].

    q: [B, S_q, H, D]; kv_cache: [B, N, D], or [num_blocks, page_size, D] with block_table [B, max_blocks];
    cache_seqlens: [B] int32 (clamped to [0, N]).
    Returns out [B, S_q, H, head_dim_v] in q.dtype and lse [B, S_q, H] float32 (natural log). A row that
    sees no key gives out 0 and lse -inf; a NaN or inf in q, the scale or a visible key makes its row NaN
    (`nan_rows`). Scores and the softmax are float32; the probabilities meet V in the cache's dtype, as in the
    kernels. mergeable: the rules in `mergeable_rows`' form, for a partial result a merge may still combine.
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
    p, row_max, denom = _softmax_numerators(scores)
    out = jnp.einsum("bshn,bnd->bshd", p.astype(kv.dtype), kv[..., :head_dim_v],
                     preferred_element_type=jnp.float32)
    rules = mergeable_rows if mergeable else nan_rows
    return rules(*_normalized(out, row_max, denom, q.dtype), (limits > 0)[:, :, None])


def _softmax_numerators(scores: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """scores [..., K] float32, -inf where masked -> (p = exp(scores - row_max), row_max [..., 1], denom [..., 1]);
    row_max is 0 for a row whose scores are all -inf (its p and denom are then 0, never NaN). A NaN score, or a
    +inf one, makes its row's p and denom NaN."""
    row_max = jnp.max(scores, axis=-1, keepdims=True, initial=-jnp.inf)
    row_max = jnp.where(row_max == -jnp.inf, 0.0, row_max)
    p = jnp.exp(scores - row_max)
    return p, row_max, jnp.sum(p, axis=-1, keepdims=True)


def _normalized(out: jax.Array, row_max: jax.Array, denom: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """The un-normalized p @ V [..., D_v] and `_softmax_numerators`' row_max, denom -> (out in dtype, lse float32);
    a row with denom 0 gives out 0 and lse -inf, one with denom NaN NaN in both."""
    out = jnp.where(denom != 0, out / jnp.where(denom != 0, denom, 1.0), 0.0)
    lse = jnp.where(denom[..., 0] != 0, row_max[..., 0] + jnp.log(denom[..., 0]), -jnp.inf)
    return out.astype(dtype), lse


# The LSE of a row that saw keys but gave them no weight (every visible score -inf) in a result that a merge may
# still combine (a split's or a shard's partial): finite and below every real LSE, so a merge weighs it 0 beside
# a real partial and keeps it when every partial has it. The kernels write it too (kernels/_common.py).
ALL_NEG_INF_LSE = -3.0e38


def _nan_reached(out: jax.Array, lse: jax.Array) -> jax.Array:
    """[...] bool: the rows a NaN or inf reached (lse NaN, or NaN anywhere in out [..., D_v])."""
    return jnp.isnan(lse) | jnp.any(jnp.isnan(out), axis=-1)


def mergeable_rows(out: jax.Array, lse: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`nan_rows` in the form a merge of partials keeps: NaN rows where a NaN or inf reached (lse NaN, or NaN in
    out), and for a row that sees keys (`visible`) but gave them no weight, out NaN and lse ALL_NEG_INF_LSE
    (`final_rows` turns it into NaN once nothing is left to merge)."""
    poisoned = _nan_reached(out, lse)
    unweighted = visible & (lse == -jnp.inf) & ~poisoned
    out = jnp.where((poisoned | unweighted)[..., None], jnp.asarray(jnp.nan, out.dtype), out)
    return out, jnp.where(poisoned, jnp.float32(jnp.nan), jnp.where(unweighted, jnp.float32(ALL_NEG_INF_LSE), lse))


def final_rows(lse: jax.Array) -> jax.Array:
    """lse [...] of a merged result in `mergeable_rows`' form -> `nan_rows`' (ALL_NEG_INF_LSE -> NaN)."""
    return jnp.where(jnp.isfinite(lse) & (lse < ALL_NEG_INF_LSE / 2), jnp.float32(jnp.nan), lse)


def nan_rows(out: jax.Array, lse: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rule every implementation follows: out [..., D_v] and lse [...] NaN in each row whose result a NaN or
    inf reached (lse NaN, or NaN anywhere in out), or that sees a key (`visible`, broadcast to lse's shape) but
    gave it no weight (lse -inf: every visible score -inf, from an inf in q, a key or the scale). Other rows are
    as they are. (A row that would read a block-table entry outside the pool is NaN too: the decode op's rule.)"""
    poisoned = _nan_reached(out, lse) | (visible & (lse == -jnp.inf))
    return (jnp.where(poisoned[..., None], jnp.asarray(jnp.nan, out.dtype), out),
            jnp.where(poisoned, jnp.float32(jnp.nan), lse))


def mla_prefill_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, softmax_scale: float, causal: bool = True,
                          segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Non-absorbed MLA prefill: multi-head (or grouped-query) attention with d_qk != d_v allowed.

    q: [B, S, H, d_qk]; k: [B, S, H_kv, d_qk]; v: [B, S, H_kv, d_v]; H a multiple of H_kv (query head h
    reads KV head h // (H // H_kv)); segment_ids: None or [B, S] int32 (a token sees only keys of its own
    segment). causal: query i sees keys j <= i.
    Returns out [B, S, H, d_v] in q.dtype and lse [B, S, H] float32 (natural log). Every row sees its own
    token; a NaN or inf in q, a visible key or value, or the scale makes the row NaN (`nan_rows`). Scores and
    the softmax are float32; the probabilities meet V in v's dtype, as in the kernels. Differentiable with
    jax.grad (it is the "xla" implementation).
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
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True, initial=-jnp.inf))
    row_max = jnp.where(row_max == -jnp.inf, 0.0, row_max)
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom != 0, denom, 1.0)
    out = jnp.einsum("bkgqn,bnkd->bqkgd", (p / safe).astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = jnp.where(denom[..., 0] != 0, row_max[..., 0] + jnp.log(safe[..., 0]), -jnp.inf)   # [B, H_kv, G, S]
    out, lse = out.reshape(b, s, h, v.shape[-1]).astype(q.dtype), lse.reshape(b, h, s).transpose(0, 2, 1)
    return nan_rows(out, lse, jnp.ones((), bool))      # every row sees at least its own token


# ---------------------------------------------------------------- the lightning indexer (DeepSeek Sparse Attention)
#
# index_score[b, s, t] = Σ_h w[b, s, h] · relu(q[b, s, h, :] · k[b, t, :]) over the causal prefix of each query
# (query s of S_q sees keys t < limit[b, s] = seqlen[b] - S_q + s + 1, as mla_decode), -inf elsewhere. The
# scaling (n_heads^-½ · head_dim^-½, transformers' DeepseekV32Indexer) is folded into w by the caller: relu
# commutes with a positive factor.
#
# The top-k ranks scores by one total order: larger score first, equal scores by lower position first. Scores
# are compared as `index_order_keys`: -0.0 counts as +0.0 and every NaN as the same NaN, above +inf.


def index_order_keys(scores: jax.Array) -> jax.Array:
    """float32 scores [...] -> uint32 keys [...] whose unsigned order is the scores' order (-0.0 taken as +0.0,
    every NaN as one NaN that ranks above +inf). The kernels compute the same keys."""
    bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
    magnitude = bits & jnp.uint32(0x7FFFFFFF)        # tested as bits: no flush of subnormals to zero
    bits = jnp.where(magnitude == 0, jnp.uint32(0), bits)
    bits = jnp.where(magnitude > 0x7F800000, jnp.uint32(0x7FC00000), bits)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def indexer_scores_reference(q: jax.Array, weights: jax.Array, k_cache: jax.Array, cache_seqlens: jax.Array,
                             block_table: jax.Array | None = None) -> jax.Array:
    """Lightning-indexer scores, float32.

    q: [B, S_q, H, D] (the index queries, RoPE applied); weights: [B, S_q, H] (the per-head weights, scaling
    folded in); k_cache: [B, N, D] contiguous, or [num_blocks, page_size, D] with block_table [B, max_blocks]
    (float keys: an FP8 cache is dequantized first); cache_seqlens: [B] int32, clamped to [0, N].
    Returns [B, S_q, N] float32: the score of each key a query sees, -inf past its causal limit. Products and
    sums are float32; keys past each length are zeroed first (unused pages may hold NaN).
    """
    keys = k_cache if block_table is None else gather_pages(k_cache, block_table)
    n, s_q = keys.shape[1], q.shape[1]
    seqlen = jnp.clip(cache_seqlens.astype(jnp.int32), 0, n)
    keys = jnp.where(jnp.arange(n)[None, :, None] < seqlen[:, None, None], keys, jnp.zeros((), keys.dtype))
    # HIGHEST: float32 keys (an FP8 cache, dequantized) would otherwise go through TF32 on a GPU.
    logits = jnp.einsum("bshd,bnd->bshn", q, keys, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    scores = jnp.einsum("bsh,bshn->bsn", weights.astype(jnp.float32), jnp.maximum(logits, 0.0),
                        precision=jax.lax.Precision.HIGHEST)
    limits = visible_key_limits(cache_seqlens, n, s_q, causal=True)
    return jnp.where(jnp.arange(n)[None, None, :] < limits[:, :, None], scores, -jnp.inf)


def indexer_topk_reference(scores: jax.Array, limits: jax.Array, topk: int, block_table: jax.Array | None = None,
                           page_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The top-k of each query's visible scores, as pool indices.

    scores: [B, S_q, N] float32; limits: [B, S_q] int32 (query (b, s) sees positions t < limits[b, s]);
    block_table: None (a contiguous cache: position t of sequence b is pool index b * N + t) or [B, max_blocks]
    int32 with page_size (t is block_table[b, t // page_size] * page_size + t % page_size, the entries used as
    they are: the ops clamp them into the pool first, as the kernels read them).
    Returns (indices int32 [B, S_q, topk], their scores float32 [B, S_q, topk]): the min(topk, limit) best
    positions by `index_order_keys` (ties: lower position first), listed in ascending position order, then -1
    (scores -inf) for the slots no visible key fills.
    """
    b, s_q, n = scores.shape
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), scores.shape)
    visible = positions < limits[..., None]
    rank_key = jnp.where(visible, ~index_order_keys(scores), jnp.uint32(0xFFFFFFFF))   # ascending = best first
    _, best = jax.lax.sort((rank_key, positions), dimension=-1, num_keys=2)
    take = min(topk, n)
    chosen = best[..., :take]
    chosen = jnp.where(chosen < limits[..., None], chosen, n)               # unfilled slots sort last
    chosen = jnp.sort(chosen, axis=-1)
    filled = chosen < n
    safe = jnp.where(filled, chosen, 0)
    picked = jnp.take_along_axis(scores, safe, axis=-1)
    if block_table is None:
        pool = jnp.arange(b, dtype=jnp.int32)[:, None, None] * n + safe
    else:
        blocks = jnp.take_along_axis(block_table[:, None, :], safe // page_size, axis=-1)
        pool = blocks * page_size + safe % page_size
    indices = jnp.where(filled, pool, -1).astype(jnp.int32)
    picked = jnp.where(filled, picked, -jnp.inf)
    if take < topk:
        pad = ((0, 0), (0, 0), (0, topk - take))
        indices = jnp.pad(indices, pad, constant_values=-1)
        picked = jnp.pad(picked, pad, constant_values=-jnp.inf)
    return indices, picked


# ---------------------------------------------------------------- DeepSeek Sparse Attention (top-k indices)


def sparse_valid(indices: jax.Array, topk_length: jax.Array | None, num_tokens: int) -> jax.Array:
    """indices [B, S_q, topk] int32, topk_length None or [B] -> [B, S_q, topk] bool: the slots that count.

    A slot counts when its index lies in [0, num_tokens) and, with topk_length, it is one of the first
    clip(topk_length[b], 0, topk) of its row; every other slot is unused (as -1), whatever it holds."""
    valid = (indices >= 0) & (indices < num_tokens)
    if topk_length is not None:
        length = jnp.clip(topk_length.astype(jnp.int32), 0, indices.shape[-1])
        valid = valid & (jnp.arange(indices.shape[-1])[None, None, :] < length[:, None, None])
    return valid


def mla_sparse_reference(q: jax.Array, pool: jax.Array, indices: jax.Array, topk_length: jax.Array | None = None,
                         *, head_dim_v: int = 512, softmax_scale: float, kv_format: str | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sparse absorbed MLA: each query token attends to the pool tokens its index list names.

    q: [B, S_q, H, D]; pool: tokens [..., W] (flat [N, W] or paged [num_blocks, page_size, W]; token i is row i
    of the flattened pool, i = page * page_size + offset), W = D in q's dtype, or an FP8 kv_format's bytes per
    token (uint8; dequantized to q's dtype with `fp8.dequantize_latent`); indices: [B, S_q, topk] int32, unused
    slots as in `sparse_valid`; topk_length: None or [B] int32. A duplicated index is attended once per slot.
    Returns out [B, S_q, H, head_dim_v] in q.dtype, lse [B, S_q, H] float32 (natural log) and max_logits
    [B, S_q, H] float32 (the largest score q·k * softmax_scale). A row with no valid slot gives out 0, lse -inf
    and max_logits -inf. Scores and the softmax are float32; the probabilities meet V in q's dtype, as in the
    kernels."""
    d = q.shape[-1]
    pool = pool.reshape(-1, pool.shape[-1])
    valid = sparse_valid(indices, topk_length, pool.shape[0])
    kv = jnp.take(pool, jnp.where(valid, indices, 0), axis=0)                        # [B, S_q, topk, W]
    if kv_format is not None:
        kv = dequantize_latent(kv, kv_format, dtype=q.dtype, d_r=d - head_dim_v)
    kv = jnp.where(valid[..., None], kv, jnp.zeros((), kv.dtype))     # unused slots may gather NaN bytes
    scores = jnp.einsum("bshd,bskd->bshk", q, kv, preferred_element_type=jnp.float32) * softmax_scale
    scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
    max_logits = jnp.max(scores, axis=-1, initial=-jnp.inf)
    p, row_max, denom = _softmax_numerators(scores)
    out = jnp.einsum("bshk,bskd->bshd", p.astype(kv.dtype), kv[..., :head_dim_v], preferred_element_type=jnp.float32)
    return (*_normalized(out, row_max, denom, q.dtype), max_logits)
