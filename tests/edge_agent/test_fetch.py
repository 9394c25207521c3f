"""Bounded, resumable downloads against a real HTTP server that misbehaves on demand."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edge_agent.fetch import FetchLimits, UrlExpiredError, fetch_artifact
from shared.errors import DownloadError, IntegrityError
from tests.edge_agent.artifact_server import ArtifactServer

DATA = bytes(range(256)) * 400  # 100 KiB
SHA = hashlib.sha256(DATA).hexdigest()
FAST = FetchLimits(timeout_s=20, attempts=3, rate_window_s=0.5, min_rate_bps=1000)


async def test_download_verifies_and_lands_atomically(tmp_path: Path) -> None:
    """A plain download ends as exactly the file, with no .part left."""
    with ArtifactServer(DATA) as server:
        dest = await fetch_artifact(server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA)
    assert dest.read_bytes() == DATA
    assert list(tmp_path.iterdir()) == [dest]


async def test_download_cut_at_half_resumes_with_a_range_request(tmp_path: Path) -> None:
    """The server closes at 50%: the next attempt asks for the rest and the file verifies."""
    with ArtifactServer(DATA, "cut_once") as server:
        dest = await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=FAST
        )
    assert dest.read_bytes() == DATA
    assert server.requests == [None, f"bytes={len(DATA) // 2}-"]


@pytest.mark.parametrize("mode", ["oversize", "oversize_undeclared"])
async def test_more_bytes_than_the_manifest_says_are_cut_off(tmp_path: Path, mode) -> None:
    """Endless or oversized data stops at the manifest's size and leaves nothing behind."""
    with ArtifactServer(DATA, mode) as server, pytest.raises(IntegrityError) as err:
        await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=FAST
        )
    assert err.value.reason == "size_exceeded"
    assert list(tmp_path.iterdir()) == []


async def test_one_byte_a_second_is_cut_off_as_too_slow(tmp_path: Path) -> None:
    """Slow retrieval: under the minimum rate for a whole window, the download fails."""
    limits = FetchLimits(timeout_s=30, attempts=1, rate_window_s=1.0, min_rate_bps=1000)
    with ArtifactServer(DATA, "slow") as server, pytest.raises(DownloadError) as err:
        await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=limits
        )
    assert err.value.reason == "download_too_slow"
    assert list(tmp_path.iterdir()) == []


async def test_overall_timeout_bounds_the_download(tmp_path: Path) -> None:
    """However the bytes trickle, the whole download never outlives its timeout."""
    limits = FetchLimits(timeout_s=1.5, attempts=5, rate_window_s=10, min_rate_bps=1)
    with ArtifactServer(DATA, "slow") as server, pytest.raises(DownloadError) as err:
        await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=limits
        )
    assert err.value.reason == "download_timeout"
    assert list(tmp_path.iterdir()) == []


async def test_refused_url_is_reported_as_expired(tmp_path: Path) -> None:
    """HTTP 403 (an expired presigned URL) is its own error, for the caller to refresh."""
    with ArtifactServer(DATA, "expired") as server, pytest.raises(UrlExpiredError):
        await fetch_artifact(server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA)


async def test_wrong_digest_is_refused_and_removed(tmp_path: Path) -> None:
    """Bytes of the right size but another sha256 never become the file."""
    with ArtifactServer(DATA) as server, pytest.raises(IntegrityError) as err:
        await fetch_artifact(server.url, tmp_path / "m.tflite", size=len(DATA), sha256="0" * 64)
    assert err.value.reason == "sha256_mismatch"
    assert list(tmp_path.iterdir()) == []


async def test_unreachable_server_fails_after_the_attempts(tmp_path: Path) -> None:
    """A closed port gives a DownloadError, not a hang."""
    limits = FetchLimits(timeout_s=10, attempts=2)
    with pytest.raises(DownloadError):
        await fetch_artifact(
            "http://127.0.0.1:1/x", tmp_path / "m", size=len(DATA), sha256=SHA, limits=limits
        )
