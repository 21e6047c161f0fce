"""Partitioning rules: plain `jax.jit` over NamedSharding inputs runs each op per shard instead of gathering.

Each wrapper takes a *body* (the per-shard function of one implementation: the jnp reference for "xla",
the Triton launches for "triton") and returns a function with the body's signature whose SPMD partitioning
is given by `jax.experimental.custom_partitioning` (a Shardy `sharding_rule` for propagation, and a
`partition` callback that picks the layout from the operands' shardings). The wrapper never depends on the
body, so both implementations share one set of rules, and the CPU tests cover the rules with the jnp body.

Host callbacks must not go through these wrappers: a `pure_callback` inside `custom_partitioning` is freed
before it runs and the program segfaults (jax-ml/jax PR #23620). The "interpret" implementation therefore
runs unwrapped (ops/_host_call.py): under sharded jit its callback runs once on device 0 over gathered
inputs (correct, not partitioned); under `shard_map` it runs per device on the local shards.

Decode layouts (mesh axes read from the operands' NamedShardings; see flashmla_jax/sharding.py for the
named layouts). D below is the product of the sizes of the mesh axes in a role.
  * batch (DP): q, lengths, block table, outputs sharded on B. Contiguous cache: sharded on B.
    Paged cache: either replicated (every device holds the whole pool; block-table entries are global page
    indices), or sharded on its page axis over exactly the batch axes: device k then holds pages
    [k * P/D, (k + 1) * P/D) and every page a sequence of device k reads must lie in that range
    (LatentCache.create's default table does: sequence b owns pages b * max_blocks, ...). Entries stay
    global indices, so results equal the unsharded call's; a sequence that reads a page of another device's
    slice gets NaN (out and lse) instead of a silent wrong answer.
  * heads (TP): q and outputs sharded on H; the latent cache is not sharded on anything but B or N (MLA
    shares it across heads).
  * sequence (CP, contiguous cache only): the cache sharded on N. Device k attends over its slice
    [k * N/D, (k + 1) * N/D) with its lengths shifted into the slice, returns its partial out and LSE, and
    the partials are merged by an LSE-weighted combine with collectives (pmax and psum over the sequence
    axes of [B, S_q, H] LSEs, psum of the weighted [B, S_q, H, D_v] outputs); the cache is never gathered.
    Causal with S_q > 1: query i sees keys < seqlen - S_q + i + 1 (global positions), which the kernels'
    per-sequence length cannot express on a slice, so each query row runs as its own non-causal pass over
    the slice (S_q passes: S_q times the cache reads of S_q = 1; MTP's S_q = 2 doubles the traffic).
  * roles combine: batch x heads, batch x sequence (and heads x sequence). An axis on the cache wins over
    one on q: the cache is never moved to fit q.
Resharding rules for shardings an op cannot use (all documented, none gathers the whole cache):
  * q's S_q or 576 axis, the cache's page-size axis, the block table's block axis: replicated (small).
  * the contiguous cache's 576 axis: moved to its N axis (an all-to-all; each device keeps 1/D of the cache),
    i.e. such an axis becomes a sequence axis.
  * a paged pool sharded other than on its page axis over the batch axes: ValueError (there is no
    layout that uses it without gathering the pool).
  * a mesh axis (or axes) whose size does not divide the dimension it shards: ValueError naming both.
Errors raised in `partition` surface when XLA compiles the jitted function.

Prefill (forward and backward kernels, each wrapped): batch and heads (q's H and, when the head axes divide
it, k/v's H_kv; with H_kv = 1 k/v are replicated and their gradients psum-reduced over the head axes).
A sharding of S (or of d) is replicated: causal context-parallel prefill (ring attention) is not built.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

Axes = tuple[str, ...]


# ---------------------------------------------------------------------------------------------- helpers


def _axes(sharding, dim: int) -> Axes:
    """Mesh axes sharding dimension `dim` of an operand (() when replicated)."""
    if not isinstance(sharding, NamedSharding):
        # decode_shardings=True gives NamedShardings whenever the jit knows a mesh; without one there is
        # nothing to partition over.
        return ()
    spec = tuple(sharding.spec) + (None,) * 8
    entry = spec[dim]
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _size(mesh, axes: Axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _entry(axes: Axes):
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def _named(mesh, *dims: Axes) -> NamedSharding:
    return NamedSharding(mesh, P(*(_entry(a) for a in dims)))


def _check_divides(mesh, axes: Axes, size: int, what: str):
    d = _size(mesh, axes)
    if axes and size % d:
        raise ValueError(f"mesh axis {_entry(axes)!r} (size {d}) does not divide {what} = {size}: shard a "
                         "dimension only over axes whose total size divides it")


def _minus(axes: Axes, used: Axes) -> Axes:
    return tuple(a for a in axes if a not in used)


def _shard_index(axes: Axes):
    """Linear index of this device along `axes` (major to minor, as a PartitionSpec tuple tiles)."""
    return jax.lax.axis_index(axes if len(axes) > 1 else axes[0]) if axes else 0


# ---------------------------------------------------------------------------------------------- decode


DecodeBody = Callable[..., tuple[jax.Array, jax.Array]]
"""body(q, kv_cache, cache_seqlens, block_table, causal, *extras) -> (out, lse): the op's semantics on one
shard. q [B, S_q, H, D]; kv_cache [B, N, D] or [pages, page_size, D], or either with a leading layer axis
[L, ...] (stacked); cache_seqlens [B] int32; block_table None or [B, max_blocks] int32; extras: small
operands every shard gets whole (a stacked cache's 0-d layer index); out [B, S_q, H, D_v] in q's dtype;
lse [B, S_q, H] float32."""


@dataclasses.dataclass(frozen=True)
class DecodePartition:
    """The mesh axes of each role in one partitioned decode call (each a tuple of mesh axis names)."""
    batch: Axes
    heads: Axes
    sequence: Axes          # contiguous cache only
    pool: Axes              # paged: the pool's page-axis sharding (() or == batch)


def plan_decode_partition(mesh, q_sharding, kv_sharding, lens_sharding, table_sharding,
                          q_shape: tuple, kv_shape: tuple, paged: bool) -> DecodePartition:
    """The layout a decode call runs in, from its operands' shardings (module docstring's rules)."""
    b, _, h, _ = q_shape
    if paged:
        pool = _axes(kv_sharding, 0)
        other = _axes(kv_sharding, 1) + _axes(kv_sharding, 2)
        if other:
            raise ValueError(f"a paged kv_cache [num_blocks, page_size, D] can be sharded only on its page axis "
                             f"(over the batch axes), got {kv_sharding.spec}: sharding page_size or D would "
                             "need the pool gathered")
        batch = pool or _axes(q_sharding, 0) or _axes(table_sharding, 0) or _axes(lens_sharding, 0)
        if pool and set(pool) != set(batch):
            raise ValueError(f"a page-sharded paged kv_cache must be sharded over the batch axes; got pool axes "
                             f"{pool} and batch axes {batch}")
        batch = pool or batch
        _check_divides(mesh, pool, kv_shape[0], "the paged kv_cache's num_blocks (axis 0)")
        sequence = ()
    else:
        batch = _axes(kv_sharding, 0) or _axes(q_sharding, 0) or _axes(lens_sharding, 0)
        # The 576 axis cannot be split (every score needs all of it): its axes move to N.
        sequence = _minus(_axes(kv_sharding, 1) + _axes(kv_sharding, 2), batch)
        _check_divides(mesh, sequence, kv_shape[1], "the kv_cache's N (axis 1)")
        pool = ()
    heads = _minus(_axes(q_sharding, 2), batch + sequence)
    _check_divides(mesh, batch, b, "the batch B (q axis 0)")
    _check_divides(mesh, heads, h, "the heads H (q axis 2)")
    return DecodePartition(batch, heads, sequence, pool)


def _combine(out, lse, axes: Axes):
    """LSE-weighted merge of per-shard partials over `axes` (collectives; a shard with no key has lse -inf).
    out [B, S_q, H, D_v], lse [B, S_q, H] -> merged (out in out's dtype, lse float32)."""
    name = axes if len(axes) > 1 else axes[0]
    m = jax.lax.pmax(lse, name)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m), 0.0)
    denom = jax.lax.psum(w, name)
    num = jax.lax.psum(w[..., None] * out.astype(jnp.float32), name)
    safe = jnp.where(denom > 0, denom, 1.0)
    merged = jnp.where(denom[..., None] > 0, num / safe[..., None], 0.0).astype(out.dtype)
    return merged, jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)


