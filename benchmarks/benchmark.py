"""Decode benchmark: rows D1-D6, C1 and their paged and FP8 variants (common.DECODE_ROWS), against measured ceilings and two XLA baselines.

    python benchmarks/benchmark.py                 # every row; on a CPU-only machine: xla at reduced sizes
    python benchmarks/benchmark.py --rows D1 D3    # a subset
    python benchmarks/benchmark.py --rows D1 D1-fp8 D5 D5-fp8   # FP8 rows beside their bf16 rows

Rows named *-fp8 read an "fp8_blockscale" cache (656 bytes a token, bytes counted so), *-fp8pt an
"fp8_pertensor" one (576 bytes, one fixed scale: PERTENSOR_SCALE); their "jnp" baseline dequantizes the cache
first (`dequantize_latent`) then runs the same plain-jnp decode. At the end, each FP8
row's time against the bf16 row of the same shape measured in the same run is printed (bf16 ms / fp8 ms).

Implementations per row: "triton" (our kernels), "jnp" (the fastest plain-jnp formulation a JAX user writes,
common.plain_jnp_decode: two einsums and a masked softmax, pages gathered first) and "xla" (our NaN-safe
reference, which also zeroes the cache past each length: one more pass over it). Speed-ups are against
"jnp". Each row reports the steady-state wall time per call and the kernels' GPU time per call (CUPTI).
Prints a table (ms, TB/s, TFLOP/s, % of the binding ceiling, speed-ups), writes
benchmarks/results/decode_<device>.json and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")     # the torch peers share the GPU
import common  # noqa: E402  (first: it puts this checkout's flashmla_jax on the path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import peers  # noqa: E402
import flashmla_jax as fm  # noqa: E402
from flashmla_jax import reference  # noqa: E402
from flashmla_jax._backend import has_cuda_gpu  # noqa: E402
from flashmla_jax.fp8 import bytes_per_token, dequantize_latent, quantize_latent  # noqa: E402

D, D_V = 576, 512
SCALE = 192 ** -0.5


ROWS = common.DECODE_ROWS
Row = common.Row
CALLS_PER_DISPATCH = 4      # decode calls (each on its own inputs) per timed jit dispatch


def token_bytes(row: Row) -> int:
    """Bytes of one cached token: 1152 in bf16, the FP8 format's (656 for fp8_blockscale)."""
    return bytes_per_token(row.kv_format, jnp.bfloat16)


# "fp8_pertensor" rows: one fixed scale for every input set (normal latents to +-4.48 before saturating).
PERTENSOR_SCALE = 0.01


def make_inputs(row: Row, seed: int):
    """(q [B, S_q, H, 576], kv [B, N, W] or pages, seqlens [B], block_table or None), random bf16; W 576,
    or the FP8 row's bytes per token (uint8)."""
    kq, kk, kl = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (row.batch, row.s_q, row.heads, D), jnp.bfloat16)
    kv = jax.random.normal(kk, (row.batch, row.context, D), jnp.bfloat16)
    if row.kv_format == "fp8_blockscale":
        kv = quantize_latent(kv, row.kv_format)
    elif row.kv_format == "fp8_pertensor":
        kv, _ = quantize_latent(kv, row.kv_format, scale=PERTENSOR_SCALE)
    if row.ragged:
        seqlens = jax.random.randint(kl, (row.batch,), 1, row.context + 1, jnp.int32)
    else:
        seqlens = jnp.full((row.batch,), row.context, jnp.int32)
    table = None
    if row.paged:
        per_seq = row.context // row.page_size
        kv = kv.reshape(row.batch * per_seq, row.page_size, kv.shape[-1])
        # A shuffled page order, as a serving stack's allocator leaves it.
        table = jax.random.permutation(kl, row.batch * per_seq).astype(jnp.int32).reshape(row.batch, per_seq)
    return q, kv, seqlens, table


