"""Compiling a model step that scans its layers over stacked weights, and checking what XLA made of it.

A model of L layers written as `lax.scan` / `nnx.scan` over parameters stacked [L, ...] reads layer i's
weights through a dynamic-slice of each stack inside the compiled while loop. On the GPU, XLA gives most
GEMMs to its Triton GEMM emitter, whose fusion pass takes a producer into the GEMM only when fusing it reads
little more than it writes or its operands are the computation's parameters (`IsInputWorthFusing` in XLA's
gemm_fusion.cc). A one-layer slice of a stack inside a loop is neither (it reads from the whole stack, a
loop-state element), so it stays outside the GEMM and is copied into a buffer of its own: every layer's
weights on every step, as an async device-to-device memcpy, which CUPTI's kernel records do not show.
Measured on the H200 (M2-H128, 61 layers, B 64): 374 MB copied a layer, about 11 ms of a 36.3 ms step. With
Triton GEMMs off process-wide (XLA_FLAGS) the GEMMs ran on cuBLAS, which read the slices in place: 27.3 ms.

`SCANNED_STEP_COMPILER_OPTIONS` turns the Triton GEMM emitter off for one executable (jax.jit's
`compiler_options` become that executable's XLA DebugOptions; nothing process-wide changes) and
`jit_scanned_step` is `jax.jit` with them (benchmark_model.py's "step" way: M2-H128 23.8 ms wall on the H200, no
weight copies). The cost: every GEMM of that executable runs on cuBLAS, which, with
the flag process-wide, made XLA's own attention GEMMs (the "xla" implementation, plain-jnp einsums) slower
(GPU 39.6 -> 50.5 ms). `stack_slices` lists the buffers a compiled module fills with one layer's slice of a
stack, to check what a compile did. The CPU accepts the GPU options and ignores them.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
from typing import Any, Callable, Mapping

import jax

# XLA DebugOptions fields, as jax.jit(compiler_options=...) takes them.
SCANNED_STEP_COMPILER_OPTIONS: Mapping[str, Any] = types.MappingProxyType({
    "xla_gpu_enable_triton_gemm": False,     # cuBLAS GEMMs, which read a stack's slice in place
})


def jit_scanned_step(fun: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with SCANNED_STEP_COMPILER_OPTIONS (a `compiler_options` in
    jit_kwargs adds to them and wins where both name an option). For a step that scans layers over stacked
    weights; the options apply to this executable only."""
    options = {**SCANNED_STEP_COMPILER_OPTIONS, **(jit_kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=options, **jit_kwargs)


@dataclasses.dataclass(frozen=True)
class StackSlice:
    """One buffer of a compiled HLO module that holds one layer's slice of a stacked array."""
    stack: str            # the stack's name (a key of stack_slices' `stacks`)
    instruction: str      # the HLO instruction that produces the buffer
    opcode: str           # e.g. dynamic-slice, copy, fusion, fusion-done
    shape: str            # HLO shape, e.g. bf16[1,7168,1536]
    computation: str      # the HLO computation holding the instruction (a while body: once per layer)
    nbytes: int


# Instructions that name or view a buffer without writing one.
_NO_BUFFER = frozenset({"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "while", "conditional",
                        "call", "opt-barrier", "add-dependency", "after-all"})
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*[({]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$")
_ARRAY = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\](?:\{[^}]*\})?\s+(?P<opcode>[a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=(\{[^}]*\}|%?[\w.\-]+)")


def _slice_dims(stacks: Mapping[str, Any]) -> dict[tuple[int, ...], str]:
    """One layer's slice dims, (1, *rest) and rest, -> the name(s) of the stacks it would be a slice of."""
    if not isinstance(stacks, Mapping):
        raise TypeError(f"stacks must be a mapping of name -> array, got {type(stacks).__name__}")
    names: dict[tuple[int, ...], list[str]] = {}
    for name, stack in stacks.items():
        shape = getattr(stack, "shape", None)
        if shape is None:
            raise TypeError(f"stacks[{name!r}] must be an array or jax.ShapeDtypeStruct, got {type(stack).__name__}")
        if len(shape) < 2:
            raise ValueError(f"stacks[{name!r}] must be stacked [L, ...] with at least one dimension per layer, "
                             f"got shape {tuple(shape)}")
        rest = tuple(int(d) for d in shape[1:])
        for dims in ((1, *rest), rest):
            names.setdefault(dims, []).append(name)
    return {dims: "/".join(dict.fromkeys(n)) for dims, n in names.items()}


def _itemsize(hlo_dtype: str) -> int:
    """Bytes of one element of an HLO element type (pred, s32, bf16, f8e4m3fn, ...), at least 1."""
    bits = re.search(r"\d+", hlo_dtype)
    return 1 if bits is None else max(1, int(bits.group()) // 8)


def stack_slices(hlo_text: str, stacks: Mapping[str, Any]) -> list[StackSlice]:
    """The buffers that a compiled HLO module (`jax.jit(f).lower(...).compile().as_text()`) fills with one
    layer's slice of a stacked array.

    stacks: name -> array or jax.ShapeDtypeStruct of shape [L, *rest]. What is matched: every instruction
    outside fused computations (those are the inside of one kernel and hold no buffer of their own) whose
    result is an array of dims [1, *rest] or [*rest] of a stack (one layer, with or without the unit axis;
    any dtype, so a converted copy counts too), unless the instruction only names or views a buffer
    (parameter, get-tuple-element, bitcast, tuple, constant, while, conditional, call). That catches a
    dynamic-slice, a copy, a loop fusion or an async fusion-done / copy-done producing the slice (the
    tuple-shaped *-start is skipped, so each copy counts once). Not matched: a slice read in place (fused
    into the GEMM or attention kernel that consumes it, or the kernels' own layer offset), a slice of part
    of a layer (other dims). The match is by dims: any other array of a layer's dims is listed as well."""
    if not isinstance(hlo_text, str):
        raise TypeError(f"hlo_text must be str (Compiled.as_text()), got {type(hlo_text).__name__}")
    wanted = _slice_dims(stacks)
    lines = hlo_text.splitlines()
    fused = set()
    for line in lines:
        for target in _CALLS.findall(line):
            fused.update(t.strip().lstrip("%") for t in target.strip("{}").split(","))
    found, computation = [], None
    for line in lines:
        if not line[:1].isspace():           # a computation's header, its closing brace, or module text
            header = _HEADER.match(line)
            computation = header.group("name") if header and line.rstrip().endswith("{") else None
            continue
        instruction = _INSTRUCTION.match(line)
        if computation is None or computation in fused or instruction is None:
            continue
        array = _ARRAY.match(instruction.group("rest"))
        if array is None or array.group("opcode") in _NO_BUFFER:
            continue                          # a tuple-shaped result, or no buffer written
        dims = tuple(int(d) for d in array.group("dims").split(",") if d)
        if dims in wanted:
            dtype = array.group("dtype")
            found.append(StackSlice(wanted[dims], instruction.group("name"), array.group("opcode"),
                                    f"{dtype}[{array.group('dims')}]", computation,
                                    math.prod(dims) * _itemsize(dtype)))
    return found
