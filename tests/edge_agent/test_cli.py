"""`hotswap agent run` flags reach the agent's configuration (the agent itself is not run)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

import edge_agent.cli
from broker.launcher import free_port
from edge_agent.agent import AgentConfig
from edge_agent.metrics import AgentMetrics
from shared.keys import init_keys


def started(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    *flags: str,
    before_run: Callable[[], None] = lambda: None,
) -> tuple[AgentConfig, AgentMetrics | None]:
    """What `agent run FLAGS` hands the agent (its configuration and metrics), captured
    instead of running it; `before_run` is called where the agent would start."""
    seen: list[tuple[AgentConfig, AgentMetrics | None]] = []

    class Captured:
        def __init__(self, config: AgentConfig, *, metrics: AgentMetrics | None = None) -> None:
            seen.append((config, metrics))

        async def run(self) -> None:
            pass

    def run_until_signalled(coro: Coroutine[Any, Any, None]) -> None:
        coro.close()
        before_run()

    monkeypatch.setattr(edge_agent.cli, "Agent", Captured)
    monkeypatch.setattr(edge_agent.cli, "run_until_signalled", run_until_signalled)
    result = invoke(monkeypatch, tmp_path, *flags)
    assert result.exit_code == 0, result.output
    return seen[0]


def configured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *flags: str) -> AgentConfig:
    """The AgentConfig `agent run FLAGS` builds."""
    return started(monkeypatch, tmp_path, *flags)[0]


def invoke(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *flags: str) -> Result:
    """`agent run` for cam-1 with `flags`, leaving the test process's logging alone."""
    monkeypatch.setattr(edge_agent.cli, "configure_logging", lambda *a, **kw: None)
    _, public = init_keys(tmp_path / "keys")
    identity = ["--device-id", "cam-1", "--region", "eu-west", "--device-type", "camera"]
    args = [*identity, "--trusted-key", str(public), "--data-dir", str(tmp_path / "d")]
    return CliRunner().invoke(edge_agent.cli.app, [*args, *flags])


@pytest.mark.parametrize(
    ("flags", "env", "budget_s"),
    [
        ((), None, 300.0),
        (("--download-budget", "10m"), None, 600.0),
        ((), "45s", 45.0),
        (("--download-budget", "2m"), "45s", 120.0),
        (("--download-timeout", "90"), None, 90.0),
    ],
)
def test_download_budget_comes_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    flags: tuple[str, ...],
    env: str | None,
    budget_s: float,
) -> None:
    """--download-budget (or HOTSWAP_DOWNLOAD_BUDGET; the flag wins) sets the fetch budget;
    the old --download-timeout still works."""
    if env is None:
        monkeypatch.delenv("HOTSWAP_DOWNLOAD_BUDGET", raising=False)
    else:
        monkeypatch.setenv("HOTSWAP_DOWNLOAD_BUDGET", env)
    assert configured(monkeypatch, tmp_path, *flags).fetch_limits.budget_s == budget_s


@pytest.mark.parametrize("bad", ["5x", "0"])
def test_a_download_budget_that_cannot_work_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bad: str
) -> None:
    """Not a duration, or no time at all: exit 2 before anything starts, saying why."""
    result = invoke(monkeypatch, tmp_path, "--download-budget", bad)
    assert result.exit_code == 2, result.output
    assert ("invalid duration" if bad == "5x" else "budget must be positive") in result.output


def test_metrics_port_serves_the_agents_own_metrics(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--metrics-port`: before the agent runs, its registry answers on that port (loopback
    unless --metrics-host says otherwise), and the agent counts into that same registry."""
    port = free_port()
    scraped: list[str] = []

    def scrape() -> None:
        scraped.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)

    _, metrics = started(monkeypatch, tmp_path, "--metrics-port", str(port), before_run=scrape)
    assert isinstance(metrics, AgentMetrics)
    assert 'hotswap_build_info{component="agent"' in scraped[0]
    assert "process_resident_memory_bytes" in scraped[0]


def test_without_metrics_port_nothing_is_served_or_counted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The default: no endpoint, and the agent gets no metrics to count into."""
    monkeypatch.delenv("HOTSWAP_METRICS_PORT", raising=False)
    assert started(monkeypatch, tmp_path)[1] is None