def cost(row: Row, seqlens: np.ndarray) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step, counted by the real lengths: the cache read once, q and out;
    2 FLOPs per multiply-add of QK^T (D wide) and PV (D_V wide)."""
    tokens = float(np.sum(seqlens))
    q_out = row.batch * row.s_q * row.heads * (D + D_V) * 2
    return tokens * token_bytes(row) + q_out, 2.0 * row.s_q * row.heads * tokens * (D + D_V)


def plain_jnp(q, kv, seqlens, table):
    """common.plain_jnp_decode, a paged cache gathered first (as a JAX user would)."""
    if table is not None:
        kv = reference.gather_pages(kv, table)
    return common.plain_jnp_decode(q, kv, seqlens, SCALE)


def decode_fn(implementation: str, kv_format: str | None = None):
    kv_scale = PERTENSOR_SCALE if kv_format == "fp8_pertensor" else None
    if implementation == "jnp":
        if kv_format is None:
            return plain_jnp
        return lambda q, kv, *rest: plain_jnp(q, dequantize_latent(kv, kv_format, kv_scale), *rest)
    return functools.partial(fm.mla_decode, softmax_scale=SCALE, implementation=implementation, kv_format=kv_format,
                             kv_scale=kv_scale)


def row_fields(row: Row) -> dict:
    """The row's fields in a result (the committed JSON's keys)."""
    return dict(row=row.name, batch=row.batch, seqlen=row.context, heads=row.heads, s_q=row.s_q, ragged=row.ragged,
                paged=row.paged, kv_format=row.kv_format, bytes_per_token=token_bytes(row))


def run_row(row: Row, implementation: str, bandwidth: float, flops_rate: float) -> dict:
    sets = [make_inputs(row, seed) for seed in range(CALLS_PER_DISPATCH)]
    fn = decode_fn(implementation, row.kv_format)
    seconds = common.time_call_in_one_dispatch(fn, sets, repeats=10, calls_per_repeat=4)
    many = jax.jit(lambda sets: [fn(*s) for s in sets])
    kernels = common.gpu_kernel_times(lambda: many(sets))
    gpu_ms = None if kernels is None else sum(t for _, t in kernels) / len(sets)
    nbytes, flops = cost(row, np.asarray(sets[0][2]))
    floor = max(nbytes / bandwidth, flops / flops_rate)
    return dict(row_fields(row), implementation=implementation, ms=seconds * 1e3,
                gpu_ms=gpu_ms, tb_s=nbytes / seconds / 1e12, tflop_s=flops / seconds / 1e12,
                bound="memory" if nbytes / bandwidth >= flops / flops_rate else "compute",
                pct_of_ceiling=100 * floor / seconds,
                gpu_pct_of_ceiling=None if gpu_ms is None else 100 * floor / (gpu_ms * 1e-3))


def run_peer_row(row: Row, peer: str, bandwidth: float, flops_rate: float) -> dict | None:
    """A CUDA peer (benchmarks/peers.py) on the first of the row's input sets: its GPU time per call from CUDA
    events around a short burst. None for rows the peer does not serve here (FP8 caches)."""
    if row.kv_format is not None:
        return None
    q, kv, seqlens, table = make_inputs(row, 0)
    timer = dict(flashmla=peers.flashmla_decode_ms, flashinfer=peers.flashinfer_decode_ms)[peer]
    ms = timer(q, kv, seqlens, table, SCALE, row.page_size)
    nbytes, flops = cost(row, np.asarray(seqlens))
    floor = max(nbytes / bandwidth, flops / flops_rate)
    return dict(row_fields(row), implementation=peer, ms=None, gpu_ms=ms, clock="cuda events", tb_s=nbytes / ms / 1e9, tflop_s=flops / ms / 1e9,
                bound="memory" if nbytes / bandwidth >= flops / flops_rate else "compute", pct_of_ceiling=None,
                gpu_pct_of_ceiling=100 * floor / (ms * 1e-3))


def print_fp8_speedups(results: list[dict], rows: list[Row], gpu: bool) -> None:
    """Each FP8 row against the bf16 row of its shape, per implementation, both from this run: the two times and
    their ratio bf16 ms / fp8 ms (above 1: the FP8 cache is faster)."""
    ms = {(r["row"], r["implementation"]): r["ms"] for r in results}
    pairs = [(r.name, r.base_name) for r in rows if r.kv_format is not None]
    if not pairs:
        return
    print("\nFP8 cache against the bf16 cache of the same shape, this run: bf16 ms / fp8 ms (> 1: FP8 faster)")
    if not gpu:
        print("  (no GPU: jnp and xla dequantize the whole FP8 cache before attending, so these ratios time that "
              "conversion, not the kernels' FP8 reads)")
    for fp8_row, base in pairs:
        gains = [f"{impl} {ms[base, impl]:.3g} / {ms[fp8_row, impl]:.3g} ms = {ms[base, impl] / ms[fp8_row, impl]:.2f}x"
                 for impl in dict.fromkeys(i for _, i in ms) if ms.get((base, impl)) and ms.get((fp8_row, impl))]
        print(f"  {fp8_row:13} {base:9} " + ("   ".join(gains) or f"(run {base} too)"))


def plot(results: list[dict], path: str, gpu: bool = True) -> None:
    common.plot_pct_of_ceiling(results, path, f"MLA decode on {common.device_name()}"
                               + ("" if gpu else " (no GPU: the jnp and xla baselines at reduced sizes)"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", help="row names to run (default: all)")
    parser.add_argument("--merge", action="store_true", help="keep the rows of other names from the existing JSON")
    parser.add_argument("--impls", nargs="*", help="implementations and peers to run (default: triton, gluon, jnp, "
                                                   "xla and every peer that imports; on a CPU jnp and xla)")
    args = parser.parse_args(argv)
    gpu = has_cuda_gpu()
    rows = common.select_rows(ROWS, args.rows)
    peer_names = [p for p in peers.available() if gpu and (not args.impls or p in args.impls)]
    impls = (["triton", "gluon", "jnp", "xla"] if gpu else ["jnp", "xla"]) if not args.impls else [
        i for i in args.impls if i not in peers.NAMES]
    if not gpu:
        rows = [r.reduced(batch=4, context=1024, s_q=16) for r in rows]
        print("No CUDA GPU: running the jnp and xla baselines only, at reduced sizes (batch <= 4, cache <= 1024); "
              "GPU columns (kernel times, peers) are left out.")
    bandwidth = common.measure_read_bandwidth(2.0 if gpu else 0.25)
    flops_rate = common.measure_matmul_rate(8192 if gpu else 1024)
    print(f"device: {common.device_name()}  read bandwidth {common.number(bandwidth / 1e12, '.2f')} TB/s  "
          f"bf16 matmul {common.number(flops_rate / 1e12, '.0f')} TFLOP/s  peers: {', '.join(peer_names) or 'none'}")
    results = []
    # gluon: the rows "triton" may give the tl kernels (the FP8 rows and C1's 1024 rows it gives Gluon already).
    jobs = [(r, i) for r in rows for i in impls if not (i == "gluon" and (r.kv_format or r.name == "C1"))]
    for row, impl in common.progress(jobs, desc="decode sweep"):
        results.append(run_row(row, impl, bandwidth, flops_rate))
    for row, peer in common.progress([(r, p) for r in rows for p in peer_names], desc="peers"):
        result = run_peer_row(row, peer, bandwidth, flops_rate)
        if result is not None:
            results.append(result)
    for base in ("jnp", "xla"):
        base_ms = {r["row"]: r["ms"] for r in results if r["implementation"] == base}
        for r in results:
            r[f"speedup_vs_{base}"] = base_ms[r["row"]] / r["ms"] if r["row"] in base_ms and r["ms"] else None
    for peer in peer_names:      # kernel GPU time against the peer's, same row, same run
        peer_ms = {r["row"]: r["gpu_ms"] for r in results if r["implementation"] == peer}
        for r in results:
            r[f"gpu_speedup_vs_{peer}"] = (peer_ms[r["row"]] / r["gpu_ms"]
                                           if r["row"] in peer_ms and r["gpu_ms"] else None)

    columns = [("ms", "ms", ".4f"), ("gpu_ms", "gpu ms", ".4f"), ("tb_s", "TB/s", ".2f"),
               ("tflop_s", "TFLOP/s", ".1f"), ("pct_of_ceiling", "% ceil", ".1f"),
               ("gpu_pct_of_ceiling", "gpu %", ".1f"), ("speedup_vs_jnp", "vs jnp", ".2f"),
               ("speedup_vs_xla", "vs xla", ".2f")] + [(f"gpu_speedup_vs_{p}", f"vs {p}", ".2f") for p in peer_names]
    ratio = "vs jnp, vs xla: that implementation's ms / this one's, same row (> 1: this one is faster)"
    notes = dict(pct_of_ceiling="% ceil: the binding ceiling's time (bytes / read bandwidth or FLOPs / matmul rate) "
                                "over the wall time",
                 gpu_pct_of_ceiling="gpu %: the same over the kernels' GPU time (CUPTI)",
                 speedup_vs_jnp=ratio, speedup_vs_xla=ratio,
                 **{f"gpu_speedup_vs_{p}": f"vs {p}: {p}'s GPU ms / this one's GPU ms" for p in peer_names})
    common.print_table(results, [("row", "row"), ("implementation", "impl"), ("bound", "bound")], columns, notes)
    print_fp8_speedups(results, rows, gpu)
    payload = dict(device=common.device_name(), reduced_sizes=not gpu, jax=jax.__version__,
                   read_bandwidth_tb_s=bandwidth / 1e12, matmul_tflop_s=flops_rate / 1e12, results=results)
    if args.merge:
        payload = common.merged_rows("decode", payload)
    path = common.write_json("decode", payload)
    plot(payload["results"], path.replace(".json", ".png"), gpu)
    print(f"wrote {path} and its .png")


if __name__ == "__main__":
    main()
