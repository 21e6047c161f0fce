"""Times mla_decode's tile configurations per shape class on the GPU: the evidence behind the table in
flashmla_jax/ops/decode.py (`_tile_config`). Not a test; prints one line per (row, config) and the best.

    python benchmarks/tune_decode.py --rows D1 D5 --block-m 16 64 --stages 2 3
"""
import argparse
import functools
import itertools
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import common  # noqa: E402
from flashmla_jax.ops import decode as decode_ops  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*", default=["D1", "D3", "D4", "D5", "D6"])
    parser.add_argument("--block-m", nargs="*", type=int, default=[16, 32, 64])
    parser.add_argument("--block-n", nargs="*", type=int, default=[32, 64])
    parser.add_argument("--warps", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--stages", nargs="*", type=int, default=[1, 2, 3])
    args = parser.parse_args()
    for row in [r for r in benchmark.ROWS if r.name in args.rows]:
        sets = [benchmark.make_inputs(row, seed) for seed in range(2)]
        rows = row.s_q * row.heads
        best = None
        for bm, bn, w, s in itertools.product(args.block_m, args.block_n, args.warps, args.stages):
            if bm > max(16, rows):
                continue
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
            fn = jax.jit(functools.partial(decode_ops._decode_triton, head_dim_v=benchmark.D_V,
                                           scale=benchmark.SCALE, causal=True, num_splits=None,
                                           implementation="triton", config=cfg))
            try:
                ms = common.time_call(fn, sets, repeats=5) * 1e3
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                print(f"{row.name} {cfg}: failed ({str(e).splitlines()[0][:100]})", flush=True)
                continue
            print(f"{row.name} {cfg}: {ms:.4f} ms", flush=True)
            if best is None or ms < best[0]:
                best = (ms, cfg)
        print(f"BEST {row.name}: {best}", flush=True)


if __name__ == "__main__":
    main()
