"""DeepSeek Sparse Attention benchmark: rows S1, S2, S3 (sparse FP8 decode) and SP (sparse prefill) of the design
card, our Triton kernels beside the jnp reference ("xla") and, when `flash_mla` imports, FlashMLA in the same run.

    python benchmarks/benchmark_sparse.py                  # every row; JSON to benchmarks/results/sparse_<gpu>.json
    python benchmarks/benchmark_sparse.py --rows S1 SP
    python benchmarks/benchmark_sparse.py --smoke          # reduced sizes (forced without a GPU): ms and errors only

| row | shape |
|---|---|
| S1 | decode B 128, S_q 2, H 128, top-k 2048 of a 32K context, pages of 64, fp8_blockscale pool |
| S2 | S1 with S_q 1 |
| S3 | S2 with H 64 |
| SP | prefill: 4096 query tokens, H 128, top-k 2048 of 32K bf16 latents, d_qk 576 |

Counting (FlashMLA's own): FLOPs = 2 * B * S_q * H * topk * (576 + 512); bytes = unique tokens read * bytes per
token (656 fp8_blockscale, 1152 bf16) + q + out (bf16). "bytes_nodedup" counts every slot's token. Each decode
sequence's top-k are distinct positions of its own 32K context (uniform noise's top-k, as FlashMLA's tests), placed
through a shuffled block table; no slot is -1.
Times: "ms" is the wall time per call inside jit (common.time_call); "gpu_ms" the kernels' GPU time per call
(CUPTI, common.gpu_kernel_times). FlashMLA (torch, benchmarks/peers.py) is timed by CUDA events around a burst of
7 calls after one warm-up (that reads like CUPTI on the JAX side); its gpu_ms is that time, it has no wall time.
"relerr" is ‖out - ref‖ / ‖ref‖ against the "xla" output on the same inputs. % of ceiling: against the read bandwidth or the
bf16 matmul rate measured in the same run, whichever binds.
"""
from __future__ import annotations

import argparse
import functools

import common  # first: it puts this checkout's flashmla_jax on the path
import jax
import jax.numpy as jnp
import numpy as np

import peers
import flashmla_jax as fm
from flashmla_jax._backend import has_cuda_gpu
from flashmla_jax.fp8 import bytes_per_token, quantize_latent

D, D_V = 576, 512
SCALE = 192 ** -0.5
PAGE = 64
FP8 = "fp8_blockscale"


Row = common.Row
ROWS = common.SPARSE_ROWS     # batch (1 for SP), s_q (SP: its query tokens), heads, topk, context (SP: kv length)


def reduced(row: Row) -> Row:
    """The same row at CPU-friendly size (H 16 keeps the kernels' narrow tiles)."""
    return row.reduced(batch=2, s_q=4 if row.prefill else 2, heads=16, topk=128, context=1024)


def _random_topk(key, rows: int, n: int, topk: int) -> jax.Array:
    """[rows, topk] int32 distinct positions in [0, n), in random order."""
    return jax.lax.top_k(jax.random.uniform(key, (rows, n)), topk)[1].astype(jnp.int32)


