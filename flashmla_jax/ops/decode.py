"""`mla_decode`: absorbed MLA decode over a contiguous or paged latent cache."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import _checks, reference
from flashmla_jax._backend import cuda_compute_capability, num_sms
from flashmla_jax.fp8 import dequantize_latent, latent_format
from flashmla_jax.ops._batching import Mapped, fold_vmap_into_batch, inference_only, member_axis
from flashmla_jax.ops._launch import launch
from flashmla_jax.ops._registry import Implementation, Registry, TritonRunner
from flashmla_jax.ops.decode_partition import partitioned_decode

MAX_SPLITS = 256
MAX_SPLITS_MERGED_IN_KERNEL = 16   # more splits than this are merged by the combine kernel


def _check_inputs(q, kv_cache, cache_seqlens, block_table, head_dim_v, num_splits, stacked, kv_format):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S_q, H, D], got shape {q.shape}")
    b, s_q, h, d = q.shape
    _checks.float_dtype("q", q)
    head_dim_v = _checks.integer("head_dim_v", head_dim_v)
    width = check_widths(kv_cache, q, head_dim_v, kv_format)
    if kv_cache.ndim != 3 + stacked or kv_cache.shape[-1] != width:
        lead = "L, " if stacked else ""
        raise ValueError(f"kv_cache must be [{lead}B, N, {width}] (or [{lead}num_blocks, page_size, {width}] with "
                         f"block_table){' with layer' if stacked else ''}, got shape {kv_cache.shape}")
    if stacked:
        kv_cache = jax.ShapeDtypeStruct(kv_cache.shape[1:], kv_cache.dtype)     # one layer's shape
    _checks.int32_array("cache_seqlens", cache_seqlens, (b,), f"int32 [B={b}]")
    _checks.optional_integer("num_splits", num_splits, 1, MAX_SPLITS)
    if block_table is None:
        if kv_cache.shape[0] != b:
            raise ValueError(f"contiguous kv_cache must be [B={b}, N, {width}], got shape {kv_cache.shape}")
    else:
        _checks.int32_array("block_table", block_table, (b, None), f"int32 [B={b}, max_blocks]")
        _checks.page_size("page_size (kv_cache.shape[1])", kv_cache.shape[1])


def check_widths(kv_cache, q, head_dim_v: int, kv_format: str | None, name: str = "kv_cache") -> int:
    """head_dim_v against q's width D, and `_token_width` (the last axis kv_cache must have), in the order that
    names the likelier mistake: for a cache in q's dtype, q's width against the cache's first."""
    d = q.shape[-1]
    if kv_format is None:
        width = _token_width(kv_cache, d, head_dim_v, kv_format, q, name)
    if not 0 < head_dim_v < d:
        raise ValueError(f"head_dim_v must be in (0, D): V is the first head_dim_v columns of each D-wide latent, and "
                         f"q is D={d} wide, got head_dim_v={head_dim_v} (the absorbed q is as wide as the latent: "
                         "512 + 64 = 576 for DeepSeek)")
    return width if kv_format is None else _token_width(kv_cache, d, head_dim_v, kv_format, q, name)


def _token_width(kv_cache, d: int, head_dim_v: int, kv_format: str | None, q, name: str = "kv_cache") -> int:
    """The last axis kv_cache (the argument `name`) must have: D (a cache in q's dtype) or the FP8 format's
    bytes per token (656 / 576 for DeepSeek's 512 + 64), after checking kv_cache's dtype and, for a cache in q's
    dtype, that its tokens are q's width."""
    if kv_format is None:
        if kv_cache.dtype == jnp.uint8:
            raise TypeError(f"{name} is uint8, raw bytes: pass kv_format (one of {_checks.FP8_FORMATS}) to say how "
                            f"they hold each latent; kv_format=None means {name} holds q's dtype ({q.dtype})")
        _checks.same_dtype(name, kv_cache, "q", q)
        if kv_cache.ndim and kv_cache.shape[-1] != d:
            raise ValueError(f"q is {d} wide but {name}'s tokens are {kv_cache.shape[-1]} wide: q must be the absorbed "
                             "query, as wide as the latent it attends ([q_nope · W_UKᵀ ; q_pe]: 576 for DeepSeek)")
        return d
    if kv_cache.dtype != jnp.uint8:
        raise TypeError(f"{name} must be uint8 (the raw bytes) with kv_format={kv_format!r}, got {kv_cache.dtype}")
    try:
        return latent_format(kv_format, head_dim_v, d - head_dim_v).bytes_per_token
    except ValueError as e:
        raise ValueError(f"kv_format={kv_format!r} cannot hold latents of head_dim_v={head_dim_v} c_kv and "
                         f"D - head_dim_v={d - head_dim_v} k_pe values: {e}") from None


# ---------------------------------------------------------------- tiles and the split-KV schedule

WIDE_TILE_ROWS = 64       # row tiles this tall are bound by the matrix units: the wide-tile options are on
BALANCE_WAVES = 3         # waves of programs the device-side schedule spreads a ragged batch over
PROGRAM_COST_BLOCKS = 1   # a program's fixed work (q load, epilogue), in key blocks
SPLIT_COST_BLOCKS = 0.5   # what splitting at all adds (partials written, then merged), in key blocks
UNIFORM_FRACTION = (10, 11)   # a batch whose mean key blocks reach 10/11 of its longest keeps the static split
COMBINE_VALUES = 4096     # partial values (all splits x BLOCK_D columns) one combine program holds


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """The split kernel's tiling: block sizes, warps, pipelining depth, the wide-tile options
    (kernels/decode.py's module docstring) and the balanced schedule's waves.

    `decode_tiles` picks one per shape class; benchmarks pass their own to `plan_decode`."""
    block_m: int              # query rows (S_q * H pairs) per program
    block_n: int              # keys per tile
    num_warps: int
    num_stages: int
    unchain_scores: bool      # each warp group computes half of QK^T
    split_masked: bool        # unmasked tiles in their own loop, before the masked ones
    late_row_sum: bool        # row sums kept per column, reduced after the loop
    waves: int = BALANCE_WAVES
    merges_in_kernel: ClassVar[bool] = True     # the last split to finish merges a few splits itself

    def kernel_constexprs(self) -> dict:
        return dict(BLOCK_M=self.block_m, UNCHAIN_SCORES=self.unchain_scores, SPLIT_MASKED=self.split_masked,
                    LATE_ROW_SUM=self.late_row_sum)

    @classmethod
    def with_defaults(cls, block_m: int, block_n: int, num_warps: int, num_stages: int, *,
                      unchain_scores: bool | None = None, split_masked: bool | None = None,
                      late_row_sum: bool | None = None, waves: int = BALANCE_WAVES) -> "DecodeTiles":
        """Options left None are on for row tiles of WIDE_TILE_ROWS or more: narrow tiles (the
        bandwidth-bound decode rows, mma.sync) measured no gain from them."""
        wide = block_m >= WIDE_TILE_ROWS
        pick = lambda option: wide if option is None else bool(option)     # noqa: E731
        return cls(block_m, block_n, num_warps, num_stages, pick(unchain_scores), pick(split_masked),
                   pick(late_row_sum), waves)


