"""Times mla_decode's tile configurations per shape class on the GPU: the evidence behind the table in
flashmla_jax/ops/decode.py (`_tile_config`). Not a test; prints one line per (row, config).

    python benchmarks/tune_decode.py --rows D1 D5
"""
import argparse
import itertools
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402
import common  # noqa: E402
import flashmla_jax as fm  # noqa: E402
from flashmla_jax.ops import decode as decode_ops  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*", default=["D1", "D3", "D5", "D6"])
    parser.add_argument("--block-m", nargs="*", type=int, default=[16, 32, 64])
    parser.add_argument("--block-n", nargs="*", type=int, default=[32, 64])
    parser.add_argument("--warps", nargs="*", type=int, default=[4, 8])
    parser.add_argument("--stages", nargs="*", type=int, default=[1, 2, 3])
    args = parser.parse_args()
    default_config = decode_ops._tile_config
    for row in [r for r in benchmark.ROWS if r.name in args.rows]:
        sets = [benchmark.make_inputs(row, seed) for seed in range(2)]
        rows = row.s_q * row.heads
        for bm, bn, w, s in itertools.product(args.block_m, args.block_n, args.warps, args.stages):
            if bm > max(16, rows) * 2:
                continue
            decode_ops._tile_config = lambda *_a, cfg=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s): cfg
            fn = jax.jit(lambda q, kv, sl, bt: fm.mla_decode(q, kv, sl, bt, implementation="triton"))
            try:
                ms = common.time_call(fn, sets, repeats=5) * 1e3
                print(f"{row.name} BLOCK_M={bm:3} BLOCK_N={bn:3} warps={w} stages={s}: {ms:.4f} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                print(f"{row.name} BLOCK_M={bm:3} BLOCK_N={bn:3} warps={w} stages={s}: failed "
                      f"({str(e).splitlines()[0][:100]})", flush=True)
        decode_ops._tile_config = default_config


if __name__ == "__main__":
    main()
