"""Decode benchmark: rows D1-D6 (ROWS below), against measured ceilings and two XLA baselines.

    python benchmarks/benchmark.py                 # every row; on a CPU-only machine: xla at reduced sizes
    python benchmarks/benchmark.py --rows D1 D3    # a subset
    python benchmarks/benchmark.py --rows D1 D1-fp8 D5 D5-fp8   # FP8 rows beside their bf16 rows

Rows named *-fp8 read an "fp8_blockscale" cache (656 bytes a token, bytes counted so); their "jnp" baseline
dequantizes the cache first (`dequantize_latent`) then runs the same plain-jnp decode. At the end, each FP8
row's speed-up over the bf16 row of the same shape measured in the same run is printed.

Implementations per row: "triton" (our kernels), "jnp" (the fastest plain-jnp formulation a JAX user writes,
common.plain_jnp_decode: two einsums and a masked softmax, pages gathered first) and "xla" (our NaN-safe
reference, which also zeroes the cache past each length: one more pass over it). Speed-ups are against
"jnp". Each row reports the steady-state wall time per call and the kernels' GPU time per call (CUPTI).
Prints a table (ms, TB/s, TFLOP/s, % of the binding ceiling, speed-ups), writes
benchmarks/results/decode_<device>.json and a PNG plot beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import flashmla_jax as fm  # noqa: E402
from flashmla_jax import reference  # noqa: E402
from flashmla_jax._backend import has_cuda_gpu  # noqa: E402
from flashmla_jax.fp8 import bytes_per_token, dequantize_latent, quantize_latent  # noqa: E402

D, D_V = 576, 512
SCALE = 192 ** -0.5


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    batch: int
    seqlen: int            # cache length (the maximum, for a ragged row)
    heads: int
    s_q: int
    ragged: bool = False
    paged: bool = False
    kv_format: str | None = None     # None: a bf16 cache; "fp8_blockscale": the FP8 cache

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.kv_format, jnp.bfloat16)

    @property
    def base_name(self) -> str:
        """The bf16 row of the same shape (this row's name for a bf16 row)."""
        return self.name.removesuffix("-fp8")

    def reduced(self) -> "Row":
        """The same row at CPU-friendly size."""
        return dataclasses.replace(self, batch=min(self.batch, 4), seqlen=min(self.seqlen, 1024))


ROWS = [
    Row("D1", 128, 4096, 16, 1),
    Row("D2", 64, 16384, 16, 1),
    Row("D3", 1, 65536, 16, 1),
    Row("D4", 128, 8192, 16, 1, ragged=True),
    Row("D5", 128, 4096, 128, 1),
    Row("D6", 64, 8192, 128, 2),
    Row("D1-paged", 128, 4096, 16, 1, paged=True),
    Row("D2-paged", 64, 16384, 16, 1, paged=True),
]
FP8 = "fp8_blockscale"
ROWS += [dataclasses.replace(r, name=f"{r.name}-fp8", kv_format=FP8)
         for r in ROWS if r.name in ("D1", "D2", "D4", "D1-paged", "D5", "D6")]
PAGE_SIZE = 64
CALLS_PER_DISPATCH = 4      # decode calls (each on its own inputs) per timed jit dispatch


def make_inputs(row: Row, seed: int):
    """(q [B, S_q, H, 576], kv [B, N, W] or pages, seqlens [B], block_table or None), random bf16; W 576,
    or the FP8 row's bytes per token (uint8)."""
    kq, kk, kl = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (row.batch, row.s_q, row.heads, D), jnp.bfloat16)
    kv = jax.random.normal(kk, (row.batch, row.seqlen, D), jnp.bfloat16)
    if row.kv_format is not None:
        kv = quantize_latent(kv, row.kv_format)
    if row.ragged:
        seqlens = jax.random.randint(kl, (row.batch,), 1, row.seqlen + 1, jnp.int32)
    else:
        seqlens = jnp.full((row.batch,), row.seqlen, jnp.int32)
    table = None
    if row.paged:
        per_seq = row.seqlen // PAGE_SIZE
        kv = kv.reshape(row.batch * per_seq, PAGE_SIZE, kv.shape[-1])
        # A shuffled page order, as a serving stack's allocator leaves it.
        table = jax.random.permutation(kl, row.batch * per_seq).astype(jnp.int32).reshape(row.batch, per_seq)
    return q, kv, seqlens, table


