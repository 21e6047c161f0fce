"""Multi-device checks of the partitioning rules, run in their own process (the device count is fixed when
JAX starts, and the rest of the suite runs on one device). tests/test_sharding.py runs this on 8 CPU host
devices; on GPUs run it directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py          # CPU, xla
    python tests/sharding_checks.py --impl triton                                              # 2 or 4 GPUs

Prints one JSON line per check: {"name", "ok", "detail"}; exits 1 when a check fails. Meshes are built from
the devices there are: n for 1-D layouts, (2, n / 2) for 2-D ones.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

if __name__ == "__main__":      # before jax starts; only the CPU platform reads it
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import flashmla_jax as fm
from flashmla_jax import sharding
from flashmla_jax.ops.prefill_partition import partition_prefill
from _util import rel_err, xla_prefill_bodies

D, D_V = 576, 512
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def same_lse(lse, ref, tol):
    lse, ref = np.asarray(lse), np.asarray(ref)
    if not np.array_equal(np.isinf(lse), np.isinf(ref)) or np.isnan(lse).any():
        return False
    f = np.isfinite(ref)
    return bool(np.allclose(lse[f], ref[f], rtol=tol, atol=tol))


_GATHER = re.compile(r"=\s*(\(?[a-z0-9]+\[[0-9,]*\][^=]*?)\s+all-gather(?:-start)?\(")
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def latent_gathers(hlo: str, rows: int, width: int = D) -> list[str]:
    """The all-gathers of latent rows in compiled HLO text: every `all-gather` (or `all-gather-start`)
    instruction with a result shape whose last dimension is `width` (576, the latent / absorbed-q width) and
    that holds at least `rows` x `width` elements (`rows` = N, one whole sequence of the cache)."""
    found = []
    for line in hlo.splitlines():
        m = _GATHER.search(line)
        if not m:
            continue
        for dims in _SHAPE.findall(m.group(1)):
            shape = [int(x) for x in dims.split(",") if x]
            if shape and shape[-1] == width and np.prod(shape) >= rows * width:
                found.append(line.strip()[:200])
    return found


def meshes():
    devs = np.array(jax.devices())
    n = len(devs)
    one = lambda name: Mesh(devs, (name,))
    two = lambda a, b: Mesh(devs.reshape(2, n // 2), (a, b))
    return n, one, two


def layouts(paged: bool):
    n, one, two = meshes()
    out = {"dp": sharding.data_parallel(one("data")), "tp": sharding.tensor_parallel(one("model")),
           "dp_tp": sharding.data_tensor_parallel(two("data", "model"))}
    if paged:
        out["dp_replicated_pool"] = sharding.data_parallel(one("data"), pool="replicated")
    else:
        out["cp"] = sharding.context_parallel(one("seq"))
        out["dp_cp"] = sharding.data_context_parallel(two("data", "seq"))
    return out


def decode_inputs(seed, b, s_q, h, n, dtype, page=None):
    """Random q, cache, ragged lengths with zeros; paged: per-device-slice pages in shuffled order with
    NaN in unused rows, and a block table of global indices."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, s_q, h, D)), dtype)
    kv = rng.standard_normal((b, n, D)).astype(np.float32)
    lens = rng.integers(1, n + 1, b)
    lens[[0, b // 2]] = 0
    lens[1] = n
    for i in range(b):
        kv[i, lens[i]:] = np.nan                   # never read: a leak shows as NaN
    if page is None:
        return q, jnp.asarray(kv, dtype), jnp.asarray(lens, jnp.int32), None
    per = n // page
    n_dev = len(jax.devices())
    # Shuffle pages inside each device's share so that the per-device-pool layout holds for any D | B.
    table = np.arange(b * per).reshape(b, per)
    for k in range(n_dev):
        lo, hi = k * b * per // n_dev, (k + 1) * b * per // n_dev
        table.reshape(-1)[lo:hi] = rng.permutation(np.arange(lo, hi))
    pool = np.full((b * per, page, D), np.nan, np.float32)
    pool[table.reshape(-1)] = kv.reshape(b * per, page, D)
    return q, jnp.asarray(pool, dtype), jnp.asarray(lens, jnp.int32), jnp.asarray(table, jnp.int32)


def _decode_case(impl, paged, s_q, dtype, tol):
    b, h, n = 8, 8, 64
    q, kv, lens, table = decode_inputs(s_q * 10 + paged, b, s_q, h, n, dtype, 16 if paged else None)
    f = jax.jit(lambda q, kv, l, t: fm.mla_decode(q, kv, l, t, head_dim_v=D_V, softmax_scale=0.05,
                                                  return_lse=True, implementation=impl))
    ref_out, ref_lse = f(q, kv, lens, table)
    detail = {}
    ok = True
    for name, layout in layouts(paged).items():
        args = sharding.shard_decode_inputs(layout, q, kv, lens, table)
        out, lse = f(*args)
        gathers = latent_gathers(f.lower(*args).compile().as_text(), n)
        err = rel_err(out, ref_out)
        good = (err < tol and same_lse(lse, ref_lse, tol) and not gathers
                and out.sharding.is_equivalent_to(layout.sharding(layout.out), 4))
        ok &= good
        detail[name] = dict(err=err, gathers=gathers[:2], out_spec=str(out.sharding.spec), ok=good)
    return ok, detail


def tol_for(impl):
    return 1e-5 if impl == "xla" else 2e-3          # the kernels use TF32 for float32 on the GPU


@check
def decode_contiguous_sq1(impl):
    return _decode_case(impl, False, 1, jnp.float32, tol_for(impl))


@check
def decode_contiguous_sq2_causal(impl):
    return _decode_case(impl, False, 2, jnp.float32, tol_for(impl))


@check
def decode_paged(impl):
    return _decode_case(impl, True, 1, jnp.float32, tol_for(impl))


def _put_cache(cache, layout, paged: bool):
    """A cache placed as the layout says, any last width (FP8 bytes too); a layer-stacked one [L, ...] as
    the layout places one layer, its layer axis unsharded."""
    spec = tuple(layout.paged_kv_cache if paged else layout.kv_cache)
    return jax.device_put(cache, layout.sharding(P(*(None,) * (cache.ndim - len(spec)), *spec)))


def _compare_sharded(impl, f, ref, args, rows: int, width: int = D):
    """f(*args) over sharded args against the unsharded result `ref`: (ok, detail) with the relative error and
    the all-gathers of latent rows (`latent_gathers` with `rows`, `width`) in the compiled HLO."""
    out = f(*args)
    gathers = latent_gathers(f.lower(*args).compile().as_text(), rows, width)
    err = rel_err(out, ref)
    good = err < tol_for(impl) and not gathers
    return good, dict(err=err, gathers=gathers[:2], ok=good)


@check
def decode_stacked(impl):
    """A layer-stacked cache [L, ...] read at a traced layer: every layout (contiguous and paged) equals the
    unsharded call, with no all-gather of latent rows; the layer axis itself is never sharded."""
    ok, detail = True, {}
    for paged in (False, True):
        b, h, n, layers = 8, 8, 64, 3
        q, kv, lens, table = decode_inputs(40 + paged, b, 1, h, n, jnp.float32, 16 if paged else None)
        # Layers that differ, laid out alike (one block table for all): layer i holds (i + 1) * the cache.
        stack = kv[None] * jnp.arange(1, layers + 1, dtype=kv.dtype)[:, None, None, None]
        f = jax.jit(lambda q, kv, l, t, i: fm.mla_decode(q, kv, l, t, head_dim_v=D_V, softmax_scale=0.05,
                                                         implementation=impl, layer=i))
        layer = jnp.int32(layers - 1)
        ref = f(q, stack, lens, table, layer)
        for name, layout in layouts(paged).items():
            sq, _, sl, st = sharding.shard_decode_inputs(layout, q, stack[0], lens, table)
            skv = _put_cache(stack, layout, paged)
            good, detail[f"{'paged' if paged else 'contiguous'}_{name}"] = _compare_sharded(
                impl, f, ref, (sq, skv, sl, st, layer), n)
            ok &= good
    return ok, detail


@check
def decode_fp8(impl):
    """FP8 caches (blockscale; pertensor stacked with one scale per layer, an [L] operand every shard gets
    whole) under DP, TP and CP equal the unsharded call, with no all-gather of cache rows."""
    b, h, n = 8, 8, 64
    q, kv, lens, _ = decode_inputs(60, b, 1, h, n, jnp.float32)
    kv = jnp.nan_to_num(kv)                                   # quantize_latent wants finite latents
    block = fm.quantize_latent(kv, "fp8_blockscale")
    stack = jnp.stack([kv, 0.5 * kv])
    per, scale = fm.quantize_latent(stack, "fp8_pertensor")
    scales = jnp.stack([scale, scale])
    cases = {
        "blockscale": (block, None, None, "fp8_blockscale"),
        "pertensor_stacked": (per, jnp.int32(1), scales, "fp8_pertensor"),
    }
    ok, detail = True, {}
    for case, (cache, layer, kv_scale, fmt) in cases.items():
        f = jax.jit(lambda q, c, l, i, s: fm.mla_decode(q, c, l, head_dim_v=D_V, softmax_scale=0.05, layer=i,
                                                        kv_format=fmt, kv_scale=s, implementation=impl))
        ref = f(q, cache, lens, layer, kv_scale)
        for name, layout in layouts(False).items():
            sq, _, sl, _ = sharding.shard_decode_inputs(layout, q, kv, lens)
            sc = _put_cache(cache, layout, False)
            good, detail[f"{case}_{name}"] = _compare_sharded(impl, f, ref, (sq, sc, sl, layer, kv_scale), n,
                                                               cache.shape[-1])
            ok &= good
    return ok, detail


@check
def decode_paged_foreign_page_is_nan(impl):
    """Per-device pools: a sequence reading another device's page gets NaN, the others stay exact."""
    q, kv, lens, table = decode_inputs(5, 8, 1, 4, 64, jnp.float32, 16)
    table = table.at[2, 0].set(table[7, 0])            # sequence 2 (device 2 of 8, or 0 of 2) -> last device
    lens = lens.at[2].set(20)
    layout = layouts(True)["dp"]
    out = fm.mla_decode(*sharding.shard_decode_inputs(layout, q, kv, lens, table), head_dim_v=D_V,
                        implementation=impl)
    nan_rows = np.isnan(np.asarray(out)).any(axis=(1, 2, 3))
    return bool(nan_rows[2] and nan_rows.sum() == 1), dict(nan_rows=nan_rows.tolist())


@check
def decode_context_parallel_row_rules(impl):
    """Context parallel (N over every device): keys scoring -inf that fill one device's slice of a sequence get
    no weight (the rows stay finite, as unsharded), a row whose every visible score is -inf is NaN, and a NaN
    key on one device makes its sequence's rows NaN."""
    q, kv, lens, _ = decode_inputs(16, 8, 1, 4, 64, jnp.float32)
    kv, lens = jnp.nan_to_num(kv), jnp.full((8,), 64, jnp.int32)
    q = q.at[..., D_V + 1].set(jnp.abs(q[..., D_V + 1]) + 0.5).at[3, 0, 2, 0].set(-jnp.inf)
    kv = kv.at[..., 0].set(jnp.abs(kv[..., 0]) + 0.5)
    kv = kv.at[1, :8, D_V + 1].set(-jnp.inf).at[5, 40, 7].set(jnp.nan)    # sequence 1: device 0's keys
    f = jax.jit(lambda q, kv, l: fm.mla_decode(q, kv, l, head_dim_v=D_V, softmax_scale=0.05, return_lse=True,
                                               implementation=impl))
    want_nan = np.zeros((8, 1, 4), bool)
    want_nan[3, 0, 2] = want_nan[5] = True
    detail, ok = {}, True
    for name in ("cp", "dp_cp"):
        out, lse = f(*sharding.shard_decode_inputs(layouts(False)[name], q, kv, lens)[:3])
        ref, ref_lse = f(q, kv, lens)
        nan_rows = np.isnan(np.asarray(lse)) & np.isnan(np.asarray(out)).all(axis=-1)
        keep = ~want_nan
        err = rel_err(np.asarray(out)[keep], np.asarray(ref)[keep])
        detail[name] = dict(err=err, nan_rows=int(nan_rows.sum()))
        ok &= bool((nan_rows == want_nan).all() and err < 1e-5
                   and np.isfinite(np.asarray(ref)[1]).all() and (np.isnan(np.asarray(ref_lse)) == want_nan).all())
    return ok, detail


def _masked_err(got, want) -> float:
    """rel_err over want's finite entries; inf unless got is finite exactly there."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)
    return rel_err(got[finite], want[finite]) if (np.isfinite(got) == finite).all() else float("inf")


@check
def sparse_ops_batch_and_heads(impl):
    """mla_decode_sparse (with topk_length, and a stacked pool at a traced layer) and mla_prefill_sparse under
    jit over q / indices sharded on B (T) and q on H: equal to the unsharded call, the outputs sharded alike, no
    all-gather in the compiled program; a sharded pool raises ValueError naming the pool (from the partitioner:
    XLA wraps it in JaxRuntimeError)."""
    _, one, two = meshes()
    rng = np.random.default_rng(17)
    b, s_q, h, n, topk = 8, 2, 8, 256, 64
    q = jnp.asarray(rng.standard_normal((b, s_q, h, D)), jnp.float32)
    pool = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    idx = jnp.asarray(rng.integers(-8, n, (b, s_q, topk)), jnp.int32)
    lens = jnp.asarray(rng.integers(0, topk + 1, b), jnp.int32)
    stack = jnp.stack([pool, -pool])
    decode = jax.jit(lambda q, p, i, l: fm.mla_decode_sparse(q, p, i, l, softmax_scale=0.05, head_dim_v=D_V,
                                                             return_lse=True, implementation=impl))
    stacked = jax.jit(lambda q, p, i, layer: fm.mla_decode_sparse(q, p, i, softmax_scale=0.05, head_dim_v=D_V,
                                                                  layer=layer, implementation=impl))
    prefill = jax.jit(lambda q, kv, i: fm.mla_prefill_sparse(q, kv, i, softmax_scale=0.05, head_dim_v=D_V,
                                                             implementation=impl))
    want = decode(q, pool, idx, lens)
    want_stacked = stacked(q, stack, idx, jnp.int32(1))
    qp, ip = q.reshape(b * s_q, h, D), idx.reshape(b * s_q, topk)
    want_prefill = prefill(qp, pool, ip)
    detail, ok = {}, True
    for name, mesh, q_spec in (("dp", one("data"), P("data")), ("tp", one("model"), P(None, None, "model")),
                               ("dp_tp", two("data", "model"), P("data", None, "model"))):
        put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
        rows = P((tuple(q_spec) + (None,))[0])
        args = (put(q, q_spec), put(pool, P()), put(idx, rows), put(lens, rows))
        out, lse = decode(*args)
        got_stacked = stacked(args[0], put(stack, P()), args[2], jnp.int32(1))
        spec = tuple(q_spec) + (None,) * 4
        pf_spec = P(spec[0], spec[2])                                     # the prefill's q [T, H, D]
        got_prefill = prefill(put(qp, pf_spec), put(pool, P()), put(ip, P(pf_spec[0])))
        hlo = decode.lower(*args).compile().as_text() + prefill.lower(
            put(qp, pf_spec), put(pool, P()), put(ip, P(pf_spec[0]))).compile().as_text()
        pairs = [(out, want[0]), (lse, want[1]), *zip(got_stacked, want_stacked), *zip(got_prefill, want_prefill)]
        errs = [_masked_err(g, w) for g, w in pairs]
        sharded = out.sharding.is_equivalent_to(NamedSharding(mesh, P(*(tuple(q_spec) + (None,) * 4)[:4])), 4)
        detail[name] = dict(max_err=max(errs), all_gathers=hlo.count("all-gather"), out_sharded_as_q=sharded)
        ok &= max(errs) < 1e-5 and "all-gather" not in hlo and sharded
    try:
        decode(q, jax.device_put(pool, NamedSharding(one("data"), P("data"))), idx, lens)
        ok, detail["sharded_pool"] = False, "no error"
    except Exception as e:                      # noqa: BLE001 (JaxRuntimeError around the partitioner's ValueError)
        line = next((l for l in str(e).splitlines() if "ValueError" in l), str(e))
        detail["sharded_pool"] = line[:160]
        ok &= "ValueError" in line and "pool" in line
    return ok, detail


@check
def decode_cache_sharded_on_576_moves_to_n(impl):
    """The documented rule for the cache's D axis: its mesh axis moves to N (all-to-all), never a gather."""
    q, kv, lens, _ = decode_inputs(6, 8, 1, 8, 64, jnp.float32)
    _, one, _ = meshes()
    mesh = one("x")
    f = jax.jit(lambda *a: fm.mla_decode(*a, head_dim_v=D_V, implementation=impl))
    args = (jax.device_put(q, NamedSharding(mesh, P())), jax.device_put(kv, NamedSharding(mesh, P(None, None, "x"))),
            jax.device_put(lens, NamedSharding(mesh, P())))
    hlo = f.lower(*args).compile().as_text()
    err = rel_err(f(*args), f(q, kv, lens))
    gathers = latent_gathers(hlo, 64)
    return err < tol_for(impl) and not gathers and "all-to-all" in hlo, dict(err=err, gathers=gathers[:2])


@check
def non_dividing_axis_raises(impl):
    """ValueError naming the axis and the dimension: from shard_decode_inputs, and from the partitioner under
    jit (XLA wraps it in JaxRuntimeError; the message keeps the ValueError's text)."""
    q, kv, lens, _ = decode_inputs(7, 7, 1, 8, 64, jnp.float32)   # 7, 61: divisible by no device count
    n, one, _ = meshes()
    layout = sharding.data_parallel(one("data"))
    msgs = []
    try:
        sharding.shard_decode_inputs(layout, q, kv, lens)
        msgs.append("no error")
    except ValueError as e:
        msgs.append(str(e))
    try:
        sharding.context_parallel(one("seq")).check(q.shape, (7, 61, D), False)
        msgs.append("no error")
    except ValueError as e:
        msgs.append(str(e))
    mesh = one("data")
    wsc = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    g = jax.jit(lambda q, kv, l: fm.mla_decode(wsc(q, P("data")), wsc(kv, P("data")), l, head_dim_v=D_V,
                                               implementation=impl))
    try:
        g(q, kv, lens)
        msgs.append("no error")
    except Exception as e:                      # noqa: BLE001 (JaxRuntimeError around our ValueError)
        msgs.append(str(e).split("\n")[-1] if "ValueError" not in str(e) else
                    next(l for l in str(e).splitlines() if "ValueError" in l))
    ok = ("'data'" in msgs[0] and "B (q axis 0) = 7" in msgs[0] and "'seq'" in msgs[1] and "N (axis 1) = 61" in msgs[1]
          and "ValueError" in msgs[2] and "'data'" in msgs[2] and "= 7" in msgs[2])
    return ok, dict(messages=msgs)


@check
def paged_pool_sharded_on_576_raises(impl):
    q, kv, lens, table = decode_inputs(8, 8, 1, 4, 64, jnp.float32, 16)
    _, one, _ = meshes()
    mesh = one("data")
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    try:
        fm.mla_decode(put(q, P("data")), put(kv, P(None, None, "data")), put(lens, P("data")), put(table, P("data")),
                      head_dim_v=D_V, implementation=impl)
        return False, "no error"
    except Exception as e:                      # noqa: BLE001
        text = str(e)
        line = next((l for l in text.splitlines() if "ValueError" in l), text[-300:])
        return "ValueError" in line and "page axis" in line, line[:300]


def _append_case(layout, paged):
    b, n = 8, 64
    cache = fm.LatentCache.create(b, n, D, jnp.float32, page_size=16 if paged else None)
    rng = np.random.default_rng(9)
    cache = cache.append(jnp.asarray(rng.standard_normal((b, 5, D)), jnp.float32), num_new=jnp.arange(b) * 3 % 6)
    new = jnp.asarray(rng.standard_normal((b, 3, D)), jnp.float32)
    want = cache.append(new, num_new=jnp.array([3, 0, 1, 3, 2, 3, 3, 1]))
    f = jax.jit(lambda c, x, m: c.append(x, num_new=m))
    args = (sharding.shard_cache(layout, cache), jax.device_put(new, layout.sharding(P(_batch(layout)))),
            jax.device_put(jnp.array([3, 0, 1, 3, 2, 3, 3, 1]), layout.sharding(layout.cache_seqlens)))
    got = f(*args)
    gathers = latent_gathers(f.lower(*args).compile().as_text(), n)
    ok = (bool(jnp.all(got.kv == want.kv)) and bool(jnp.all(got.seqlens == want.seqlens)) and not gathers
          and got.kv.sharding.is_equivalent_to(args[0].kv.sharding, 3))
    return ok, dict(gathers=gathers[:2], kv_spec=str(got.kv.sharding.spec))


def _batch(layout):
    return None if not layout.batch else (layout.batch[0] if len(layout.batch) == 1 else layout.batch)


@check
def append_layouts(impl):
    del impl
    ok, detail = True, {}
    for paged in (False, True):
        for name, layout in layouts(paged).items():
            if name.endswith("tp") or name == "tp":
                continue
            good, detail[f"{'paged' if paged else 'contiguous'}_{name}"] = _append_case(layout, paged)
            ok &= good
    return ok, detail


def _prefill_fn(impl):
    """loss(q, k, v, seg) through the partitioned prefill: the jnp bodies in the same wrappers for "xla"
    (tests the rules on the CPU), the public mla_prefill otherwise."""
    if impl != "xla":
        return lambda q, k, v, seg: fm.mla_prefill(q, k, v, segment_ids=seg, softmax_scale=0.1, return_lse=True,
                                                   implementation=impl)
    fwd, bwd = partition_prefill(*xla_prefill_bodies())

    @jax.custom_vjp
    def flash(q, k, v, seg):
        return fwd(q, k, v, seg, 0.1, None)

    def flash_fwd(q, k, v, seg):
        out, lse = fwd(q, k, v, seg, 0.1, None)
        return (out, lse), (q, k, v, seg, out, lse)

    def flash_bwd(res, cts):
        q, k, v, seg, out, lse = res
        dq, dk, dv = bwd(q, k, v, seg, out, lse, cts[0], cts[1], 0.1, None)
        return dq, dk, dv, None

    flash.defvjp(flash_fwd, flash_bwd)
    return lambda q, k, v, seg: (lambda o: (o[0], o[1].transpose(0, 2, 1)))(flash(q, k, v, seg))


@check
def prefill_gradients(impl):
    """Forward (out, lse) and gradients of a loss using both, under DP, TP and DP x TP (MHA, and MQA
    H_kv = 1 under TP, whose dK/dV are psum-reduced), equal the unsharded ones; no all-gather of q/k/v."""
    n, one, two = meshes()
    b, s, h, dq_, dv_ = 8, 64, 8, 64, 32
    rng = np.random.default_rng(11)
    fn = _prefill_fn(impl)

    def loss(q, k, v, seg, w):
        out, lse = fn(q, k, v, seg)
        return jnp.sum(out * w) + 0.1 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    cases = {"dp": (one("data"), P("data"), P("data")), "tp": (one("model"), P(None, None, "model"), None),
             "dp_tp": (two("data", "model"), P("data", None, "model"), None)}
    ok, detail = True, {}
    for h_kv in (h, 1):
        q = jnp.asarray(rng.standard_normal((b, s, h, dq_)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((b, s, h_kv, dq_)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((b, s, h_kv, dv_)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((b, s, h, dv_)), jnp.float32)
        seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, s)), axis=1), jnp.int32)
        for name, (mesh, qspec, segspec) in cases.items():
            if b % mesh.shape.get("data", 1):
                continue
            kvspec = qspec if h_kv % mesh.shape.get("model", 1) == 0 else P(qspec[0] if len(qspec) else None)
            put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
            use_seg = seg if name == "dp" else None
            args = (put(q, qspec), put(k, kvspec), put(v, kvspec),
                    None if use_seg is None else put(seg, P(qspec[0] if len(qspec) else None)), put(w, qspec))
            (val, grads) = grad(*args)
            (val_ref, grads_ref) = grad(q, k, v, use_seg, w)
            errs = [rel_err(g, r) for g, r in zip(grads, grads_ref)]
            gathers = latent_gathers(grad.lower(*args).compile().as_text(), s, dq_)
            good = max(errs) < 10 * tol_for(impl) and abs(float(val) - float(val_ref)) < 1e-3 * abs(float(val_ref)) + 1e-3
            good &= not gathers
            ok &= good
            detail[f"{name}_hkv{h_kv}"] = dict(errs=errs, gathers=gathers[:2], ok=good)
    return ok, detail


@check
def interpret_under_shard_map(impl):
    """The interpreted kernels per shard under an explicit shard_map (batch-sharded decode, contiguous and
    paged, and prefill forward) equal the unsharded interpreted result."""
    del impl
    from jax import shard_map
    _, one, _ = meshes()
    mesh = one("data")
    q, kv, lens, _ = decode_inputs(12, 8, 1, 2, 32, jnp.float32)
    dec = lambda q, kv, l: fm.mla_decode(q, kv, l, head_dim_v=D_V, softmax_scale=0.05, implementation="interpret")
    sm = jax.jit(shard_map(dec, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    err_dec = rel_err(sm(q, kv, lens), dec(q, kv, lens))
    qp = jnp.asarray(np.random.default_rng(13).standard_normal((8, 32, 2, 32)), jnp.float32)
    pre = lambda q: fm.mla_prefill(q, q, q, softmax_scale=0.2, implementation="interpret")
    smp = jax.jit(shard_map(pre, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    err_pre = rel_err(smp(qp), pre(qp))
    return err_dec < 1e-5 and err_pre < 1e-5, dict(decode=err_dec, prefill=err_pre)


@check
def interpret_under_sharded_jit(impl):
    """implementation="interpret" under plain jit over sharded inputs: correct, no crash. It is not
    partitioned: the kernels run once on device 0 over gathered inputs (a host callback cannot run inside
    custom_partitioning); the HLO scan sees those gathers, which also shows the scan matches them."""
    del impl
    _, one, two = meshes()
    q, kv, lens, _ = decode_inputs(14, 8, 1, 2, 32, jnp.float32)
    f = jax.jit(lambda q, kv, l: fm.mla_decode(q, kv, l, head_dim_v=D_V, softmax_scale=0.05,
                                               implementation="interpret"))
    ref = f(q, kv, lens)
    detail, ok = {}, True
    for name, layout in (("dp", sharding.data_parallel(one("data"))),
                         ("dp_cp", sharding.data_context_parallel(two("data", "seq")))):
        args = sharding.shard_decode_inputs(layout, q, kv, lens)[:3]
        t0 = time.time()
        err = rel_err(f(*args), ref)
        gathers = latent_gathers(f.lower(*args).compile().as_text(), 32)
        detail[name] = dict(err=err, seconds=round(time.time() - t0, 2), cache_gathers_seen=len(gathers))
        ok &= err < 1e-6 and len(gathers) > 0
    qp = jnp.asarray(np.random.default_rng(15).standard_normal((8, 32, 2, 32)), jnp.float32)
    pre = jax.jit(jax.grad(lambda q: jnp.sum(fm.mla_prefill(q, q, q, softmax_scale=0.2, implementation="interpret"))))
    gp = pre(jax.device_put(qp, NamedSharding(one("data"), P("data"))))
    detail["prefill_grad_err"] = rel_err(gp, pre(qp))
    ok &= detail["prefill_grad_err"] < 1e-5
    return ok, detail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", default="xla", choices=("xla", "triton"))
    parser.add_argument("names", nargs="*", help="checks to run (default: all)")
    args = parser.parse_args(argv)
    failed = 0
    for name in args.names or list(CHECKS):
        if args.impl == "triton" and name.startswith("interpret"):
            continue
        t0 = time.time()
        try:
            ok, detail = CHECKS[name](args.impl)
        except Exception:                       # noqa: BLE001 - reported as a failed check
            ok, detail = False, traceback.format_exc()[-3000:]
        failed += not ok
        print(json.dumps(dict(name=name, ok=bool(ok), seconds=round(time.time() - t0, 2), detail=detail),
                         default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
