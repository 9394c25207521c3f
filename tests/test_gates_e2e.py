"""The latency gate end to end on real agents: a same-cost candidate passes canary after
canary; a candidate about 30 % slower never passes `--max-latency-increase 0.1`.

A real mosquitto, moto's S3 API, the controller as a `hotswap controller run` process,
and twelve in-process agents running real interpreters under synthetic load; the
gates read the agents' telemetry sketches with the settle rule and the statistics
of `controller.gates`. Latency verdicts: these run with the `serial` tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.launcher import Mosquitto
from controller.artifacts import ArtifactStore
from shared.errors import RequestError
from shared.messages import GateSpec, GateVerdict, ListDevices, RolloutStatus, StartRollout
from shared.model_builder import build_dense_model
from tests.conftest import S3, KeyPair, fleet_agents
from tests.test_rollouts import ControllerProcess, Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.serial, pytest.mark.timeout(240)]

# Six devices a side: a canary of half the fleet, so the latency gate has a spread on
# both sides (with one device a side it can only say inconclusive).
DEVICES = tuple((f"gate-{i}", "eu-west" if i % 2 else "us-east", "camera") for i in range(12))
IDS = tuple(d[0] for d in DEVICES)
# Enough compute per call (about 0.2 ms) that the model, not the Python around it, sets
# the latency; "slow" has about 1.4x its multiply-adds with the same signature (its p95
# alone on this machine: about +25 %; more beside other agents, its weights miss cache).
HIDDEN = (1024, 1024)
SLOW_HIDDEN = (1024, 1024, 400)
SIDE = len(DEVICES) // 2
GATES = {"max_latency_increase": 0.1, "settle_s": 0.5, "min_samples": 400}
# This machine is no fleet (2 shared cores, twelve agents in one process): a 6-to-6
# canary's interval of the p95 ratio spans about +-40-70 % here (docs/gates.md), so a
# tolerance of 0.1 would leave a healthy candidate inconclusive (paused, not failed).
HEALTHY_TOLERANCE = 2.0
BAKE_S = 3.0
SLOW_BAKE_S = 10.0


class GateFleet(Fleet):
    """`Fleet` of tests/test_rollouts.py over this module's eight devices."""

    async def start(self, **spec: Any) -> str:
        result = await self.request(StartRollout(model="clf", devices=IDS, **spec))
        return str(result["rolloutId"])

    async def settled(
        self, rollout_id: str, within_s: float = 60
    ) -> tuple[RolloutStatus, list[GateVerdict]]:
        """The status once final or Paused (inconclusive gates pause at the bake's end),
        and every latency-gate reading published while the canary stage was on (the
        final status carries the last stage's, which has no baseline)."""
        canary: list[GateVerdict] = []
        async with asyncio.timeout(within_s):
            while True:
                with contextlib.suppress(RequestError):
                    status = await self.status(rollout_id)
                    if status.stage.startswith("canary"):
                        canary += [g for g in status.gates if g.gate == "max_latency_increase"]
                    if status.final or status.status == "Paused":
                        return status, canary
                await asyncio.sleep(0.1)


@pytest.fixture
async def fleet(
    mosquitto: Mosquitto, s3: S3, signing_keys: KeyPair, tmp_path: Path
) -> AsyncIterator[GateFleet]:
    """Twelve agents under load serving v1 (rolled out Direct), a controller process.

    The agents share this one Python process, as no two devices do: the interpreter's
    default switch interval (5 ms) would let one agent's Python (or the event loop's)
    sit inside another's timed inference. A short one keeps the latencies the model's.
    """
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    agents = fleet_agents(
        mosquitto,
        signing_keys,
        tmp_path,
        DEVICES,
        workload_hz=200.0,
        telemetry_interval_s=0.5,
        max_latency_factor=1e6,  # the controller's gates are under test
    )
    controller = ControllerProcess(mosquitto, s3, tmp_path)
    fleet = GateFleet(
        mosquitto.endpoint("operator"),
        ArtifactStore(s3.endpoint, s3.bucket),
        signing_keys,
        agents,
        controller,
    )
    tasks = [asyncio.create_task(a.run()) for a in agents]
    await controller.start()
    try:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(RequestError):  # the controller is starting
                    online = await fleet.request(ListDevices())
                    if sum(d["online"] for d in online) == len(DEVICES):
                        break
                await asyncio.sleep(0.3)
        await fleet.push(build_dense_model(hidden=HIDDEN, seed=1), "1.0.0")
        first = await fleet.start(version="1.0.0")
        assert (await fleet.final(first)).status == "Succeeded"
        yield fleet
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await controller.stop()
        sys.setswitchinterval(switch_interval)


