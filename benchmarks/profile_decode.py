"""Launches the decode kernels straight from Triton on torch tensors (no JAX dispatch in the way), for
compiler reports (registers, spills, shared memory), CUDA-event kernel times and Nsight Compute.

    python benchmarks/profile_decode.py --rows D3 D5                 # report + kernel times per row
    python benchmarks/profile_decode.py --rows D5 --sweep             # tile sweep on kernel time
    python benchmarks/profile_decode.py --rows chunk --configs "64,64,8,2,1,1,1;64,64,8,2,0,0,0"   # wide-tile options
    ncu --clock-control none -k regex:mla_decode python benchmarks/profile_decode.py --rows D5 --once

Needs a CUDA GPU and torch. Efficiency is counted as in benchmark.py (floor / time); the ceilings are
passed in (--bandwidth TB/s, --matmul TFLOP/s) from a benchmark.py run on the same card.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools

import benchmark
import common
import jax.numpy as jnp
import numpy as np
import torch
import triton
import triton.testing

from flashmla_jax.kernels import decode as kernels
from flashmla_jax.ops import decode as decode_ops

# "chunk": C1's earlier name, the absorbed chunked-prefill row
EXTRA_ROWS = [dataclasses.replace(r, name="chunk") for r in common.DECODE_ROWS if r.name == "C1"]


def make_inputs(row, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    d = benchmark.D
    q = torch.randn(row.batch, row.s_q * row.heads, d, device="cuda", generator=g).to(torch.bfloat16)
    kv = torch.randn(row.batch, row.context, d, device="cuda", generator=g).to(torch.bfloat16)
    if row.ragged:
        seqlens = torch.randint(1, row.context + 1, (row.batch,), device="cuda", generator=g, dtype=torch.int32)
    else:
        seqlens = torch.full((row.batch,), row.context, device="cuda", dtype=torch.int32)
    table = None
    if row.paged:
        per_seq = row.context // row.page_size
        kv = kv.reshape(row.batch * per_seq, row.page_size, d)
        table = torch.randperm(row.batch * per_seq, device="cuda", generator=g).to(torch.int32).reshape(
            row.batch, per_seq)
    return q, kv, seqlens, table


def launcher(row, inputs, tiles, num_splits=None):
    """A zero-argument callable running split (+ combine) once, one running the split kernel alone,
    the compiled split kernel, and the plan (ops/decode.py's `plan_decode`, as mla_decode launches)."""
    q, kv, seqlens, table = inputs
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan = decode_ops.plan_decode((row.batch, row.s_q, row.heads, q.shape[-1]), jnp.bfloat16, benchmark.D_V, True,
                                  tuple(kv.shape), None if table is None else tuple(table.shape), num_splits, sms,
                                  tiles)
    outs = [torch.empty(o.shape, device="cuda", dtype=getattr(torch, np.dtype(o.dtype).name))
            for o in plan.split_outputs]
    out, out_lse, o, lse, taken, _ = outs
    tbl = seqlens if table is None else table

    def split():
        for i in plan.zeroed_outputs:
            outs[i].zero_()     # as jax-triton's zeroed_outputs does before each launch
        return kernels.mla_decode_split_kernel[plan.grid](
            q, kv, seqlens, tbl, seqlens, seqlens, benchmark.SCALE, *outs,   # seqlens: unused layer, scale pointers
            num_warps=plan.num_warps, num_stages=plan.num_stages, **plan.constexprs)

    def run():
        split()
        if plan.combine_grid is not None:
            kernels.mla_decode_combine_kernel[plan.combine_grid](o, lse, taken, out, out_lse, out, out_lse,
                                                                 num_warps=4, num_stages=1, **plan.combine_constexprs)

    compiled = split()
    return run, split, compiled, plan


def label(tiles) -> str:
    """BLOCK_M,BLOCK_N,warps,stages,unchain,split,late: the --configs syntax."""
    return ",".join(str(int(v)) for v in dataclasses.astuple(tiles)[:7])


def efficiency(row, seqlens, ms, bandwidth, matmul):
    nbytes, flops = benchmark.cost(row, seqlens.cpu().numpy())
    floor = max(nbytes / (bandwidth * 1e12), flops / (matmul * 1e12))
    return 100 * floor / (ms * 1e-3)


def report(row, tiles, args, num_splits=None):
    inputs = make_inputs(row)
    if row.paged and args.identity_table:
        q, kv, seqlens, table = inputs
        inputs = q, kv, seqlens, torch.arange(table.numel(), device="cuda", dtype=torch.int32).reshape(table.shape)
    run, split, compiled, plan = launcher(row, inputs, tiles, num_splits)
    splits = f"{plan.num_splits}{'b' if plan.constexprs['BALANCE'] else ''}"
    if tiles.waves != decode_ops.BALANCE_WAVES:
        splits += f"w{tiles.waves}"
    torch.cuda.synchronize()
    if args.once:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        return None
    ms = triton.testing.do_bench(run, warmup=25, rep=200)
    split_ms = triton.testing.do_bench(split, warmup=25, rep=200)
    eff = efficiency(row, inputs[2], ms, args.bandwidth, args.matmul)
    print(f"{row.name:9} {label(tiles):75} splits {splits:>4} regs {compiled.n_regs:3d} spills {compiled.n_spills:4d} "
          f"smem {compiled.metadata.shared // 1024:3d}K  total {ms * 1e3:8.1f} us (split {split_ms * 1e3:8.1f})  "
          f"{eff:5.1f}% of floor", flush=True)
    return ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*", default=["D1", "D3", "D4", "D5", "D6", "chunk"])
    parser.add_argument("--bandwidth", type=float, default=3.03)
    parser.add_argument("--matmul", type=float, default=691.0)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--splits", nargs="*", type=lambda v: None if v == "auto" else int(v), default=[None],
                        help="'auto' (mla_decode's default: a cap and the device-side schedule) or a count")
    parser.add_argument("--identity-table", action="store_true", help="paged rows: pages in order")
    parser.add_argument("--configs", help=common.DECODE_CONFIG_HELP + " to try")
    parser.add_argument("--waves", nargs="*", type=int, default=None, help="balanced schedule waves to try")
    parser.add_argument("--once", action="store_true", help="launch a few times only (for ncu)")
    args = parser.parse_args()
    rows = common.select_rows(common.DECODE_ROWS + EXTRA_ROWS, args.rows)
    for row in rows:
        base = decode_ops.decode_tiles(row.s_q * row.heads, jnp.bfloat16, row.page_size if row.paged else None)
        candidates = [base]
        if args.sweep:
            candidates = [decode_ops.DecodeTiles.with_defaults(bm, bn, w, s)
                          for bm, bn, w, s in itertools.product([32, 64], [32, 64], [4, 8], [1, 2, 3])
                          if bm <= max(16, row.s_q * row.heads)]
        if args.configs:
            candidates = common.parse_decode_configs(args.configs)
        if args.waves:
            candidates = [dataclasses.replace(t, waves=w) for t in candidates for w in args.waves]
        for tiles, ns in itertools.product(candidates, args.splits):
            try:
                report(row, tiles, args, ns)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported
                print(f"{row.name:9} {label(tiles):75} failed: {str(e).splitlines()[0][:90]}", flush=True)


if __name__ == "__main__":
    main()
