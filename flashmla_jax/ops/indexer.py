"""`indexer_scores` and `indexer_topk`: the lightning indexer of DeepSeek Sparse Attention (V3.2) over a paged
key cache, and its top-k as indices into the paged pool (the `indices` a sparse MLA decode reads).

Shapes: B sequences, S_q new query tokens each, H index heads (64 for DeepSeek-V3.2), D = 128 the index head
dim, N the cache capacity per sequence (max_blocks * page_size when paged), L layers of a stacked cache.

    index_score[b, s, t] = Σ_h weights[b, s, h] · relu(q[b, s, h, :] · k[b, t, :])

over the causal prefix of each query: query s sees keys t < seqlen[b] - S_q + s + 1 (as `mla_decode`); other
positions score -inf. The per-head scale of transformers' `DeepseekV32Indexer` (n_heads^-½ · D^-½) belongs in
`weights` (`flashmla_jax.indexer_math.indexer_projections` puts it there). The kernels and the tiling policy:
flashmla_jax/kernels/indexer.py.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import _checks, reference
from flashmla_jax._backend import num_sms
from flashmla_jax.fp8 import INDEX_KEY_DIM, e4m3_values_by_lookup, index_key_codes, quantize_index_tokens
from flashmla_jax.ops._launch import launch
from flashmla_jax.ops._registry import Implementation, Registry, TritonRunner
from flashmla_jax.ops.decode import FP8_NATIVE, _pow2_at_least, check_block_table, index_layer

MAX_KERNEL_HEADS = 128           # the score kernel's dot is [BLOCK_N, QG * H]: at most 128 columns
MAX_SCORE_BYTES = 1 << 30        # the top-k's float32 score buffer per pass; longer query runs go in chunks
_INT32_MAX = 2 ** 31 - 1


# ---------------------------------------------------------------- checks


def _check_inputs(q, weights, k_cache, cache_seqlens, block_table, kv_format, stacked) -> tuple[int, int | None, int]:
    """Checks the arguments; returns (capacity N, page_size or None when contiguous, blocks in the pool)."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S_q, H, D], got shape {q.shape}")
    b, s_q, h, d = q.shape
    _checks.float_dtype("q", q)
    if weights.ndim != 3 or weights.shape != (b, s_q, h):
        raise ValueError(f"weights must be [B={b}, S_q={s_q}, H={h}], got shape {weights.shape}")
    _checks.float_dtype("weights", weights)
    _checks.int32_array("cache_seqlens", cache_seqlens, (b,), f"int32 [B={b}]")
    lead = "L, " if stacked else ""
    if kv_format is None:
        if k_cache.dtype == jnp.uint8:
            raise TypeError(f"k_cache is uint8, raw bytes: pass kv_format (one of {_checks.INDEX_FORMATS}) to say how "
                            f"they hold the keys; kv_format=None means k_cache holds q's dtype ({q.dtype})")
        _checks.same_dtype("k_cache", k_cache, "q", q)
        if k_cache.ndim != 3 + stacked or k_cache.shape[-1] != d:
            raise ValueError(f"k_cache must be [{lead}B, N, {d}] (or [{lead}num_blocks, page_size, {d}] with "
                             f"block_table), got shape {k_cache.shape}")
        rows, per_row = k_cache.shape[stacked], k_cache.shape[stacked + 1]
    else:
        if k_cache.dtype != jnp.uint8:
            raise TypeError(f"k_cache must be uint8 (the raw bytes) with kv_format={kv_format!r}, got {k_cache.dtype}")
        if d != INDEX_KEY_DIM:
            raise ValueError(f"kv_format={kv_format!r} holds keys of {INDEX_KEY_DIM} values: q must be "
                             f"[B, S_q, H, {INDEX_KEY_DIM}], got shape {q.shape}")
        width = INDEX_KEY_DIM + 4
        if k_cache.ndim != 2 + stacked or k_cache.shape[-1] % width or k_cache.shape[-1] == 0:
            raise ValueError(f"k_cache must be uint8 [{lead}B, N * {width}] (or [{lead}num_blocks, page_size * "
                             f"{width}] with block_table), got shape {k_cache.shape}")
        rows, per_row = k_cache.shape[stacked], k_cache.shape[-1] // width
    if block_table is None:
        if rows != b:
            raise ValueError(f"a contiguous k_cache must hold B={b} sequences, got shape {k_cache.shape}")
        if b * per_row > _INT32_MAX:
            raise ValueError(f"B * N ({b * per_row}) must fit int32 pool indices")
        return per_row, None, rows
    _checks.int32_array("block_table", block_table, (b, None), f"int32 [B={b}, max_blocks]")
    page_size = _checks.page_size("page_size (from k_cache's shape)", per_row)
    if rows * page_size > _INT32_MAX:
        raise ValueError(f"num_blocks * page_size ({rows * page_size}) must fit int32 pool indices")
    return block_table.shape[1] * page_size, page_size, rows