def _context_parallel_body(body: DecodeBody, causal: bool, capacity: int, axes: Axes):
    """body on one N-slice with global causal limits, then the cross-device combine."""

    def run(q, kv, lens, *extras):
        n_local = kv.shape[-2]
        offset = _shard_index(axes) * n_local
        s_q = q.shape[1]
        seqlen = jnp.clip(lens, 0, capacity)
        if not causal or s_q == 1:
            # Causal with S_q = 1 sees keys < seqlen: the same as non-causal.
            out, lse = body(q, kv, jnp.clip(seqlen - offset, 0, n_local).astype(jnp.int32), None, False, *extras)
        else:
            parts = [body(q[:, i:i + 1], kv, jnp.clip(seqlen - (s_q - 1 - i) - offset, 0, n_local).astype(jnp.int32),
                          None, False, *extras)
                     for i in range(s_q)]
            out = jnp.concatenate([o for o, _ in parts], axis=1)
            lse = jnp.concatenate([l for _, l in parts], axis=1)
        return _combine(out, lse, axes)

    return run


def _local_pages_body(body: DecodeBody, causal: bool, axes: Axes):
    """Paged DP over per-device pools: global block-table entries become local ones; a sequence that reads
    a page outside this device's slice gets NaN."""

    def run(q, pool, lens, table, *extras):
        pages, page_size = pool.shape[-3], pool.shape[-2]
        local = table - _shard_index(axes) * pages
        seqlen = jnp.clip(lens, 0, table.shape[1] * page_size)
        used = jnp.arange(table.shape[1])[None, :] < (-(-seqlen // page_size))[:, None]
        foreign = jnp.any(used & ((local < 0) | (local >= pages)), axis=1)            # [B]
        out, lse = body(q, pool, lens, local, causal, *extras)
        out = jnp.where(foreign[:, None, None, None], jnp.nan, out).astype(out.dtype)
        return out, jnp.where(foreign[:, None, None], jnp.nan, lse)

    return run


def _one_layer(sharding, mesh):
    """The sharding of one layer of a stacked cache (its layer axis dropped); ValueError if that axis is
    sharded: every shard needs every layer it may be asked for, and the layer is data."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * 4
    if spec[0] is not None:
        raise ValueError(f"a layer-stacked kv_cache cannot be sharded on its layer axis (axis 0), got {sharding.spec}: "
                         "shard B, N or the page axis instead")
    return NamedSharding(mesh, P(*spec[1:4]))


def partitioned_decode(body: DecodeBody, *, causal: bool) -> Callable:
    """decode(q, kv_cache, cache_seqlens, block_table, *extras) -> (out, lse), partitioned under jit.

    `body` is the per-shard function of one implementation (DecodeBody); `causal` the op's flag; extras are
    small operands given whole to every shard, or None (passed on as None): the layer of a stacked cache
    (kv_cache [L, ...], whose layer axis must not be sharded) and an FP8 cache's scale. On one device, inside
    `shard_map`, or on replicated inputs the body runs as is.
    """

    @functools.lru_cache(maxsize=None)
    def wrapper(paged: bool, stacked: bool, extra_ranks: tuple):
        # extra_ranks: one entry per extra, None where the extra is None, else its rank.
        def full_body(q, kv, lens, table, causal, *arrays):
            it = iter(arrays)
            return body(q, kv, lens, table, causal, *(None if r is None else next(it) for r in extra_ranks))

        def fn(q, kv, lens, *rest):
            table, arrays = (rest[0], rest[1:]) if paged else (None, rest)
            return full_body(q, kv, lens, table, causal, *arrays)

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            q_s, kv_s, lens_s = arg_shapes[:3]
            table_s = arg_shapes[3] if paged else None
            arrays = arg_shapes[4 if paged else 3:]
            kv_sharding = _one_layer(kv_s.sharding, mesh) if stacked else kv_s.sharding
            kv_shape = kv_s.shape[1:] if stacked else kv_s.shape
            plan = plan_decode_partition(mesh, q_s.sharding, kv_sharding, lens_s.sharding,
                                         table_s.sharding if paged else None, q_s.shape, kv_shape, paged)
            bt, hd, sq = plan.batch, plan.heads, plan.sequence
            q_sh = _named(mesh, bt, (), hd, ())
            outs = (_named(mesh, bt, (), hd, ()), _named(mesh, bt, (), hd))
            layer_axis = ((),) if stacked else ()
            if paged:
                args = (q_sh, _named(mesh, *layer_axis, plan.pool, (), ()), _named(mesh, bt), _named(mesh, bt, ()))
                lower = _local_pages_body(full_body, causal, plan.pool) if plan.pool else fn
            else:
                args = (q_sh, _named(mesh, *layer_axis, bt, sq, ()), _named(mesh, bt))
                lower = _context_parallel_body(full_body, causal, kv_shape[1], sq) if sq else fn
            return mesh, lower, outs, args + tuple(_named(mesh, *(() for _ in a.shape)) for a in arrays)

        wrapped = custom_partitioning(fn)
        # Separate factors for q's and the cache's D: the cache's 576-axis sharding must not spread to q.
        # Extras get factors of their own (z0, z1, ...), which partition() keeps replicated.
        cache = ("l " if stacked else "") + ("p g e" if paged else "b n e")
        extras = "".join(", " + " ".join(f"z{k}{d}" for d in range(r)) for k, r in enumerate(extra_ranks)
                         if r is not None)
        rule = f"b s h d, {cache}, b" + (", b m" if paged else "") + extras + " -> b s h v, b s h"
        wrapped.def_partition(partition=partition, sharding_rule=rule)
        return wrapped

    def decode(q, kv_cache, cache_seqlens, block_table, *extras):
        paged = block_table is not None
        ranks = tuple(None if e is None else e.ndim for e in extras)
        arrays = tuple(e for e in extras if e is not None)
        return tuple(wrapper(paged, kv_cache.ndim == 4, ranks)(q, kv_cache, cache_seqlens,
                                                                *((block_table,) if paged else ()), *arrays))

    return decode


# ---------------------------------------------------------------------------------------------- cache append


def _append_slice(kv, seqlens, kv_new, num_new, capacity: int, offset):
    """LatentCache.append on a contiguous cache slice holding positions [offset, offset + N_local).

    kv [B, N_local, D]; seqlens, num_new [B] int32; kv_new [B, S, D] in kv's dtype; capacity the global N.
    Returns (kv, new seqlens): token s of sequence b goes to global position clip(seqlens, 0, capacity) + s
    when s < clip(num_new, 0, S) and the position is < capacity (cache.py's rule), and this slice keeps the
    ones that land in it.
    """
    b, n_local, d = kv.shape
    s = kv_new.shape[1]
    start = jnp.clip(seqlens, 0, capacity)
    count = jnp.clip(num_new, 0, s)
    pos = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    local = pos - offset
    keep = (jnp.arange(s)[None, :] < count[:, None]) & (pos < capacity) & (local >= 0) & (local < n_local)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None] * n_local + local
    # Dropped tokens get distinct indices past the end, so the indices stay unique and mode="drop" skips them.
    rows = jnp.where(keep, rows, b * n_local + jnp.arange(b * s, dtype=jnp.int32).reshape(b, s))
    flat = kv.reshape(-1, d).at[rows.reshape(-1)].set(kv_new.reshape(-1, d), mode="drop", unique_indices=True)
    return flat.reshape(kv.shape), jnp.minimum(start + count, capacity)


@functools.lru_cache(maxsize=None)
def _append_partitioned(capacity: int):
    def fn(kv, seqlens, kv_new, num_new):
        return _append_slice(kv, seqlens, kv_new, num_new, capacity, 0)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        kv_s, _, new_s, _ = arg_shapes
        batch = _axes(kv_s.sharding, 0)
        sequence = _minus(_axes(kv_s.sharding, 1) + _axes(kv_s.sharding, 2), batch)
        _check_divides(mesh, batch, kv_s.shape[0], "the cache's batch B (kv axis 0)")
        _check_divides(mesh, sequence, kv_s.shape[1], "the cache's N (kv axis 1)")
        kv_sh, lens_sh = _named(mesh, batch, sequence, ()), _named(mesh, batch)

        def lower(kv, seqlens, kv_new, num_new):
            return _append_slice(kv, seqlens, kv_new, num_new, capacity, _shard_index(sequence) * kv.shape[1])

        return mesh, lower, (kv_sh, lens_sh), (kv_sh, lens_sh, _named(mesh, batch, (), ()), lens_sh)

    wrapped = custom_partitioning(fn)
    wrapped.def_partition(partition=partition, sharding_rule="b n d, b, b s e, b -> b n d, b")
    return wrapped


def append_contiguous(kv, seqlens, kv_new, num_new):
    """LatentCache.append's write into a contiguous cache, partitioned under jit: batch- and sequence-sharded
    caches write their own rows with no communication (a sequence-sharded cache is never gathered, which
    XLA's own scatter partitioning does). kv [B, N, D]; seqlens, num_new [B] int32; kv_new [B, S, D] in
    kv's dtype -> (kv, seqlens). A batch-sharded paged pool needs no rule: XLA partitions that scatter
    itself (each device applies the updates that fall in its pages)."""
    return _append_partitioned(kv.shape[1])(kv, seqlens, kv_new, num_new)


# ---------------------------------------------------------------------------------------------- prefill


def plan_prefill_partition(mesh, q_sharding, k_sharding, q_shape: tuple, k_shape: tuple) -> tuple[Axes, Axes, bool]:
    """(batch axes, head axes, k/v heads sharded too) for one prefill call (module docstring's rules)."""
    b, _, h, _ = q_shape
    h_kv = k_shape[2]
    batch = _axes(q_sharding, 0) or _axes(k_sharding, 0)
    heads = _minus(_axes(q_sharding, 2) or _axes(k_sharding, 2), batch)
    _check_divides(mesh, batch, b, "the batch B (q axis 0)")
    _check_divides(mesh, heads, h, "the heads H (q axis 2)")
    if heads and h_kv % _size(mesh, heads) and h_kv != 1:
        raise ValueError(f"mesh axis {_entry(heads)!r} (size {_size(mesh, heads)}) shards q's H = {h} but divides "
                         f"neither k/v's H_kv = {h_kv} nor is H_kv 1: a shard's query heads would need KV heads "
                         "of other shards")
    return batch, heads, bool(heads) and h_kv % _size(mesh, heads) == 0


def partition_prefill(forward: Callable, backward: Callable) -> tuple[Callable, Callable]:
    """Wraps ops/prefill.py's kernel launchers (same signatures) in partitioning rules.

    forward(q, k, v, segment_ids, scale, plan) -> (out [B, S, H, d_v], lse [B, H, S]);
    backward(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan) -> (dq, dk, dv).
    q [B, S, H, d_qk]; k [B, S, H_kv, d_qk]; v [B, S, H_kv, d_v]; segment_ids None or [B, S] int32;
    plan the PrefillPlan (None for the jnp bodies of `xla_prefill_bodies`). A plan for "interpret" passes
    through unwrapped (host callbacks cannot run inside custom_partitioning).
    """

    def specs(mesh, arg_shapes, with_seg):
        q_s, k_s = arg_shapes[0], arg_shapes[1]
        batch, heads, kv_sharded = plan_prefill_partition(mesh, q_s.sharding, k_s.sharding, q_s.shape, k_s.shape)
        kvh = heads if kv_sharded else ()
        qs = _named(mesh, batch, (), heads, ())
        kvs = _named(mesh, batch, (), kvh, ())
        lse = _named(mesh, batch, heads, ())
        seg = (_named(mesh, batch, ()),) if with_seg else ()
        # k/v replicated over the head axes (H_kv = 1): each shard's dK, dV is a partial sum.
        reduce_axes = heads if heads and not kv_sharded else ()
        return qs, kvs, lse, seg, reduce_axes

    def interpreted(plan):
        return plan is not None and plan.implementation == "interpret"

    def fwd(q, k, v, segment_ids, scale, plan):
        if interpreted(plan):
            return forward(q, k, v, segment_ids, scale, plan)
        with_seg = segment_ids is not None

        def fn(q, k, v, *seg):
            return forward(q, k, v, seg[0] if seg else None, scale, plan)

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            qs, kvs, lse, seg, _ = specs(mesh, arg_shapes, with_seg)
            return mesh, fn, (qs, lse), (qs, kvs, kvs) + seg

        wrapped = custom_partitioning(fn)
        wrapped.def_partition(partition=partition, sharding_rule=(
            "b s h d, b s k d, b s k e" + (", b s" if with_seg else "") + " -> b s h e, b h s"))
        return tuple(wrapped(q, k, v, *((segment_ids,) if with_seg else ())))

    def bwd(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan):
        if interpreted(plan):
            return backward(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan)
        with_seg = segment_ids is not None

        def fn(q, k, v, *rest):
            seg, (out, lse, dout, dlse) = (rest[0], rest[1:]) if with_seg else (None, rest)
            return backward(q, k, v, seg, out, lse, dout, dlse, scale, plan)

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            qs, kvs, lse_s, seg, reduce_axes = specs(mesh, arg_shapes, with_seg)

            def lower(*args):
                dq, dk, dv = fn(*args)
                if reduce_axes:
                    name = reduce_axes if len(reduce_axes) > 1 else reduce_axes[0]
                    dk, dv = (jax.lax.psum(x.astype(jnp.float32), name).astype(x.dtype) for x in (dk, dv))
                return dq, dk, dv

            return mesh, lower, (qs, kvs, kvs), (qs, kvs, kvs) + seg + (qs, lse_s, qs, lse_s)

        wrapped = custom_partitioning(fn)
        wrapped.def_partition(partition=partition, sharding_rule=(
            "b s h d, b s k d, b s k e" + (", b s" if with_seg else "")
            + ", b s h e, b h s, b s h e, b h s -> b s h d, b s k d, b s k e"))
        return tuple(wrapped(q, k, v, *((segment_ids,) if with_seg else ()), out, lse, dout, dlse))

    return fwd, bwd


def xla_prefill_bodies(causal: bool = True) -> tuple[Callable, Callable]:
    """(forward, backward) with the kernel launchers' signatures, computed by the jnp reference: the pure-JAX
    bodies the CPU tests run through `partition_prefill` with plan None (the rules are the same for the
    Triton kernels)."""
    from flashmla_jax import reference

    def forward(q, k, v, segment_ids, scale, plan):
        del plan
        out, lse = reference.mla_prefill_reference(q, k, v, softmax_scale=scale, causal=causal,
                                                   segment_ids=segment_ids)
        return out, lse.transpose(0, 2, 1)

    def backward(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan):
        del out, lse
        _, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, segment_ids, scale, plan), q, k, v)
        return vjp((dout, dlse))

    return forward, backward
