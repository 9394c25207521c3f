"""Bounded, resumable artifact downloads over HTTP (presigned S3 GET URLs).

Streams into `<dest>.part` while hashing, never accepts more bytes than the
manifest declares, and resumes a cut transfer with an HTTP Range request. A
connection error, a 5xx or 429, a cut or too-slow transfer is retried with
jittered backoff capped at 10 s for as long as the time budget lasts
(`FetchLimits.budget_s`, five minutes by default: an S3 outage of seconds must
not fail a rollout); the budget bounds the whole download, transfers and
waits, and the agent cuts it to the time its deploy command has left
(`hotswap agent run --download-budget` / `HOTSWAP_DOWNLOAD_BUDGET`). A refused
URL (401/403: ask for a fresh one), any other 4xx and bytes that contradict
the manifest are never retried. Only a complete file whose sha256 matches is
renamed to `dest`; a partial file is never returned. Does network and disk I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import structlog

from shared.errors import DownloadError, IntegrityError
from shared.mqtt import backoff_delays

log = structlog.get_logger("hotswap.agent.fetch")


@dataclass(frozen=True, slots=True)
class FetchLimits:
    budget_s: float = 300.0  # the whole download: every attempt and the waits between them
    connect_timeout_s: float = 10.0
    min_rate_bps: float = 1024.0  # slower than this over `rate_window_s` is cut off
    rate_window_s: float = 10.0
    backoff_base_s: float = 0.5  # first wait between attempts (jittered)
    backoff_cap_s: float = 10.0  # longest wait between attempts

    def __post_init__(self) -> None:
        if not self.budget_s > 0:
            raise ValueError(f"download budget must be positive, not {self.budget_s}")
        if not 0 < self.backoff_base_s <= self.backoff_cap_s:
            raise ValueError("backoff needs 0 < base <= cap")

    def within(self, seconds: float) -> FetchLimits:
        """These limits with the budget cut to `seconds` (say, until a command expires)."""
        return self if seconds >= self.budget_s else replace(self, budget_s=seconds)


class UrlExpiredError(DownloadError):
    """The presigned URL was refused (expired or revoked): a fresh one is needed."""

    reason = "url_expired"


class _RefusedError(DownloadError):
    """A 4xx answer that asking again will not change (404, 400, ...): not retried."""


# Client errors that are about the moment, not the request: retried like a 5xx.
_TRANSIENT_4XX = frozenset({408, 425, 429})


async def fetch_artifact(
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    limits: FetchLimits = FetchLimits(),
    on_progress: Callable[[int], None] | None = None,
    logger: structlog.BoundLogger | None = None,
) -> Path:
    """Download exactly `size` bytes with digest `sha256` to `dest` (atomically).

    Retries (logged as `download_retry` warnings on `logger`, with the attempt
    and the budget left) until `limits.budget_s` is spent.
    """
    bound = logger if logger is not None else log
    part = dest.with_name(dest.name + ".part")
    deadline = time.monotonic() + limits.budget_s
    delays = backoff_delays(base=limits.backoff_base_s, cap=limits.backoff_cap_s)
    attempt, last = 0, None
    while True:
        attempt += 1
        before = _part_size(part)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await _transfer(url, part, size=size, limits=limits, on_progress=on_progress)
            break
        except TimeoutError as exc:
            # Out of budget. While bytes flowed that is a timeout; in an attempt that got
            # nothing after earlier failures, the failure that kept coming is the news.
            stalled = last is not None and _part_size(part) == before
            _discard(part)
            if last is not None and stalled:
                raise _gave_up(last, attempt, limits) from exc
            raise DownloadError(
                f"download did not finish within its {limits.budget_s:.0f}s budget "
                f"(attempt {attempt})",
                reason="download_timeout",
            ) from exc
        except UrlExpiredError:
            raise  # keep the part: the caller resumes it with a fresh URL
        except (IntegrityError, _RefusedError):
            _discard(part)
            raise
        except DownloadError as exc:
            last = exc
        except httpx.ReadTimeout:
            # Nothing at all for a whole rate window: the slow-retrieval case.
            last = DownloadError(
                f"no data for {limits.rate_window_s:g}s", reason="download_too_slow"
            )
        except httpx.HTTPError as exc:
            last = DownloadError(f"download failed: {type(exc).__name__}: {exc}")
        left = deadline - time.monotonic()
        delay = next(delays)
        if delay >= left:  # the next attempt would start with no budget left
            _discard(part)
            raise _gave_up(last, attempt, limits) from last
        bound.warning(
            "download_retry",
            attempt=attempt,
            reason=last.reason,
            error=str(last),
            retry_in_s=round(delay, 2),
            budget_left_s=round(left, 1),
        )
        await asyncio.sleep(delay)
    digest = await asyncio.to_thread(_sha256_file, part)
    if digest != sha256:
        _discard(part)
        raise IntegrityError(
            f"downloaded file's sha256 {digest[:12]}… != manifest {sha256[:12]}…",
            reason="sha256_mismatch",
        )
    part.replace(dest)
    return dest


async def _transfer(
    url: str,
    part: Path,
    *,
    size: int,
    limits: FetchLimits,
    on_progress: Callable[[int], None] | None,
) -> None:
    have = _usable_part(part, size)
    if have == size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    timeout = httpx.Timeout(limits.rate_window_s, connect=limits.connect_timeout_s)
    async with (
        httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        if response.status_code in (401, 403):
            raise UrlExpiredError(f"artifact URL refused with HTTP {response.status_code}")
        if response.status_code == 200:
            have = 0  # the server ignored the range: start over
        elif response.status_code != 206 or not have:
            status = response.status_code
            message = f"artifact server answered HTTP {status}"
            if 400 <= status < 500 and status not in _TRANSIENT_4XX:
                raise _RefusedError(message)
            raise DownloadError(message)
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and have + int(declared) > size:
            raise IntegrityError(
                f"server announces {have + int(declared)} bytes, manifest says {size}",
                reason="size_exceeded",
            )
        window_start, window_bytes = time.monotonic(), 0
        with part.open("ab" if have else "wb") as out:
            async for chunk in response.aiter_bytes():  # as it arrives: resume keeps every byte
                have += len(chunk)
                if have > size:
                    out.close()
                    _discard(part)
                    raise IntegrityError(
                        f"server sent more than the manifest's {size} bytes", reason="size_exceeded"
                    )
                out.write(chunk)
                if on_progress is not None:
                    on_progress(have)
                window_bytes += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= limits.rate_window_s:
                    if window_bytes / elapsed < limits.min_rate_bps:
                        raise DownloadError(
                            f"transfer slower than {limits.min_rate_bps:.0f} B/s",
                            reason="download_too_slow",
                        )
                    window_start, window_bytes = time.monotonic(), 0
            out.flush()
            os.fsync(out.fileno())
    if have != size:
        raise DownloadError(f"connection closed after {have} of {size} bytes")


def _gave_up(last: DownloadError, attempts: int, limits: FetchLimits) -> DownloadError:
    return DownloadError(
        f"{last} (gave up after {attempts} attempts: the {limits.budget_s:.0f}s budget is spent)",
        reason=last.reason,
    )


def _part_size(part: Path) -> int:
    return part.stat().st_size if part.exists() else 0


def _usable_part(part: Path, size: int) -> int:
    """Bytes already downloaded that a Range request can continue from."""
    have = _part_size(part)
    if have > size:
        _discard(part)
        return 0
    return have


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
