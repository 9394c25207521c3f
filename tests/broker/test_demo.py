"""`hotswap demo` on the secure broker: provisioned agents, signed commands, v2 everywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_demo_runs_end_to_end_on_the_secure_broker() -> None:
    """The real command, with no extra step: both rollouts succeed, every device serves v2."""
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "demo", "--devices", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["ok"] is True
    assert [r["status"] for r in summary["rollouts"]] == ["Succeeded", "Succeeded"]
    assert {d["deviceId"]: d["serving"] for d in summary["devices"]} == {
        "demo-1": "demo-classifier@2.0.0",
        "demo-2": "demo-classifier@2.0.0",
    }
    assert "provisioned 2 devices" in done.stderr
