"""flashmla_jax._checks: one rule for every argument (wrong type -> TypeError, wrong shape or value ->
ValueError, the message names the argument; NumPy integers accepted, bools rejected)."""
import jax.numpy as jnp
import numpy as np
import pytest

from flashmla_jax import _checks


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_integer_accepts_python_and_numpy_ints(value):
    out = _checks.integer("n", value, lo=1, hi=3)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 3.0, "3", None, np.float32(3)])
def test_integer_rejects_other_types(value):
    with pytest.raises(TypeError, match="^n must be an int"):
        _checks.integer("n", value)


@pytest.mark.parametrize("value, lo, hi", [(0, 1, None), (5, None, 4), (9, 1, 8)])
def test_integer_out_of_range_is_a_value_error(value, lo, hi):
    with pytest.raises(ValueError, match="^n must be an int"):
        _checks.integer("n", value, lo, hi)


def test_optional_integer():
    assert _checks.optional_integer("n", None, 1) is None
    assert _checks.optional_integer("n", np.int16(2), 1) == 2


def test_page_size():
    assert _checks.page_size("page_size", np.int64(64)) == 64
    with pytest.raises(TypeError, match="page_size"):
        _checks.page_size("page_size", 64.0)
    for bad in (48, 8, 512):
        with pytest.raises(ValueError, match="page_size"):
            _checks.page_size("page_size", bad)


def test_int32_array_shape_then_dtype():
    _checks.int32_array("t", jnp.zeros((2, 5), jnp.int32), (2, None), "int32 [2, n]")
    with pytest.raises(ValueError, match="^t must be int32 \\[2, n\\], got shape"):
        _checks.int32_array("t", jnp.zeros((3, 5), jnp.int32), (2, None), "int32 [2, n]")
    with pytest.raises(ValueError, match="^t must be"):
        _checks.int32_array("t", jnp.zeros((2,), jnp.int32), (2, None), "int32 [2, n]")
    with pytest.raises(TypeError, match="^t must be int32, got float32"):
        _checks.int32_array("t", jnp.zeros((2, 5), jnp.float32), (2, None), "int32 [2, n]")


def test_dtypes():
    _checks.float_dtype("q", jnp.zeros(1, jnp.bfloat16))
    with pytest.raises(TypeError, match="^q must be float16"):
        _checks.float_dtype("q", jnp.zeros(1, jnp.int32))
    with pytest.raises(TypeError, match="^k dtype float16 must equal q's dtype float32"):
        _checks.same_dtype("k", jnp.zeros(1, jnp.float16), "q", jnp.zeros(1, jnp.float32))


def test_implementation():
    assert _checks.implementation(None) is None
    assert _checks.implementation("interpret") == "interpret"
    with pytest.raises(ValueError, match="implementation must be one of"):
        _checks.implementation("cuda")
    with pytest.raises(TypeError, match="implementation must be one of"):
        _checks.implementation(1)


def test_softmax_scale():
    assert _checks.softmax_scale(None, 64) == 0.125
    assert _checks.softmax_scale(np.float32(0.5), 64) == 0.5 and _checks.softmax_scale(2, 64) == 2.0
    for bad in (True, "0.1", 1j):
        with pytest.raises(TypeError, match="softmax_scale"):
            _checks.softmax_scale(bad, 64)


def test_kv_format():
    assert _checks.kv_format("kv_format", None) is None
    assert _checks.kv_format("kv_format", "fp8_pertensor") == "fp8_pertensor"
    with pytest.raises(ValueError, match="^kv_format must be None or one of"):
        _checks.kv_format("kv_format", "fp8_e5m2")
    for bad in (1, b"fp8_blockscale", ("fp8_blockscale",)):
        with pytest.raises(TypeError, match="^kv_format must be None or one of"):
            _checks.kv_format("kv_format", bad)
    with pytest.raises(ValueError, match="^kv_format=None stores the latent as it is"):
        _checks.kv_format("kv_format", None, required=True)


def test_float_scale():
    assert _checks.float_scale("s", 2).dtype == jnp.float32
    assert _checks.float_scale("s", np.float64(0.5)).shape == ()
    assert _checks.float_scale("s", jnp.ones((3,), jnp.bfloat16)).shape == (3,)
    for bad in (True, "1.0", None, jnp.ones((), jnp.int32)):
        with pytest.raises(TypeError, match="^s must be"):
            _checks.float_scale("s", bad)
