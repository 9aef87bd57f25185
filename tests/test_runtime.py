"""realsyn.runtime: device, offline mode, faiss GPU choice, unit-length rows."""

import numpy as np
import pytest

from realsyn import runtime


def test_resolve_device_keeps_an_explicit_device():
    assert runtime.resolve_device("cpu") == "cpu" and runtime.resolve_device("cuda:1") == "cuda:1"
    assert runtime.resolve_device("auto") in ("cpu", "cuda")


@pytest.mark.parametrize("value, offline", [("1", True), ("TRUE", True), (" on ", True), ("yes", True), ("0", False), ("", False)])
def test_hub_offline(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert runtime.hub_offline() is offline


def test_faiss_use_gpu_choices(monkeypatch):
    with pytest.raises(ValueError):
        runtime.faiss_use_gpu("sometimes")
    assert runtime.faiss_use_gpu("never") is False
    monkeypatch.setattr(runtime, "faiss_gpu_count", lambda: 0)
    assert runtime.faiss_use_gpu("auto") is False
    with pytest.raises(RuntimeError):
        runtime.faiss_use_gpu("always")
    monkeypatch.setattr(runtime, "faiss_gpu_count", lambda: 2)
    assert runtime.faiss_use_gpu("auto") is True and runtime.faiss_use_gpu("always") is True


def test_l2_normalize_is_float32_unit_rows_and_keeps_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], dtype=np.float64)
    out = runtime.l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:2], np.array([[0.6, 0.8], [0.0, 0.0]], dtype=np.float32))
    # the same numbers as the float32 formula both former copies used
    y = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    expected = (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    np.testing.assert_array_equal(runtime.l2_normalize(y), expected)


def test_env_number_parses_defaults_and_names_the_variable(monkeypatch):
    from realsyn.runtime import env_number

    monkeypatch.delenv("REALSYN_TEST_N", raising=False)
    assert env_number("REALSYN_TEST_N", 8, integer=True) == 8
    monkeypatch.setenv("REALSYN_TEST_N", "  ")
    assert env_number("REALSYN_TEST_N", 2.5) == 2.5
    monkeypatch.setenv("REALSYN_TEST_N", "3")
    assert env_number("REALSYN_TEST_N", 8, integer=True, minimum=1) == 3
    monkeypatch.setenv("REALSYN_TEST_N", "2.5")
    assert env_number("REALSYN_TEST_N", 1.0) == 2.5
    with pytest.raises(ValueError, match=r"REALSYN_TEST_N='2.5' is not an integer"):
        env_number("REALSYN_TEST_N", 8, integer=True)
    monkeypatch.setenv("REALSYN_TEST_N", "x")
    with pytest.raises(ValueError, match=r"REALSYN_TEST_N='x' is not a number"):
        env_number("REALSYN_TEST_N", 1.0)
    monkeypatch.setenv("REALSYN_TEST_N", "0")
    with pytest.raises(ValueError, match=r"REALSYN_TEST_N must be >= 1, got 0"):
        env_number("REALSYN_TEST_N", 8, integer=True, minimum=1)
