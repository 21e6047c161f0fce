"""Input checks shared by the ops, the cache and the Flax layer.

One rule for every argument: a wrong type (a Python type, or an array's dtype) raises TypeError, a wrong
shape or value raises ValueError, and each message names the argument. Integer arguments accept Python and
NumPy integers and reject bools (a bool is an int to Python, never a count or a size here).
"""
from __future__ import annotations

import numbers
import operator

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("triton", "xla", "interpret")
FP8_FORMATS = ("fp8_blockscale", "fp8_pertensor")          # the kv_format values (flashmla_jax/fp8.py's layouts)
INDEX_FORMATS = ("fp8_paged",)                              # the lightning indexer's key formats (fp8.py, last section)
FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)     # what the kernels take
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 16, 256                       # a key tile lies in one page; pages are powers of two


def is_int(x) -> bool:
    """True for Python and NumPy integers (anything with __index__), False for bools."""
    if isinstance(x, bool):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as a Python int: TypeError unless an integer (bools rejected), ValueError outside [lo, hi]."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo}, {hi}]" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise ValueError(f"{name} must be an int {bounds}, got {value}")
    return value


def optional_integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int | None:
    """None, or `integer(name, value, lo, hi)`."""
    return None if value is None else integer(name, value, lo, hi)


def implementation(value) -> str | None:
    """None or one of IMPLEMENTATIONS, the names every op takes (which code runs a call is the op's registry's
    choice, ops/_registry.py; mla_decode also takes "gluon")."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {type(value).__name__}")
    if value is not None and value not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {value!r}")
    return value


def float_dtype(name: str, x) -> None:
    """x must be float16, bfloat16 or float32 (the kernels' dtypes)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


def same_dtype(name: str, x, ref_name: str, ref) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {x.dtype} must equal {ref_name}'s dtype {ref.dtype}")


def int32_array(name: str, x, shape: tuple, shape_text: str) -> None:
    """x must be int32 of `shape` (None entries match any size); shape_text describes it for the message."""
    if x.ndim != len(shape) or any(want is not None and got != want for got, want in zip(x.shape, shape)):
        raise ValueError(f"{name} must be {shape_text}, got shape {x.shape}")
    if x.dtype != jnp.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")


def page_size(name: str, value) -> int:
    """A page size: an int, a power of two in [MIN_PAGE_SIZE, MAX_PAGE_SIZE]."""
    value = integer(name, value)
    if not is_pow2(value) or not MIN_PAGE_SIZE <= value <= MAX_PAGE_SIZE:
        raise ValueError(f"{name} must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}], got {value}")
    return value


def static_scale(value) -> float | None:
    """The caller's softmax_scale as a Python float (None stays None): a Python or NumPy real, or a concrete
    0-d float array. The scale is compiled into the kernels, so a traced one is a TypeError that says so; a
    scale <= 0 is a ValueError on every implementation (NaN and inf pass: every row that reads them is NaN)."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError("softmax_scale must be a Python float: it is compiled into the kernels, and a traced value "
                        "(an argument of a jitted function) has no value at compile time; pass it as a static "
                        "argument (jax.jit(..., static_argnames=...)) or close over it")
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and jnp.issubdtype(value.dtype, jnp.floating):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"softmax_scale must be None or a real number, got {value!r}")
    value = float(value)
    if value <= 0:
        raise ValueError(f"softmax_scale must be > 0 (scores are q·k times it), got {value}")
    return value


def softmax_scale(value, head_dim: int) -> float:
    """The caller's scale as a float (`static_scale`), or head_dim ** -0.5 when None."""
    value = static_scale(value)
    return head_dim ** -0.5 if value is None else value


def as_array(name: str, value):
    """An array argument as a jax array: arrays and tracers as they are, array-likes (lists, NumPy arrays,
    Python scalars) through jnp.asarray; TypeError naming the argument for anything else. A NumPy array whose
    dtype JAX would narrow (float64, int64 without x64) is left as it is, so that the dtype check names it."""
    if isinstance(value, (jax.Array, jax.core.Tracer)):
        return value
    try:
        array = jnp.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array or an array-like (a list, a NumPy array), got "
                        f"{type(value).__name__}: {e}") from None
    dtype = getattr(value, "dtype", None)
    return value if dtype is not None and array.dtype != dtype else array