def cost(row: Row, seqlens: np.ndarray) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step, counted by the real lengths: the cache read once, q and out;
    2 FLOPs per multiply-add of QK^T (D wide) and PV (D_V wide)."""
    tokens = float(np.sum(seqlens))
    q_out = row.batch * row.s_q * row.heads * (D + D_V) * 2
    return tokens * row.bytes_per_token + q_out, 2.0 * row.s_q * row.heads * tokens * (D + D_V)


def plain_jnp(q, kv, seqlens, table):
    """common.plain_jnp_decode, a paged cache gathered first (as a JAX user would)."""
    if table is not None:
        kv = reference.gather_pages(kv, table)
    return common.plain_jnp_decode(q, kv, seqlens, SCALE)


def decode_fn(implementation: str, kv_format: str | None = None):
    if implementation == "jnp":
        if kv_format is None:
            return plain_jnp
        return lambda q, kv, *rest: plain_jnp(q, dequantize_latent(kv, kv_format), *rest)
    return functools.partial(fm.mla_decode, softmax_scale=SCALE, implementation=implementation, kv_format=kv_format)


def run_row(row: Row, implementation: str, bandwidth: float, flops_rate: float) -> dict:
    sets = [make_inputs(row, seed) for seed in range(CALLS_PER_DISPATCH)]
    fn = decode_fn(implementation, row.kv_format)
    seconds = common.time_call_in_one_dispatch(fn, sets, repeats=10, calls_per_repeat=4)
    many = jax.jit(lambda sets: [fn(*s) for s in sets])
    kernels = common.gpu_kernel_times(lambda: many(sets))
    gpu_ms = None if kernels is None else sum(t for _, t in kernels) / len(sets)
    nbytes, flops = cost(row, np.asarray(sets[0][2]))
    floor = max(nbytes / bandwidth, flops / flops_rate)
    return dict(row=row.name, implementation=implementation, batch=row.batch, seqlen=row.seqlen,
                heads=row.heads, s_q=row.s_q, ragged=row.ragged, paged=row.paged, kv_format=row.kv_format,
                bytes_per_token=row.bytes_per_token, ms=seconds * 1e3,
                gpu_ms=gpu_ms, tb_s=nbytes / seconds / 1e12, tflop_s=flops / seconds / 1e12,
                bound="memory" if nbytes / bandwidth >= flops / flops_rate else "compute",
                pct_of_ceiling=100 * floor / seconds,
                gpu_pct_of_ceiling=None if gpu_ms is None else 100 * floor / (gpu_ms * 1e-3))


def print_fp8_speedups(results: list[dict], rows: list[Row]) -> None:
    """Each FP8 row's speed-up over the bf16 row of its shape, per implementation, both from this run."""
    ms = {(r["row"], r["implementation"]): r["ms"] for r in results}
    pairs = [(r.name, r.base_name) for r in rows if r.kv_format is not None]
    if not pairs:
        return
    print("\nFP8 cache vs bf16 cache, same shape, this run (bf16 ms / fp8 ms):")
    for fp8_row, base in pairs:
        gains = [f"{impl} {ms[base, impl] / ms[fp8_row, impl]:.2f}x" for impl in dict.fromkeys(i for _, i in ms)
                 if (base, impl) in ms and (fp8_row, impl) in ms]
        print(f"  {fp8_row:13} vs {base:9} " + ("  ".join(gains) or f"(run {base} too)"))


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["row"] for r in results))
    impls = list(dict.fromkeys(r["implementation"] for r in results))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [next((r["pct_of_ceiling"] for r in results if r["row"] == n and r["implementation"] == impl), 0)
                for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=impl)
    ax.set_xticks(np.arange(len(names)) + width * (len(impls) - 1) / 2, names)
    ax.set_ylabel("% of the binding ceiling")
    ax.set_title(f"MLA decode on {common.device_name()}")
    ax.axhline(100, color="gray", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", help="row names to run (default: all)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    gpu = has_cuda_gpu()
    rows = [r for r in ROWS if not args.rows or r.name in args.rows]
    impls = ["triton", "jnp", "xla"] if gpu else ["jnp", "xla"]
    if not gpu:
        rows = [r.reduced() for r in rows]
        print("No CUDA GPU: running the xla rows only, at reduced sizes (batch <= 4, cache <= 1024).")
    bandwidth = common.measure_read_bandwidth(2.0 if gpu else 0.25)
    flops_rate = common.measure_matmul_rate(8192 if gpu else 1024)
    print(f"device: {common.device_name()}  read bandwidth {bandwidth / 1e12:.2f} TB/s  "
          f"bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s")
    results = []
    for row, impl in tqdm([(r, i) for r in rows for i in impls], desc="decode sweep"):
        results.append(run_row(row, impl, bandwidth, flops_rate))
    for base in ("jnp", "xla"):
        base_ms = {r["row"]: r["ms"] for r in results if r["implementation"] == base}
        for r in results:
            r[f"speedup_vs_{base}"] = base_ms[r["row"]] / r["ms"] if r["row"] in base_ms else None

    print(f"\n{'row':13} {'impl':7} {'ms':>9} {'gpu ms':>9} {'TB/s':>6} {'TFLOP/s':>8} {'bound':>7} {'% ceil':>7} "
          f"{'gpu %':>7} {'vs jnp':>7} {'vs xla':>7}")
    nan = float("nan")
    for r in results:
        print(f"{r['row']:13} {r['implementation']:7} {r['ms']:9.4f} {r['gpu_ms'] or nan:9.4f} {r['tb_s']:6.2f} "
              f"{r['tflop_s']:8.1f} {r['bound']:>7} {r['pct_of_ceiling']:6.1f}% {r['gpu_pct_of_ceiling'] or nan:6.1f}% "
              f"{r['speedup_vs_jnp'] or nan:6.2f}x {r['speedup_vs_xla'] or nan:6.2f}x")
    print_fp8_speedups(results, rows)
    payload = dict(device=common.device_name(), reduced_sizes=not gpu, jax=jax.__version__,
                   read_bandwidth_tb_s=bandwidth / 1e12, matmul_tflop_s=flops_rate / 1e12, results=results)
    path = common.write_json("decode", payload)
    plot(results, path.replace(".json", ".png"))
    print(f"wrote {path} and its .png")


if __name__ == "__main__":
    main()