def _num_layers(k_cache, kv_format) -> int | None:
    """L of a stacked k_cache (one more axis than a layer's), None when the shape says it is not stacked."""
    unstacked = 3 if kv_format is None else 2
    return k_cache.shape[0] if getattr(k_cache, "ndim", 0) == unstacked + 1 else None


# ---------------------------------------------------------------- tiles


@dataclasses.dataclass(frozen=True)
class IndexerTiles:
    """How the kernels cut the work (kernels/indexer.py): the score kernel's key tile (block_n), keys per program
    (split), warps and stages; the top-k programs' scores per program (chunk) and per step (tile); query rows
    per top-k pass (query_chunk; None: all S_q at once); fp8_acc_depth: products an FP8 wgmma accumulates in
    its own reduced-precision adder before each float32 promotion (Triton's max_num_imprecise_acc). 128, the
    key width, never promotes: 1.3e-4 relative error at I1-fp8 on the H200, where 32 gave 4.6e-5 but a 31%
    slower score kernel (benchmarks/NOTES.md)."""
    block_n: int
    split: int
    num_warps: int
    num_stages: int
    chunk: int
    tile: int
    query_chunk: int | None = None
    fp8_acc_depth: int = 128


SCORE_WAVES = 8            # score programs per SM the split aims for (ragged batches and the tail balance)
TOPK_CHUNK, TOPK_TILE = 4096, 1024


