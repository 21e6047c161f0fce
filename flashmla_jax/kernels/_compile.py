"""Compiling a kernel for Hopper (sm_90) on any machine, and reading what the compiler made of it.

Triton compiles without a GPU; ptxas, cuobjdump and nvdisasm ship inside the triton wheel. This is how CI checks
the Gluon kernels, which Triton's interpreter cannot run, and how benchmarks/compile_report.py inspects the
tl kernels: registers, spills (stack), shared memory, the compiled warp count and instruction counts in the SASS.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Mapping

HOPPER = 90
SHARED_MEMORY_LIMIT = 227 * 1024      # bytes of shared memory one program may take on sm_90


@dataclasses.dataclass(frozen=True)
class CompiledFacts:
    """What one compiled kernel holds."""
    registers: int           # per thread, as launched (before any setmaxnreg)
    stack: int               # bytes of local memory per thread: spills when > 0
    shared: int              # bytes of shared memory
    num_warps: int           # warps the kernel is compiled for (warp specialization adds partitions)
    global_scratch: int      # bytes of global scratch per program (device-side tensor descriptors)
    sass: str                # the disassembly

    def count(self, opcode: str) -> int:
        """Instructions in the SASS whose opcode starts with `opcode` (e.g. "HGMMA", "UTMALDG")."""
        return len(re.findall(rf"\b{re.escape(opcode)}[\w.]*", self.sass))


def compile_for_hopper(fn, pointer_types: Mapping[str, str], constexprs: Mapping[str, object], num_warps: int,
                       num_stages: int = 2, scalar_types: Mapping[str, str] | None = None):
    """triton.compile of `fn` (@triton.jit or Gluon) for sm_90 with the given arguments.

    pointer_types: argument name -> element type ("bf16", "fp32", "i32", "u8", ...), every pointer 16-byte
    aligned as jax-triton assumes; scalar_types: argument name -> type ("fp32", "i32"); every other argument must
    be in constexprs (by name)."""
    import triton
    from triton.backends.compiler import GPUTarget

    scalar_types = dict(scalar_types or {})
    names = fn.arg_names
    missing = [a for a in names if a not in pointer_types and a not in scalar_types and a not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no type or constexpr value for {missing}")
    signature = {a: ("*" + pointer_types[a]) if a in pointer_types else scalar_types.get(a, "constexpr")
                 for a in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in pointer_types}
    values = {(names.index(k),): v for k, v in constexprs.items() if k in names}
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource
        src = GluonASTSource(fn, signature, constexprs=values, attrs=attrs)
    else:
        src = triton.compiler.ASTSource(fn, signature, constexprs=values, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", HOPPER, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def facts(compiled) -> CompiledFacts:
    """Registers, stack, shared memory, warps, scratch and SASS of a kernel `compile_for_hopper` returned."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = _run("cuobjdump", "--dump-resource-usage", cubin)
        sass = _run("nvdisasm", "-c", cubin)
    md = compiled.metadata
    return CompiledFacts(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                         stack=int(re.search(r"STACK:(\d+)", usage).group(1)), shared=int(md.shared),
                         num_warps=int(md.num_warps), global_scratch=int(md.global_scratch_size or 0), sass=sass)


def _run(tool: str, *args: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout
