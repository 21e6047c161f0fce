"""DeepSeek Sparse Attention (V3.2): `mla_decode_sparse` and `mla_prefill_sparse`, absorbed MLA over top-k
token indices into a latent pool.

Both run one kernel (kernels/sparse.py) on "pairs": a decode step's (sequence, query position) pairs, or a
prefill's tokens; each op's registry (SPARSE_DECODE, SPARSE_PREFILL: ops/_registry.py) picks "xla" (the jnp
reference) or the kernel, through jax-triton ("triton") or Triton's interpreter ("interpret"). Each pair's H
heads attend to the tokens its index list names; an index outside the pool, or past the pair's top-k length, is
unused (as -1) and never read.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import _checks, reference
from flashmla_jax._backend import cuda_compute_capability, num_sms
from flashmla_jax.fp8 import latent_format
from flashmla_jax.ops._batching import Mapped, fold_vmap_into_batch, inference_only, member_axis
from flashmla_jax.ops._launch import launch
from flashmla_jax.ops._registry import Implementation, Registry, TritonRunner
from flashmla_jax.ops.decode import (FP8_NATIVE, KV_FORMATS, MAX_SPLITS_MERGED_IN_KERNEL, DecodePlan, DecodeTiles,
                                     SplitOutputs, _kernel_dims_unsupported, _pow2_at_least, check_widths,
                                     choose_num_splits, combine_plan, decode_tiles, index_layer, merge_splits,
                                     split_buffers)
from flashmla_jax.ops.sparse_partition import partitioned_sparse

SPARSE_FORMATS = (None, "fp8_blockscale")    # kv_format values the sparse pool may have
INT32_MAX = 2 ** 31 - 1


# ---------------------------------------------------------------- the plan and the Triton path


@dataclasses.dataclass(frozen=True)
class SparsePlan(DecodePlan):
    """A DecodePlan for the sparse kernel (grid (row tiles, pairs, splits); split_outputs over the pairs), whose
    kernel writes one more output after the split ones: max_logits, [P, H] float32 with the prefill's max, else
    one element."""
    max_logits: jax.ShapeDtypeStruct = jax.ShapeDtypeStruct((1,), jnp.float32)

    @property
    def outputs(self) -> tuple:
        """The kernel's outputs in its pointer order (a launch's out_shape)."""
        return (*self.split_outputs, self.max_logits)


def sparse_tiles(heads: int, dtype, kv_format: str | None) -> DecodeTiles:
    """The dense decode's tiles for H rows (`decode_tiles`), changed where the sparse kernel, compiled for sm_90,
    spills or has ptxas serialize its wgmma (benchmarks/compile_report.py --sparse; tests/test_sparse.py checks):
    no LATE_ROW_SUM (with it the 64-row FP8 kernel spills and the bf16 one waits after every QK^T wgmma; the
    kernel has neither it nor SPLIT_MASKED: every tile is masked), and no 32-row tiles at 4 warps (8 warps for a
    float pool; an FP8 pool spills at 32 rows either way and takes the 16-row tiles). float32 queries over an FP8
    pool spill at every tile tried (no serving setup uses them)."""
    tiles = decode_tiles(heads, dtype, None, kv_format)
    if tiles.block_m == 32:
        tiles = decode_tiles(16, dtype, None, kv_format) if kv_format else dataclasses.replace(tiles, num_warps=8)
    return dataclasses.replace(tiles, late_row_sum=False, split_masked=False)


def plan_sparse(q_shape: tuple, dtype, head_dim_v: int, topk: int, num_tokens: int, num_layers: int,
                kv_format: str | None, num_splits: int | None, sms: int, with_max: bool = False,
                fp8_native: bool = True, tiles: DecodeTiles | None = None,
                merges_in_kernel: bool = True) -> SparsePlan:
    """q_shape [B, S_q, H, D]; a pool of num_tokens tokens (num_layers > 0: a stack of that many such pools, of
    num_tokens * W elements a layer, W = D or the FP8 format's bytes per token); topk index slots per pair.

    Tiles: `sparse_tiles` (`tiles` replaces them). num_splits None: split the index list only where the pairs'
    row tiles leave the GPU's `sms` idle (`choose_num_splits`); never more splits than blocks of the list; with_max
    (the prefill's max_logits) needs one split. merges_in_kernel False: every split list is merged by the combine
    kernel (the Gluon kernel has no in-kernel merge)."""
    batch, s_q, heads, d = q_shape
    pairs = batch * s_q
    tiles = tiles or sparse_tiles(heads, dtype, kv_format)
    row_tiles = -(-heads // tiles.block_m)
    if num_splits is None:
        num_splits = 1 if with_max else choose_num_splits(pairs, row_tiles, topk, tiles.block_n, sms)
    if with_max and num_splits != 1:
        raise ValueError(f"max_logits needs one split of the index list, got num_splits={num_splits}")
    if tiles.late_row_sum or tiles.split_masked:
        raise ValueError("the sparse kernel has no LATE_ROW_SUM or SPLIT_MASKED option (sparse_tiles says why)")
    topk_blocks = max(1, -(-topk // tiles.block_n))
    num_splits = min(num_splits, topk_blocks)          # no split past the list
    split_len = -(-topk_blocks // num_splits) * tiles.block_n
    last_merges = merges_in_kernel and 1 < num_splits <= MAX_SPLITS_MERGED_IN_KERNEL
    splits_pow2 = _pow2_at_least(num_splits)
    width = d if kv_format is None else latent_format(kv_format, head_dim_v, d - head_dim_v).bytes_per_token
    constexprs = dict(
        H=heads, S_Q=s_q, TOPK=topk, NUM_TOKENS=num_tokens, NUM_LAYERS=num_layers,
        LAYER_STRIDE=num_tokens * width if num_layers else 0, D_V=head_dim_v, D_R=d - head_dim_v,
        NUM_SPLITS=num_splits, SPLIT_LEN=split_len, SPLITS_POW2=splits_pow2, ROW_TILES=row_tiles,
        LAST_MERGES=last_merges, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, UNCHAIN_SCORES=tiles.unchain_scores,
        KV_FORMAT=KV_FORMATS[kv_format], FP8_NATIVE=bool(fp8_native), WRITE_MAX=bool(with_max))
    combine_grid, combine_constexprs = combine_plan(pairs, heads, head_dim_v, num_splits, last_merges)
    split_outputs = split_buffers(pairs, heads, head_dim_v, dtype, num_splits, row_tiles, combine_grid is not None,
                                  last_merges)
    max_logits = jax.ShapeDtypeStruct((pairs, heads) if with_max else (1,), jnp.float32)
    return SparsePlan((row_tiles, pairs, num_splits), tiles.num_warps, tiles.num_stages, constexprs, num_splits,
                      split_outputs, ("arrivals",) if last_merges else (), combine_grid, combine_constexprs,
                      max_logits)


# ---------------------------------------------------------------- the implementations and their registries


@dataclasses.dataclass(frozen=True)
class SparseCall:
    """The static facts of one sparse call that decide which implementation can run it."""
    q_shape: tuple            # [B, S_q, H, D] (the prefill: [T, 1, H, D])
    dtype: Any
    head_dim_v: int
    kv_format: str | None
    stacked: bool = False     # a layer-stacked pool read at `layer`
    with_max: bool = False    # the prefill's max_logits output

    @property
    def d_r(self) -> int:
        return self.q_shape[3] - self.head_dim_v


class SparseImplementation(Implementation[SparseCall]):
    """attend(q, pool, indices, topk_length, layer, *, head_dim_v, scale, kv_format, num_splits, with_max) ->
    (out [B, S_q, H, D_v], lse [B, S_q, H]) and, with with_max, max_logits [B, S_q, H] after them: q [B, S_q, H, D],
    pool flat [N, W] (or [L, N, W] with layer, a 0-d int32), indices [B, S_q, topk], topk_length None or [B]."""

    def attend(self, q, pool, indices, topk_length, layer, *, head_dim_v, scale, kv_format, num_splits, with_max):
        raise NotImplementedError


class XlaSparse(SparseImplementation):
    """The jnp reference (any shapes, dtypes and devices): tokens gathered, then dequantized."""
    name = "xla"

    def unsupported(self, call: SparseCall) -> str | None:
        return None

    def attend(self, q, pool, indices, topk_length, layer, *, head_dim_v, scale, kv_format, num_splits, with_max):
        if layer is not None:
            pool = index_layer(pool, layer)
        out, lse, max_logits = reference.mla_sparse_reference(q, pool, indices, topk_length, head_dim_v=head_dim_v,
                                                              softmax_scale=scale, kv_format=kv_format)
        return (out, lse, max_logits) if with_max else (out, lse)


class TritonSparse(TritonRunner, SparseImplementation):
    """The tl sparse kernel (kernels/sparse.py) and, for many splits, the decode's combine kernel, through
    jax-triton on a CUDA GPU (runner "triton") or Triton's interpreter on the CPU ("interpret")."""

    def unsupported(self, call: SparseCall) -> str | None:
        return self.runner_unsupported() or _kernel_dims_unsupported(call)

    def attend(self, q, pool, indices, topk_length, layer, *, head_dim_v, scale, kv_format, num_splits, with_max):
        from flashmla_jax.kernels import sparse as kernels

        b, s_q, h, d = q.shape
        stacked = layer is not None
        plan = plan_sparse(q.shape, q.dtype, head_dim_v, indices.shape[-1], pool.shape[-2],
                           pool.shape[0] if stacked else 0, kv_format, num_splits, num_sms(self.name), with_max,
                           FP8_NATIVE[self.name])
        unused = indices                      # the pointer of an input the kernel does not read
        *split, max_logits = launch(
            kernels.mla_sparse_kernel, q.reshape(b * s_q, h, d), pool, indices,
            unused if topk_length is None else topk_length, unused if layer is None else layer, np.float32(scale),
            out_shape=plan.outputs, grid=plan.grid, implementation=self.name, num_warps=plan.num_warps,
            num_stages=plan.num_stages, zeroed_outputs=plan.zeroed_outputs, HAS_TOPK_LENGTH=topk_length is not None,
            **plan.constexprs)
        out, lse = merge_splits(SplitOutputs(*split), plan.combine_grid, plan.combine_constexprs, self.name)
        out, lse = out.reshape(b, s_q, h, head_dim_v), lse.reshape(b, s_q, h)
        return (out, lse, max_logits.reshape(b, s_q, h)) if with_max else (out, lse)


class GluonSparse(SparseImplementation):
    """The Hopper kernel in Gluon (kernels/gluon_sparse_decode.py: the dense Gluon decode's consumer warpgroups fed
    by a producer that gathers the listed tokens with cp.async and dequantizes an FP8 pool in shared memory) and
    the combine kernel, through jax-triton on a compute capability 9.x GPU: bf16 / fp16 pools, "fp8_blockscale"
    ones with bf16 queries, 512 + 64 latents, more than 32 heads (a narrower pair pads its 64-row tile: the tl
    kernel takes it); the decode and the prefill (with its max_logits)."""

    name = "gluon"

    def unsupported(self, call: SparseCall) -> str | None:
        capability = cuda_compute_capability()
        if capability is None or capability[0] != 9:
            return "the Gluon kernels need a Hopper GPU (compute capability 9.x) as JAX's default backend"
        if call.dtype not in (jnp.bfloat16, jnp.float16):
            return f"the Gluon sparse kernel takes bfloat16 or float16 queries, not {jnp.dtype(call.dtype)}"
        if call.kv_format == "fp8_blockscale" and call.dtype != jnp.bfloat16:
            return f"the Gluon sparse kernel reads fp8_blockscale pools with bfloat16 queries, not {jnp.dtype(call.dtype)}"
        if (call.head_dim_v, call.d_r) != (512, 64):
            return f"the Gluon sparse kernel takes 512 + 64 latents, not {call.head_dim_v} + {call.d_r}"
        if call.q_shape[2] < GLUON_SPARSE_MIN_HEADS:
            return f"{call.q_shape[2]} heads: the Gluon sparse kernel's 64-row tiles start at {GLUON_SPARSE_MIN_HEADS}"
        return None

    def attend(self, q, pool, indices, topk_length, layer, *, head_dim_v, scale, kv_format, num_splits, with_max):
        from flashmla_jax.kernels import gluon_sparse_decode as kernels

        b, s_q, h, d = q.shape
        stacked = layer is not None
        plan = plan_sparse(q.shape, q.dtype, head_dim_v, indices.shape[-1], pool.shape[-2],
                           pool.shape[0] if stacked else 0, kv_format, num_splits, num_sms("triton"), with_max, True,
                           tiles=GLUON_SPARSE_TILES, merges_in_kernel=False)
        constexprs = {k: v for k, v in plan.constexprs.items() if k in kernels.mla_sparse_gluon_kernel.arg_names}
        unused = indices                      # the pointer of an input the kernel does not read
        *split, max_logits = launch(
            kernels.mla_sparse_gluon_kernel, q.reshape(b * s_q, h, d), pool, indices,
            unused if topk_length is None else topk_length, unused if layer is None else layer, np.float32(scale),
            out_shape=plan.outputs, grid=plan.grid, implementation="triton", num_warps=plan.num_warps,
            num_stages=plan.num_stages, zeroed_outputs=plan.zeroed_outputs, HAS_TOPK_LENGTH=topk_length is not None,
            **constexprs)
        out, lse = merge_splits(SplitOutputs(*split), plan.combine_grid, plan.combine_constexprs, "triton")
        out, lse = out.reshape(b, s_q, h, head_dim_v), lse.reshape(b, s_q, h)
        return (out, lse, max_logits.reshape(b, s_q, h)) if with_max else (out, lse)


# The Gluon sparse kernel's fixed tiling (kernels/gluon_sparse_decode.py): 64 heads and 64 slots a block, 4
# launched warps (the producer), one stage (its ring is the kernel's own).
GLUON_SPARSE_TILES = DecodeTiles(64, 64, 4, 1, False, False, False)
GLUON_SPARSE_MIN_HEADS = 33

# "triton" on a Hopper GPU: the Gluon kernel where it can run, the tl kernel otherwise.
_IMPLEMENTATIONS = {"triton": (GluonSparse(), TritonSparse("triton")), "xla": (XlaSparse(),),
                    "interpret": (TritonSparse("interpret"),)}
SPARSE_DECODE = Registry("mla_decode_sparse", _IMPLEMENTATIONS)
SPARSE_PREFILL = Registry("mla_prefill_sparse", _IMPLEMENTATIONS)


def _fold_sparse_members(call, v, in_batched, q, pool, indices, topk_length, layer):
    """vmap's members laid along the pairs' batch (see `fold_vmap_into_batch`): a batched pool's members end to
    end, each member's valid indices offset to its own tokens (invalid ones stay invalid: -1). A stacked pool
    whose stack or layer is batched is first indexed at each member's layer (a copy of the layer); a shared one
    stays in place. Members whose pools together pass 2^31 tokens (int32 indices) run one by one."""
    q_b, pool_b, idx_b, len_b, layer_b = in_batched
    if layer is not None and (pool_b or layer_b):
        pool = jax.vmap(index_layer)(member_axis(pool, pool_b, v), member_axis(layer, layer_b, v))
        pool_b, layer = True, None
    if pool_b and v * pool.shape[1] > INT32_MAX:
        members = (member_axis(q, q_b, v), pool, member_axis(indices, idx_b, v),
                   None if topk_length is None else member_axis(topk_length, len_b, v))
        return Mapped(jax.lax.map(lambda m: call(*m, None), members))
    q = member_axis(q, q_b, v)
    b = q.shape[1]
    indices = member_axis(indices, idx_b, v)
    if pool_b:
        n = pool.shape[1]
        offsets = (jnp.arange(v, dtype=jnp.int32) * n)[:, None, None, None]
        indices = jnp.where((indices >= 0) & (indices < n), indices + offsets, -1)
        pool = pool.reshape((v * n,) + pool.shape[2:])
    if topk_length is not None:
        topk_length = member_axis(topk_length, len_b, v).reshape(v * b)
    return (q.reshape((v * b,) + q.shape[2:]), pool, indices.reshape((v * b,) + indices.shape[2:]), topk_length,
            layer)


def _attend(registry: Registry, implementation, q, pool, indices, topk_length, layer, *, head_dim_v, kv_format,
            **options):
    """The implementation `registry` selects, under vmap (folded into the batch) and refusing derivatives.
    pool: flat [N, W] or [L, N, W]. With nothing to attend (no rows, no pool tokens or no slots) every
    implementation gives empty rows, or 0 with lse (and max_logits) -inf."""
    b, s_q, h, _ = q.shape
    if q.size == 0 or pool.shape[-2] == 0 or indices.shape[-1] == 0:
        rows = jnp.full((b, s_q, h), -jnp.inf, jnp.float32)
        empty = (jnp.zeros((b, s_q, h, head_dim_v), q.dtype), rows)
        return (*empty, rows) if options["with_max"] else empty
    impl = registry.select(implementation, SparseCall(q.shape, q.dtype, head_dim_v, kv_format, layer is not None,
                                                      options["with_max"]))
    message = (f"{registry.op} is inference-only (forward only) and has no derivative: jax.lax.stop_gradient its "
               "inputs (mla_prefill_sparse's docstring says what a backward needs)")
    fn = functools.partial(impl.attend, head_dim_v=head_dim_v, kv_format=kv_format, **options)
    if impl.partitionable:      # not the interpreter: a host callback cannot run inside custom_partitioning
        fn = partitioned_sparse(fn, with_max=options["with_max"])
    return inference_only(fold_vmap_into_batch(fn, _fold_sparse_members), message)(q, pool, indices, topk_length,
                                                                                    layer)


# ---------------------------------------------------------------- input checks


def _check_common(q, head_dim_v, indices, topk_length, index_shape, index_text, length_shape, length_text):
    _checks.float_dtype("q", q)
    head_dim_v = _checks.integer("head_dim_v", head_dim_v)     # its range: `_check_pool`, beside the widths
    _checks.int32_array("indices", indices, index_shape, index_text)
    if topk_length is not None:
        _checks.int32_array("topk_length", topk_length, length_shape, length_text)
    return head_dim_v


def _check_pool(name, pool, q, head_dim_v, kv_format, shapes_text, ndims, stacked=False):
    """pool: tokens [..., W] with ndim in `ndims` (a layer axis first when stacked), W = D or the FP8 bytes."""
    width = check_widths(pool, q, head_dim_v, kv_format, name)
    if pool.ndim not in ndims or pool.shape[-1] != width:
        raise ValueError(f"{name} must be {shapes_text.format(W=width)}, got shape {pool.shape}")


def _kv_format(kv_format):
    kv_format = _checks.kv_format("kv_format", kv_format)
    if kv_format not in SPARSE_FORMATS:
        raise ValueError(f"the sparse ops take kv_format None or 'fp8_blockscale' (FlashMLA's V3.2 pool), got "
                         f"{kv_format!r}")
    return kv_format


# ---------------------------------------------------------------- the public ops


def mla_decode_sparse(q: jax.Array, pool: jax.Array, indices: jax.Array, topk_length: jax.Array | None = None,
                      softmax_scale: float | None = None, kv_format: str | None = None, return_lse: bool = True,
                      head_dim_v: int = 512, implementation: str | None = None, layer: int | jax.Array | None = None,
                      num_splits: int | None = None):
    """Sparse absorbed MLA decode (DeepSeek-V3.2's DSA): each query token attends to its own top-k pool tokens.

    Args:
      q: [B, S_q, H, D] absorbed queries ([q_nope · W_UKᵀ ; q_pe], D = 576), fp16 / bf16 / fp32.
      pool: the latent tokens, paged [num_blocks, page_size, W] or flat [N, W]: W = D in q's dtype (kv_format
        None), or uint8 W = 656 with kv_format "fp8_blockscale" (FlashMLA's V3.2 token: 512 e4m3 c_kv, 4 float32
        scales, 64 bfloat16 k_pe; `quantize_latent` writes it). With `layer`: a stack [L, num_blocks, page_size, W]
        or [L, N, W], one pool per layer, all addressed by the same indices.
      indices: [B, S_q, topk] int32, each the token's place in the pool, page · page_size + offset (a row of the
        flattened pool). -1 marks an unused slot; so does any index < 0 or >= num_blocks · page_size (never read,
        whatever the pool holds). A duplicated index is attended once per slot (it counts twice, as in FlashMLA).
        The indices encode causality: there is no causal flag.
      topk_length: None, or [B] int32: only the first topk_length[b] slots of each of sequence b's rows count
        (clamped to [0, topk]; later slots are never read).
      softmax_scale: scores are q·k times this, a Python float > 0 (a traced value is a TypeError: it is compiled
        into the kernel); None means D ** -0.5 (DeepSeek passes mscale² / sqrt(192)).
      kv_format: None or "fp8_blockscale" (the kernel dequantizes each gathered tile to q's dtype; "xla"
        dequantizes the gathered tokens with `dequantize_latent`). "fp8_pertensor" is refused.
      return_lse: also return the log-sum-exp (the default, as FlashMLA).
      head_dim_v: width of V, the first columns of the latent (512).
      implementation: "triton" (jax-triton on a CUDA GPU: on a Hopper GPU the Gluon kernel for more than 32
        heads, bf16 / fp16 queries and fp8_blockscale pools with bf16 ones, the tl kernel otherwise), "xla" (the
        jnp reference) or "interpret" (the tl kernel in Triton's interpreter, on the CPU); None means "triton" on
        a CUDA device, else "xla". A call the chosen implementation cannot run raises ValueError saying why and
        which one can (SPARSE_DECODE, the op's registry).
      layer: None, or the layer of a stacked pool: a Python int in [0, L) (ValueError otherwise) or a traced
        integer scalar (clamped to [0, L - 1]); the kernel offsets its pointer, no slice is materialized (under
        vmap, members with their own layer or stack get a copy of their layer).
      num_splits: splits of each index list (split-K); None: only where the grid would leave SMs idle.

    Returns:
      out [B, S_q, H, head_dim_v] in q's dtype and, with return_lse, lse [B, S_q, H] float32 (natural log). A row
      with no valid index gives out 0 and lse -inf (FlashMLA returns lse +inf there; its lse is also laid out
      [B, H, S_q]); so do all rows of an empty pool or index list. A NaN in the row's query, the scale or a token
      it lists (an FP8 NaN code or scale) makes the row NaN on every implementation; unused slots are never read.
      An inf that makes all of a row's scores -inf gives that row 0 and lse -inf (as if it listed nothing).

    Works under jit and vmap (members folded into the batch); differentiating raises (inference only)."""
    q, pool, indices = (_checks.as_array(name, x) for name, x in (("q", q), ("pool", pool), ("indices", indices)))
    topk_length = None if topk_length is None else _checks.as_array("topk_length", topk_length)
    softmax_scale = _checks.static_scale(softmax_scale)
    kv_format = _kv_format(kv_format)
    if layer is not None:
        num_layers = pool.shape[0] if pool.ndim in (3, 4) else None   # else: refused below
        layer = _checks.layer_index("layer", layer, num_layers)
    out, lse = _mla_decode_sparse(q, pool, indices, topk_length, layer, softmax_scale=softmax_scale,
                                  kv_format=kv_format, head_dim_v=head_dim_v, implementation=implementation,
                                  num_splits=num_splits)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("softmax_scale", "kv_format", "head_dim_v", "implementation",
                                             "num_splits"))
def _mla_decode_sparse(q, pool, indices, topk_length, layer, softmax_scale, kv_format, head_dim_v, implementation,
                       num_splits):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S_q, H, D], got shape {q.shape}")
    b, s_q = q.shape[:2]
    head_dim_v = _check_common(q, head_dim_v, indices, topk_length, (b, s_q, None),
                               f"int32 [B={b}, S_q={s_q}, topk]", (b,), f"int32 [B={b}]")
    stacked = layer is not None
    lead = "L, " if stacked else ""
    _check_pool("pool", pool, q, head_dim_v, kv_format,
                f"[{lead}num_blocks, page_size, {{W}}] or [{lead}N, {{W}}]", (2 + stacked, 3 + stacked), stacked)
    num_splits = _checks.optional_integer("num_splits", num_splits, 1, None)
    flat = pool.reshape(pool.shape[:stacked] + (-1, pool.shape[-1]))           # a view: token i is row i
    return _attend(SPARSE_DECODE, implementation, q, flat, indices, topk_length, layer, head_dim_v=head_dim_v,
                   kv_format=kv_format, scale=_checks.softmax_scale(softmax_scale, q.shape[-1]),
                   num_splits=num_splits, with_max=False)