@dataclasses.dataclass(frozen=True)
class GluonDecodeTiles:
    """The Hopper kernel's tiling (kernels/gluon_decode.py): 64 query rows and 64-key blocks are fixed by its
    design (one wgmma M extent per consumer group; a block's rope box holds its probabilities); the launch
    names 4 warps (the producer, the default partition: the kernel adds the two consumer warpgroups). Every
    split sequence is merged by the combine kernel."""
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 1
    waves: int = BALANCE_WAVES
    merges_in_kernel: ClassVar[bool] = False

    def kernel_constexprs(self) -> dict:
        return {}


def decode_tiles(rows: int, dtype, page_size: int | None, kv_format: str | None = None) -> DecodeTiles:
    """The tiles of one (rows = S_q * H, dtype, page size, kv_format) class.

    An FP8 cache (kv_format set) takes the tiles of a cache in q's dtype: its staged tiles are uint8, 656 or
    576 bytes a token instead of 1152, which leaves shared memory for the tile dequantized to q's dtype that
    the products read (benchmarks/compile_report.py --kv-format reports what the compiler allocates). The
    H100 sweep of other FP8 tiles found none faster (benchmarks/NOTES.md)."""
    del kv_format   # the same tiles as the float cache (see above)
    # float32 stays at 32 rows: a 64-row query tile and two key tiles of it overflow shared memory.
    block_m = 16 if rows <= 16 else (32 if rows <= 32 or dtype == jnp.float32 else 64)
    block_n = 32 if dtype == jnp.float32 else 64
    if page_size is not None:
        block_n = min(block_n, page_size)
    num_warps = 4 if block_m <= 32 else 8
    num_stages = 2
    if block_m == 16 and block_n == 64 and dtype != jnp.float32:
        # H100 sweeps (benchmarks/NOTES.md): 3 stages of 72 KB tiles, contiguous or paged (the block
        # table sits in registers, so paged tiles pipeline alike); 4 stages overflow shared memory.
        # 8 warps: at 4 the kernel sits at 255 registers and small changes make it spill.
        num_stages, num_warps = 3, 8
    return DecodeTiles.with_defaults(block_m, block_n, num_warps, num_stages)