def concrete(*values) -> bool:
    """True when every value is known here (no tracer among them): checks on values, not only shapes, apply."""
    return not any(isinstance(v, jax.core.Tracer) for v in values)


def layer_index(name: str, value, num_layers: int | None):
    """A layer of a stack of `num_layers` as a 0-d int32 array: a Python or NumPy integer must lie in
    [0, num_layers) (ValueError); a traced integer scalar is clipped into it (TypeError for anything else).
    num_layers None: the stack's size is not known here, and a static value is only checked for >= 0."""
    if is_int(value) and not hasattr(value, "shape"):
        value = integer(name, value, lo=0, hi=None if num_layers is None else num_layers - 1)
        return jnp.asarray(value, jnp.int32)
    if isinstance(value, bool) or not hasattr(value, "dtype"):
        raise TypeError(f"{name} must be an int or an integer scalar array, got {type(value).__name__}")
    if value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer scalar, got {value.dtype} {value.shape}")
    value = value.astype(jnp.int32)
    return value if num_layers is None else jnp.clip(value, 0, num_layers - 1)


def kv_format(name: str, value, required: bool = False) -> str | None:
    """None (a cache in the queries' float dtype) or one of FP8_FORMATS: TypeError for a non-string,
    ValueError for another string, and for None when `required` (quantizing needs a format)."""
    return _one_format(name, value, FP8_FORMATS, required, "stores the latent as it is, in the cache's dtype")


def index_kv_format(name: str, value, required: bool = False) -> str | None:
    """None (indexer keys in the queries' float dtype) or one of INDEX_FORMATS, as `kv_format` checks it."""
    return _one_format(name, value, INDEX_FORMATS, required, "keeps the indexer keys in a float dtype")


def _one_format(name: str, value, formats: tuple, required: bool, none_keeps: str) -> str | None:
    if value is None:
        if required:
            raise ValueError(f"{name}=None {none_keeps}: there is nothing to (de)quantize; pass one of {formats}")
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be None or one of {formats}, got {type(value).__name__}")
    if value not in formats:
        raise ValueError(f"{name} must be None or one of {formats}, got {value!r}")
    return value


def float_scale(name: str, value):
    """A float32 scale as a float32 array of value's shape: a Python or NumPy real, or a float array
    (TypeError for a bool, a non-number or a non-float array). Shapes are the caller's rule."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or hasattr(value, "dtype")):
        raise TypeError(f"{name} must be a float or a float32 array, got {type(value).__name__}")
    if hasattr(value, "dtype") and not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{name} must be float32, got {value.dtype}")
    return jnp.asarray(value, jnp.float32)


def kv_scale(name: str, value, kv_format: str | None, num_layers: int | None, default: float | None = None):
    """An "fp8_pertensor" cache's scale as a float32 array of shape () or, for a stack of `num_layers`, also
    [num_layers]; `default` stands in for None (without one, None is a ValueError). Refused (ValueError) with
    any other kv_format; a bool, a non-number or a non-float array is a TypeError."""
    if kv_format != "fp8_pertensor":
        if value is not None:
            raise ValueError(f"{name} is only for kv_format='fp8_pertensor' (got kv_format={kv_format!r}): "
                             "fp8_blockscale tokens carry their own scales")
        return None
    if value is None:
        if default is None:
            raise ValueError(f"kv_format='fp8_pertensor' needs {name}, the cache's float32 scale")
        value = default
    value = float_scale(name, value)
    shapes = ((), (num_layers,)) if num_layers is not None else ((),)
    if value.shape not in shapes:
        want = "a scalar or [L] (one per layer)" if num_layers is not None else "a scalar"
        raise ValueError(f"{name} must be {want}, got shape {value.shape}")
    return value
