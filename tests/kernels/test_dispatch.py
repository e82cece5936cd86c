"""Backend selection: explicit fallbacks (logged once, recorded), forcing, native loading, the start-up report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import kernels
from kernels import _dispatch, native

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_available_backends_reports_every_backend():
    report = kernels.available_backends()
    assert set(report) == {"triton", "native", "reference"}
    assert all(isinstance(v["active"], bool) and isinstance(v["detail"], str) for v in report.values())
    assert report["reference"]["active"]


def test_ineligible_call_falls_back_to_reference_and_logs_once(caplog):
    caplog.set_level(logging.WARNING, logger="kernels")
    for _ in range(3):
        assert _dispatch.select_backend("demo_op", CUDA, "a reason", None) == "reference"
    assert kernels.last_backend()["demo_op"] == "reference"
    assert [r.getMessage() for r in caplog.records] == [
        "demo_op: triton cannot run this call (a reason); using the reference"
    ]
    assert _dispatch.select_backend("demo_op", CUDA, None, None) == "triton"


def test_native_not_loaded_is_a_configuration_not_a_fallback(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="kernels")
    monkeypatch.setattr(native, "is_loaded", lambda: False)
    assert _dispatch.select_backend("demo_cpu_op", CPU, None, "not loaded") == "reference"
    monkeypatch.setattr(native, "is_loaded", lambda: True)
    assert _dispatch.select_backend("demo_cpu_op", CPU, None, None) == "native"
    assert _dispatch.select_backend("demo_cpu_op", CPU, None, _dispatch.NO_NATIVE_KERNEL) == "reference"
    assert not caplog.records


def test_forcing_an_unusable_backend_raises():
    x = torch.randn(4, 3, 5)  # 3-D: the kernels take 4-D batches only
    state = [torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)] * 2
    with kernels.force_backend("triton"), pytest.raises(RuntimeError, match="forced but cannot run"):
        kernels.dual_batch_norm(x, *state, training=True)
    with pytest.raises(ValueError, match="unknown backend"), kernels.force_backend("cuda"):
        pass


def test_real_op_fallback_with_native_loaded(caplog):
    """A 3-D batch on CPU with the native library loaded runs the reference, says so, and is still correct."""
    if not kernels.load_native():
        pytest.skip("native library not built: cmake -S . -B build ... (see docs/kernels.md)")
    caplog.set_level(logging.WARNING, logger="kernels")
    x = torch.randn(4, 3, 5)
    state = [torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3)] * 2
    expected_state = [t.clone() for t in state]
    y = kernels.dual_batch_norm(x, *state, training=True)
    assert kernels.last_backend()["dual_batch_norm"] == "reference"
    assert any("x must be 4-D" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(y, kernels.dual_batch_norm_reference(x, *expected_state, training=True))


def test_load_native_rejects_a_missing_explicit_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        kernels.load_native(tmp_path / "missing.so")


def test_a_native_library_built_from_other_sources_is_not_used(tmp_path, monkeypatch, caplog):
    """build/ is ignored by git and nothing rebuilt it: a library from an older checkout (its NaN rules changed
    twice since) loaded without a word. The library carries its sources' hash; another one's, or none, is not used."""
    from kernels import native

    monkeypatch.setattr(native, "_loaded_from", None)  # as in a fresh process (nothing loaded yet)
    stale = tmp_path / "libarat_native.so"
    caplog.set_level(logging.WARNING, logger="kernels")
    for content in (b"\x7fELF arat-native-sources:" + b"0" * 64, b"\x7fELF built before the hash"):
        stale.write_bytes(content)
        assert native.load_native(stale) is False and not native.is_loaded()
        assert "built from other sources" in caplog.text and "bash scripts/build_native.sh" in caplog.text
        caplog.clear()


def test_the_built_library_carries_the_hash_python_computes_from_its_sources():
    """CMake embeds a hash of csrc/ in the library; the loader compares it with the one Python computes: they must
    agree on a fresh build, else every built library would be refused as stale."""
    built = Path(native.__file__).resolve().parents[1] / "build" / native.LIBRARY_NAME
    if not built.is_file():
        pytest.skip("the native library is not built (scripts/test.sh builds it: bash scripts/build_native.sh)")
    assert native.built_from(built) == native.source_hash()