def indexer_tiles(batch: int, s_q: int, heads: int, capacity: int, dtype, fp8: bool, sms: int) -> IndexerTiles:
    """The tiles of one call: 128-key tiles (64 for float32 keys: shared memory), splits so that the score
    programs fill SCORE_WAVES waves of `sms`, 4096-score top-k chunks; queries chunked so that the top-k's
    scores stay within MAX_SCORE_BYTES."""
    block_n = 64 if (dtype == jnp.float32 and not fp8) else 128
    rows = batch * -(-s_q // _query_group(s_q, heads))
    wanted = max(1, -(-SCORE_WAVES * sms // rows))
    split = max(block_n, _pow2_at_least(-(-capacity // wanted)))
    chunk = min(TOPK_CHUNK, _pow2_at_least(capacity, 16))
    per_query = batch * capacity * 4
    query_chunk = None if per_query * s_q <= MAX_SCORE_BYTES else max(1, MAX_SCORE_BYTES // per_query)
    columns = _query_group(s_q, heads) * _kernel_heads(heads)       # 128 float32 accumulator columns: 8 warps
    return IndexerTiles(block_n=block_n, split=split, num_warps=4 if columns <= 64 else 8,
                        num_stages=3 if not fp8 else 4, chunk=chunk,
                        tile=min(TOPK_TILE, chunk), query_chunk=query_chunk)


def _query_group(s_q: int, heads: int) -> int:
    """Queries per score program: 2 when two fit the dot's 128 columns (MTP, prefill), else 1."""
    return 2 if s_q > 1 and 2 * _kernel_heads(heads) <= MAX_KERNEL_HEADS else 1


def _kernel_heads(h: int) -> int:
    """Heads as the kernels see them: a power of two >= 16 (the dot's narrowest), zero-weighted heads padded."""
    return max(16, _pow2_at_least(h))


# ---------------------------------------------------------------- the kernels' path


def _kernel_inputs(q, weights, kv_format):
    """(q for the kernels [B, S_q, H', 128], weights float32 [B, S_q, H']): heads padded to H' (zero weights);
    FP8 keys: q as e4m3 bytes with one scale per (token, head), folded into the weights."""
    w = weights.astype(jnp.float32)
    if kv_format is not None:
        q, q_scale = quantize_index_tokens(q)
        w = w * q_scale
    pad = _kernel_heads(q.shape[2]) - q.shape[2]
    if pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
        w = jnp.pad(w, ((0, 0), (0, 0), (0, pad)))
    return q, w


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """The static facts of a key cache the kernels need: capacity N per sequence, page_size (None: contiguous),
    blocks in the pool, max_blocks of the table, layers of a stack (0: one layer) and the stride between them
    (elements of the cache's dtype), and whether it is "fp8_paged"."""
    capacity: int
    page_size: int | None
    num_blocks: int
    max_blocks: int
    num_layers: int
    layer_stride: int
    fp8: bool

    @classmethod
    def of(cls, k_cache, block_table, capacity, page_size, num_blocks, stacked, kv_format) -> "KeyLayout":
        return cls(capacity, page_size, num_blocks, 1 if block_table is None else block_table.shape[1],
                   k_cache.shape[0] if stacked else 0, int(np.prod(k_cache.shape[1:])) if stacked else 0,
                   kv_format is not None)

    def constexprs(self) -> dict:
        paged = self.page_size is not None
        return dict(CAPACITY=self.capacity, PAGED=paged, PAGE_SIZE=self.page_size if paged else self.capacity,
                    MAX_BLOCKS=self.max_blocks, NUM_BLOCKS=self.num_blocks)


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One launch: the kernel's name in flashmla_jax/kernels/indexer.py, grid, warps, stages, constexprs and
    the outputs to zero first."""
    kernel: str
    grid: tuple
    num_warps: int
    num_stages: int
    constexprs: dict
    zeroed_outputs: tuple = ()

    def __call__(self, *args, out_shape, implementation: str):
        from flashmla_jax.kernels import indexer as kernels

        return launch(getattr(kernels, self.kernel), *args, out_shape=out_shape, grid=self.grid,
                      implementation=implementation, num_warps=self.num_warps, num_stages=self.num_stages,
                      zeroed_outputs=self.zeroed_outputs, **self.constexprs)


HIST_BINS = (2048, 2048, 1024)     # the radix select's digits (kernels/indexer.py: BINS1, BINS2, BINS3)


def plan_scores(batch: int, s_q: int, s_total: int, heads: int, layout: KeyLayout, tiles: IndexerTiles,
                fp8_native: bool, topk: int | None = None) -> KernelLaunch:
    """The score kernel for S_q queries of S_TOTAL (a query chunk), `heads` already padded for the kernels;
    with topk it also counts the top-k's first digit (HIST)."""
    qg = _query_group(s_q, heads)
    groups = -(-s_q // qg)
    return KernelLaunch(
        "indexer_scores_kernel", (batch * groups, -(-layout.capacity // tiles.split)), tiles.num_warps,
        tiles.num_stages, dict(S_Q=s_q, S_TOTAL=s_total, H=heads, QG=qg, NUM_GROUPS=groups, SPLIT=tiles.split,
                               BLOCK_N=tiles.block_n, NUM_LAYERS=layout.num_layers, LAYER_STRIDE=layout.layer_stride,
                               FP8=layout.fp8, FP8_NATIVE=bool(fp8_native), FP8_ACC_DEPTH=tiles.fp8_acc_depth,
                               HIST=topk is not None, TOPK=topk or 0,
                               **layout.constexprs()),
        zeroed_outputs=(1,) if topk is not None else ())


def plan_topk(rows: int, s_q: int, s_total: int, layout: KeyLayout, topk: int, tiles: IndexerTiles,
              return_scores: bool) -> dict[str, KernelLaunch]:
    """The radix select's launches over the scores of `rows` = B * S_q query rows: "threshold1", "refine2",
    "threshold2", "refine3", "threshold3", "count", "write"."""
    num_chunks = -(-layout.capacity // tiles.chunk)
    grid = (rows, num_chunks)
    common = dict(S_Q=s_q, S_TOTAL=s_total, CAPACITY=layout.capacity, TOPK=topk, CHUNK=tiles.chunk, TILE=tiles.tile)
    threshold = dict(S_Q=s_q, S_TOTAL=s_total, CAPACITY=layout.capacity, TOPK=topk)

    def threshold_launch(level):
        return KernelLaunch("indexer_topk_threshold_kernel", (rows,), 4, 1, dict(LEVEL=level, **threshold))

    return dict(
        threshold1=threshold_launch(1),
        refine2=KernelLaunch("indexer_topk_refine_kernel", grid, 4, 2, dict(LEVEL=2, **common), (0,)),
        threshold2=threshold_launch(2),
        refine3=KernelLaunch("indexer_topk_refine_kernel", grid, 4, 2, dict(LEVEL=3, **common), (0,)),
        threshold3=threshold_launch(3),
        count=KernelLaunch("indexer_topk_count_kernel", grid, 4, 2, dict(NUM_CHUNKS=num_chunks, **common)),
        write=KernelLaunch("indexer_topk_write_kernel", grid, 4, 2, dict(
            common, TOPK_TILE=min(TOPK_TILE, _pow2_at_least(topk, 16)), NUM_CHUNKS=num_chunks,
            CHUNKS_POW2=_pow2_at_least(num_chunks), WRITE_SCORES=bool(return_scores), **layout.constexprs())))


def _score_launch(q, w, k_cache, cache_seqlens, block_table, layer, q_offset, s_total, layout, tiles, impl,
                  topk=None):
    """The score kernel over queries [q_offset, q_offset + S) of S_TOTAL: (scores [B * S, N] float32, and with
    topk the digit-1 histogram [B * S, 2048] of the rows that see more than topk keys)."""
    b, s_q, h, _ = q.shape
    step = plan_scores(b, s_q, s_total, h, layout, tiles, FP8_NATIVE[impl], topk)
    rows = b * s_q
    out_shape = [jax.ShapeDtypeStruct((rows, layout.capacity), jnp.float32),
                 jax.ShapeDtypeStruct((rows, HIST_BINS[0]) if topk is not None else (1,), jnp.int32)]
    table = cache_seqlens if block_table is None else block_table      # unused pointer when contiguous
    layer_arg = cache_seqlens if layer is None else layer               # unused pointer when not stacked
    return step(q, w, k_cache, cache_seqlens, table, layer_arg, int(q_offset), out_shape=out_shape,
                implementation=impl)


def _topk_launch(scores, hist1, cache_seqlens, block_table, q_offset, s_q, s_total, layout, topk, return_scores,
                 tiles, impl):
    """The radix select over the scores of one query chunk -> (indices int32 [rows, topk], scores or None)."""
    rows = scores.shape[0]
    steps = plan_topk(rows, s_q, s_total, layout, topk, tiles, return_scores)
    offset = int(q_offset)
    thr3, counts = threshold_and_counts(steps, scores, hist1, cache_seqlens, offset, impl)
    out_shape = [jax.ShapeDtypeStruct((rows, topk), jnp.int32),
                 jax.ShapeDtypeStruct((rows, topk) if return_scores else (1,), jnp.float32)]
    table = cache_seqlens if block_table is None else block_table
    idx, vals = steps["write"](scores, cache_seqlens, table, thr3, counts, offset, out_shape=out_shape,
                               implementation=impl)
    return idx, (vals if return_scores else None)


def threshold_and_counts(steps: dict, scores, hist1, cache_seqlens, offset: int, impl: str):
    """The radix select up to the write (`plan_topk`'s steps): (the threshold T and its rank per row [rows, 2]
    int32, the per-chunk counts of keys > T and == T [rows, chunks, 2] int32)."""
    rows = scores.shape[0]
    hists = [jax.ShapeDtypeStruct((rows, bins), jnp.int32) for bins in HIST_BINS]
    thr_shape = [jax.ShapeDtypeStruct((rows, 2), jnp.int32)]      # per row: the threshold's prefix bits, its rank

    def threshold(level, hist2, hist3):
        return steps[f"threshold{level}"](cache_seqlens, hist1, hist2, hist3, offset, out_shape=thr_shape,
                                          implementation=impl)[0]

    thr1 = threshold(1, hist1, hist1)
    (hist2,) = steps["refine2"](scores, cache_seqlens, thr1, offset, out_shape=hists[1:2], implementation=impl)
    thr2 = threshold(2, hist2, hist2)
    (hist3,) = steps["refine3"](scores, cache_seqlens, thr2, offset, out_shape=hists[2:], implementation=impl)
    thr3 = threshold(3, hist2, hist3)
    num_chunks = steps["count"].grid[1]
    (counts,) = steps["count"](scores, cache_seqlens, thr3, offset,
                               out_shape=[jax.ShapeDtypeStruct((rows, num_chunks, 2), jnp.int32)], implementation=impl)
    return thr3, counts


def hopper_facts(kv_format: str | None = None, batch: int = 64, s_q: int = 1, heads: int = 64,
                 context: int = 131072, page_size: int = 64, topk: int = 2048, sms: int = 132) -> dict:
    """{launch name: kernels._compile.CompiledFacts} of `indexer_topk`'s launches as planned for bf16 queries and
    keys (or "fp8_paged" keys) at this shape (row I1 by default; sms: an H100 SXM's), compiled for sm_90 on any
    machine. A process that has run these kernels in Triton's interpreter cannot compile them afterwards: call
    this in a fresh one."""
    from flashmla_jax.kernels import _compile
    from flashmla_jax.kernels import indexer as kernels

    fp8 = kv_format is not None
    tiles = indexer_tiles(batch, s_q, heads, context, jnp.bfloat16, fp8, sms)
    layout = KeyLayout(context, page_size, batch * context // page_size, context // page_size, 0, 0, fp8)
    steps = dict(scores=plan_scores(batch, s_q, s_q, _kernel_heads(heads), layout, tiles, True, topk),
                 **plan_topk(batch * s_q, s_q, s_q, layout, topk, tiles, True))
    key = "u8" if fp8 else "bf16"
    pointers = dict(q_ptr=key, w_ptr="fp32", k_ptr=key, seqlens_ptr="i32", table_ptr="i32", layer_ptr="i32",
                    scores_ptr="fp32", hist_ptr="i32", hist1_ptr="i32", hist2_ptr="i32", hist3_ptr="i32",
                    thr_ptr="i32", out_hist_ptr="i32", counts_ptr="i32", idx_ptr="i32", val_ptr="fp32")
    facts = {}
    for name, step in steps.items():
        kernel = getattr(kernels, step.kernel)
        compiled = _compile.compile_for_hopper(kernel, {a: t for a, t in pointers.items() if a in kernel.arg_names},
                                               step.constexprs, step.num_warps, step.num_stages,
                                               scalar_types=dict(q_offset="i32"))
        facts[name] = _compile.facts(compiled)
    return facts


def _layout(q, weights, k_cache, cache_seqlens, block_table, kv_format, layer) -> KeyLayout:
    """The arguments checked, and the cache's KeyLayout."""
    stacked = layer is not None
    capacity, page_size, num_blocks = _check_inputs(q, weights, k_cache, cache_seqlens, block_table, kv_format,
                                                    stacked)
    return KeyLayout.of(k_cache, block_table, capacity, page_size, num_blocks, stacked, kv_format)


def scores_with_tiles(tiles: IndexerTiles, q, weights, k_cache, cache_seqlens, block_table=None, *, kv_format=None,
                      layer=None, implementation: str):
    """`indexer_scores`' kernel as `tiles` lay it out (benchmarks and tests choose their own); the arguments are
    checked as there, layer is None or a 0-d int32 array, implementation "triton" or "interpret"."""
    b, s_q = q.shape[:2]
    layout = _layout(q, weights, k_cache, cache_seqlens, block_table, kv_format, layer)
    q_k, w_k = _kernel_inputs(q, weights, kv_format)
    scores, _ = _score_launch(q_k, w_k, k_cache, cache_seqlens, block_table, layer, 0, s_q, layout, tiles,
                              implementation)
    return scores.reshape(b, s_q, layout.capacity)


def topk_with_tiles(tiles: IndexerTiles, q, weights, k_cache, cache_seqlens, block_table=None, *, topk: int,
                    kv_format=None, layer=None, return_scores=False, implementation: str):
    """`indexer_topk`'s kernels as `tiles` lay them out, query chunks included (benchmarks and tests choose their
    own); arguments as `scores_with_tiles`, topk an int >= 1."""
    b, s_q = q.shape[:2]
    layout = _layout(q, weights, k_cache, cache_seqlens, block_table, kv_format, layer)
    q_k, w_k = _kernel_inputs(q, weights, kv_format)
    step = tiles.query_chunk or s_q
    outs = []
    for lo in range(0, s_q, step):
        hi = min(s_q, lo + step)
        scores, hist1 = _score_launch(q_k[:, lo:hi], w_k[:, lo:hi], k_cache, cache_seqlens, block_table, layer, lo,
                                      s_q, layout, tiles, implementation, topk)
        outs.append(_topk_launch(scores, hist1, cache_seqlens, block_table, lo, hi - lo, s_q, layout, topk,
                                 return_scores, tiles, implementation))
    idx = jnp.concatenate([o[0].reshape(b, -1, topk) for o in outs], axis=1)
    if not return_scores:
        return idx
    return idx, jnp.concatenate([o[1].reshape(b, -1, topk) for o in outs], axis=1)


# ---------------------------------------------------------------- the reference's path


def _xla_scores(q, weights, k_cache, cache_seqlens, block_table, layer, kv_format, num_blocks):
    """The reference's scores [B, S_q, N] of the layer's keys. FP8 keys: the queries rounded to FP8 as the
    kernels take them (one scale per (token, head); their bytes read back by lookup, so that XLA keeps the
    rounding); the e4m3 values of both sides meet in a bfloat16 product (each is exact in bfloat16, so is each
    product in float32) and the scales, positive, are applied outside the relu: w·s_q into the weights, s_k
    after the head sum, as the kernels apply them."""
    if layer is not None:
        k_cache = index_layer(k_cache, layer)
    table = _clamped(block_table, num_blocks)
    if kv_format is None:
        return reference.indexer_scores_reference(q, weights, k_cache, cache_seqlens, table)
    codes, q_scale = quantize_index_tokens(q)
    key_values, key_scales = index_key_codes(k_cache)
    scores = reference.indexer_scores_reference(e4m3_values_by_lookup(codes).astype(jnp.bfloat16),
                                                weights.astype(jnp.float32) * q_scale,
                                                key_values.astype(jnp.bfloat16), cache_seqlens, table)
    if table is not None:
        key_scales = reference.gather_pages(key_scales[..., None], table)[..., 0]                # [B, N]
    return jnp.where(jnp.isneginf(scores), scores, scores * key_scales[:, None, :])


def _clamped(block_table, num_blocks):
    return None if block_table is None else jnp.clip(block_table, 0, num_blocks - 1)


@dataclasses.dataclass(frozen=True)
class IndexerCall:
    """The static facts of one indexer call that decide which implementation can run it."""
    heads: int
    dim: int


class IndexerImplementation(Implementation[IndexerCall]):
    """run(q, weights, k_cache, cache_seqlens, block_table, layer, *, capacity, page_size, num_blocks, kv_format,
    topk, return_scores): the scores [B, S_q, N] (topk None) or the top-k pool indices [B, S_q, topk] (and their
    scores with return_scores)."""

    def run(self, q, weights, k_cache, cache_seqlens, block_table, layer, *, capacity, page_size, num_blocks,
            kv_format, topk, return_scores):
        raise NotImplementedError


class XlaIndexer(IndexerImplementation):
    """The jnp reference (`_xla_scores`: FP8 queries rounded as the kernels round them, FP8 keys' values and
    scales taken apart as the kernels take them), the scores, and the ranked top-k."""
    name = "xla"

    def unsupported(self, call: IndexerCall) -> str | None:
        return None

    def run(self, q, weights, k_cache, cache_seqlens, block_table, layer, *, capacity, page_size, num_blocks,
            kv_format, topk, return_scores):
        scores = _xla_scores(q, weights, k_cache, cache_seqlens, block_table, layer, kv_format, num_blocks)
        if topk is None:
            return scores
        limits = reference.visible_key_limits(cache_seqlens, capacity, q.shape[1], causal=True)
        idx, vals = reference.indexer_topk_reference(scores, limits, topk, _clamped(block_table, num_blocks),
                                                     page_size)
        return (idx, vals) if return_scores else idx


class TritonIndexer(TritonRunner, IndexerImplementation):
    """The score kernel and the radix-select top-k (kernels/indexer.py) through jax-triton on a CUDA GPU (runner
    "triton") or Triton's interpreter ("interpret"); `indexer_tiles` picks their tiles."""

    def unsupported(self, call: IndexerCall) -> str | None:
        if call.heads > MAX_KERNEL_HEADS:
            return f"the Triton kernels take at most {MAX_KERNEL_HEADS} index heads, got H={call.heads}"
        if call.dim != INDEX_KEY_DIM:
            return f"the Triton kernels take index heads of D={INDEX_KEY_DIM}, got D={call.dim}"
        return self.runner_unsupported()

    def run(self, q, weights, k_cache, cache_seqlens, block_table, layer, *, capacity, page_size, num_blocks,
            kv_format, topk, return_scores):
        b, s_q = q.shape[:2]
        tiles = indexer_tiles(b, s_q, q.shape[2], capacity, q.dtype, kv_format is not None, num_sms(self.name))
        kw = dict(kv_format=kv_format, layer=layer, implementation=self.name)
        if topk is None:
            return scores_with_tiles(tiles, q, weights, k_cache, cache_seqlens, block_table, **kw)
        return topk_with_tiles(tiles, q, weights, k_cache, cache_seqlens, block_table, topk=topk,
                               return_scores=return_scores, **kw)


INDEXER = Registry("lightning indexer", {"triton": (TritonIndexer("triton"),), "xla": (XlaIndexer(),),
                                         "interpret": (TritonIndexer("interpret"),)})


# ---------------------------------------------------------------- public


def _arguments(q, weights, k_cache, cache_seqlens, block_table, layer, kv_format):
    """The public ops' arguments as arrays (array-likes accepted), the format and layer checked; a concrete
    block table is checked as mla_decode checks one (an entry outside the pool in a used block: ValueError)."""
    q, weights, k_cache, cache_seqlens = (_checks.as_array(name, x) for name, x in (
        ("q", q), ("weights", weights), ("k_cache", k_cache), ("cache_seqlens", cache_seqlens)))
    block_table = None if block_table is None else _checks.as_array("block_table", block_table)
    _checks.index_kv_format("kv_format", kv_format)
    if layer is not None:
        layer = _checks.layer_index("layer", layer, _num_layers(k_cache, kv_format))
    if block_table is not None and _checks.concrete(block_table, cache_seqlens):
        _, page_size, num_blocks = _check_inputs(q, weights, k_cache, cache_seqlens, block_table, kv_format,
                                                 layer is not None)
        check_block_table(block_table, cache_seqlens, num_blocks, page_size)
    return q, weights, k_cache, cache_seqlens, block_table, layer


def indexer_scores(q: jax.Array, weights: jax.Array, k_cache: jax.Array, cache_seqlens: jax.Array,
                   block_table: jax.Array | None = None, *, kv_format: str | None = None,
                   layer: int | jax.Array | None = None, implementation: str | None = None) -> jax.Array:
    """Lightning-indexer scores of every cached key for every query.

    Args:
      q: [B, S_q, H, D] index queries (RoPE applied; D = 128), fp16/bf16/fp32.
      weights: [B, S_q, H] per-head weights, the n_heads^-½ · D^-½ scale included; any float dtype (float32
        inside).
      k_cache: the index keys beside the latent cache, paged under the same block table.
        kv_format None: [num_blocks, page_size, D] pages (q's dtype) with block_table, or [B, N, D] contiguous.
        kv_format "fp8_paged": uint8 [num_blocks, page_size * 132] in DeepGEMM's paged layout (per page: the
        page_size × 128 e4m3 values, then page_size float32 scales; `quantize_index_keys` writes it), or
        [B, N * 132] contiguous (one page per sequence). The queries are then rounded to FP8 too, one scale per
        (token, head) folded into the weights, as DeepSeek's kernel does; e4m3 products are exact, so the
        scores are those of the dequantized queries and keys (the accuracy: README, "Lightning indexer").
        With `layer`: a stack [L, ...] of such caches.
      cache_seqlens: [B] int32 keys per sequence, the S_q new ones included; clamped to [0, N].
      block_table: None or [B, max_blocks] int32 (page_size a power of two in [16, 256]). Entries past each
        sequence's last block are never read. An entry outside the pool in a block a sequence uses raises
        ValueError naming block_table when the values are concrete (as `mla_decode`); under jit it is clamped into
        the pool.
      kv_format: None or "fp8_paged".
      layer: None, or the layer of a stacked k_cache: a Python int in [0, L) or a traced integer (clamped).
      implementation: "triton" (CUDA GPU), "xla" (the jnp reference) or "interpret" (the Triton kernels in
        Triton's interpreter on the CPU); None: "triton" on a CUDA device, else "xla". The kernels take
        H <= 128 heads (fewer than 16, or not a power of two: padded with zero-weight heads) and D = 128; they
        have no vmap or derivative rule (fold a mapped axis into B; the indexer is inference-only).

    Returns:
      [B, S_q, N] float32: Σ_h weights[b, s, h] · relu(q[b, s, h] · k[b, t]) for t < seqlen - S_q + s + 1, -inf
      elsewhere (N = max_blocks * page_size when paged). Keys of unused pages are never used, whatever they hold.
    """
    q, weights, k_cache, cache_seqlens, block_table, layer = _arguments(q, weights, k_cache, cache_seqlens,
                                                                        block_table, layer, kv_format)
    return _indexer_scores(q, weights, k_cache, cache_seqlens, block_table, layer, kv_format=kv_format,
                           implementation=implementation)


@functools.partial(jax.jit, static_argnames=("kv_format", "implementation"))
def _indexer_scores(q, weights, k_cache, cache_seqlens, block_table, layer, kv_format, implementation):
    return _run(q, weights, k_cache, cache_seqlens, block_table, layer, kv_format, implementation)


def indexer_topk(q: jax.Array, weights: jax.Array, k_cache: jax.Array, cache_seqlens: jax.Array,
                 block_table: jax.Array | None = None, *, topk: int = 2048, kv_format: str | None = None,
                 layer: int | jax.Array | None = None, return_scores: bool = False,
                 implementation: str | None = None):
    """The top-k keys of every query by lightning-indexer score, as indices into the paged pool.

    Arguments as `indexer_scores`, and topk (>= 1; DeepSeek-V3.2: 2048) and return_scores.

    Returns:
      indices [B, S_q, topk] int32: the min(topk, visible) keys with the largest scores, in ascending position
      order, each as its place in the pool, block_table[b, t // page_size] * page_size + t % page_size (the
      block clamped into the pool, as read), or b * N + t for a contiguous cache; -1 fills the slots left when
      a query sees fewer than topk keys. Ties: lower position first. Scores compare as floats, -0.0 equal to
      +0.0; a NaN score (NaN in a visible key, query or weight) ranks above every number.
      With return_scores, also their scores [B, S_q, topk] float32 (-inf where the index is -1).
    """
    topk = _checks.integer("topk", topk, lo=1)
    if not isinstance(return_scores, bool):
        raise TypeError(f"return_scores must be a bool, got {type(return_scores).__name__}")
    q, weights, k_cache, cache_seqlens, block_table, layer = _arguments(q, weights, k_cache, cache_seqlens,
                                                                        block_table, layer, kv_format)
    return _indexer_topk(q, weights, k_cache, cache_seqlens, block_table, layer, topk=topk, kv_format=kv_format,
                         return_scores=return_scores, implementation=implementation)


@functools.partial(jax.jit, static_argnames=("topk", "kv_format", "return_scores", "implementation"))
def _indexer_topk(q, weights, k_cache, cache_seqlens, block_table, layer, topk, kv_format, return_scores,
                  implementation):
    return _run(q, weights, k_cache, cache_seqlens, block_table, layer, kv_format, implementation, topk, return_scores)


def _run(q, weights, k_cache, cache_seqlens, block_table, layer, kv_format, implementation, topk=None,
         return_scores=False):
    """The dispatch: the implementation INDEXER selects, for the scores (topk None) or the top-k."""
    capacity, page_size, num_blocks = _check_inputs(q, weights, k_cache, cache_seqlens, block_table, kv_format,
                                                    layer is not None)
    b, s_q = q.shape[:2]
    if b * s_q == 0:           # no queries, on every implementation: empty results
        if topk is None:
            return jnp.full((b, s_q, capacity), -jnp.inf, jnp.float32)
        indices = jnp.full((b, s_q, topk), -1, jnp.int32)
        return (indices, jnp.full((b, s_q, topk), -jnp.inf, jnp.float32)) if return_scores else indices
    impl = INDEXER.select(implementation, IndexerCall(q.shape[2], q.shape[3]))
    return impl.run(q, weights, k_cache, cache_seqlens, block_table, layer, capacity=capacity, page_size=page_size,
                    num_blocks=num_blocks, kv_format=kv_format, topk=topk, return_scores=return_scores)