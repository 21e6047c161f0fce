"""Compiles the decode split kernel (or the Hopper Gluon decode kernel, or the sparse kernel) for sm_90 on this machine (no GPU needed: through
flashmla_jax/kernels/_compile.py) and reports, per config, what the compiler made of it: registers, stack (spills),
shared memory, the matrix instructions and the barriers in the SASS (counted over the whole kernel). This is how
the 64-row tiles' duplicated QK^T was found: 76 HGMMA in the kernel's loop, 40 once each warp group computes its
half (benchmarks/NOTES.md).

    python benchmarks/compile_report.py --shape 1,1024,16,16384                      # the chunked-prefill row
    python benchmarks/compile_report.py --shape 128,1,128,4096 --configs "64,64,8,2,0,0,0;64,64,8,2,1,1,1"
    python benchmarks/compile_report.py --shape 1,1024,16,16384 --dump /tmp/k      # also writes .ttgir/.ptx/.sass
    python benchmarks/compile_report.py --shape 128,1,16,4096 --kv-format fp8_blockscale   # an FP8 cache
    python benchmarks/compile_report.py --sparse --shape 128,2,128,2048,4194304 --kv-format fp8_blockscale  # S1
    python benchmarks/compile_report.py --sparse --prefill --shape 4096,1,128,2048,32768                     # SP
    python benchmarks/compile_report.py --indexer             # the lightning indexer's launches at row I1
    python benchmarks/compile_report.py --gluon --shape 128,1,128,4096                # the Hopper kernel at D5
    python benchmarks/compile_report.py --gluon --shape 128,1,16,4096                 # its narrow kernel at D1

--shape is B,S_q,H,N (contiguous cache, D 576, V 512); with --sparse B,S_q,H,topk,pool tokens (--prefill: the
prefill's max_logits output; B is then T); --configs as profile_decode.py's.
Uses the ptxas, cuobjdump and nvdisasm that ship inside the triton wheel.
"""
from __future__ import annotations

import argparse
import os

import common  # first: it puts this checkout's flashmla_jax on the path
import jax.numpy as jnp

from flashmla_jax.fp8 import FP8_FORMATS, latent_format
from flashmla_jax.kernels import _compile
from flashmla_jax.kernels import decode as kernels
from flashmla_jax.kernels import gluon_decode
from flashmla_jax.kernels import gluon_narrow_decode
from flashmla_jax.kernels import gluon_sparse_decode
from flashmla_jax.kernels import sparse as sparse_kernels
from flashmla_jax.ops import decode as decode_ops
from flashmla_jax.ops import sparse as sparse_ops

H100_SMS = 132         # the schedule is planned for an H100 SXM: this machine has no GPU to ask
_TRITON_TYPES = {jnp.bfloat16: "bf16", jnp.float16: "fp16", jnp.float32: "fp32"}


def compile_split_kernel(shape, dtype, tiles, kv_format=None):
    """(compiled kernel, plan) of mla_decode's split kernel for shape (B, S_q, H, N), as mla_decode plans it
    (`tiles` None: its own choice; kv_format None or an FP8 format, FP8_NATIVE as on the GPU)."""
    b, s_q, h, n = shape
    width = 576 if kv_format is None else latent_format(kv_format).bytes_per_token
    plan = decode_ops.plan_decode((b, s_q, h, 576), dtype, 512, True, (b, n, width), None, None, H100_SMS, tiles,
                                  kv_format=kv_format)
    t = _TRITON_TYPES[dtype]
    pointer_types = dict(q_ptr=t, kv_ptr=t if kv_format is None else "u8", o_ptr=t, seqlens_ptr="i32",
                         table_ptr="i32", layer_ptr="i32", kv_scale_ptr="fp32" if kv_format else "i32",
                         splits_ptr="i32", count_ptr="i32", lse_ptr="fp32", o_part_ptr="fp32", lse_part_ptr="fp32")
    return _compile.compile_for_hopper(kernels.mla_decode_split_kernel, pointer_types, plan.constexprs,
                                       plan.num_warps, plan.num_stages, scalar_types=dict(scale="fp32")), plan