def reading(gate: GateVerdict | None) -> str:
    if gate is None:
        return "no canary reading"
    return (
        f"{gate.verdict} {gate.observed} [{gate.low}, {gate.high}] "
        f"{gate.samples}/{gate.baseline_samples} samples {gate.detail}"
    )


async def test_same_cost_candidates_pass_ten_canaries_out_of_ten(fleet: GateFleet) -> None:
    """Ten canaries of same-architecture models (other weights): each one's stage ends on
    passing gates (an inconclusive one would pause it, a failing one roll it back) and the
    rollout reaches every device; no reading of any of them ever failed."""
    readings: list[str] = []
    for i in range(10):
        version = f"2.0.{i}"
        await fleet.push(build_dense_model(hidden=HIDDEN, seed=10 + i), version)
        rid = await fleet.start(
            version=version, strategy="canary", canary_percent=50, canary_duration_s=BAKE_S,
            gates=GateSpec(**{**GATES, "max_latency_increase": HEALTHY_TOLERANCE}),
        )  # fmt: skip
        status, seen = await fleet.settled(rid)
        readings.append(reading(seen[-1] if seen else None))
        assert status.status == "Succeeded", (i, status.reason, readings)
        assert fleet.versions() == {version}
        assert all(g.verdict != "fail" for g in seen), [reading(g) for g in seen]
        # The last published canary reading may precede the bake's end by a status tick;
        # any that passed did so with its whole interval within the tolerance.
        for g in seen:
            if g.verdict == "pass":
                assert g.high is not None and g.high <= HEALTHY_TOLERANCE, reading(g)
                assert 1 <= (g.devices or 0) <= SIDE and 1 <= (g.baseline_devices or 0) <= SIDE


async def test_a_thirty_percent_slower_candidate_never_passes(fleet: GateFleet) -> None:
    """About 1.4x the work per call against `--max-latency-increase 0.1`: the canary never
    passes and the rest of the fleet never gets it. Here (see docs/gates.md, "End to
    end") its p95 shows +5 % to +60 % beside eleven other agents, so the gate either
    fails (rollback) or, when its interval still reaches below +10 %, stays
    inconclusive and pauses; it is never read as a pass."""
    await fleet.push(build_dense_model(hidden=SLOW_HIDDEN, seed=5), "2.0.0+slow")
    rid = await fleet.start(
        version="2.0.0+slow", strategy="canary", canary_percent=50, canary_duration_s=SLOW_BAKE_S,
        gates=GateSpec(**GATES),
    )  # fmt: skip
    status, seen = await fleet.settled(rid)
    gate = next((g for g in status.gates if g.gate == "max_latency_increase"), None)
    assert all(g.verdict != "pass" for g in seen), [reading(g) for g in seen]
    assert status.status in ("RolledBack", "Paused"), (status.status, status.reason)
    assert status.devices_updated <= SIDE
    if status.status == "RolledBack":
        # The reason holds the failing reading (the status's gates read on after it).
        assert status.reason and "gate failed: max_latency_increase" in status.reason
        async with asyncio.timeout(10):
            while fleet.versions() != {"1.0.0"}:
                await asyncio.sleep(0.1)
    else:
        assert gate is not None and gate.verdict == "inconclusive", reading(gate)
        assert gate.low is not None and gate.low <= 0.1 < (gate.high or math.inf)