def mla_prefill_sparse(q: jax.Array, kv: jax.Array, indices: jax.Array, topk_length: jax.Array | None = None,
                       softmax_scale: float | None = None, head_dim_v: int = 512, implementation: str | None = None):
    """Sparse absorbed MLA prefill, forward only (FlashMLA's `flash_mla_sparse_fwd` contract).

    Args:
      q: [T, H, D] absorbed queries (D = 576), fp16 / bf16 / fp32.
      kv: [N, D] latents in q's dtype (FlashMLA's [N, 1, D] without its KV-head axis).
      indices: [T, topk] int32 rows of kv (FlashMLA's [T, 1, topk] without its axis); -1, any index < 0 or
        >= N is unused and never read; a duplicated index counts once per slot.
      topk_length: None, or [T] int32: token t uses only its first topk_length[t] slots (clamped to [0, topk]).
      softmax_scale: as for `mla_decode_sparse` (None: D ** -0.5).
      head_dim_v: width of V, the first columns of the latent (512).
      implementation: as for `mla_decode_sparse` (SPARSE_PREFILL, the op's registry).

    Returns:
      (out [T, H, head_dim_v] in q's dtype, max_logits [T, H] float32, lse [T, H] float32): max_logits is the
      largest scaled score, max over valid slots of q·k * softmax_scale (as FlashMLA's, which scales before its
      max), lse the natural-log log-sum-exp of the scaled scores. A token with no valid slot gives out 0,
      max_logits -inf and lse -inf (FlashMLA: lse +inf).

    Differentiating raises. A backward would take dO and the saved lse: recompute P = exp(q·k * scale - lse)
    over the same gathered tokens, dP = dO · Vᵀ, dS = P ⊙ (dP - rowsum(dO ⊙ out)); dq = dS · K * scale from the
    gathered tile; dkv = scale · dSᵀ · q (all 576 columns) plus Pᵀ · dO on the first head_dim_v columns,
    scatter-added into the rows the indices name (a duplicated or shared index receives every slot's share,
    so the scatter needs atomics or a sort by index), and nothing for unused slots.
    """
    q, kv, indices = (_checks.as_array(name, x) for name, x in (("q", q), ("kv", kv), ("indices", indices)))
    topk_length = None if topk_length is None else _checks.as_array("topk_length", topk_length)
    return _mla_prefill_sparse(q, kv, indices, topk_length, softmax_scale=_checks.static_scale(softmax_scale),
                               head_dim_v=head_dim_v, implementation=implementation)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "head_dim_v", "implementation"))
def _mla_prefill_sparse(q, kv, indices, topk_length, softmax_scale, head_dim_v, implementation):
    if q.ndim != 3:
        raise ValueError(f"q must be [T, H, D], got shape {q.shape}")
    t = q.shape[0]
    head_dim_v = _check_common(q, head_dim_v, indices, topk_length, (t, None), f"int32 [T={t}, topk]", (t,),
                               f"int32 [T={t}]")
    _check_pool("kv", kv, q, head_dim_v, None, "[N, {W}]", (2,))
    out, lse, max_logits = _attend(SPARSE_PREFILL, implementation, q[:, None], kv, indices[:, None], topk_length,
                                   None, head_dim_v=head_dim_v, kv_format=None,
                                   scale=_checks.softmax_scale(softmax_scale, q.shape[-1]), num_splits=1,
                                   with_max=True)
    return out[:, 0], max_logits[:, 0], lse[:, 0]
