"""One way to launch a Triton kernel from JAX: jax-triton on the GPU, Triton's interpreter on the CPU.

Gluon kernels (`triton.experimental.gluon.jit`) launch through the same call on the GPU (ops/_jax_triton_hooks.py
lets jax-triton 0.3.1 compile them); the interpreter cannot run them.

Both paths take the same arguments as `jax_triton.triton_call`: array and scalar inputs by position (a
float scalar as `np.float32`), then one output pointer per `out_shape` entry, then constexpr keywords.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

from flashmla_jax.ops import _jax_triton_hooks
from flashmla_jax.ops._host_call import host_call

_INTERPRETED: dict[Any, Any] = {}
_INTERPRET_LOCK = threading.Lock()


def launch(kernel, *args, out_shape: Sequence[jax.ShapeDtypeStruct], grid: tuple | Callable,
           implementation: str, num_warps: int = 4, num_stages: int = 2,
           zeroed_outputs: Sequence[int] = (), input_output_aliases: dict[int, int] | None = None,
           **constexprs):
    """Runs `kernel` over `grid` and returns the list of outputs described by `out_shape`.

    implementation: "triton" (jax-triton, CUDA) or "interpret" (Triton's interpreter through
    `jax.pure_callback`, CPU). Outputs not in `zeroed_outputs` start as NaN (floats) or -1 (ints) in
    the interpreter, so an element the kernel forgets to write fails the tests.
    input_output_aliases {input index: output index}: that output is the input's buffer, updated in
    place (inputs counted among the array arguments; the kernel still takes both pointers).
    """
    aliases = dict(input_output_aliases or {})
    out_shape = list(out_shape)
    if implementation == "triton":
        import jax_triton  # imported here: it cannot be imported without a GPU build of JAX

        _jax_triton_hooks.install()             # Gluon kernels, global scratch, the compiled warp count
        outs = jax_triton.triton_call(
            *args, kernel=kernel, out_shape=out_shape, grid=grid, num_warps=num_warps,
            num_stages=num_stages, zeroed_outputs=tuple(zeroed_outputs), input_output_aliases=aliases,
            **constexprs)
        return list(outs)
    if implementation != "interpret":
        raise ValueError(f"launch() runs Triton kernels only, not implementation={implementation!r}")
    if _jax_triton_hooks.is_gluon(kernel):
        raise ValueError(f"{getattr(kernel, '__name__', kernel)} is a Gluon kernel: Triton's interpreter cannot "
                         "run Gluon (it compiles for Hopper GPUs only)")
    return _interpret(kernel, args, out_shape, grid, tuple(zeroed_outputs), aliases, constexprs)


def _interpret(kernel, args, out_shape, grid, zeroed_outputs, aliases, constexprs):
    _import_interpreter_modules()
    is_array = [not isinstance(a, (bool, int, float, np.floating, np.integer)) for a in args]
    arrays = [a for a, arr in zip(args, is_array) if arr]
    grid = tuple(grid(constexprs) if callable(grid) else grid)

    def host(*host_arrays):
        it = iter(host_arrays)
        kernel_args = [_to_torch(np.asarray(next(it))) if arr else _to_python(a) for a, arr in zip(args, is_array)]
        aliased = {o: np.asarray(host_arrays[i]) for i, o in aliases.items()}
        outs = []
        for i, s in enumerate(out_shape):
            fill = 0 if i in zeroed_outputs else (np.nan if np.issubdtype(s.dtype, np.inexact) else -1)
            outs.append(_to_torch(aliased[i] if i in aliased else np.full(s.shape, fill, dtype=s.dtype)))
        with _interpreting_jit_calls():
            _interpreted(kernel)[grid](*kernel_args, *outs, **constexprs)
        return tuple(_from_torch(o, s.dtype) for o, s in zip(outs, out_shape))

    # host_call: jax.pure_callback without the device_put that stalls a program on many CPU devices
    # (ops/_host_call.py).
    return list(host_call(host, tuple(out_shape), *arrays))


def _import_interpreter_modules() -> None:
    """Imports what the host function uses, here (when the program is traced) rather than in the callback: a
    program may still run when Python exits, and an import there fails (torch's import registers a threading
    exit hook, refused after shutdown: "can't register atexit after shutdown"). On many devices the failed
    callback left the other devices waiting in a collective until they aborted (rc 134, 60 s)."""
    for module in ("ml_dtypes", "torch", "triton.runtime.interpreter"):
        importlib.import_module(module)


def _interpreted(jit_fn):
    """The interpreter's twin of a @triton.jit function (cached)."""
    from triton.runtime.interpreter import InterpretedFunction

    # Keyed by id: hashing a JITFunction walks its source, which fails while the interpreter patches tl.
    fn = _INTERPRETED.get(id(jit_fn))
    if fn is None:
        fn = _INTERPRETED[id(jit_fn)] = InterpretedFunction(getattr(jit_fn, "fn", jit_fn))
    return fn