def choose_num_splits(batch: int, row_tiles: int, capacity: int, block_n: int, sms: int) -> int:
    """Splits per sequence that minimise waves x blocks per program, from static shapes only.

    Each program costs its key blocks plus PROGRAM_COST_BLOCKS of fixed work; one program per SM is
    resident at a time, as 576-wide tiles fill shared memory.
    """
    n_blocks = max(1, -(-capacity // block_n))
    programs = batch * row_tiles
    best, best_cost = 1, math.inf
    for splits in range(1, min(MAX_SPLITS, n_blocks) + 1):
        waves = -(-programs * splits // sms)
        cost = waves * (-(-n_blocks // splits) + PROGRAM_COST_BLOCKS) + (SPLIT_COST_BLOCKS if splits > 1 else 0.0)
        if cost < best_cost - 1e-9:
            best, best_cost = splits, cost
    return best


def balanced_split_cap(batch: int, row_tiles: int, capacity: int, block_n: int, sms: int,
                       waves: int = BALANCE_WAVES) -> tuple[int, int, int]:
    """(split cap, splits for full-length sequences, slots) for the device-side schedule (`BALANCE`,
    kernels/decode.py's `_sequence_splits`).

    Lengths are data under jit; the kernels read them and cut a ragged batch's real key blocks into runs
    of about work / slots blocks, slots being `waves` waves of programs less one per (sequence, row
    tile), which bounds what rounding each sequence up to whole runs adds. The cap lets a ragged batch
    fill those waves; a batch that fills the GPU with one program per (sequence, row tile) is not split
    beyond the static choice.
    """
    programs = batch * row_tiles
    uniform = choose_num_splits(batch, row_tiles, capacity, block_n, sms)
    if programs >= sms:
        return uniform, uniform, 1
    n_blocks = max(1, -(-capacity // block_n))
    cap = min(MAX_SPLITS, n_blocks, max(uniform, -(-waves * sms // programs)))
    return cap, uniform, max(1, waves * sms - programs)


# The kernels' KV_FORMAT constexpr (kernels/decode.py's KV_NATIVE, KV_BLOCKSCALE, KV_PERTENSOR).
KV_FORMATS = {None: 0, "fp8_blockscale": 1, "fp8_pertensor": 2}
# FP8_NATIVE per implementation: the hardware e4m3 conversion on the GPU; in the interpreter the exact bit
# arithmetic (its float8 converter reads 0x7F / 0xFF as ±480, not NaN: kernels/fp8.py).
FP8_NATIVE = {"triton": True, "interpret": False}


def _pow2_at_least(n: int, floor: int = 2) -> int:
    return max(floor, 1 << (n - 1).bit_length())


class SplitOutputs(NamedTuple):
    """The split kernel's outputs, in its pointer order (each a jax.ShapeDtypeStruct in a plan, an array after
    the launch; a buffer the launch does not use is one element, never touched). R = S_q * H."""
    out: Any            # [B, R, D_v] in q's dtype: the result
    lse: Any            # [B, R] float32
    o_part: Any         # [B, splits, R, D_v] float32: the partials of split sequences
    lse_part: Any       # [B, splits, R] float32
    splits_taken: Any   # [B] int32: splits each sequence took, for the combine kernel
    arrivals: Any       # [B * row tiles] int32: splits finished per (sequence, row tile), counted up from 0


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Static launch parameters of one decode call: the split kernel's grid, warps, stages, constexprs
    and outputs, and the combine kernel's grid and constexprs (None when no sequence can be split, or
    when the last split to finish merges: up to MAX_SPLITS_MERGED_IN_KERNEL splits)."""
    grid: tuple
    num_warps: int
    num_stages: int
    constexprs: dict
    num_splits: int
    split_outputs: SplitOutputs
    zeroed: tuple[str, ...]       # names of the split outputs that must start at 0
    combine_grid: tuple | None
    combine_constexprs: dict | None

    @property
    def zeroed_outputs(self) -> tuple[int, ...]:
        """Indices of `zeroed` in the split kernel's outputs (a launch's zeroed_outputs)."""
        return tuple(SplitOutputs._fields.index(name) for name in self.zeroed)


def plan_decode(q_shape: tuple, dtype, head_dim_v: int, causal: bool, kv_shape: tuple, table_shape: tuple | None,
                num_splits: int | None, sms: int, tiles: DecodeTiles | GluonDecodeTiles | None = None,
                num_layers: int = 0, kv_format: str | None = None, fp8_native: bool = True) -> DecodePlan:
    """q_shape [B, S_q, H, D]; kv_shape [B, N, W] (contiguous, table_shape None) or [num_pages,
    page_size, W] with table_shape [B, max_blocks]: one layer's cache, W = D, or the bytes per token of an
    FP8 kv_format. num_layers > 0: the cache is a
    stack [num_layers, *kv_shape] read at a layer index in place. num_splits None: a cap chosen here and the
    schedule computed on the device from the real lengths (`BALANCE`); an int: exactly that many equal
    splits per sequence. `tiles` replaces `decode_tiles`' choice (benchmarks/profile_decode.py sweeps it).
    fp8_native: decode e4m3 with the hardware conversion (FP8_NATIVE; the GPU) or bit arithmetic. The kernels
    apply the row rules themselves (the tl kernels' ROW_RULES; the Gluon kernel always; reference.mergeable_rows'
    form)."""
    batch, s_q, heads, d = q_shape
    rows = s_q * heads
    paged = table_shape is not None
    page_size = kv_shape[1] if paged else None
    max_blocks, num_pages = (table_shape[1], kv_shape[0]) if paged else (1, 1)
    capacity = page_size * max_blocks if paged else kv_shape[1]
    tiles = tiles or decode_tiles(rows, dtype, page_size, kv_format)
    row_tiles = -(-rows // tiles.block_m)
    if num_splits is None:
        num_splits, uniform, slots = balanced_split_cap(batch, row_tiles, capacity, tiles.block_n, sms, tiles.waves)
    else:
        uniform, slots = num_splits, 1
    schedule = dict(CAPACITY=capacity, NUM_SPLITS=num_splits, UNIFORM_SPLITS=uniform,
                    BALANCE=num_splits > uniform, BATCH=batch, BATCH_POW2=_pow2_at_least(batch),
                    SLOTS=slots, ROW_TILES=row_tiles, BLOCK_N=tiles.block_n,
                    UNIFORM_NUM=UNIFORM_FRACTION[0], UNIFORM_DEN=UNIFORM_FRACTION[1])
    last_merges = tiles.merges_in_kernel and 1 < num_splits <= MAX_SPLITS_MERGED_IN_KERNEL
    splits_pow2 = _pow2_at_least(num_splits)
    constexprs = dict(
        LAST_MERGES=last_merges, SPLITS_POW2=splits_pow2, H=heads, S_Q=s_q, N_MAX=0 if paged else capacity,
        NUM_LAYERS=num_layers, LAYER_STRIDE=math.prod(kv_shape) if num_layers else 0,
        PAGED=paged, PAGE_SIZE=page_size or 1, MAX_BLOCKS=max_blocks, NUM_PAGES=num_pages,
        TABLE_POW2=_pow2_at_least(max_blocks), D_V=head_dim_v, D_R=d - head_dim_v,
        CAUSAL=causal, KV_FORMAT=KV_FORMATS[kv_format], FP8_NATIVE=bool(fp8_native), ROW_RULES=True,
        **tiles.kernel_constexprs(),
        **schedule)
    combine_grid, combine_constexprs = combine_plan(batch, rows, head_dim_v, num_splits, last_merges)
    split_outputs = split_buffers(batch, rows, head_dim_v, dtype, num_splits, row_tiles, combine_grid is not None,
                                  last_merges)
    return DecodePlan((row_tiles, batch, num_splits), tiles.num_warps, tiles.num_stages, constexprs, num_splits,
                      split_outputs, ("arrivals",) if last_merges else (), combine_grid, combine_constexprs)


def combine_plan(batch: int, rows: int, head_dim_v: int, num_splits: int, last_merges: bool):
    """(grid, constexprs) of `mla_decode_combine_kernel` for split partials [batch, num_splits, rows, head_dim_v],
    or (None, None) when there is nothing for it to merge (one split, or the last split merges)."""
    if num_splits <= 1 or last_merges:
        return None, None
    splits_pow2 = _pow2_at_least(num_splits)
    block_d = max(16, min(head_dim_v, COMBINE_VALUES // splits_pow2))
    return (rows, head_dim_v // block_d, batch), dict(R=rows, D_V=head_dim_v, NUM_SPLITS=num_splits,
                                                      SPLITS_POW2=splits_pow2, BLOCK_D=block_d)


def split_buffers(batch: int, rows: int, head_dim_v: int, dtype, num_splits: int, row_tiles: int, combine: bool,
                  last_merges: bool) -> SplitOutputs:
    """The SplitOutputs (jax.ShapeDtypeStruct) of a kernel ending in kernels/decode.py's `_write_split`, for
    `batch` sequences of `rows` rows: out in dtype, the rest as SplitOutputs says; splits_taken only with the
    combine kernel, arrivals only when the last split merges. Buffers a launch does not use are one element."""
    part = (batch, num_splits, rows) if num_splits > 1 else (1,)
    return SplitOutputs(
        out=jax.ShapeDtypeStruct((batch, rows, head_dim_v), dtype),
        lse=jax.ShapeDtypeStruct((batch, rows), jnp.float32),
        o_part=jax.ShapeDtypeStruct(part + ((head_dim_v,) if num_splits > 1 else ()), jnp.float32),
        lse_part=jax.ShapeDtypeStruct(part, jnp.float32),
        splits_taken=jax.ShapeDtypeStruct((batch,) if combine else (1,), jnp.int32),
        arrivals=jax.ShapeDtypeStruct((batch * row_tiles,) if last_merges else (1,), jnp.int32))


def _launch_split_kernel(kernel, plan: DecodePlan, runner: str, q, kv_cache, cache_seqlens, block_table, layer,
                         kv_scale, scale):
    """The split kernel (tl or Gluon: the same pointers), then for split sequences the plan's in-place combine.
    Returns out [B, S_q, H, D_v] and lse [B, S_q, H]."""
    b, s_q, h, d = q.shape
    head_dim_v = plan.split_outputs.out.shape[-1]
    table = cache_seqlens if block_table is None else block_table      # unused pointer when contiguous
    layer = cache_seqlens if layer is None else layer                   # unused pointer when not stacked
    kv_scale = cache_seqlens if kv_scale is None else kv_scale         # unused pointer unless fp8_pertensor
    constexprs = {k: v for k, v in plan.constexprs.items() if k in kernel.arg_names}
    split = SplitOutputs(*launch(
        kernel, q.reshape(b, s_q * h, d), kv_cache, cache_seqlens, table, layer, kv_scale, np.float32(scale),
        out_shape=plan.split_outputs, grid=plan.grid, implementation=runner, num_warps=plan.num_warps,
        num_stages=plan.num_stages, zeroed_outputs=plan.zeroed_outputs, **constexprs))
    out, lse = merge_splits(split, plan.combine_grid, plan.combine_constexprs, runner)
    return out.reshape(b, s_q, h, head_dim_v), lse.reshape(b, s_q, h)


def merge_splits(split: SplitOutputs, combine_grid: tuple | None, combine_constexprs: dict | None, runner: str):
    """(out, lse) of a split kernel's outputs: as written (one split, or the last split merged), or with
    combine_grid (`combine_plan`) merged in place by `mla_decode_combine_kernel`, run by `runner`."""
    from flashmla_jax.kernels import decode as kernels

    out, lse = split.out, split.lse
    if combine_grid is None:
        return out, lse
    # The combine updates out and lse in place (inputs 3 and 4 alias outputs 0 and 1).
    out_shape = (jax.ShapeDtypeStruct(out.shape, out.dtype), jax.ShapeDtypeStruct(lse.shape, lse.dtype))
    out, lse = launch(kernels.mla_decode_combine_kernel, split.o_part, split.lse_part, split.splits_taken, out, lse,
                      out_shape=out_shape, grid=combine_grid, implementation=runner, num_warps=4, num_stages=1,
                      input_output_aliases={3: 0, 4: 1}, **combine_constexprs)
    return out, lse


# ---------------------------------------------------------------- the implementations and their registry


@dataclasses.dataclass(frozen=True)
class DecodeCall:
    """The static facts of one decode call that decide which implementation can run it."""
    q_shape: tuple            # [B, S_q, H, D]
    dtype: Any                # q's (and a float cache's) dtype
    head_dim_v: int
    page_size: int | None     # None: a contiguous cache
    kv_format: str | None
    capacity: int             # keys a sequence can hold: N, or max_blocks * page_size

    @property
    def rows(self) -> int:
        """Query rows per sequence, S_q * H."""
        return self.q_shape[1] * self.q_shape[2]

    @property
    def d_r(self) -> int:
        return self.q_shape[3] - self.head_dim_v


class DecodeImplementation(Implementation[DecodeCall]):
    """decode(q, kv_cache, cache_seqlens, block_table, layer, kv_scale, *, head_dim_v, scale, causal, num_splits,
    kv_format) -> (out [B, S_q, H, D_v], lse [B, S_q, H]): the per-shard body of `mla_decode` (layer None or a 0-d
    int32 array into a stacked cache; kv_scale None or float32, [L] with layer).

    Its results follow the row rules in reference.mergeable_rows' form (the op finishes them: `_finish_rows`).
    table_rule: they are also NaN in the rows that would read a block-table entry outside the pool (else the op
    makes them so)."""

    table_rule: bool = False

    def decode(self, q, kv_cache, cache_seqlens, block_table, layer, kv_scale, *, head_dim_v, scale, causal,
               num_splits, kv_format):
        raise NotImplementedError


class XlaDecode(DecodeImplementation):
    """The jnp reference (any shapes, dtypes and devices); an FP8 cache is dequantized first."""
    name = "xla"

    def unsupported(self, call: DecodeCall) -> str | None:
        return None

    def decode(self, q, kv_cache, cache_seqlens, block_table, layer, kv_scale, *, head_dim_v, scale, causal,
               num_splits, kv_format):
        if layer is not None:    # fuses into the einsums: no copy of the layer
            kv_cache = index_layer(kv_cache, layer)
        kv_cache = _dequantized(kv_cache, kv_format, kv_scale, layer, q.dtype, q.shape[-1] - head_dim_v)
        return reference.mla_decode_reference(q, kv_cache, cache_seqlens, block_table, head_dim_v=head_dim_v,
                                              softmax_scale=scale, causal=causal, mergeable=True)


class TritonDecode(TritonRunner, DecodeImplementation):
    """The tl split and combine kernels (kernels/decode.py), through jax-triton on a CUDA GPU (runner "triton")
    or Triton's interpreter on the CPU ("interpret"); `decode_tiles` picks their tiles."""

    table_rule = True

    def unsupported(self, call: DecodeCall) -> str | None:
        return self.runner_unsupported() or _kernel_dims_unsupported(call)

    def decode(self, q, kv_cache, cache_seqlens, block_table, layer, kv_scale, *, head_dim_v, scale, causal,
               num_splits, kv_format):
        from flashmla_jax.kernels import decode as kernels

        stacked = layer is not None
        plan = plan_decode(q.shape, q.dtype, head_dim_v, causal, kv_cache.shape[stacked:],
                           None if block_table is None else block_table.shape, num_splits, num_sms(self.name),
                           num_layers=kv_cache.shape[0] if stacked else 0, kv_format=kv_format,
                           fp8_native=FP8_NATIVE[self.name])
        return _launch_split_kernel(kernels.mla_decode_split_kernel, plan, self.name, q, kv_cache, cache_seqlens,
                                    block_table, layer, kv_scale, scale)


class GluonDecode(DecodeImplementation):
    """The Hopper kernel in Gluon (kernels/gluon_decode.py: TMA, wgmma, warp specialization) and the tl combine,
    through jax-triton on a compute capability 9.x GPU. Caches in q's dtype (bf16 or fp16), "fp8_blockscale"
    caches with bf16 queries or "fp8_pertensor" ones with bf16 / fp16 queries (dequantized in shared memory by
    the kernel's producer warps), DeepSeek's 512 + 64 latent, pages of 64 tokens or more. At most 32 query rows
    with a cache in q's dtype, or 16 with an FP8 one, run kernels/gluon_narrow_decode.py (the keys as the wgmma
    M side: `uses_narrow_kernel`), the rest kernels/gluon_decode.py (64-row tiles).

    every_call: False under "triton": there it takes the 64-row tile class (more than 32 query rows, S_q * H),
    where it ran 1.46-1.63x the tl kernel on the H200, and fewer rows when the static schedule splits each
    sequence at most NARROW_MAX_SPLITS ways (on the H200, the narrow kernel: D1 0.153, D4 0.185, D1-paged 0.157
    ms against the tl kernel's 0.168 / 0.234 / 0.163 in an earlier run). With more splits its fixed start per
    program shows (D3: 0.032 against 0.030 ms; benchmarks/NOTES.md). An FP8 cache it takes for every row count:
    the 64-row kernel ran 1.4-1.5x the tl kernels on every "fp8_blockscale" row measured (D1-fp8 to D6-fp8,
    paged too) and "fp8_pertensor" ones in 0.327 ms at D5-fp8pt against 0.516, and the narrow kernel, which
    converts the codes straight into fp16 register operands, D1-fp8 in 0.139 ms and D1-fp8pt in 0.101 (0.199 /
    0.172 on the 64-row one).
    True under "gluon": every call it can run."""

    name = "gluon"

    def __init__(self, every_call: bool):
        self.every_call = every_call

    def unsupported(self, call: DecodeCall) -> str | None:
        capability = cuda_compute_capability()
        if capability is None or capability[0] != 9:
            return "the Gluon kernels need a Hopper GPU (compute capability 9.x) as JAX's default backend"
        if call.dtype not in (jnp.bfloat16, jnp.float16):
            return f"the Gluon kernels take bfloat16 or float16 queries and caches, not {jnp.dtype(call.dtype)}"
        if call.kv_format not in (None, "fp8_blockscale", "fp8_pertensor"):
            return (f"the Gluon kernels read caches in q's dtype, fp8_blockscale or fp8_pertensor, not "
                    f"kv_format={call.kv_format!r}")
        if call.kv_format == "fp8_blockscale" and call.dtype != jnp.bfloat16:
            return f"the Gluon kernels read fp8_blockscale caches with bfloat16 queries, not {jnp.dtype(call.dtype)}"
        if (call.head_dim_v, call.d_r) != (512, 64):
            return f"the Gluon kernels take 512 + 64 latents, not {call.head_dim_v} + {call.d_r}"
        if call.page_size is not None and call.page_size < GluonDecodeTiles.block_n:
            return f"the Gluon kernels read 64-token blocks of one page: page_size {call.page_size} < 64"
        if not self.every_call and call.kv_format is None and call.rows < WIDE_ROWS:
            splits = choose_num_splits(call.q_shape[0], 1, call.capacity, GluonDecodeTiles.block_n, num_sms("triton"))
            if splits > NARROW_MAX_SPLITS:
                return (f"{call.rows} query rows (S_q * H) split {splits} ways: the tl kernel is as fast or faster "
                        "there (benchmarks/NOTES.md)")
        return None

    def decode(self, q, kv_cache, cache_seqlens, block_table, layer, kv_scale, *, head_dim_v, scale, causal,
               num_splits, kv_format):
        from flashmla_jax.kernels import gluon_decode, gluon_narrow_decode

        stacked = layer is not None
        plan = plan_decode(q.shape, q.dtype, head_dim_v, causal, kv_cache.shape[stacked:],
                           None if block_table is None else block_table.shape, num_splits, num_sms("triton"),
                           tiles=GluonDecodeTiles(), num_layers=kv_cache.shape[0] if stacked else 0,
                           kv_format=kv_format)
        kernel = gluon_decode.mla_decode_gluon_kernel
        if uses_narrow_kernel(q.shape[1] * q.shape[2], kv_format):
            kernel = gluon_narrow_decode.mla_decode_gluon_narrow_kernel
        return _launch_split_kernel(kernel, plan, "triton", q, kv_cache, cache_seqlens, block_table, layer, kv_scale,
                                    scale)


def uses_narrow_kernel(rows: int, kv_format: str | None) -> bool:
    """Whether GluonDecode runs kernels/gluon_narrow_decode.py (keys as the wgmma M side) rather than
    kernels/gluon_decode.py, which pads the rows to 64: S_q * H <= 32 rows with a cache in q's dtype, <= 16 with
    an FP8 one (its consumer groups merge O through a raw stage's 32 KB)."""
    return rows <= (NARROW_ROWS if kv_format is None else NARROW_FP8_ROWS)


def _kernel_dims_unsupported(call: DecodeCall) -> str | None:
    is_pow2 = _checks.is_pow2
    if not (is_pow2(call.head_dim_v) and is_pow2(call.d_r) and call.head_dim_v >= 16 and call.d_r >= 16):
        return (f"the Triton kernels need head_dim_v ({call.head_dim_v}) and D - head_dim_v ({call.d_r}) to be "
                "powers of two >= 16 (DeepSeek: 512 and 64)")
    return None


# "triton" on a Hopper GPU: the Gluon kernel for the 64-row tile class, for fewer rows unless the static schedule
# splits each sequence many ways, and for FP8 caches; the tl kernels for the rest.
WIDE_ROWS = 33
NARROW_ROWS = 32          # the operand-swapped Gluon kernel's largest tile (kernels/gluon_narrow_decode.py)
NARROW_FP8_ROWS = 16      # and its largest with an FP8 cache
NARROW_MAX_SPLITS = 8
DECODE = Registry("mla_decode", {
    "triton": (GluonDecode(every_call=False), TritonDecode("triton")),
    "gluon": (GluonDecode(every_call=True),),
    "xla": (XlaDecode(),),
    "interpret": (TritonDecode("interpret"),),
})


def mla_decode(q: jax.Array, kv_cache: jax.Array, cache_seqlens: jax.Array, block_table: jax.Array | None = None,
               head_dim_v: int = 512, softmax_scale: float | None = None, causal: bool = True,
               num_splits: int | None = None, return_lse: bool = False, implementation: str | None = None,
               layer: int | jax.Array | None = None, kv_format: str | None = None, kv_scale=None):
    """Absorbed MLA decode (multi-query attention over the latent cache; V = K[..., :head_dim_v]).

    Args:
      q: [B, S_q, H, D] absorbed queries ([q_nope · W_UKᵀ ; q_pe], D = 576 for DeepSeek), fp16/bf16/fp32.
      kv_cache: [B, N, D] contiguous, or [num_blocks, page_size, D] pages addressed by `block_table`;
        same dtype as q. With `layer`: a layer-stacked cache [L, B, N, D] or [L, num_blocks, page_size, D]
        (every layer its own page pool of the same shape, addressed by the one block table).
      cache_seqlens: [B] int32, valid tokens per sequence, the S_q new ones included. Values are clamped
        to [0, capacity] (capacity N, or max_blocks * page_size): a negative length counts as 0 and no
        value makes a kernel read outside the cache.
      block_table: None, or [B, max_blocks] int32 page indices (paged cache; page_size a power of two in
        [16, 256]). Entries past each sequence's last block (its first ceil(length / page_size)) are never read
        and may hold anything. An entry outside [0, num_blocks) in a block a sequence uses raises ValueError
        naming block_table when the values are concrete (a device-to-host copy of the table and lengths); under
        jit (traced values) the rows that would read it come out NaN, never another page's data.
      head_dim_v: width of V, the first columns of the latent (512).
      softmax_scale: scores are q·k times this, a Python float > 0 (ValueError otherwise, on every
        implementation; a traced value is a TypeError: it is compiled into the kernels); None means D ** -0.5.
        DeepSeek passes mscale² / sqrt(192).
      causal: query i of S_q sees keys < seqlen - S_q + i + 1; otherwise all keys < seqlen.
      num_splits: key splits per sequence (flash-decoding). None (the default): a cap from the static
        shapes and the GPU's SM count, and a schedule the kernels compute from the real lengths, so a
        ragged batch splits its long sequences more than its short ones. An int: exactly that many
        equal splits for every sequence.
      return_lse: also return the log-sum-exp of the scaled scores.
      implementation: "triton" (CUDA GPU: on a Hopper GPU the Gluon kernel for calls of more than 32 query
        rows S_q * H, for fewer unless each sequence splits more than 8 ways, for "fp8_blockscale" caches with bf16
        queries and for "fp8_pertensor" caches; the tl kernels otherwise), "gluon" (the Hopper Gluon kernel for
        every call it can run: bf16 / fp16 caches in q's dtype, "fp8_blockscale" ones with bf16 queries,
        "fp8_pertensor" ones, 512 + 64 latents, pages of 64 tokens or more), "xla" (the jnp reference) or
        "interpret" (the tl kernels on the CPU through Triton's interpreter); None means "triton" on a CUDA
        device, else "xla". A call the chosen implementation cannot run raises ValueError saying why and which
        implementation can.
      layer: None (kv_cache is one layer's), or the layer of a stacked kv_cache to attend: a Python int
        in [0, L) (ValueError otherwise), or a traced integer scalar, clamped to [0, L - 1]
        (a negative one counts as 0). The kernels offset their cache pointer by the layer: no slice of the
        stack is materialized, so a `lax.scan` over layers reads each layer's cache in place.
      kv_format: None (kv_cache holds q's dtype), "fp8_blockscale" (kv_cache uint8 [..., 656]: per token
        512 e4m3 c_kv, 4 float32 scales, 64 bfloat16 k_pe; FlashMLA V3.2's layout) or "fp8_pertensor"
        (uint8 [..., 576] e4m3, with kv_scale); flashmla_jax/fp8.py has the byte layouts, `quantize_latent`
        writes them. The kernels dequantize each tile to q's dtype for the products (V is the dequantized
        first head_dim_v columns); "xla" dequantizes the cache first (`dequantize_latent`). Bytes of unused
        pages and of tokens past each length are never used, whatever they hold (NaN patterns, inf scales).
      kv_scale: "fp8_pertensor" only (required there): the float32 scale (latent = e4m3 * kv_scale), a
        scalar, or with a stacked cache also [L], one per layer (a scalar serves every layer).

    Returns:
      out [B, S_q, H, head_dim_v] in q's dtype, and with return_lse lse [B, S_q, H] float32 (natural log).
      A row that sees no key gives out 0 and lse -inf (so do all rows of an empty cache, N = 0); B, S_q or H 0
      give empty results. A NaN or inf in anything a row reads (its query, a key or V column it sees, the scale;
      an FP8 cache's NaN code or scale in a token it sees) makes that row NaN in out and lse, on every
      implementation; keys past each length and unused pages are never read. Keys inside the length that a
      row cannot see causally (the later new tokens of the same call) meet a zero probability: a NaN there may
      or may not reach the earlier rows, depending on the implementation's tiles (as in jnp, 0 · NaN is NaN).
      Arrays may be given as array-likes (lists, NumPy arrays).
    """
    q, kv_cache, cache_seqlens = (_checks.as_array(name, x) for name, x in
                                  (("q", q), ("kv_cache", kv_cache), ("cache_seqlens", cache_seqlens)))
    block_table = None if block_table is None else _checks.as_array("block_table", block_table)
    softmax_scale = _checks.static_scale(softmax_scale)
    num_layers = None
    if layer is not None:
        num_layers = kv_cache.shape[0] if kv_cache.ndim == 4 else None   # else: refused below
        layer = _checks.layer_index("layer", layer, num_layers)
    kv_format = _checks.kv_format("kv_format", kv_format)
    kv_scale = _checks.kv_scale("kv_scale", kv_scale, kv_format, num_layers)
    _check_inputs(q, kv_cache, cache_seqlens, block_table, head_dim_v, num_splits, layer is not None, kv_format)
    if block_table is not None and _checks.concrete(block_table, cache_seqlens):
        check_block_table(block_table, cache_seqlens, kv_cache.shape[-3], kv_cache.shape[-2])
    return _mla_decode(q, kv_cache, cache_seqlens, block_table, layer, kv_scale, head_dim_v=head_dim_v,
                       softmax_scale=softmax_scale, causal=causal, num_splits=num_splits, return_lse=return_lse,
                       implementation=implementation, kv_format=kv_format)


@functools.partial(jax.jit, static_argnames=("head_dim_v", "softmax_scale", "causal", "num_splits",
                                             "return_lse", "implementation", "kv_format"))
def _mla_decode(q, kv_cache, cache_seqlens, block_table, layer, kv_scale, head_dim_v, softmax_scale, causal,
                num_splits, return_lse, implementation, kv_format):
    """`mla_decode` under jit, its inputs checked; layer: None or a 0-d int32 array; kv_scale None or a float
    array."""
    if kv_scale is not None and layer is not None:     # one per layer of a stacked cache: the kernels' [L] pointer
        kv_scale = jnp.broadcast_to(kv_scale, kv_cache.shape[:1])
    scale = _checks.softmax_scale(softmax_scale, q.shape[-1])
    head_dim_v = int(head_dim_v)
    num_splits = None if num_splits is None else int(num_splits)     # NumPy integers too
    page_size = None if block_table is None else kv_cache.shape[-2]
    capacity = kv_cache.shape[-2] if block_table is None else page_size * block_table.shape[1]
    b, s_q, h, _ = q.shape
    num_blocks = kv_cache.shape[-3]
    if q.size == 0 or capacity == 0 or num_blocks == 0:
        # Nothing to attend, on every implementation: empty rows, or 0 and -inf (NaN where a used block has no page).
        out, lse = jnp.zeros((b, s_q, h, head_dim_v), q.dtype), jnp.full((b, s_q, h), -jnp.inf, jnp.float32)
        out, lse = _finish_rows(out, lse, cache_seqlens, block_table, num_blocks, page_size, capacity, causal)
        return (out, lse) if return_lse else out
    impl = DECODE.select(implementation, DecodeCall(q.shape, q.dtype, head_dim_v, page_size, kv_format, capacity))

    def decode(q, kv_cache, cache_seqlens, block_table, causal, layer, kv_scale):
        return impl.decode(q, kv_cache, cache_seqlens, block_table, layer, kv_scale, head_dim_v=head_dim_v,
                           scale=scale, causal=causal, num_splits=num_splits, kv_format=kv_format)

    # Partitioning rules under jit over sharded inputs (ops/decode_partition.py), except for implementations
    # that host-callback (Triton's interpreter: a callback inside custom_partitioning segfaults, jax PR #23620).
    # layer and kv_scale reach every shard whole.
    shard = (partitioned_decode(decode, causal=causal) if impl.partitionable
             else functools.partial(_with_causal, decode, causal))
    out, lse = _inference_only(_fold_vmap_into_batch(shard))(q, kv_cache, cache_seqlens, block_table, layer, kv_scale)
    table = None if impl.table_rule else block_table
    out, lse = _finish_rows(out, lse, cache_seqlens, table, num_blocks, page_size, capacity, causal)
    return (out, lse) if return_lse else out


def _bad_table_rows(block_table, limits, num_blocks: int, page_size: int):
    """[B, S_q, 1] bool: the rows whose visible keys (limits [B, S_q]) reach a block-table entry outside the pool."""
    return (first_bad_block(block_table, num_blocks) * page_size)[:, None, None] < limits[:, :, None]


def _finish_rows(out, lse, cache_seqlens, block_table, num_blocks: int, page_size: int | None, capacity: int,
                 causal: bool):
    """The rules every implementation's result follows (reference.nan_rows), for results in
    reference.mergeable_rows' form (every DecodeImplementation's, and the empty call's zeros): ALL_NEG_INF_LSE
    becomes NaN (its output is NaN already), and with block_table the rows that would read an entry of it outside
    the pool become NaN (block_table None: a contiguous cache, or an implementation whose results already hold
    that rule). Without a table: lse only, no pass over out."""
    lse = reference.final_rows(lse)
    if block_table is None:
        return out, lse
    limits = reference.visible_key_limits(cache_seqlens, capacity, out.shape[1], causal)      # [B, S_q]
    bad = _bad_table_rows(block_table, limits, num_blocks, page_size)
    return jnp.where(bad[..., None], jnp.asarray(jnp.nan, out.dtype), out), jnp.where(bad, jnp.float32(jnp.nan), lse)


def first_bad_block(block_table, num_blocks: int, xp=jnp):
    """block_table [B, max_blocks] -> [B] int32: each sequence's first block whose entry lies outside
    [0, num_blocks), max_blocks where none does (xp: jax.numpy under jit, numpy for concrete values)."""
    max_blocks = block_table.shape[1]
    out_of_range = (block_table < 0) | (block_table >= num_blocks)
    blocks = xp.where(out_of_range, xp.arange(max_blocks, dtype=xp.int32)[None, :], max_blocks)
    return xp.min(blocks, axis=1, initial=max_blocks).astype(xp.int32)


def check_block_table(block_table, cache_seqlens, num_blocks: int, page_size: int) -> None:
    """For concrete values: ValueError naming block_table when a block some sequence uses (one of its first
    ceil(length / page_size), the length clamped to the table's capacity) holds an entry outside the pool
    [0, num_blocks). Entries past a sequence's last block may hold anything."""
    table = np.asarray(block_table)
    lengths = np.clip(np.asarray(cache_seqlens), 0, page_size * table.shape[1])
    first = first_bad_block(table, num_blocks, np)
    bad = np.flatnonzero(first * page_size < lengths)
    if bad.size:
        b, j = int(bad[0]), int(first[bad[0]])
        last = -(-int(lengths[b]) // page_size) - 1
        raise ValueError(f"block_table[{b}, {j}] = {table[b, j]} lies outside the pool's pages [0, {num_blocks}), in a "
                         f"block sequence {b} uses (length {lengths[b]}: blocks 0..{last} of {page_size} tokens); "
                         f"{bad.size} sequence(s) use such entries. Entries past a sequence's last block may hold "
                         "anything")


def _with_causal(decode, causal, q, kv_cache, cache_seqlens, block_table, *extras):
    """decode(q, kv_cache, cache_seqlens, block_table, causal, *extras): the signature the partitioned form has."""
    return decode(q, kv_cache, cache_seqlens, block_table, causal, *extras)


def index_layer(stack: jax.Array, layer: jax.Array) -> jax.Array:
    """stack [L, ...] (a stacked cache, per-layer lengths [L, B] or scales [L]), layer a 0-d integer ->
    stack[clip(layer, 0, L - 1)], clamped as the kernels clamp (a plain dynamic index would wrap a negative
    layer around)."""
    return jax.lax.dynamic_index_in_dim(stack, jnp.clip(layer, 0, stack.shape[0] - 1), 0, keepdims=False)


def _dequantized(kv_cache, kv_format, kv_scale, layer, dtype, d_r):
    """One layer's cache [..., W] as latents [..., D] of dtype (d_r k_pe values last): as it is for kv_format
    None, else `dequantize_latent` (the scale of `layer` when kv_scale is [L]). Tokens past each length may become
    NaN here; the reference zeroes them."""
    if kv_format is None:
        return kv_cache
    if kv_scale is not None and layer is not None:
        kv_scale = index_layer(kv_scale, layer)
    return dequantize_latent(kv_cache, kv_format, kv_scale, dtype, d_r=d_r)


def _fold_vmap_into_batch(decode):
    """`jax.vmap` support: jax-triton has no batching rule, so a vmapped axis V is folded into the
    kernel's batch (B -> V * B) and unfolded from the outputs. Pages of a batched paged cache are laid
    end to end and each member's block table is offset to its own pages (after clamping, so an
    out-of-range index never reaches another member's pages). A stacked cache is first indexed at each
    member's layer (under vmap the layer's cache is copied)."""
    return fold_vmap_into_batch(decode, _fold_decode_members)


def _fold_decode_members(call, v, in_batched, q, kv_cache, cache_seqlens, block_table, layer, kv_scale):
    """`_fold_vmap_into_batch`'s fold (ops/_batching.py's `fold_vmap_into_batch`)."""
    q_b, kv_b, len_b, table_b, layer_b, scale_b = in_batched
    if layer is not None:
        kv_cache = jax.vmap(index_layer)(member_axis(kv_cache, kv_b, v), member_axis(layer, layer_b, v))
        kv_b = True
        if kv_scale is not None and (scale_b or layer_b):
            kv_scale = jax.vmap(index_layer)(member_axis(kv_scale, scale_b, v), member_axis(layer, layer_b, v))
            scale_b = True
        elif kv_scale is not None:
            kv_scale = index_layer(kv_scale, layer)
    if kv_scale is not None and scale_b:
        # Members with their own per-tensor scales cannot share one launch: they run one by one.
        table = None if block_table is None else member_axis(block_table, table_b, v)
        members = (member_axis(q, q_b, v), member_axis(kv_cache, kv_b, v), member_axis(cache_seqlens, len_b, v),
                   table, kv_scale)
        return Mapped(jax.lax.map(lambda m: call(*m[:4], None, m[4]), members))
    q = member_axis(q, q_b, v)
    b = q.shape[1]
    seqlens = member_axis(cache_seqlens, len_b, v).reshape(v * b)
    if block_table is None:
        kv = member_axis(kv_cache, kv_b, v).reshape((v * b,) + kv_cache.shape[-2:])
        table = None
    else:
        table = member_axis(block_table, table_b, v)
        kv = kv_cache
        if kv_b:
            num_pages = kv_cache.shape[1]
            kv = kv_cache.reshape((v * num_pages,) + kv_cache.shape[2:])
            offsets = (jnp.arange(v, dtype=jnp.int32) * num_pages)[:, None, None]
            table = jnp.clip(table, 0, num_pages - 1) + offsets
        table = table.reshape(v * b, -1)
    return q.reshape((v * b,) + q.shape[2:]), kv, seqlens, table, None, kv_scale


def _inference_only(decode):
    """Differentiating decode raises: it is an inference kernel (mla_prefill has gradients)."""
    return inference_only(decode, "mla_decode is inference-only and has no derivative; for gradients use "
                                  "flashmla_jax.mla_prefill (non-absorbed attention with a Triton backward), or "
                                  "jax.lax.stop_gradient on the decode inputs")
