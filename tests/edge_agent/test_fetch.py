"""Bounded, resumable downloads against a real HTTP server that misbehaves on demand."""

from __future__ import annotations

import hashlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import structlog

from edge_agent.fetch import FetchLimits, UrlExpiredError, fetch_artifact
from shared.errors import DownloadError, IntegrityError
from tests.edge_agent.artifact_server import ArtifactServer

DATA = bytes(range(256)) * 400  # 100 KiB
SHA = hashlib.sha256(DATA).hexdigest()
FAST = FetchLimits(budget_s=20, rate_window_s=0.5, min_rate_bps=1000)
CLOSED_PORT_URL = "http://127.0.0.1:1/x"


class FailingFirst(ArtifactServer):
    """Answers the first `failures` requests with HTTP `status`, then serves normally."""

    def __init__(self, data: bytes, *, status: int, failures: int) -> None:
        super().__init__(data)
        self.status, self.failures = status, failures

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        if len(self.requests) < self.failures:
            self.requests.append(h.headers.get("Range"))
            h.send_response(self.status)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        super().handle(h)


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


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_server_errors_are_retried_more_times_than_the_old_four(
    tmp_path: Path, status: int
) -> None:
    """Six 5xx/429 answers in a row are waited out: the seventh request gets the file."""
    limits = FetchLimits(budget_s=60, backoff_base_s=0.01, backoff_cap_s=0.05)
    with FailingFirst(DATA, status=status, failures=6) as server:
        dest = await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=limits
        )
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA
    assert len(server.requests) == 7


async def test_each_retry_is_a_warning_with_its_attempt_and_the_budget_left(
    tmp_path: Path,
) -> None:
    """`download_retry` warnings count the attempts and show the budget going down."""
    limits = FetchLimits(budget_s=60, backoff_base_s=0.01, backoff_cap_s=0.05)
    with (
        FailingFirst(DATA, status=503, failures=3) as server,
        structlog.testing.capture_logs() as logs,
    ):
        await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=limits
        )
    retries = [e for e in logs if e["event"] == "download_retry"]
    assert [e["attempt"] for e in retries] == [1, 2, 3]
    assert {e["log_level"] for e in retries} == {"warning"}
    assert all(0 < e["budget_left_s"] <= 60 for e in retries)
    assert retries[0]["budget_left_s"] >= retries[-1]["budget_left_s"]
    assert "HTTP 503" in retries[0]["error"]


@pytest.mark.parametrize("status", [404, 400])
async def test_a_client_error_is_not_retried(tmp_path: Path, status: int) -> None:
    """404/400 will not change by asking again: one request, a DownloadError, no file."""
    with (
        FailingFirst(DATA, status=status, failures=99) as server,
        pytest.raises(DownloadError) as err,
    ):
        await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=FAST
        )
    assert err.value.reason == "download_failed"
    assert len(server.requests) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["oversize", "oversize_undeclared"])
async def test_more_bytes_than_the_manifest_says_are_cut_off(tmp_path: Path, mode) -> None:
    """Endless or oversized data stops at the manifest's size and leaves nothing behind."""
    with ArtifactServer(DATA, mode) as server, pytest.raises(IntegrityError) as err:
        await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=FAST
        )
    assert err.value.reason == "size_exceeded"
    assert list(tmp_path.iterdir()) == []
    assert len(server.requests) == 1  # never retried


async def test_one_byte_a_second_is_cut_off_as_too_slow_and_resumed(tmp_path: Path) -> None:
    """Slow retrieval: under the minimum rate for a whole window, the transfer is cut and
    retried from where it stopped; when the budget is spent, nothing is left behind."""
    limits = FetchLimits(budget_s=4, rate_window_s=1.0, min_rate_bps=1000)
    with (
        ArtifactServer(DATA, "slow") as server,
        structlog.testing.capture_logs() as logs,
        pytest.raises(DownloadError),
    ):
        await fetch_artifact(
            server.url, tmp_path / "m.tflite", size=len(DATA), sha256=SHA, limits=limits
        )
    first = next(e for e in logs if e["event"] == "download_retry")
    assert first["reason"] == "download_too_slow"
    assert server.requests[0] is None
    assert server.requests[1] is not None and server.requests[1].startswith("bytes=")
    assert list(tmp_path.iterdir()) == []


async def test_the_budget_bounds_a_download_that_never_finishes(tmp_path: Path) -> None:
    """However the bytes trickle, the whole download never outlives its budget."""
    limits = FetchLimits(budget_s=1.5, rate_window_s=10, min_rate_bps=1)
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
    assert len(server.requests) == 1  # never retried


async def test_wrong_digest_is_refused_and_removed(tmp_path: Path) -> None:
    """Bytes of the right size but another sha256 never become the file."""
    with ArtifactServer(DATA) as server, pytest.raises(IntegrityError) as err:
        await fetch_artifact(server.url, tmp_path / "m.tflite", size=len(DATA), sha256="0" * 64)
    assert err.value.reason == "sha256_mismatch"
    assert list(tmp_path.iterdir()) == []
    assert len(server.requests) == 1  # never retried


async def test_unreachable_server_is_retried_until_the_budget_is_spent(tmp_path: Path) -> None:
    """A closed port: several attempts with backoff, then a DownloadError naming them, not a hang."""
    limits = FetchLimits(budget_s=2, backoff_base_s=0.05, backoff_cap_s=0.2)
    with structlog.testing.capture_logs() as logs, pytest.raises(DownloadError) as err:
        await fetch_artifact(
            CLOSED_PORT_URL, tmp_path / "m", size=len(DATA), sha256=SHA, limits=limits
        )
    assert err.value.reason == "download_failed"
    attempts = len([e for e in logs if e["event"] == "download_retry"]) + 1
    assert attempts > 4
    assert f"gave up after {attempts} attempts" in str(err.value)


def test_a_budget_is_cut_to_the_time_left_never_raised() -> None:
    """`within` lowers the budget to a command's remaining time and never extends it."""
    limits = FetchLimits(budget_s=300)
    assert limits.within(20).budget_s == 20
    assert limits.within(900) is limits


@pytest.mark.parametrize(
    "kw", [{"budget_s": 0}, {"budget_s": -1}, {"backoff_base_s": 0}, {"backoff_cap_s": 0.1}]
)
def test_limits_refuse_a_budget_or_backoff_that_cannot_work(kw: dict[str, float]) -> None:
    """No budget, or a backoff whose base is not positive or over its cap: ValueError."""
    with pytest.raises(ValueError):
        FetchLimits(**kw)
