"""`LatentCache`: the MLA latent KV cache as a pytree (contiguous or paged), for decode loops inside jit.

The cache holds one latent row per token, `[c_kv ; k_pe]` (D = 576 for DeepSeek), shared by all heads.

    cache = LatentCache.create(batch=8, max_len=4096, page_size=64)       # paged, contiguous block table
    cache = cache.append(kv_new)                                          # kv_new [B, S, D]
    out = cache.decode(q, softmax_scale=scale)                            # q [B, S_q, H, D]

A whole model's cache is one stacked buffer (`num_layers=L`): every layer has its own rows and lengths,
and `append(kv_new, layer=i)` / `decode(q, layer=i)` act on layer i exactly as L separate caches would,
while the kernels read the layer in place (no slice is copied), also inside a `lax.scan` over layers:

    cache = LatentCache.create(batch=8, max_len=4096, num_layers=27)
    def layer_step(cache, i):                                             # scanned over i = 0 .. L-1
        cache = cache.append(kv_new_i, layer=i)
        return cache, cache.decode(q_i, layer=i)

Lengths count the tokens already written, the newest included: append the step's tokens, then decode
(query i of S_q sees keys < seqlen - S_q + i + 1, see `mla_decode`).

`append` writes with one scatter into the cache buffer, so under `jax.jit(..., donate_argnums=...)` the
update happens in place on the GPU (and on the CPU for float32/float16): no copy of the whole cache.
XLA's CPU backend has no native bfloat16 scatter or dynamic_update_slice: it widens the whole operand to
float32 and back, so a bfloat16 append on the CPU costs two passes over the cache (no extra copy is kept).

An FP8 cache (`kv_format="fp8_blockscale"` or `"fp8_pertensor"`, flashmla_jax/fp8.py) stores each token as
uint8 bytes (656 / 576 instead of 1152 in bfloat16); `append` quantizes the new tokens inside its jitted
step (`quantize_latent`) and scatters the bytes in place, `decode` passes the format to `mla_decode`.
"fp8_pertensor" quantizes with a scale fixed at creation (`kv_scale`): choose amax / 448 of the latents
you expect (e.g. calibrated on a few prompts); 1.0 covers |values| <= 448, and larger values saturate.

DeepSeek-V3.2 (DeepSeek Sparse Attention) also caches one lightning-indexer key per token beside its latent
(`create(..., index_head_dim=128)`): same token grid, block table and lengths, in `dtype` or in DeepGEMM's
paged FP8 layout (`index_kv_format="fp8_paged"`, flashmla_jax/fp8.py). `append(kv_new, index_keys=k)` writes
both in one jitted step; `index_topk` ranks the cached keys and `decode_sparse` attends to the chosen tokens:

    cache = LatentCache.create(8, 32768, page_size=64, index_head_dim=128, index_kv_format="fp8_paged")
    cache = cache.append(kv_new, index_keys=k_index)                      # [B, S, 576], [B, S, 128]
    indices = cache.index_topk(q_index, weights, topk=2048)               # [B, S, 2048] pool indices
    out = cache.decode_sparse(q, indices, softmax_scale=scale)            # [B, S, H, 512]
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning

from flashmla_jax import _checks, _mesh
from flashmla_jax.fp8 import (INDEX_KEY_DIM, LatentFormat, dequantize_latent, index_page_bytes, latent_format,
                              quantize_latent, write_index_keys)
from flashmla_jax.ops.decode import index_layer, mla_decode
from flashmla_jax.ops.indexer import indexer_topk
from flashmla_jax.ops.sparse import mla_decode_sparse


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["kv", "seqlens", "block_table", "kv_scale", "index_k"],
                   meta_fields=["page_size", "capacity", "num_layers", "kv_format", "latent_widths", "index_kv_format"])
@dataclasses.dataclass(frozen=True, eq=False)                    # eq on arrays has no single bool
class LatentCache:
    """Latent rows, per-sequence lengths and (paged) the block table of B sequences.

    Fields (pytree leaves):
      kv: contiguous [B, capacity, D], or paged [num_blocks, page_size, D]; token t of sequence b lives at
        kv[b, t] (contiguous) or kv[block_table[b, t // page_size], t % page_size] (paged). Stacked
        (num_layers L): [L, B, capacity, D] or [L, num_blocks, page_size, D], layer i at kv[i].
      seqlens: [B] int32, tokens written per sequence, in [0, capacity]; stacked: [L, B], each layer's own.
      block_table: None (contiguous), or [B, max_blocks] int32 page indices (paged; one table for all layers,
        each layer having its own pool of num_blocks pages).
      kv_scale: "fp8_pertensor": the float32 scale, 0-d ([L] when stacked, one per layer); else None.
      index_k: None, or the lightning indexer's keys (DeepSeek-V3.2), one per token on the latent's token grid:
        [B, capacity, D_I] / [num_blocks, page_size, D_I] in a float dtype, or with index_kv_format "fp8_paged"
        uint8 [B, capacity * 132] / [num_blocks, page_size * 132] (fp8.py's layout, D_I = 128); [L, ...] stacked.
    Static fields (part of the tree structure, so a jitted function retraces when they change):
      page_size: None (contiguous), or a power of two in [16, 256].
      capacity: the most tokens a sequence holds (<= max_blocks * page_size when paged).
      num_layers: None (one layer's cache), or L for a layer-stacked cache.
      kv_format: None (kv holds floats of `dtype`), "fp8_blockscale" or "fp8_pertensor" (kv holds uint8
        bytes, the format's bytes per token as its last axis: 656 / 576).
      latent_widths: FP8 caches: (d_v, d_r), the c_kv and k_pe widths of a latent (512, 64); else None.
      index_kv_format: None (index keys, if any, in a float dtype) or "fp8_paged".

    Make one with `LatentCache.create`; it is immutable: `append` returns a new cache.
    """

    kv: jax.Array
    seqlens: jax.Array
    block_table: jax.Array | None
    page_size: int | None
    capacity: int
    num_layers: int | None = None
    kv_format: str | None = None
    latent_widths: tuple[int, int] | None = None
    kv_scale: jax.Array | None = None
    index_k: jax.Array | None = None
    index_kv_format: str | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, batch: int, max_len: int, dim: int = 576, dtype=jnp.bfloat16, page_size: int | None = None,
               num_blocks: int | None = None, block_table=None, num_layers: int | None = None,
               kv_format: str | None = None, kv_scale=None, rope_dim: int = 64, index_head_dim: int | None = None,
               index_kv_format: str | None = None) -> "LatentCache":
        """An empty cache (all lengths 0, latent rows zero) for `batch` sequences of up to `max_len` tokens.

        Args:
          batch: B, the number of sequences.
          max_len: capacity, the most tokens one sequence holds; appends past it are dropped.
          dim: D, the latent width (576 = kv_lora_rank 512 + rope 64 for DeepSeek).
          dtype: the cache's dtype (must equal the queries' dtype in `decode`).
          page_size: None for a contiguous cache kv [B, max_len, D]; else a power of two in [16, 256]
            (64 is what the fastest CUDA kernel uses) for a paged cache kv [num_blocks, page_size, D].
          num_blocks: paged only: pages in the pool; default B * ceil(max_len / page_size).
          block_table: paged only: None for the contiguous default (sequence b owns pages
            b * max_blocks ... b * max_blocks + max_blocks - 1, max_blocks = ceil(max_len / page_size)),
            or your own [B, max_blocks'] int32 table with max_blocks' * page_size >= max_len. Entries a
            sequence never reaches may hold anything (an out-of-range index is never read nor written);
            two sequences must not share a page they both append into.
          num_layers: None for one layer's cache, or L: one stacked buffer for L layers (each with its own
            lengths and, paged, its own pool of num_blocks pages under the one block table).
          kv_format: None (latents stored in `dtype`), "fp8_blockscale" (656 bytes a token at 512 + 64) or
            "fp8_pertensor" (576 bytes): kv is uint8 [..., bytes per token] and `dtype` is not used.
          kv_scale: "fp8_pertensor" only: the fixed float32 scale the latents are quantized with (None: 1.0).
            Choose amax / 448 of the latents the cache will hold (calibrate it on a few prompts): values
            beyond 448 * kv_scale saturate, and a scale far above that wastes precision. A scalar, or [L]
            (one per layer) for a stacked cache.
          rope_dim: FP8 only: d_r, the k_pe width at the end of the latent (64; kept in bfloat16 by blockscale).
          index_head_dim: None (no indexer keys: a V2/V3 cache), or D_I: the cache also holds one lightning-indexer
            key of D_I values per token (DeepSeek-V3.2: 128), zeros, on the latent's token grid.
          index_kv_format: None (the index keys in `dtype`, also beside an FP8 latent) or "fp8_paged" (uint8, 132
            bytes a token; needs index_head_dim 128).

        Returns:
          LatentCache with kv [B, max_len, D] or [num_blocks, page_size, D] ([L, ...] when stacked),
          seqlens zeros [B] ([L, B]) int32, block_table None or [B, max_blocks] int32, index_k None or as the
          class docstring says.
        """
        batch, max_len, dim = (_checks.integer(name, value, lo=1)
                               for name, value in (("batch", batch), ("max_len", max_len), ("dim", dim)))
        num_layers = _checks.optional_integer("num_layers", num_layers, lo=1)
        lead = () if num_layers is None else (num_layers,)
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        fp8 = _fp8_fields(kv_format, kv_scale, dim, rope_dim, lead)
        index = _index_fields(index_head_dim, index_kv_format, dtype)
        if kv_format is not None:
            dtype, dim = jnp.dtype(jnp.uint8), latent_format(kv_format, *fp8["latent_widths"]).bytes_per_token
        seqlens = jnp.zeros(lead + (batch,), jnp.int32)
        if page_size is None:
            if num_blocks is not None or block_table is not None:
                raise ValueError("num_blocks and block_table need a paged cache: pass page_size")
            return cls(jnp.zeros(lead + (batch, max_len, dim), dtype), seqlens, None, None, max_len, num_layers, **fp8,
                       **_index_keys(index, lead + (batch,), max_len))

        page_size = _checks.page_size("page_size", page_size)
        max_blocks = -(-max_len // page_size)
        if block_table is None:
            needed = batch * max_blocks
            if num_blocks is None:
                num_blocks = needed
            num_blocks = _checks.integer("num_blocks (for the default block table: >= batch * ceil(max_len / "
                                         "page_size))", num_blocks, lo=needed)
            block_table = jnp.arange(needed, dtype=jnp.int32).reshape(batch, max_blocks)
        else:
            dtype_in = getattr(block_table, "dtype", None)                   # before jnp narrows int64
            block_table = jnp.asarray(block_table)
            if block_table.dtype != jnp.int32 or (dtype_in is not None and dtype_in != jnp.int32):
                raise TypeError(f"block_table must be int32, got {dtype_in or block_table.dtype}")
            if block_table.ndim != 2 or block_table.shape[0] != batch or block_table.shape[1] * page_size < max_len:
                raise ValueError(f"block_table must be [batch={batch}, max_blocks >= {max_blocks}] to hold max_len="
                                 f"{max_len} tokens in pages of {page_size}, got shape {block_table.shape}")
            if num_blocks is None:
                num_blocks = batch * max_blocks
            num_blocks = _checks.integer("num_blocks", num_blocks, lo=1)
        kv = jnp.zeros(lead + (num_blocks, page_size, dim), dtype)
        return cls(kv, seqlens, block_table, page_size, max_len, num_layers, **fp8,
                   **_index_keys(index, lead + (num_blocks,), page_size))

    # ------------------------------------------------------------------ properties

    @property
    def batch(self) -> int:
        """B, the number of sequences."""
        return self.seqlens.shape[-1]

    @property
    def dim(self) -> int:
        """D, the latent width (576 for DeepSeek, also for an FP8 cache, whose kv holds more bytes)."""
        return self.kv.shape[-1] if self.latent_widths is None else sum(self.latent_widths)

    @property
    def dtype(self):
        """kv's dtype: the latents' float dtype, or uint8 for an FP8 cache."""
        return self.kv.dtype

    @property
    def format(self) -> LatentFormat | None:
        """An FP8 cache's byte layout (flashmla_jax/fp8.py), or None."""
        return None if self.kv_format is None else latent_format(self.kv_format, *self.latent_widths)

    def as_stored(self, latent: jax.Array, layer: int | jax.Array | None = None) -> jax.Array:
        """latent [..., D] as this cache gives it back to attention, in latent's dtype: rounded to the
        cache's dtype, or quantized and dequantized (FP8; with `layer`'s scale when stacked)."""
        if self.kv_format is None:
            return latent.astype(self.dtype).astype(latent.dtype)
        scale = _layer_scale(self.kv_scale, self._layer(layer))
        packed = _quantized(self, latent, scale)
        return dequantize_latent(packed, self.kv_format, scale, latent.dtype, d_r=self.latent_widths[1])

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    @property
    def stacked(self) -> bool:
        """True for a layer-stacked cache (num_layers set)."""
        return self.num_layers is not None

    @property
    def index_head_dim(self) -> int | None:
        """D_I, the width of a lightning-indexer key (128), or None for a cache without them."""
        if self.index_k is None:
            return None
        return INDEX_KEY_DIM if self.index_kv_format is not None else self.index_k.shape[-1]

    # ------------------------------------------------------------------ update and attend

    def append(self, kv_new: jax.Array, num_new: jax.Array | None = None,
               layer: int | jax.Array | None = None, index_keys: jax.Array | None = None) -> "LatentCache":
        """Writes new latent rows after each sequence's own length (ragged) and advances the lengths.

        Args:
          kv_new: [B, S, D] (S >= 1, static): token s of sequence b goes to position seqlens[b] + s.
            Cast to the cache's dtype, or quantized to its FP8 format (`quantize_latent`, with the cache's
            scale for "fp8_pertensor").
          num_new: None (all S tokens are new), or [B] int: only the first num_new[b] tokens of sequence b
            are written (clamped to [0, S]), e.g. a ragged prefill padded to S.
          layer: a stacked cache's layer to write (required there, refused otherwise): a Python int in
            [0, L), or a traced integer scalar, clamped to [0, L - 1] as `mla_decode` clamps it. Only that
            layer's rows and lengths change.
          index_keys: a cache with indexer keys (`create(index_head_dim=)`): their new keys [B, S, D_I] float
            (required there, refused otherwise), written at the same places as kv_new (and dropped where it is),
            cast to the keys' dtype or quantized to "fp8_paged" (`quantize_index_tokens`) in the same jitted step.

        Returns:
          A new LatentCache; seqlens (of that layer) become min(seqlens + num_new, capacity).

        Past capacity: tokens that do not fit are dropped and the length stops at capacity. A paged token
        whose block-table entry is out of range [0, num_blocks) is dropped too (its length still counts
        it: give every block a sequence reaches a valid page). Nothing is ever written out of bounds.

        jit-safe and usable inside `lax.scan` / `lax.while_loop`; under
        `jax.jit(f, donate_argnums=...)` the cache buffer is updated in place (no full-cache copy), the
        stacked buffer too (one scatter of the new rows into it).
        """
        if kv_new.ndim != 3 or kv_new.shape[0] != self.batch or kv_new.shape[2] != self.dim:
            raise ValueError(f"kv_new must be [B={self.batch}, S, D={self.dim}], got shape {kv_new.shape}")
        if kv_new.shape[1] < 1:
            raise ValueError(f"kv_new must hold at least one token (S >= 1), got shape {kv_new.shape}")
        if not jnp.issubdtype(kv_new.dtype, jnp.floating):
            raise TypeError(f"kv_new must be floating, got {kv_new.dtype}")
        s = kv_new.shape[1]
        if num_new is None:
            num_new = jnp.full((self.batch,), s, jnp.int32)
        else:
            num_new = jnp.asarray(num_new)
            if num_new.shape != (self.batch,):
                raise ValueError(f"num_new must be an int [B={self.batch}], got shape {num_new.shape}")
            if not jnp.issubdtype(num_new.dtype, jnp.integer):
                raise TypeError(f"num_new must be an integer array, got {num_new.dtype}")
        index_keys = self._check_index_keys(index_keys, kv_new.shape[:2])
        if self.kv_format is None:
            kv_new = kv_new.astype(self.dtype)       # FP8: quantized inside the jitted step
        return _append(self, kv_new, num_new.astype(jnp.int32), self._layer(layer), index_keys)

    def _check_index_keys(self, index_keys, lead: tuple) -> jax.Array | None:
        if self.index_k is None:
            if index_keys is not None:
                raise ValueError("index_keys needs a cache with indexer keys (LatentCache.create(index_head_dim=))")
            return None
        if index_keys is None:
            raise ValueError("this cache holds indexer keys: pass index_keys [B, S, D_I] with every append")
        if not hasattr(index_keys, "shape") or tuple(index_keys.shape) != tuple(lead) + (self.index_head_dim,):
            raise ValueError(f"index_keys must be [B, S, D_I] = {tuple(lead) + (self.index_head_dim,)} (kv_new's B "
                             f"and S), got {getattr(index_keys, 'shape', type(index_keys).__name__)}")
        if not jnp.issubdtype(index_keys.dtype, jnp.floating):
            raise TypeError(f"index_keys must be floating, got {index_keys.dtype}")
        return index_keys if self.index_kv_format is not None else index_keys.astype(self.index_k.dtype)

    def decode(self, q: jax.Array, layer: int | jax.Array | None = None, **kwargs):
        """`mla_decode(q, self.kv, self.seqlens, self.block_table, **kwargs)`: attention against this cache.

        q: [B, S_q, H, D] in the cache's dtype (FP8 caches: bfloat16, float16 or float32); the S_q query
          tokens are the last S_q appended (causal).
        layer: a stacked cache's layer (required there, refused otherwise; as in `append`), read in place.
        Keyword arguments as `mla_decode` (head_dim_v=512, softmax_scale, causal, num_splits, return_lse,
        implementation). Returns out [B, S_q, H, head_dim_v] (and lse [B, S_q, H] with return_lse=True).
        """
        layer = self._layer(layer)
        return mla_decode(q, self.kv, self.lengths(layer), self.block_table, layer=layer, kv_format=self.kv_format,
                          kv_scale=self.kv_scale, **kwargs)

    def index_topk(self, q: jax.Array, weights: jax.Array, layer: int | jax.Array | None = None, **kwargs):
        """`indexer_topk(q, weights, self.index_k, lengths, self.block_table, kv_format=self.index_kv_format)`:
        each query's top-k cached tokens by lightning-indexer score, as pool indices of this cache's latents.

        q: [B, S_q, H_I, D_I] index queries (in the keys' dtype when they are floats), weights [B, S_q, H_I] (the
        last S_q appended tokens' queries, causal); layer as in `decode`. Keyword arguments as `indexer_topk`
        (topk, return_scores, implementation). Returns indices [B, S_q, topk] int32 for `decode_sparse`."""
        if self.index_k is None:
            raise ValueError("this cache holds no indexer keys (LatentCache.create(index_head_dim=))")
        layer = self._layer(layer)
        return indexer_topk(q, weights, self.index_k, self.lengths(layer), self.block_table,
                            kv_format=self.index_kv_format, layer=layer, **kwargs)

    def decode_sparse(self, q: jax.Array, indices: jax.Array, layer: int | jax.Array | None = None, **kwargs):
        """`mla_decode_sparse(q, self.kv, indices, kv_format=self.kv_format, layer=layer)`: attention of each query
        to the tokens its indices name (`index_topk`'s pool indices; -1 unused), in place in this cache.

        q: [B, S_q, H, D]; indices [B, S_q, topk] int32; layer as in `decode`. Keyword arguments as
        `mla_decode_sparse` (softmax_scale, return_lse (default True), head_dim_v, implementation, num_splits).
        "fp8_pertensor" caches are refused (the sparse ops read bfloat16 or "fp8_blockscale" pools)."""
        return mla_decode_sparse(q, self.kv, indices, kv_format=self.kv_format, layer=self._layer(layer), **kwargs)

    def lengths(self, layer: int | jax.Array | None = None) -> jax.Array:
        """[B] int32: the tokens each sequence holds (in `layer`, for a stacked cache; as in `append`)."""
        layer = self._layer(layer)
        return self.seqlens if layer is None else index_layer(self.seqlens, layer)

    def _layer(self, layer) -> jax.Array | None:
        """Checks `layer` against the cache's stacking: None for one layer's cache, a 0-d int32 else."""
        if not self.stacked:
            if layer is not None:
                raise ValueError(f"layer={layer!r} needs a layer-stacked cache (LatentCache.create(num_layers=L))")
            return None
        if layer is None:
            raise ValueError(f"this cache stacks {self.num_layers} layers: pass layer=")
        return _checks.layer_index("layer", layer, self.num_layers)


# ---------------------------------------------------------------------- append internals


def _fp8_fields(kv_format, kv_scale, dim: int, rope_dim: int, lead: tuple) -> dict:
    """LatentCache's FP8 fields (kv_format, latent_widths, kv_scale) from `create`'s arguments."""
    kv_format = _checks.kv_format("kv_format", kv_format)
    scale = _checks.kv_scale("kv_scale", kv_scale, kv_format, lead[0] if lead else None, default=1.0)
    if kv_format is None:
        return {}
    rope_dim = _checks.integer("rope_dim", rope_dim, lo=0, hi=dim - 1)
    widths = (dim - rope_dim, rope_dim)
    try:
        latent_format(kv_format, *widths)
    except ValueError as e:
        raise ValueError(f"dim={dim}, rope_dim={rope_dim} do not fit kv_format={kv_format!r}: {e}") from None
    if scale is None:
        return dict(kv_format=kv_format, latent_widths=widths)
    return dict(kv_format=kv_format, latent_widths=widths, kv_scale=jnp.broadcast_to(scale, lead))


def _index_fields(index_head_dim, index_kv_format, dtype) -> dict | None:
    """The checked indexer-key arguments of `create`: None (no keys) or {dim, format, dtype}."""
    index_kv_format = _checks.index_kv_format("index_kv_format", index_kv_format)
    if index_head_dim is None:
        if index_kv_format is not None:
            raise ValueError(f"index_kv_format={index_kv_format!r} needs index_head_dim (128)")
        return None
    index_head_dim = _checks.integer("index_head_dim", index_head_dim, lo=1)
    if index_kv_format is not None and index_head_dim != INDEX_KEY_DIM:
        raise ValueError(f"index_kv_format={index_kv_format!r} holds keys of {INDEX_KEY_DIM} values, got "
                         f"index_head_dim={index_head_dim}")
    return dict(dim=index_head_dim, format=index_kv_format, dtype=dtype)


def _index_keys(index: dict | None, rows: tuple, per_row: int) -> dict:
    """LatentCache's index_k and index_kv_format for `rows` (lead axes, then B or num_blocks) of `per_row` tokens."""
    if index is None:
        return {}
    if index["format"] is None:
        keys = jnp.zeros(rows + (per_row, index["dim"]), index["dtype"])
    else:
        keys = jnp.zeros(rows + (index_page_bytes(per_row, index["format"]),), jnp.uint8)
    return dict(index_k=keys, index_kv_format=index["format"])


def _layer_scale(kv_scale: jax.Array | None, layer: jax.Array | None) -> jax.Array | None:
    """The scale of one layer: kv_scale [L] at layer, or kv_scale itself (0-d or None)."""
    return kv_scale if kv_scale is None or layer is None else index_layer(kv_scale, layer)


def _quantized(cache: LatentCache, latent: jax.Array, scale: jax.Array | None) -> jax.Array:
    """latent [..., D] as the FP8 cache's bytes [..., W] (uint8), with `scale` for fp8_pertensor."""
    packed = quantize_latent(latent, cache.kv_format, scale, d_r=cache.latent_widths[1])
    return packed if scale is None else packed[0]


def _packed_rows(cache: LatentCache, kv_new: jax.Array, layer: jax.Array | None) -> jax.Array:
    """kv_new [B, S, D] -> [B * S, W]: the rows to scatter, in the cache's dtype or as FP8 bytes."""
    if cache.kv_format is not None:
        kv_new = _quantized(cache, kv_new, _layer_scale(cache.kv_scale, layer))
    return kv_new.reshape(-1, kv_new.shape[-1])


def _new_positions(seqlens: jax.Array, num_new: jax.Array, s: int, capacity: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(pos, keep, new lengths) of an append of S tokens: pos [B, S] the global position of each token,
    clip(seqlens, 0, capacity) + s; keep [B, S] whether it is written (s < clip(num_new, 0, S) and pos <
    capacity); the new lengths [B]. seqlens, num_new: [B] int32."""
    start = jnp.clip(seqlens, 0, capacity)                                  # [B]
    count = jnp.clip(num_new, 0, s)
    pos = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]          # [B, S]
    keep = (jnp.arange(s)[None, :] < count[:, None]) & (pos < capacity)
    return pos, keep, jnp.minimum(start + count, capacity)


def _contiguous_rows(pos: jax.Array, keep: jax.Array, n_rows: int, offset=0) -> tuple[jax.Array, jax.Array]:
    """(rows, keep) of positions pos [B, S] in a contiguous buffer [B, n_rows] that holds positions [offset,
    offset + n_rows) of each sequence (the whole cache: offset 0, n_rows the capacity; a sequence shard: its
    slice): row b * n_rows + pos - offset, kept where it lands in the buffer."""
    local = pos - offset
    keep = keep & (local >= 0) & (local < n_rows)
    return jnp.arange(pos.shape[0], dtype=jnp.int32)[:, None] * n_rows + local, keep


def _dropped_past(rows: jax.Array, keep: jax.Array, end: int) -> jax.Array:
    """rows [B, S] with each dropped token (keep False) given a distinct index >= end (the buffer's rows), so
    that the indices stay unique and a scatter with mode="drop" skips it."""
    b, s = rows.shape
    return jnp.where(keep, rows, end + jnp.arange(b * s, dtype=jnp.int32).reshape(b, s))


def _scatter_rows(kv: jax.Array, rows: jax.Array, new_rows: jax.Array) -> jax.Array:
    """kv [..., W] with new_rows [R, W] written at the flat rows [R] (any shape) of kv.reshape(-1, W),
    indices past the end skipped: one scatter, in place when kv is donated."""
    flat = kv.reshape(-1, kv.shape[-1]).at[rows.reshape(-1)].set(new_rows, mode="drop", unique_indices=True)
    return flat.reshape(kv.shape)


def _target_rows(cache: LatentCache, seqlens: jax.Array, s: int, num_new: jax.Array, layer: jax.Array | None
                 ) -> tuple[jax.Array, jax.Array]:
    """[B, S] flat row index into kv.reshape(-1, W) for each new token (in `layer`'s rows of a stacked
    cache), and the new [B] lengths.

    seqlens: [B], the lengths of the layer written. A dropped token gets a distinct index past the end of
    the whole buffer (`_dropped_past`)."""
    layer_shape = cache.kv.shape[-3:]
    per_layer = layer_shape[0] * layer_shape[1]
    pos, keep, new_lengths = _new_positions(seqlens, num_new, s, cache.capacity)
    if cache.block_table is None:
        rows, keep = _contiguous_rows(pos, keep, cache.capacity)
    else:
        max_blocks = cache.block_table.shape[1]
        block = jnp.minimum(pos // cache.page_size, max_blocks - 1)        # in range where keep holds
        page = jnp.take_along_axis(cache.block_table, block, axis=1)
        keep &= (page >= 0) & (page < layer_shape[0])
        rows = page * cache.page_size + pos % cache.page_size
    if layer is not None:
        rows = rows + layer * per_layer
    return _dropped_past(rows, keep, per_layer * (cache.num_layers or 1)), new_lengths


def _append_slice(kv, seqlens, kv_new, num_new, capacity: int, offset):
    """`append` on a contiguous cache slice holding positions [offset, offset + N_local) of each sequence.

    kv [B, N_local, D]; seqlens, num_new [B] int32; kv_new [B, S, D] in kv's dtype; capacity the global N.
    Returns (kv, new seqlens): the tokens `_new_positions` keeps that land in this slice are written."""
    b, n_local, d = kv.shape
    pos, keep, new_lengths = _new_positions(seqlens, num_new, kv_new.shape[1], capacity)
    rows, keep = _contiguous_rows(pos, keep, n_local, offset)
    return _scatter_rows(kv, _dropped_past(rows, keep, b * n_local), kv_new.reshape(-1, d)), new_lengths


@functools.lru_cache(maxsize=None)
def _append_partitioned(capacity: int):
    """The partitioning rule of a contiguous cache's append (flashmla_jax/_mesh.py): a batch- or
    sequence-sharded cache writes its own rows with no communication; a sequence-sharded one is never
    gathered (which XLA's own scatter partitioning would do)."""
    def fn(kv, seqlens, kv_new, num_new):
        return _append_slice(kv, seqlens, kv_new, num_new, capacity, 0)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        kv_s = arg_shapes[0]
        batch = _mesh.axes_of(kv_s.sharding, 0)
        sequence = _mesh.minus(_mesh.axes_of(kv_s.sharding, 1) + _mesh.axes_of(kv_s.sharding, 2), batch)
        _mesh.check_divides(mesh, batch, kv_s.shape[0], "the cache's batch B (kv axis 0)")
        _mesh.check_divides(mesh, sequence, kv_s.shape[1], "the cache's N (kv axis 1)")
        kv_sh, lens_sh = _mesh.named(mesh, batch, sequence, ()), _mesh.named(mesh, batch)

        def lower(kv, seqlens, kv_new, num_new):
            return _append_slice(kv, seqlens, kv_new, num_new, capacity, _mesh.shard_index(sequence) * kv.shape[1])

        return mesh, lower, (kv_sh, lens_sh), (kv_sh, lens_sh, _mesh.named(mesh, batch, (), ()), lens_sh)

    wrapped = custom_partitioning(fn)
    wrapped.def_partition(partition=partition, sharding_rule="b n d, b, b s e, b -> b n d, b")
    return wrapped


def _write_index_keys(cache: LatentCache, rows: jax.Array, keys: jax.Array) -> jax.Array:
    """cache.index_k with keys [B, S, D_I] written at the token rows [B, S] of `_target_rows` (dropped past the
    end): a scatter of the rows, or of each token's codes and scale in its page ("fp8_paged")."""
    index_k = cache.index_k
    if cache.index_kv_format is None:
        return _scatter_rows(index_k, rows, keys.reshape(-1, keys.shape[-1]))
    tokens_per_page = cache.page_size or cache.capacity       # a contiguous cache: one page per sequence
    pages = index_k.reshape(-1, index_k.shape[-1])
    rows = rows.reshape(-1)
    pages = write_index_keys(pages, keys.reshape(-1, keys.shape[-1]), rows // tokens_per_page,
                             rows % tokens_per_page, cache.index_kv_format)
    return pages.reshape(index_k.shape)


@jax.jit
def _append(cache: LatentCache, kv_new: jax.Array, num_new: jax.Array, layer: jax.Array | None,
            index_keys: jax.Array | None = None) -> LatentCache:
    """kv_new [B, S, D] in the cache's dtype (FP8 caches: floats, quantized here), num_new [B] int32, layer
    None or a 0-d int32 in range, index_keys None or [B, S, D_I] (a cache with indexer keys) -> the updated cache
    (see `append`). A stacked cache gets one scatter into its whole buffer, offset to the layer's rows, and one
    update of that layer's lengths; its indexer keys go to the same token rows."""
    b, s, _ = kv_new.shape
    if index_keys is not None:
        seqlens = cache.seqlens if layer is None else index_layer(cache.seqlens, layer)
        rows, _ = _target_rows(cache, seqlens, s, num_new, layer)
        cache = dataclasses.replace(cache, index_k=_write_index_keys(cache, rows, index_keys))
    if cache.block_table is None and layer is None:
        # Through a partitioning rule, so a sequence-sharded cache is not gathered; the same rows as below.
        # (A batch-sharded cache, paged or stacked, XLA's scatter partitions by itself.)
        kv, seqlens = _append_partitioned(cache.capacity)(
            cache.kv, cache.seqlens, _packed_rows(cache, kv_new, None).reshape(b, s, -1), num_new)
        return dataclasses.replace(cache, kv=kv, seqlens=seqlens)
    seqlens = cache.seqlens if layer is None else index_layer(cache.seqlens, layer)
    rows, new_lengths = _target_rows(cache, seqlens, s, num_new, layer)
    if layer is not None:
        new_lengths = jax.lax.dynamic_update_index_in_dim(cache.seqlens, new_lengths, layer, 0)
    kv = _scatter_rows(cache.kv, rows, _packed_rows(cache, kv_new, layer))
    return dataclasses.replace(cache, kv=kv, seqlens=new_lengths)
