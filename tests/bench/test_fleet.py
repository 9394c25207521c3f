"""The fleet benchmark runs end to end on a small fleet and counts every device once.

A real broker, S3 API and controller process, 40 simulated devices in two
worker processes. Timings are printed by the benchmark, never asserted here:
what is asserted is that the figures are about the right things (every device
activated and rolled back exactly once, the statuses final and right, the
telemetry counts consistent and nothing lost unaccounted, no unplanned
disconnect, every operator request answered).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
N = 40


@pytest.mark.timeout(180)
def test_fleet_benchmark_counts_every_device_once_and_loses_nothing() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--devices", str(N), "--processes", "2",
         "--regions", "3", "--only", "p1,p4,p5,p5raw,p6", "--telemetry-interval", "1",
         "--p5-rate", "1000", "--p5-seconds", "2", "--hold-s", "2", "--timeout", "60", "--json"],
        capture_output=True, text=True, timeout=170, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["devices"] == N and r["sim"]["connected"] == N

    p1 = r["p1"]
    assert p1["raw"]["devices"] == N and p1["raw"]["seconds"] is not None
    c = p1["controller"]
    assert c["status"] == "Succeeded" and c["ok"]
    assert c["devicesTargeted"] == N and c["devicesUpdated"] == N and c["devicesFailed"] == 0
    assert c["devicesPending"] == 0
    # Each device activated the rollout once: one final answer per device, no device twice.
    assert c["sim"] == {"devices": N, "answers": N, "twice": 0}
    assert c["raw_events_activated"] == N
    assert p1["ratio"] is not None and p1["ratio"] > 0

    p4 = r["p4"]["controller"]
    assert p4["status"] == "RolledBack" and p4["ok"]
    assert p4["devices_back"] == N and p4["devices_back_s"] is not None
    assert p4["sim"] == {"devices": N, "answers": N, "twice": 0}
    assert r["p4"]["raw"]["devices"] == N

    p5 = r["p5"]
    assert p5["sent"] > 0
    assert p5["raw_received"] == p5["sent"]  # the raw subscriber got the whole stream
    accounted = p5["controller_accepted"] + p5["controller_rejected"]
    assert accounted + p5["dropped"]["rate_limited"] == p5["sent"]
    assert p5["unaccounted"] == 0
    assert p5["controller_stored"] == p5["controller_accepted"] - p5["dropped"]["db_error"]
    # The raw source (one paho client in every device's name): the same bookkeeping.
    flood = r["p5raw"]
    assert flood["sent"] > 0 and flood["raw_received"] == flood["sent"]
    assert (
        flood["controller_accepted"]
        + flood["controller_rejected"]
        + sum(flood["dropped"][k] for k in ("rate_limited", "backlog"))
        == flood["sent"]
    )
    assert flood["unaccounted"] == 0

    assert r["p6"]["connected"] == N and r["p6"]["unplanned_disconnects"] == 0
    assert r["p6"]["controller_rss_mb"] > 0
    assert r["unplanned_disconnects"] == 0
    assert r["registration_s"] >= 0 and r["provision_s"] > 0

    for kind in ("list_devices", "get_rollout"):
        sampled = r["requests"][kind]
        assert sampled["n"] > 0 and sampled["unanswered"] == 0 and sampled["refused"] == 0
    # Every device ended where the commands put it: 3.0.0 rolled back to 2.0.0 by the
    # controller, then forward again by the raw rollback baseline.
    assert r["sim"]["versions"] == {"3.0.0": N}


def test_fleet_benchmark_refuses_an_unknown_phase() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--devices", "1", "--only", "p9"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode != 0
    assert "unknown phase" in out.stderr
