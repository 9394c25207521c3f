"""The device daemon: MQTT session, artifact fetch + verification, double-buffered runtime.

`agent.Agent` composes the parts: `runtime` (two interpreter slots, one reference
swap), `verify` (the bytes-in trust checks, no I/O), `fetch` (bounded HTTP
downloads), `store` (crash-safe model files and pointers), `telemetry` (mergeable
inference windows) and `workload` (a synthetic inference source).
"""

from shared import __version__

__all__ = ["__version__"]
