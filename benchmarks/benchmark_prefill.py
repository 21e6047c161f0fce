"""Prefill benchmark: rows P1 and P2 (causal, d_qk 192 / d_v 128, bf16), forward and
forward+backward, mla_prefill's Triton kernels beside jax.nn.dot_product_attention's "xla" and "cudnn", plus the
absorbed chunked-prefill row (mla_decode, B=1, S_q=1024, N=16384, H=16) — against a bf16 matmul measured in the
same run.

    python benchmarks/benchmark_prefill.py                # the table; JSON to benchmarks/results/prefill_<gpu>.json
    python benchmarks/benchmark_prefill.py --sweep        # also time a few tile configs on P1 first
    python benchmarks/benchmark_prefill.py --rows P2 --no-baselines

FLOP convention (causal: half the square, the diagonal's half-blocks ignored):
  forward  = 2 * B * H * (S^2 / 2) * (d_qk + d_v)                 (QK^T and PV)
  backward = 2 * B * H * (S^2 / 2) * (3 * d_qk + 2 * d_v)         (QK^T recomputed, dP, dV, dQ, dK: 2.6x the
             forward at 192/128; it is the usual 2.5x when d_qk == d_v)
jax.nn.dot_product_attention needs v as wide as q: for "xla" and "cudnn" v (and dO) are zero-padded from 128 to
192 columns and the output sliced back; their times include that padding, their FLOPs are counted unpadded.
Times: median seconds per call inside jit after warm-up (benchmarks/common.time_call).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
import traceback

import common  # first: it puts this checkout's flashmla_jax on the path
import jax
import jax.numpy as jnp
import numpy as np

import flashmla_jax as fm
from flashmla_jax.ops import prefill as prefill_ops

ROWS = {r.name: r for r in common.PREFILL_ROWS}     # batch, context (the sequence length), heads
D_QK, D_V = 192, 128
SCALE = D_QK ** -0.5


def fwd_flops(b, s, h):
    return 2 * b * h * (s * s / 2) * (D_QK + D_V)


def bwd_flops(b, s, h):
    return 2 * b * h * (s * s / 2) * (3 * D_QK + 2 * D_V)


def inputs(b, s, h, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, s, h, D_QK), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, h, D_QK), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, h, D_V), jnp.bfloat16)
    do = jax.random.normal(ks[3], (b, s, h, D_V), jnp.bfloat16)
    return q, k, v, do


def timed(fn, args, reps=10, calls=3):
    return common.time_call(fn, [args], repeats=reps, calls_per_repeat=calls, warmup=2)


# ------------------------------------------------------------------ the functions timed


def triton_fns(tiles=None, implementation="triton"):
    """Jitted (fwd, fwd+bwd, bwd-only, fwd with its vjp) functions of the Triton kernels; `tiles` (a
    PrefillTiles) replaces the static tile table. bwd takes the vjp function fwd_vjp returns and runs the
    backward kernels alone. implementation "interpret" runs them on a CPU (tiny shapes only)."""
    def fwd(q, k, v):
        plan = prefill_ops.plan_prefill(q.shape, k.shape, v.shape, q.dtype, True, False, implementation, tiles)
        return prefill_ops.prefill_with_plan(plan, q, k, v, SCALE)[0]

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(fwd, q, k, v)
        return out, vjp(do)

    def fwd_vjp(q, k, v):
        return jax.vjp(fwd, q, k, v)

    def bwd(vjp, do):
        return vjp(do)

    return [jax.jit(f) for f in (fwd, fwd_bwd, bwd, fwd_vjp)]


def dpa_fns(implementation):
    """jax.nn.dot_product_attention with v (and dO) zero-padded to d_qk columns."""
    def fwd(q, k, v):
        v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, D_QK - D_V)))
        out = jax.nn.dot_product_attention(q, k, v_pad, scale=SCALE, is_causal=True, implementation=implementation)
        return out[..., :D_V]

    def fwd_bwd(q, k, v, do):
        out, vjp = jax.vjp(fwd, q, k, v)
        return out, vjp(do)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def check(fwd_bwd, q, k, v, do, heads=4):
    """Relative errors of out, dq, dk, dv against the fp32 jnp reference on the first `heads` heads (heads are
    independent: the loss sum(out * do) splits over them)."""
    out, (dq, dk, dv) = fwd_bwd(q, k, v, do)
    sl = slice(0, heads)
    f32 = [x[:, :, sl].astype(jnp.float32) for x in (q, k, v, do)]

    def ref_fwd(q, k, v):
        return fm.mla_prefill(q, k, v, softmax_scale=SCALE, implementation="xla")
    r_out, vjp = jax.vjp(ref_fwd, *f32[:3])
    r_grads = vjp(f32[3])

    def rel(a, b):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b)) if np.all(np.isfinite(a)) else float("inf")
    return dict(out=rel(out[:, :, sl], r_out), dq=rel(dq[:, :, sl], r_grads[0]), dk=rel(dk[:, :, sl], r_grads[1]),
                dv=rel(dv[:, :, sl], r_grads[2]))


# ------------------------------------------------------------------ sweep


SWEEP = dict(
    fwd=[(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3)],
    dkdv=[(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3)],
    dq=[(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)],
)


def sweep(row, budget_s, log):
    b, s, h = ROWS[row].batch, ROWS[row].context, ROWS[row].heads
    q, k, v, do = inputs(b, s, h)
    best = prefill_ops.prefill_tiles("triton", jnp.bfloat16, D_QK, D_V)
    results = []
    t_start = time.time()
    for kind in ("fwd", "dkdv", "dq"):
        best_t = None
        for cfg in SWEEP[kind]:
            if time.time() - t_start > budget_s:
                log(f"sweep: budget spent, stopping at {kind} {cfg}")
                break
            tiles = dataclasses.replace(best, **{kind: prefill_ops.KernelTiles(*cfg)})
            try:
                fwd, _, bwd, fwd_vjp = triton_fns(tiles)
                if kind == "fwd":
                    t = timed(fwd, (q, k, v), reps=8, calls=2)
                    tflops = fwd_flops(b, s, h) / t / 1e12
                else:
                    _, vjp = fwd_vjp(q, k, v)
                    t = timed(bwd, (vjp, do), reps=6, calls=2)
                    tflops = bwd_flops(b, s, h) / t / 1e12
            except Exception as e:  # noqa: BLE001 — shared-memory overflow etc. show up only here
                log(f"sweep {row} {kind} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
                results.append(dict(kind=kind, config=cfg, error=str(e)[:300]))
                continue
            log(f"sweep {row} {kind} {cfg}: {t * 1e3:.3f} ms  {tflops:.1f} TFLOP/s")
            results.append(dict(kind=kind, config=cfg, ms=t * 1e3, tflops=tflops))
            if best_t is None or t < best_t:
                best_t, best = t, tiles
    log(f"sweep best: {best}")
    return best, results


# ------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=["P1", "P2"])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-budget-s", type=float, default=120)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-chunked", action="store_true")
    ap.add_argument("--out", default=None, help="also copy the JSON into this folder")
    args = ap.parse_args()
    if not common.on_gpu():
        ap.error("needs a CUDA GPU: it times mla_prefill's Triton kernels (tests/test_prefill.py runs them on a CPU "
                 "in Triton's interpreter)")

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    payload = dict(device=common.device_name(), jax=jax.__version__, flop_convention=__doc__.split(
        "FLOP convention")[1].split("Times:")[0].strip(), rows={}, chunked_prefill={}, sweep=[])

    def save():
        path = common.write_json("prefill", payload)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            common_path = os.path.join(args.out, os.path.basename(path))
            with open(path) as src, open(common_path, "w") as dst:
                dst.write(src.read())
        return path

    log(f"device: {payload['device']}  jax {jax.__version__}")
    matmul = common.measure_matmul_rate()
    payload["matmul_tflops"] = matmul / 1e12
    log(f"bf16 matmul ceiling (8192^3): {matmul / 1e12:.1f} TFLOP/s")

    tiles = None
    if args.sweep:
        tiles, payload["sweep"] = sweep("P1", args.sweep_budget_s, log)
    else:
        tiles = prefill_ops.prefill_tiles("triton", jnp.bfloat16, D_QK, D_V)
    payload["tiles_used"] = {kind: list(dataclasses.astuple(getattr(tiles, kind))) for kind in ("fwd", "dkdv", "dq")}
    if args.sweep:
        save()

    for row in [r.name for r in common.select_rows(common.PREFILL_ROWS, args.rows)]:
        b, s, h = ROWS[row].batch, ROWS[row].context, ROWS[row].heads
        q, k, v, do = inputs(b, s, h)
        ff, bf = fwd_flops(b, s, h), bwd_flops(b, s, h)
        res = dict(B=b, S=s, H=h, d_qk=D_QK, d_v=D_V, fwd_gflop=ff / 1e9, bwd_gflop=bf / 1e9)
        fwd, fwd_bwd, bwd, fwd_vjp = triton_fns(tiles)
        res["check"] = check(fwd_bwd, q, k, v, do)
        log(f"{row} check vs reference (4 heads, fp32 reference): {res['check']}")
        t_f = timed(fwd, (q, k, v))
        t_fb = timed(fwd_bwd, (q, k, v, do))
        out, vjp = fwd_vjp(q, k, v)
        t_b = timed(bwd, (vjp, do))
        res["triton"] = dict(fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3, bwd_ms=t_b * 1e3,
                             fwd_tflops=ff / t_f / 1e12, bwd_tflops=bf / t_b / 1e12,
                             fwd_bwd_tflops=(ff + bf) / t_fb / 1e12,
                             fwd_pct_matmul=100 * ff / t_f / matmul, bwd_pct_matmul=100 * bf / t_b / matmul)
        del out, vjp
        if not args.no_baselines:
            for impl in ("xla", "cudnn"):
                try:
                    f1, f2 = dpa_fns(impl)
                    t1 = timed(f1, (q, k, v), reps=5, calls=2)
                    entry = dict(fwd_ms=t1 * 1e3, fwd_tflops=ff / t1 / 1e12, v_padded_to=D_QK)
                    try:
                        t2 = timed(f2, (q, k, v, do), reps=5, calls=2)
                        entry.update(fwd_bwd_ms=t2 * 1e3, fwd_bwd_tflops=(ff + bf) / t2 / 1e12)
                    except Exception as e:  # noqa: BLE001
                        entry["fwd_bwd_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                except Exception as e:  # noqa: BLE001 (out of memory, shapes cuDNN refuses, ...)
                    entry = dict(error=f"{type(e).__name__}: {str(e)[:300]}", v_padded_to=D_QK)
                res[impl] = entry
        payload["rows"][row] = res
        save()
        log_row(row, res, log)

    if not args.no_chunked:
        payload["chunked_prefill"] = chunked_prefill(matmul, log)
        save()
    path = save()
    log(table(payload))
    log(f"wrote {path}")


def log_row(row, res, log):
    t = res["triton"]
    msg = (f"{row}: triton fwd {t['fwd_ms']:.2f} ms ({t['fwd_tflops']:.0f} TF/s, {t['fwd_pct_matmul']:.0f}%), "
           f"bwd {t['bwd_ms']:.2f} ms ({t['bwd_tflops']:.0f} TF/s, {t['bwd_pct_matmul']:.0f}%), "
           f"fwd+bwd {t['fwd_bwd_ms']:.2f} ms")
    for impl in ("xla", "cudnn"):
        if impl in res:
            e = res[impl]
            both = f"{e['fwd_bwd_ms']:.2f} ms" if "fwd_bwd_ms" in e else "failed (fwd_bwd_error in the JSON)"
            msg += f" | {impl}: " + (e["error"][:80] if "error" in e else f"fwd {e['fwd_ms']:.2f} ms, fwd+bwd {both}")
    log(msg)


def chunked_prefill(matmul, log):
    """Absorbed chunked prefill: 1024 new tokens against a 16384-token latent prefix (causal), H = 16."""
    b, s_q, n, h = 1, 1024, 16384, 16
    kq, kk = jax.random.split(jax.random.PRNGKey(1))
    q = jax.random.normal(kq, (b, s_q, h, 576), jnp.bfloat16)
    kv = jax.random.normal(kk, (b, n, 576), jnp.bfloat16)
    seqlens = jnp.full((b,), n, jnp.int32)
    flops = 2 * b * s_q * h * n * (576 + 512)
    res = dict(B=b, S_q=s_q, N=n, H=h, gflop=flops / 1e9)
    for impl in ("triton", "xla"):
        try:
            f = jax.jit(lambda q, kv, sl, impl=impl: fm.mla_decode(q, kv, sl, softmax_scale=SCALE,
                                                                  implementation=impl))
            t = timed(f, (q, kv, seqlens))
            res[impl] = dict(ms=t * 1e3, tflops=flops / t / 1e12, pct_matmul=100 * flops / t / matmul)
        except Exception as e:  # noqa: BLE001
            res[impl] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    log(f"chunked prefill (mla_decode B=1 S_q=1024 N=16384 H=16): {res}")
    return res


def table(payload):
    mm = payload["matmul_tflops"]
    out = [f"\n{payload['device']} — bf16 matmul ceiling {mm:.0f} TFLOP/s (measured); causal, d_qk 192 / d_v 128, bf16",
           "| row | pass | triton ms | TFLOP/s | % matmul | xla ms (v padded) | cuDNN ms (v padded) | xla / triton | "
           "cuDNN / triton |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row, r in payload["rows"].items():
        t = r["triton"]
        for name, key_t, flops in (("fwd", "fwd_ms", r["fwd_gflop"]),
                                   ("fwd+bwd", "fwd_bwd_ms", r["fwd_gflop"] + r["bwd_gflop"])):
            ms = t[key_t]
            tf = flops / ms                                   # GFLOP / ms = TFLOP/s
            cells = []
            for impl in ("xla", "cudnn"):
                e = r.get(impl, {})
                cells.append(e.get(key_t))
            fmt = [f"{c:.2f}" if c else ("OOM" if "RESOURCE_EXHAUSTED" in str(r.get(impl)) else "n/a")
                   for c, impl in zip(cells, ("xla", "cudnn"))]
            ratio = [f"{c / ms:.2f}x" if c else "n/a" for c in cells]
            out.append(f"| {row} | {name} | {ms:.2f} | {tf:.0f} | {100 * tf / mm:.0f}% | {fmt[0]} | {fmt[1]} | "
                       f"{ratio[0]} | {ratio[1]} |")
        out.append(f"| {row} | bwd only | {t['bwd_ms']:.2f} | {t['bwd_tflops']:.0f} | {t['bwd_pct_matmul']:.0f}% "
                   "| | | | |")
    c = payload.get("chunked_prefill") or {}
    if "triton" in c and "ms" in c.get("triton", {}):
        x = c.get("xla", {}).get("ms")
        out.append(f"| chunked (mla_decode 1x1024 vs 16384, H 16) | fwd | {c['triton']['ms']:.2f} | "
                   f"{c['triton']['tflops']:.0f} | {c['triton']['pct_matmul']:.0f}% | "
                   f"{x:.2f} | n/a | {x / c['triton']['ms']:.2f}x | n/a |" if x else "| chunked | fwd | ... |")
    return "\n".join(out)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
