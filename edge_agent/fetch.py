"""Bounded, resumable artifact downloads over HTTP (presigned S3 GET URLs).

Streams into `<dest>.part` while hashing, never accepts more bytes than the
manifest declares, resumes a cut transfer with an HTTP Range request, gives up
after an overall timeout, a transfer slower than a minimum rate, or N attempts
with jittered backoff. Only a complete file whose sha256 matches is renamed to
`dest`; a partial file is never returned. Does network and disk I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from shared.errors import DownloadError, IntegrityError
from shared.mqtt import backoff_delays

log = structlog.get_logger("hotswap.agent.fetch")


@dataclass(frozen=True, slots=True)
class FetchLimits:
    timeout_s: float = 300.0  # whole download, all attempts
    connect_timeout_s: float = 10.0
    min_rate_bps: float = 1024.0  # slower than this over `rate_window_s` is cut off
    rate_window_s: float = 10.0
    attempts: int = 4


class UrlExpiredError(DownloadError):
    """The presigned URL was refused (expired or revoked): a fresh one is needed."""

    reason = "url_expired"


async def fetch_artifact(
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    limits: FetchLimits = FetchLimits(),
    on_progress: Callable[[int], None] | None = None,
) -> Path:
    """Download exactly `size` bytes with digest `sha256` to `dest` (atomically)."""
    part = dest.with_name(dest.name + ".part")
    deadline = time.monotonic() + limits.timeout_s
    delays = backoff_delays(base=0.5, cap=5.0)
    for attempt in range(1, limits.attempts + 1):
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                await _transfer(url, part, size=size, limits=limits, on_progress=on_progress)
            break
        except TimeoutError as exc:
            _discard(part)
            raise DownloadError(
                f"download did not finish within {limits.timeout_s:.0f}s", reason="download_timeout"
            ) from exc
        except UrlExpiredError:
            raise  # keep the part: the caller resumes it with a fresh URL
        except IntegrityError:
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
        if attempt == limits.attempts:
            _discard(part)
            raise last
        log.info("download_retry", attempt=attempt, error=str(last))
        await asyncio.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))
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
            raise DownloadError(f"artifact server answered HTTP {response.status_code}")
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


def _usable_part(part: Path, size: int) -> int:
    """Bytes already downloaded that a Range request can continue from."""
    have = part.stat().st_size if part.exists() else 0
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