def compile_gluon_kernel(shape, dtype, paged=False, layers=0, causal=True, num_splits=None, kv_format=None,
                         narrow=False):
    """(compiled kernel, plan) of the Hopper Gluon decode kernel (kernels/gluon_decode.py, or with narrow
    kernels/gluon_narrow_decode.py) for shape (B, S_q, H, N), planned as its implementation plans it
    (GluonDecodeTiles; pages of 64 when paged; kv_format None or an FP8 format)."""
    b, s_q, h, n = shape
    width = 576 if kv_format is None else latent_format(kv_format).bytes_per_token
    kv_shape = (b * n // 64, 64, width) if paged else (b, n, width)
    plan = decode_ops.plan_decode((b, s_q, h, 576), dtype, 512, causal, kv_shape, (b, n // 64) if paged else None,
                                  num_splits, H100_SMS, tiles=decode_ops.GluonDecodeTiles(), num_layers=layers,
                                  kv_format=kv_format)
    t = _TRITON_TYPES[dtype]
    pointer_types = dict(q_ptr=t, kv_ptr=t if kv_format is None else "u8", o_ptr=t, seqlens_ptr="i32",
                         table_ptr="i32", layer_ptr="i32", kv_scale_ptr="fp32" if kv_format else "i32",
                         splits_ptr="i32", count_ptr="i32", lse_ptr="fp32", o_part_ptr="fp32", lse_part_ptr="fp32")
    kernel = gluon_narrow_decode.mla_decode_gluon_narrow_kernel if narrow else gluon_decode.mla_decode_gluon_kernel
    return _compile.compile_for_hopper(kernel, pointer_types, plan.constexprs,
                                       plan.num_warps, plan.num_stages, scalar_types=dict(scale="fp32")), plan


def compile_sparse_kernel(shape, dtype, kv_format=None, with_max=False, tiles=None, num_splits=None, gluon=False,
                          layers=0):
    """(compiled kernel, plan) of the sparse kernel (mla_decode_sparse / mla_prefill_sparse with with_max; with
    gluon the Hopper Gluon decode kernel, kernels/gluon_sparse_decode.py) for shape (B, S_q, H, topk, pool
    tokens), D 576, V 512, planned as the ops plan it."""
    b, s_q, h, topk, tokens = shape
    tiles = sparse_ops.GLUON_SPARSE_TILES if gluon else tiles          # the Gluon kernel's tiling is fixed
    plan = sparse_ops.plan_sparse((b, s_q, h, 576), dtype, 512, topk, tokens, layers, kv_format, num_splits, H100_SMS,
                                  with_max, tiles=tiles, merges_in_kernel=not gluon)
    t = _TRITON_TYPES[dtype]
    pointer_types = dict(q_ptr=t, kv_ptr=t if kv_format is None else "u8", idx_ptr="i32", topk_len_ptr="i32",
                         layer_ptr="i32", o_ptr=t, lse_ptr="fp32", o_part_ptr="fp32", lse_part_ptr="fp32",
                         splits_ptr="i32", count_ptr="i32", max_ptr="fp32")
    kernel = gluon_sparse_decode.mla_sparse_gluon_kernel if gluon else sparse_kernels.mla_sparse_kernel
    constexprs = {k: v for k, v in dict(plan.constexprs, HAS_TOPK_LENGTH=True).items() if k in kernel.arg_names}
    return _compile.compile_for_hopper(kernel, pointer_types, constexprs, plan.num_warps, plan.num_stages,
                                       scalar_types=dict(scale="fp32")), plan


def report(compiled, dump=None):
    facts = _compile.facts(compiled)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]), ("sass", facts.sass)):
            with open(os.path.join(dump, f"{compiled.metadata.name}.{ext}"), "w") as f:
                f.write(text)
    return (f"regs {facts.registers:>3} stack {facts.stack:>4} B  smem {facts.shared // 1024:3d} KB  "
            f"HGMMA {facts.count('HGMMA'):3d}  HMMA {facts.count('HMMA'):3d}  "
            f"wgmma waits {facts.count('WARPGROUP.DEPBAR'):2d}  bar.sync {facts.count('BAR.SYNC'):2d}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,1024,16,16384", help="B,S_q,H,N")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--configs", help=common.DECODE_CONFIG_HELP)
    parser.add_argument("--dump", help="folder for the last config's .ttgir, .ptx and .sass")
    parser.add_argument("--kv-format", default=None, choices=FP8_FORMATS, help="an FP8 cache (default: q's dtype)")
    parser.add_argument("--indexer", action="store_true", help="the lightning indexer's launches at row I1 (bf16 and "
                        "fp8_paged keys) instead of the decode kernel")
    parser.add_argument("--sparse", action="store_true", help="the sparse (top-k) kernel instead of the split kernel")
    parser.add_argument("--gluon", action="store_true", help="the Hopper Gluon decode kernel instead of the split "
                        "kernel (--paged: pages of 64 tokens; --kv-format: its FP8 paths)")
    parser.add_argument("--paged", action="store_true", help="with --gluon: a paged cache")
    parser.add_argument("--prefill", action="store_true", help="with --sparse: mla_prefill_sparse's variant")
    args = parser.parse_args()
    if args.indexer:
        from flashmla_jax.ops.indexer import hopper_facts

        for kv_format in (None, "fp8_paged"):
            for name, f in hopper_facts(kv_format).items():
                print(f"{kv_format or 'bf16':9} {name:8} regs {f.registers:>3} stack {f.stack:>4} B  smem "
                      f"{f.shared // 1024:3d} KB  HGMMA {f.count('HGMMA'):3d}  QGMMA {f.count('QGMMA'):3d}  "
                      f"bar.sync {f.count('BAR.SYNC'):2d}", flush=True)
        return
    shape = tuple(int(v) for v in args.shape.split(","))
    dtype = getattr(jnp, args.dtype)
    for tiles in common.parse_decode_configs(args.configs) if args.configs else [None]:
        if args.gluon:
            narrow = decode_ops.uses_narrow_kernel(shape[1] * shape[2], args.kv_format)    # as GluonDecode runs it
            compiled, plan = compile_gluon_kernel(shape, dtype, args.paged, kv_format=args.kv_format, narrow=narrow)
        elif args.sparse:
            compiled, plan = compile_sparse_kernel(shape, dtype, args.kv_format, args.prefill, tiles)
        else:
            compiled, plan = compile_split_kernel(shape, dtype, tiles, args.kv_format)
        options = {k: int(v) for k, v in plan.constexprs.items() if k in ("UNCHAIN_SCORES", "SPLIT_MASKED", "LATE_ROW_SUM")}
        block_m = plan.constexprs.get("BLOCK_M", decode_ops.GluonDecodeTiles.block_m)     # Gluon: fixed
        label = (f"BM {block_m} BN {plan.constexprs['BLOCK_N']} warps {plan.num_warps} "
                 f"stages {plan.num_stages} {options}")
        print(f"{label:95} {report(compiled, args.dump)}", flush=True)


if __name__ == "__main__":
    main()