@contextlib.contextmanager
def _interpreting_jit_calls():
    """Routes calls of @triton.jit functions (our helpers, and triton.language's own: tl.sum, tl.max, ...)
    to the interpreter for the duration of one interpreted launch.

    Triton decides between compiling and interpreting when a function is decorated, and only an
    environment variable set before `import triton` makes its standard library interpretable; this
    scoped patch gives the same result without touching the process's GPU path.
    """
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    with _INTERPRET_LOCK:
        original_call = JITFunction.__call__
        original_dot = interpreter.InterpreterBuilder.create_dot
        original_cast = interpreter.InterpreterBuilder.cast_impl
        JITFunction.__call__ = _call_interpreted
        interpreter.InterpreterBuilder.create_dot = _bf16_aware_dot(original_dot)
        interpreter.InterpreterBuilder.cast_impl = _bf16_rounding_cast(original_cast)
        try:
            yield
        finally:
            JITFunction.__call__ = original_call
            interpreter.InterpreterBuilder.create_dot = original_dot
            interpreter.InterpreterBuilder.cast_impl = original_cast


def _call_interpreted(jit_fn, *args, **kwargs):
    """A @triton.jit helper called from an interpreted kernel, run by the interpreter with triton.language patched
    for the call only. Triton 3.6's `InterpretedFunction.__call__` patches it and never restores it, which leaves
    tl's builtins bound to the interpreter: a kernel compiled later in the same process (a Gluon compile, an sm_90
    compile check) then fails in code generation."""
    from triton.runtime import interpreter

    fn = _interpreted(jit_fn)
    scope = interpreter._patch_lang(fn.fn)
    try:
        return fn.rewrite()(*args, **kwargs)
    except Exception as e:
        raise interpreter.InterpreterError(repr(e)) from e
    finally:
        scope.restore()


def _bf16_aware_dot(original_dot):
    """Triton 3.6's interpreter keeps bfloat16 as raw uint16 bits and multiplies the bits in tl.dot;
    widen bfloat16 operands to float32 (exact) first."""
    from triton.runtime.interpreter import TensorHandle
    import triton.language as tl

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = x.data.astype(np.uint32) << np.uint32(16)
        return TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    return create_dot


def _bf16_rounding_cast(original_cast):
    """Triton 3.6's interpreter truncates float32 to bfloat16 in `.to(tl.bfloat16)`, where the GPU rounds
    to nearest even; round as the GPU does (ml_dtypes' cast), so interpreted bfloat16 tiles (dequantized
    FP8 tiles, probabilities) carry the GPU's rounding error, not a truncation bias twice its size."""
    import ml_dtypes
    from triton.runtime.interpreter import TensorHandle
    import triton.language as tl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.asarray(src.data, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
            return TensorHandle(bits, tl.bfloat16)
        return original_cast(self, src, dst_type)

    return cast_impl


def _to_python(x):
    return float(x) if isinstance(x, (float, np.floating)) else x


def _to_torch(a: np.ndarray):
    import torch

    if a.dtype == jax.numpy.bfloat16:
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))  # a writable copy: the kernel may write through it


def _from_torch(t, dtype) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(dtype)
    return t.numpy()
