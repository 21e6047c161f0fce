"""Lightning-indexer benchmark: row I1 of the design card (B 64, S_q 1, a 128K context, 64 index heads × 128,
top-k 2048, page 64), with bf16 keys (I1) and FP8 keys in DeepGEMM's paged layout (I1-fp8).

    python benchmarks/benchmark_indexer.py                  # both rows; JSON to benchmarks/results/indexer_<gpu>.json
    python benchmarks/benchmark_indexer.py --rows I1-fp8 --sweep "4096,4;8192,3;16384,4"   # score tiles: split,stages
    python benchmarks/benchmark_indexer.py --smoke          # CPU: tiny shapes through the interpreter, no JSON

Per row: "scores" (`indexer_scores`: the score kernel alone), "topk" (`indexer_topk`: scores, then the radix
select, indices out), "jnp" (what a JAX user writes: gather the pages, einsum, relu, weighted head sum, mask,
`jax.lax.top_k`; FP8 keys dequantized first) and "xla" (our reference, `implementation="xla"`).

Ceilings (measured in the same run, benchmarks/common.py): bytes = the keys read (256 bytes a token in bf16, 132 in
FP8) plus q, weights and the indices out; FLOPs = 2 · B · S_q · H · N · 128 at the bf16 matmul rate (an FP8 dot
runs at twice that rate, so for I1-fp8 the FLOP floor is lower still: both rows are bound by bytes). Each
implementation is reported as % of the binding ceiling, by wall time per call and by CUPTI kernel time; for
"topk" the CUPTI time is split into the score kernel and the top-k kernels.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools

import common  # first: it puts this checkout's flashmla_jax on the path
import jax
import jax.numpy as jnp
import numpy as np

import flashmla_jax as fm
from flashmla_jax import reference
from flashmla_jax._backend import has_cuda_gpu, num_sms
from flashmla_jax.ops import indexer as indexer_ops

D = 128
FP8 = "fp8_paged"


Row = common.Row
ROWS = common.INDEXER_ROWS
SMOKE = {r.name: dataclasses.replace(r, batch=2, context=512, heads=16, topk=32) for r in ROWS}


def key_bytes(row: Row) -> int:
    """Bytes of one cached index key: 128 bf16 values, or 128 e4m3 codes and a float32 scale."""
    return D + 4 if row.kv_format else 2 * D


def cost(row: Row) -> tuple[float, float]:
    """(bytes, FLOPs) of one call: keys read once, q, weights, indices out; QK products counted."""
    tokens = row.batch * row.context
    q_bytes = row.batch * row.s_q * row.heads * (D * (1 if row.kv_format else 2) + 4)
    out = row.batch * row.s_q * row.topk * 4
    return tokens * key_bytes(row) + q_bytes + out, 2.0 * row.batch * row.s_q * row.heads * row.context * D


def make_inputs(row: Row, seed: int):
    """(q [B, S_q, H, 128] bf16, weights [B, S_q, H] f32, key pages, seqlens [B], block table (shuffled pages))."""
    kq, kw, kk, kt = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (row.batch, row.s_q, row.heads, D), jnp.bfloat16)
    w = jax.random.normal(kw, (row.batch, row.s_q, row.heads), jnp.float32) * (row.heads * D) ** -0.5
    per_seq = row.context // row.page_size
    pages = jax.random.normal(kk, (row.batch * per_seq, row.page_size, D), jnp.bfloat16)
    if row.kv_format:
        pages = fm.quantize_index_keys(pages, row.kv_format)
    table = jax.random.permutation(kt, row.batch * per_seq).astype(jnp.int32).reshape(row.batch, per_seq)
    seqlens = jnp.full((row.batch,), row.context, jnp.int32)
    return q, w, pages, seqlens, table


def plain_jnp(q, w, pages, seqlens, table, *, topk, kv_format):
    """The indexer a JAX user writes by hand: pages gathered, einsum, relu, weighted head sum, masked, lax.top_k."""
    if kv_format:
        pages = fm.dequantize_index_keys(pages, kv_format, jnp.bfloat16)
    keys = reference.gather_pages(pages, table)                                      # [B, N, 128]
    logits = jnp.einsum("bshd,bnd->bshn", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.einsum("bsh,bshn->bsn", w, jnp.maximum(logits, 0.0))
    n, s_q = keys.shape[1], q.shape[1]
    limit = seqlens[:, None] - s_q + 1 + jnp.arange(s_q)[None, :]
    scores = jnp.where(jnp.arange(n)[None, None, :] < limit[:, :, None], scores, -jnp.inf)
    _, pos = jax.lax.top_k(scores, topk)
    page = jnp.take_along_axis(table[:, None, :], pos // pages.shape[1], axis=-1)
    return page * pages.shape[1] + pos % pages.shape[1]


def functions(row: Row, implementation: str, tiles=None) -> dict:
    """name -> jitted fn(q, w, pages, seqlens, table) for the implementations timed on this machine. The ops are
    jitted whole, as in a decode loop: called eagerly with a concrete block table they check it on the host
    first (a copy to the host on every call, which also broke the enqueue-ahead wall clock: I1 read 0.365 ms
    of wall time against 0.522 ms of kernels)."""
    kw = dict(kv_format=row.kv_format)
    fns = {}
    if implementation != "xla":
        if tiles is None:
            fns["scores"] = jax.jit(functools.partial(fm.indexer_scores, implementation=implementation, **kw))
            fns["topk"] = jax.jit(functools.partial(fm.indexer_topk, topk=row.topk, implementation=implementation,
                                                    **kw))
        else:
            fns["scores"] = jax.jit(functools.partial(indexer_ops.scores_with_tiles, tiles,
                                                      implementation=implementation, **kw))
    if tiles is None:
        fns["jnp"] = jax.jit(functools.partial(plain_jnp, topk=row.topk, **kw))
        fns["xla"] = jax.jit(functools.partial(fm.indexer_topk, topk=row.topk, implementation="xla", **kw))
    return fns


def run(row: Row, name: str, fn, sets, bandwidth: float, flops_rate: float, repeats: int, smoke: bool) -> dict:
    # A smoke run (the interpreter's host callbacks) waits for each call: enqueue-then-wait timing reads nothing.
    seconds = (common.time_serial(fn, sets, repeats=repeats, warmup=1) if smoke
               else common.time_call(fn, sets, repeats=repeats, calls_per_repeat=4))
    kernels = common.gpu_kernel_times(lambda: fn(*sets[0]))
    nbytes, flops = cost(row)
    if name == "scores":
        nbytes -= row.batch * row.s_q * row.topk * 4
    floor = max(nbytes / bandwidth, flops / flops_rate)
    out = dict(row=row.name, implementation=name, batch=row.batch, context=row.context, heads=row.heads, s_q=row.s_q,
               topk=row.topk, page_size=row.page_size, kv_format=row.kv_format, ms=seconds * 1e3,
               bound="memory" if nbytes / bandwidth >= flops / flops_rate else "compute", floor_ms=floor * 1e3,
               pct_of_ceiling=100 * floor / seconds, tb_s=nbytes / seconds / 1e12)
    if kernels is not None:
        split = common.kernel_groups(kernels, dict(score=("indexer_scores",), topk=("indexer_topk",)))
        out.update(gpu_ms=split["total"], gpu_pct_of_ceiling=100 * floor / (split["total"] * 1e-3),
                   score_kernel_ms=split["score"], topk_kernels_ms=split["topk"], kernels=kernels)
    return out


def check(row: Row, sets, implementation: str) -> str:
    """The kernels' top-k against the reference's on the first input set: the share of selected keys in common
    (random keys leave near-ties that float32 rounding order may swap) and the score error."""
    q, w, pages, seqlens, table = sets[0]
    kw = dict(kv_format=row.kv_format)
    idx = np.asarray(fm.indexer_topk(q, w, pages, seqlens, table, topk=row.topk, implementation=implementation, **kw))
    ref = np.asarray(fm.indexer_topk(q, w, pages, seqlens, table, topk=row.topk, implementation="xla", **kw))
    common_share = np.mean([len(np.intersect1d(a, b)) / row.topk for a, b in zip(idx.reshape(-1, row.topk),
                                                                                ref.reshape(-1, row.topk))])
    return f"top-k agreement with the reference {100 * common_share:.3f}%"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", help="row names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes through the interpreter (CPU); no JSON")
    parser.add_argument("--sweep", help='score-kernel tiles to time instead of the default set: "split,stages;..."')
    parser.add_argument("--no-check", action="store_true", help="skip the agreement check against the reference")
    args = parser.parse_args(argv)
    gpu = has_cuda_gpu()
    if not gpu and not args.smoke:
        parser.error("no CUDA GPU: run with --smoke (tiny shapes through the interpreter)")
    impl = "triton" if gpu and not args.smoke else "interpret"
    rows = [SMOKE[r.name] if args.smoke else r for r in common.select_rows(ROWS, args.rows)]
    bandwidth = common.measure_read_bandwidth(2.0 if gpu else 0.05)
    flops_rate = common.measure_matmul_rate(8192 if gpu else 512)
    print(f"device: {common.device_name()}  read {common.number(bandwidth / 1e12, '.2f')} TB/s  bf16 matmul "
          f"{common.number(flops_rate / 1e12, '.0f')} "
          f"TFLOP/s  implementation {impl}")
    results = []
    for row in rows:
        sets = [make_inputs(row, seed) for seed in range(1 if args.smoke else 2)]
        if not args.no_check:
            print(f"{row.name}: {check(row, sets, impl)}")
        configs = [None]
        if args.sweep:
            base = indexer_ops.indexer_tiles(row.batch, row.s_q, row.heads, row.context, jnp.bfloat16,
                                             row.kv_format is not None, num_sms(impl))
            configs = [dataclasses.replace(base, split=int(c.split(",")[0]), num_stages=int(c.split(",")[1]))
                       for c in args.sweep.split(";")]
        for tiles in configs:
            for name, fn in functions(row, impl, tiles).items():
                r = run(row, name, fn, sets, bandwidth, flops_rate, repeats=2 if args.smoke else 10, smoke=args.smoke)
                if tiles is not None:
                    r["tiles"] = dataclasses.asdict(tiles)
                results.append(r)
                label = name if tiles is None else f"{name} split {tiles.split} stages {tiles.num_stages}"
                gpu_part = ""
                if "gpu_ms" in r:
                    gpu_part = (f"  gpu {r['gpu_ms']:.4f} ms ({r['gpu_pct_of_ceiling']:.1f}%)  score kernel "
                                f"{r['score_kernel_ms']:.4f}  top-k kernels {r['topk_kernels_ms']:.4f}")
                rates = ("" if args.smoke else f"  {r['tb_s']:5.2f} TB/s  {r['pct_of_ceiling']:5.1f}% of the "
                         f"{r['bound']} ceiling ({r['floor_ms']:.4f} ms)")
                print(f"{row.name:7} {label:28} {r['ms']:9.4f} ms{rates}{gpu_part}", flush=True)
    if args.smoke:
        print("smoke run (Triton's interpreter on the CPU): wall ms of one call each, which say nothing about a GPU "
              "(rates and % of the ceilings left out); no JSON written")
        return
    payload = dict(device=common.device_name(), jax=jax.__version__, read_bandwidth_tb_s=bandwidth / 1e12,
                   matmul_tflop_s=flops_rate / 1e12, results=results)
    print(f"wrote {common.write_json('indexer', payload)}")


if __name__ == "__main__":
    main()
