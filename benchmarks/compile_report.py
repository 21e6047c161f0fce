"""Compiles the decode split kernel for sm_90 on this machine (no GPU needed) and reports, per config, what
the compiler made of it: registers, stack (spills), shared memory, the matrix instructions and the
barriers in the SASS (counted over the whole kernel). This is how the 64-row tiles' duplicated QK^T was
found: 76 HGMMA in the kernel's loop, 40 once each warp group computes its half (benchmarks/NOTES.md).

    python benchmarks/compile_report.py --shape 1,1024,16,16384                      # the chunked-prefill row
    python benchmarks/compile_report.py --shape 128,1,128,4096 --configs "64,64,8,2,0,0,0;64,64,8,2,1,1,1"
    python benchmarks/compile_report.py --shape 1,1024,16,16384 --dump /tmp/k      # also writes .ttgir/.ptx/.sass
    python benchmarks/compile_report.py --shape 128,1,16,4096 --kv-format fp8_blockscale   # an FP8 cache

    python benchmarks/compile_report.py --indexer             # the lightning indexer's launches at row I1

--shape is B,S_q,H,N (contiguous cache, D 576, V 512); --configs as profile_decode.py's.
Uses the ptxas, cuobjdump and nvdisasm that ship inside the triton wheel.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from flashmla_jax.kernels import decode as kernels  # noqa: E402
from flashmla_jax.ops import decode as decode_ops  # noqa: E402
from flashmla_jax.fp8 import FP8_FORMATS, latent_format  # noqa: E402

H100_SMS = 132         # the schedule is planned for an H100 SXM: this machine has no GPU to ask
_TRITON_TYPES = {jnp.bfloat16: "bf16", jnp.float16: "fp16", jnp.float32: "fp32"}
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


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
    names = kernels.mla_decode_split_kernel.arg_names
    signature = {a: "*" + pointer_types[a] if a in pointer_types else ("fp32" if a == "scale" else "constexpr")
                 for a in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in pointer_types}
    constexprs = {(names.index(k),): v for k, v in plan.constexprs.items()}
    src = triton.compiler.ASTSource(kernels.mla_decode_split_kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=plan.num_warps, num_stages=plan.num_stages))
    return compiled, plan


def report(compiled, dump=None):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-c", cubin],
                              capture_output=True, text=True, check=True).stdout
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext, text in (("ttgir", compiled.asm["ttgir"]), ("ptx", compiled.asm["ptx"]), ("sass", sass)):
            with open(os.path.join(dump, f"mla_decode_split_kernel.{ext}"), "w") as f:
                f.write(text)
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    return (f"regs {regs:>3} stack {stack:>4} B  smem {compiled.metadata.shared // 1024:3d} KB  "
            f"HGMMA {sass.count('HGMMA'):3d}  HMMA {sass.count(' HMMA'):3d}  "
            f"wgmma waits {sass.count('WARPGROUP.DEPBAR'):2d}  bar.sync {sass.count('BAR.SYNC'):2d}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,1024,16,16384", help="B,S_q,H,N")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--configs", help=common.DECODE_CONFIG_HELP)
    parser.add_argument("--dump", help="folder for the last config's .ttgir, .ptx and .sass")
    parser.add_argument("--kv-format", default=None, choices=FP8_FORMATS, help="an FP8 cache (default: q's dtype)")
    parser.add_argument("--indexer", action="store_true", help="the lightning indexer's launches at row I1 (bf16 and "
                        "fp8_paged keys) instead of the decode kernel")
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
        compiled, plan = compile_split_kernel(shape, dtype, tiles, args.kv_format)
        options = {k: int(v) for k, v in plan.constexprs.items() if k in ("UNCHAIN_SCORES", "SPLIT_MASKED", "LATE_ROW_SUM")}
        label = (f"BM {plan.constexprs['BLOCK_M']} BN {plan.constexprs['BLOCK_N']} warps {plan.num_warps} "
                 f"stages {plan.num_stages} {options}")
        print(f"{label:95} {report(compiled, args.dump)}", flush=True)


if __name__ == "__main__":
    main()
