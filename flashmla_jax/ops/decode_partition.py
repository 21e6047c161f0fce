"""Partitioning rules of `mla_decode`: plain `jax.jit` over NamedSharding inputs runs it per shard instead of
gathering the cache (flashmla_jax/_mesh.py says how a rule wraps a body; flashmla_jax/sharding.py has the named
layouts).

Layouts, with mesh axes read from the operands' NamedShardings. D below is the product of the sizes of the mesh
axes in a role.
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
Resharding rules for shardings the op cannot use (all documented, none gathers the whole cache):
  * q's S_q or 576 axis, the cache's page-size axis, the block table's block axis: replicated (small).
  * the contiguous cache's 576 axis: moved to its N axis (an all-to-all; each device keeps 1/D of the cache),
    i.e. such an axis becomes a sequence axis.
  * a paged pool sharded other than on its page axis over the batch axes: ValueError (there is no
    layout that uses it without gathering the pool).
  * a mesh axis (or axes) whose size does not divide the dimension it shards: ValueError naming both.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from flashmla_jax._mesh import Axes, axes_of, check_divides, collective_axis, minus, named, shard_index


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
        pool = axes_of(kv_sharding, 0)
        other = axes_of(kv_sharding, 1) + axes_of(kv_sharding, 2)
        if other:
            raise ValueError(f"a paged kv_cache [num_blocks, page_size, D] can be sharded only on its page axis "
                             f"(over the batch axes), got {kv_sharding.spec}: sharding page_size or D would "
                             "need the pool gathered")
        batch = pool or axes_of(q_sharding, 0) or axes_of(table_sharding, 0) or axes_of(lens_sharding, 0)
        if pool and set(pool) != set(batch):
            raise ValueError(f"a page-sharded paged kv_cache must be sharded over the batch axes; got pool axes "
                             f"{pool} and batch axes {batch}")
        batch = pool or batch
        check_divides(mesh, pool, kv_shape[0], "the paged kv_cache's num_blocks (axis 0)")
        sequence = ()
    else:
        batch = axes_of(kv_sharding, 0) or axes_of(q_sharding, 0) or axes_of(lens_sharding, 0)
        # The 576 axis cannot be split (every score needs all of it): its axes move to N.
        sequence = minus(axes_of(kv_sharding, 1) + axes_of(kv_sharding, 2), batch)
        check_divides(mesh, sequence, kv_shape[1], "the kv_cache's N (axis 1)")
        pool = ()
    heads = minus(axes_of(q_sharding, 2), batch + sequence)
    check_divides(mesh, batch, b, "the batch B (q axis 0)")
    check_divides(mesh, heads, h, "the heads H (q axis 2)")
    return DecodePartition(batch, heads, sequence, pool)


def _combine(out, lse, axes: Axes):
    """LSE-weighted merge of per-shard partials over `axes` (collectives; a shard with no key has lse -inf).
    out [B, S_q, H, D_v], lse [B, S_q, H] -> merged (out in out's dtype, lse float32). A NaN LSE on any shard
    makes the row NaN; a partial of weight 0 is never multiplied in (a kernel's row whose keys all scored -inf
    has NaN output and a finite LSE below every real one: weight 0 beside a real partial, kept when all are)."""
    name = collective_axis(axes)
    poisoned = jax.lax.psum(jnp.isnan(lse).astype(jnp.int32), name) > 0
    m = jax.lax.pmax(jnp.where(jnp.isnan(lse), -jnp.inf, lse), name)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m), 0.0)
    denom = jax.lax.psum(w, name)
    num = jax.lax.psum(jnp.where(w[..., None] > 0, w[..., None] * out.astype(jnp.float32), 0.0), name)
    safe = jnp.where(denom > 0, denom, 1.0)
    merged = jnp.where(denom[..., None] > 0, num / safe[..., None], 0.0)
    merged = jnp.where(poisoned[..., None], jnp.nan, merged).astype(out.dtype)
    return merged, jnp.where(poisoned, jnp.nan, jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf))


def _context_parallel_body(body: DecodeBody, causal: bool, capacity: int, axes: Axes):
    """body on one N-slice with global causal limits, then the cross-device combine."""

    def run(q, kv, lens, *extras):
        n_local = kv.shape[-2]
        offset = shard_index(axes) * n_local
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
        local = table - shard_index(axes) * pages
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
            q_sh = named(mesh, bt, (), hd, ())
            outs = (named(mesh, bt, (), hd, ()), named(mesh, bt, (), hd))
            layer_axis = ((),) if stacked else ()
            if paged:
                args = (q_sh, named(mesh, *layer_axis, plan.pool, (), ()), named(mesh, bt), named(mesh, bt, ()))
                lower = _local_pages_body(full_body, causal, plan.pool) if plan.pool else fn
            else:
                args = (q_sh, named(mesh, *layer_axis, bt, sq, ()), named(mesh, bt))
                lower = _context_parallel_body(full_body, causal, kv_shape[1], sq) if sq else fn
            return mesh, lower, outs, args + tuple(named(mesh, *(() for _ in a.shape)) for a in arrays)

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