def _latents(key, tokens: int, kv_format: str | None, chunk: int = 1 << 19) -> jax.Array:
    """[tokens, W] random latents, bf16 or packed (made in chunks: a 4M-token pool's float32 would take 10 GB)."""
    chunk = min(chunk, tokens)
    pack = jax.jit(lambda k: (lambda x: x if kv_format is None else quantize_latent(x, kv_format))(
        jax.random.normal(k, (chunk, D), jnp.bfloat16)))
    keys = jax.random.split(key, -(-tokens // chunk))
    return jnp.concatenate([pack(k) for k in keys])[:tokens]


def make_inputs(row: Row, seed: int, pool=None):
    """Decode: (q [B, S_q, H, 576], pool [pages, 64, W], indices [B, S_q, topk]); prefill: (q [T, H, 576],
    kv [N, 576], indices [T, topk]). `pool` reuses one already made (inputs differ in q and indices)."""
    kq, kk, ki, kt = jax.random.split(jax.random.PRNGKey(seed), 4)
    if row.prefill:
        kv = _latents(kk, row.context, None) if pool is None else pool
        q = jax.random.normal(kq, (row.s_q, row.heads, D), jnp.bfloat16)
        return q, kv, _random_topk(ki, row.s_q, row.context, row.topk)
    pages_per_seq = row.context // PAGE
    if pool is None:
        pool = _latents(kk, row.batch * row.context, row.kv_format).reshape(row.batch * pages_per_seq, PAGE, -1)
    table = jax.random.permutation(kt, row.batch * pages_per_seq).astype(jnp.int32).reshape(row.batch, -1)
    pos = _random_topk(ki, row.batch * row.s_q, row.context, row.topk).reshape(row.batch, row.s_q, row.topk)
    pages = jnp.take_along_axis(table[:, None, :], pos // PAGE, axis=2)
    q = jax.random.normal(kq, (row.batch, row.s_q, row.heads, D), jnp.bfloat16)
    return q, pool, pages * PAGE + pos % PAGE


def cost(row: Row, indices: np.ndarray) -> dict:
    """FLOPs and bytes of one call (module docstring)."""
    queries = row.batch * row.s_q * row.heads
    token = bytes_per_token(row.kv_format, jnp.bfloat16)
    q_out = queries * (D + D_V) * 2
    unique = int(np.unique(indices[indices >= 0]).size)
    return dict(flops=2.0 * queries * row.topk * (D + D_V), bytes=unique * token + q_out,
                bytes_nodedup=int((indices >= 0).sum()) * token + q_out, unique_tokens=unique)


def jax_fn(row: Row, implementation: str):
    if row.prefill:
        return jax.jit(lambda q, kv, i: fm.mla_prefill_sparse(q, kv, i, softmax_scale=SCALE,
                                                              implementation=implementation)[0])
    return jax.jit(functools.partial(fm.mla_decode_sparse, softmax_scale=SCALE, kv_format=row.kv_format,
                                     return_lse=False, implementation=implementation))


# ---------------------------------------------------------------- the sweep


def run_row(row: Row, impls: list[str], with_peer: bool, gpu: bool) -> list[dict]:
    first = make_inputs(row, 0)
    sets = [first, make_inputs(row, 1, pool=first[1])]
    counts = cost(row, np.asarray(sets[0][2]))
    ref = np.asarray(jax_fn(row, "xla")(*sets[0]), np.float32)
    relerr = lambda out: float(np.linalg.norm(out - ref) / np.linalg.norm(ref))  # noqa: E731
    base = dict(row=row.name, batch=row.batch, s_q=row.s_q, heads=row.heads, topk=row.topk, context=row.context,
                kv_format=row.kv_format, prefill=row.prefill, **counts)
    results = []
    for impl in impls:
        fn = jax_fn(row, impl)
        out = np.asarray(fn(*sets[0]), np.float32)
        if gpu:
            seconds = common.time_call(fn, sets, repeats=10, calls_per_repeat=5, warmup=2)
        else:
            seconds = common.time_serial(fn, sets)
        kernels = common.gpu_kernel_times(lambda: fn(*sets[0]))
        results.append(dict(base, implementation=impl, ms=seconds * 1e3,
                            gpu_ms=None if kernels is None else sum(t for _, t in kernels), relerr=relerr(out)))
    if with_peer:
        peer = (peers.flashmla_sparse_prefill if row.prefill else peers.flashmla_sparse_decode)(*sets[0], SCALE)
        if peer is not None:
            ms, out = peer
            results.append(dict(base, implementation="flashmla", ms=None, gpu_ms=ms, clock="cuda events",
                                relerr=relerr(out.float().cpu().numpy())))
    return results


def add_rates(results: list[dict], bandwidth: float, flops_rate: float) -> None:
    """Rates and % of the binding ceiling from the wall time (JAX rows) and the GPU time; speed-ups over
    FlashMLA in GPU time."""
    for r in results:
        floor_read, floor_mm = r["bytes"] / bandwidth, r["flops"] / flops_rate
        floor = max(floor_read, floor_mm)
        seconds = (r["ms"] if r["ms"] is not None else r["gpu_ms"]) * 1e-3
        r.update(tb_s=r["bytes"] / seconds / 1e12, tflop_s=r["flops"] / seconds / 1e12,
                 bound="memory" if floor_read >= floor_mm else "compute",
                 pct_of_ceiling=None if r["ms"] is None else 100 * floor / seconds,
                 gpu_pct_of_ceiling=None if r["gpu_ms"] is None else 100 * floor / (r["gpu_ms"] * 1e-3))
    peer = {r["row"]: r["gpu_ms"] for r in results if r["implementation"] == "flashmla"}
    for r in results:
        r["speedup_vs_flashmla"] = peer[r["row"]] / r["gpu_ms"] if r["row"] in peer and r["gpu_ms"] else None


def plot(results: list[dict], path: str) -> None:
    common.plot_pct_of_ceiling(results, path, f"DeepSeek Sparse Attention on {common.device_name()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="reduced sizes, no JSON (forced without a GPU)")
    args = parser.parse_args(argv)
    gpu = has_cuda_gpu()
    smoke = args.smoke or not gpu
    rows = common.select_rows(ROWS, args.rows)
    if smoke:
        rows = [reduced(r) for r in rows]
        print("smoke run: reduced sizes (B <= 2, H <= 16, top-k <= 128, context <= 1024)"
              + ("" if gpu else "; no CUDA GPU: the kernels run in Triton's interpreter"))
    impls = ["triton", "xla"] if gpu else ["interpret", "xla"]
    with_peer = gpu and "flashmla" in peers.available()
    if gpu and not with_peer:
        print("FlashMLA not run: `import flash_mla` fails here (../shared/peers/README.md says how to carry it)")
    results = [r for row in rows for r in run_row(row, impls, with_peer, gpu)]
    if not gpu:
        print(f"\n{'row':4} {'impl':9} {'CPU ms':>9} {'relerr':>8}   (the interpreter's time means nothing; rates, "
              "ceilings and FlashMLA need a GPU)")
        for r in results:
            ms = "-" if r["implementation"] == "interpret" else f"{r['ms']:.2f}"
            print(f"{r['row']:4} {r['implementation']:9} {ms:>9} {r['relerr']:8.1e}")
        return
    bandwidth = common.measure_read_bandwidth(2.0)
    flops_rate = common.measure_matmul_rate(8192)
    add_rates(results, bandwidth, flops_rate)
    print(f"device: {common.device_name()}  read bandwidth {bandwidth / 1e12:.2f} TB/s  "
          f"bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s")
    columns = [("ms", "ms", ".4f"), ("gpu_ms", "gpu ms", ".4f"), ("tb_s", "TB/s", ".2f"),
               ("tflop_s", "TFLOP/s", ".1f"), ("pct_of_ceiling", "% ceil", ".1f"),
               ("gpu_pct_of_ceiling", "gpu %", ".1f"), ("speedup_vs_flashmla", "vs FlashMLA", ".2f"),
               ("relerr", "relerr", ".1e")]
    common.print_table(results, [("row", "row"), ("implementation", "impl"), ("bound", "bound")], columns, dict(ms="ms: wall time per call (FlashMLA has none: its gpu ms are CUDA-event time)",
                                     speedup_vs_flashmla="vs FlashMLA: FlashMLA's GPU ms / this one's (> 1: faster)",
                                     relerr="relerr: ||out - xla|| / ||xla|| on the same inputs"))
    if smoke:
        return
    payload = dict(device=common.device_name(), jax=jax.__version__, read_bandwidth_tb_s=bandwidth / 1e12,
                   matmul_tflop_s=flops_rate / 1e12, flashmla=with_peer, results=results)
    path = common.write_json("sparse", payload)
    plot(results, path.replace(".json", ".png"))
    print(f"wrote {path} and its .png")


if __name__ == "__main__":
    main()
