"""Fleet benchmark: thousands of simulated devices against the real controller, with raw baselines.

    python -m bench.fleet --devices 1000 --json
    python -m bench.fleet --devices 200 --db-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Starts everything itself on free ports: the secure mosquitto (dynamic
security), moto's S3 server, the controller as `hotswap controller run` (a
child process; `--controller-src DIR` runs another source tree of it, e.g. an
older commit unpacked with `git archive`), and `--processes` worker
processes of simulated devices (`bench.fleet_sim`: each device its own MQTT 5
session and provisioned login, speaking the wire contract as the agent does;
they skip the download, the manifest signature and digest checks, the
interpreter and, unless `--verify-signatures`, the command signature check:
the benchmark measures the control plane). Every device starts serving
`fleet-model@1.0.0`. With `--db-url postgresql…` a fresh database is created
for the run on that server and dropped after it. Everything it starts is
stopped again, also on Ctrl-C.

Measured in one run, each against a raw baseline measured in the same run
(plain paho, no controller: `bench.fleet_raw`):

* provisioning (every device's login and role through the broker's API) and
  registration (workers start → the controller's `device list` shows N online);
* P1: a direct rollout to every device (2.0.0 → 3.0.0), from the start request
  (the one `hotswap rollout start --all` sends) to `Succeeded` in the retained
  status; raw: the same signed deploy commands (1.0.0 → 2.0.0) published by
  plain paho to each device's cmd topic, until every `activated` event came.
  Then one gated canary rollout (3.0.0 → 4.0.0, 10 %, a latency gate) to
  `Succeeded`;
* P4: fleet rollback of the last successful rollout (`rollout rollback`, the
  operator control): until every device's `rolled_back` event, and until the
  status says `RolledBack`; raw: rollback commands to each device by paho;
* P5: telemetry ingest: periodic telemetry paused, then `--p5-rate` windows/s
  for `--p5-seconds`; what the controller accepted and dropped (by reason,
  from its Prometheus metrics) against what a raw paho subscriber received of
  the same stream, and what was sent: `unaccounted` are silent losses;
* P6: every connection held `--hold-s` seconds with periodic telemetry:
  unplanned disconnects, controller RSS (VmRSS/VmHWM of /proc/<pid>/status);
* operator requests (`device list`, `rollout status` through the request
  API) every `--sample-s` during P1, the canary and P4: p50/p99, unanswered.

Prints one JSON object with `--json`, a summary otherwise; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/fleet.py`: the repository on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
import httpx

from bench.fleet_provision import create_raw_identity, provision_fleet
from bench.fleet_raw import RawClient, Requester, StatusWatcher, flood, telemetry_messages
from bench.fleet_sim import raise_nofile_limit, worker_main
from broker.launcher import Mosquitto, free_port
from broker.s3server import DEMO_CREDENTIALS, S3Server
from shared import topics
from shared.credentials import COMMAND_KEY_FILE, COMMAND_PUB_FILE, DeviceIdentity
from shared.keys import init_keys, load_private_key, load_public_key
from shared.manifest import build_manifest, key_id, sign_manifest
from shared.messages import DeployCommand, ModelRef, RollbackCommand
from shared.model_builder import build_dense_model
from shared.settings import MqttEndpoint
from shared.tflite_schema import read_signature

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fleet-model"
VERSIONS = ("1.0.0", "2.0.0", "3.0.0", "4.0.0")
PHASES = ("p1", "canary", "p4", "p5", "p5raw", "p6")
FINAL = {"Succeeded", "Failed", "RolledBack", "Aborted"}


def progress(message: str) -> None:
    print(f"fleet: {message}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB (empty when it is gone)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?", line)
        if m and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# ---------------------------------------------------------------- processes


@dataclass
class WorkerHandle:
    process: BaseProcess
    conn: Connection
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        async with self.lock:
            self.conn.send({"op": op, **args})
            answer: dict[str, Any] = await asyncio.to_thread(self.conn.recv)
        if not answer.get("ok"):
            raise RuntimeError(f"worker {op}: {answer.get('error')}")
        return answer


class Controller:
    """`hotswap controller run` as a child process, logging JSON to a file."""

    def __init__(
        self,
        broker: Mosquitto,
        s3: str,
        bucket: str,
        db_url: str,
        work: Path,
        *,
        source: Path | None,
        log_level: str,
    ) -> None:
        self.metrics_port = free_port()
        self.log_path = work / "controller.log"
        self.env = os.environ | DEMO_CREDENTIALS
        if source is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(source), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        self.args = [
            sys.executable,
            "-m",
            "broker.cli",
            "controller",
            "run",
            "--mqtt-url",
            broker.url,
            "--credentials",
            str(broker.credentials("controller")),
            "--db-url",
            db_url,
            "--s3-endpoint",
            s3,
            "--s3-bucket",
            bucket,
            "--metrics-port",
            str(self.metrics_port),
            "--log-json",
            "--log-level",
            log_level,
        ]
        self.cwd = source or ROOT
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args,
                env=self.env,
                stdout=log,
                stderr=log,
                cwd=self.cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def log_tail(self, n: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        return parse_metrics(r.text)

    async def stop(self) -> int | None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        return proc.returncode


@contextlib.contextmanager
def fresh_database(db_url: str | None, work: Path) -> Iterator[str]:
    """The controller's database URL: a SQLite file in `work`, or a new PostgreSQL
    database on the given server (dropped afterwards)."""
    if not db_url:
        yield f"sqlite:///{work / 'controller.db'}"
        return
    if not db_url.startswith("postgresql"):
        yield db_url
        return
    import psycopg

    base = re.sub(r"^postgresql\+\w+://", "postgresql://", db_url)
    name = f"hotswap_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    head, sep, query = db_url.partition("?")
    try:
        yield head.rsplit("/", 1)[0] + "/" + name + sep + query
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------- the run


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    broker: Mosquitto
    controller: Controller
    requester: Requester
    watcher: StatusWatcher
    raw: RawClient
    workers: list[WorkerHandle]
    command_key: Any
    models: dict[str, dict[str, Any]]
    signed: dict[str, Any]
    bucket: str
    s3: str
    devices: list[DeviceIdentity]
    provision_s: float = 0.0
    active_ref: dict[str, Any] = field(default_factory=dict)
    logins: dict[str, Any] = field(default_factory=dict)
    phase: str = "setup"
    sampled_rollout: str | None = None
    rss: list[dict[str, int]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.devices)

    async def all_workers(self, op: str, **args: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.call(op, **args) for w in self.workers)))

    async def report(self) -> dict[str, Any]:
        """The workers' reports merged: counters summed, finals unioned."""
        parts = await self.all_workers("report")
        merged: dict[str, Any] = {
            "stats": Counter(),
            "commands": Counter(),
            "events": Counter(),
            "versions": Counter(),
            "final_answers": Counter(),
            "finals": {},
            "connected": 0,
            "last_errors": [],
        }
        for p in parts:
            merged["connected"] += p["connected"]
            for key in ("stats", "commands", "events", "versions", "final_answers"):
                merged[key].update(p[key])
            for rid, phases in p["finals"].items():
                mine = merged["finals"].setdefault(rid, {})
                for phase, ids in phases.items():
                    mine.setdefault(phase, []).extend(ids)
            if p["last_error"]:
                merged["last_errors"].append(p["last_error"])
        return merged

    def check_controller(self) -> None:
        if not self.controller.alive():
            raise RuntimeError(f"the controller exited:\n{self.controller.log_tail()}")

    # ------------------------------------------------------------ sampling

    async def sampler(self) -> None:
        """Operator requests and controller RSS, every `--sample-s`, for the whole run."""
        while True:
            await asyncio.sleep(self.args.sample_s)
            self.rss.append(rss_kb(self.controller.pid))
            if self.phase not in ("p1", "canary", "p4"):
                continue
            phase = self.phase
            # What `device list` asks first: a page of 1,000 devices.
            await self.requester.request(
                {"kind": "list_devices", "offset": 0, "limit": 1000}, phase=phase, wait_s=10
            )
            if self.sampled_rollout:
                await self.requester.request(
                    {"kind": "get_rollout", "rolloutId": self.sampled_rollout},
                    phase=phase,
                    wait_s=10,
                )

    # ------------------------------------------------------------ pieces

    def deploy_payload(self, version: str, device: str, expires: datetime) -> tuple[str, bytes]:
        model = self.models[version]
        url = (
            boto3.client("s3", endpoint_url=self.s3).generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": model["s3Key"]}, ExpiresIn=3600
            )
            if "url" not in model
            else model["url"]
        )
        model["url"] = url
        command = DeployCommand(
            command_id=f"raw-{uuid.uuid4().hex}",
            issued_at=datetime.now(UTC),
            expires_at=expires,
            manifest=self.signed[version],
            url=url,
        )
        return command.command_id, command.to_wire()

    async def raw_round(
        self, build: Callable[[str], tuple[str, bytes]], phase: str, within_s: float
    ) -> dict[str, Any]:
        """Publish one command per device (built and signed now), until each device answered
        `phase`: the raw baseline."""
        t0 = time.monotonic()
        ids: set[str] = set()
        infos = []
        for d in self.devices:
            cid, payload = build(d.device_id)
            ids.add(cid)
            infos.append(
                self.raw.publish_command(
                    topics.device_cmd(d.device_id), payload, self.command_key, 600
                )
            )
        published = time.monotonic() - t0
        deadline = t0 + within_s
        while len(self.raw.devices_with(command_ids=ids, phase=phase)) < self.n:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        done = self.raw.devices_with(command_ids=ids, phase=phase)
        last = self.raw.last_time(ids, phase)
        seconds = round(last - t0, 3) if len(done) >= self.n else None
        return {
            "devices": len(done),
            "seconds": seconds,
            "published_s": round(published, 3),
            "per_min": round(self.n / seconds * 60) if seconds else None,
        }

    async def start_rollout(self, body: dict[str, Any]) -> tuple[str, float]:
        t0 = time.monotonic()
        result = await self.requester.result({"kind": "start_rollout", **body}, wait_s=60)
        rid = str(result["rolloutId"])
        self.sampled_rollout = rid
        return rid, t0

    async def finish(
        self, rid: str, t0: float, wanted: set[str], *, after: float | None = None
    ) -> dict[str, Any]:
        """Until the rollout's status is final (as seen from `after` on): what it says."""
        try:
            at = await self.watcher.wait_status(
                rid, FINAL, self.args.timeout, after=t0 if after is None else after
            )
        except TimeoutError as exc:
            self.check_controller()
            return {"error": str(exc), "status": self.watcher.latest.get(rid, {}).get("status")}
        body = self.watcher.latest[rid]
        return {
            "status": body.get("status"),
            "reason": body.get("reason"),
            "seconds": round(at - t0, 3),
            "devicesTargeted": body.get("devicesTargeted"),
            "devicesUpdated": body.get("devicesUpdated"),
            "devicesFailed": body.get("devicesFailed"),
            "devicesPending": body.get("devicesPending"),
            "ok": body.get("status") in wanted,
        }

    def sim_counts(self, report: dict[str, Any], rid: str, phase: str) -> dict[str, int]:
        ids = report["finals"].get(rid, {}).get(phase, [])
        return {
            "devices": len(set(ids)),
            "answers": int(report["final_answers"].get(f"{rid}/{phase}", 0)),
            "twice": len(ids) - len(set(ids)),
        }

    # ------------------------------------------------------------ phases

    async def p1(self, out: dict[str, Any]) -> str:
        n = self.n
        progress(f"P1 raw baseline: signed deploy 2.0.0 to {n} devices by plain paho")
        expires = datetime.now(UTC) + timedelta(seconds=600)
        raw = await self.raw_round(
            lambda d: self.deploy_payload("2.0.0", d, expires), "activated", self.args.timeout
        )
        progress(f"P1 raw: {raw['devices']}/{n} activated in {raw['seconds']} s")
        await asyncio.sleep(1.0)
        progress(f"P1 controller: direct rollout of 3.0.0 to --all ({n} devices)")
        self.phase = "p1"
        rid, t0 = await self.start_rollout(
            {
                "model": MODEL,
                "version": "3.0.0",
                "strategy": "direct",
                "allDevices": True,
                "deviceTimeoutS": self.args.timeout,
            }
        )
        done = await self.finish(rid, t0, {"Succeeded"})
        self.phase = "between"
        last = self.raw.rollout_last(rid, "activated")
        done["devices_activated_s"] = round(last - t0, 3) if last else None
        done["raw_events_activated"] = len(self.raw.devices_with(rollout=rid, phase="activated"))
        done["rollout_id"] = rid
        seconds = done.get("seconds")
        done["per_min"] = round(n / seconds * 60) if seconds else None
        report = await self.report()
        done["sim"] = self.sim_counts(report, rid, "activated")
        out["p1"] = {
            "controller": done,
            "raw": raw,
            "ratio": round(seconds / raw["seconds"], 2) if seconds and raw["seconds"] else None,
        }
        progress(
            f"P1: {done.get('status')} in {seconds} s ({done['per_min']}/min), raw "
            f"{raw['seconds']} s, ratio {out['p1']['ratio']}x"
        )
        return rid

    async def canary(self, out: dict[str, Any]) -> str:
        duration = max(5.0, 3 * self.args.telemetry_interval)
        progress(f"canary: 4.0.0, 10% then all, {duration:g}s bake, gate p95 <= 100 ms")
        self.phase = "canary"
        rid, t0 = await self.start_rollout(
            {
                "model": MODEL,
                "version": "4.0.0",
                "strategy": "canary",
                "allDevices": True,
                "canaryPercent": 10,
                "canaryDurationS": duration,
                "gates": {"maxLatencyMs": 100.0, "minSamples": 20},
                "deviceTimeoutS": self.args.timeout,
            }
        )
        done = await self.finish(rid, t0, {"Succeeded"})
        self.phase = "between"
        done["rollout_id"] = rid
        done["bake_s"] = duration
        done["sim"] = self.sim_counts(await self.report(), rid, "activated")
        out["canary"] = done
        progress(f"canary: {done.get('status')} in {done.get('seconds')} s")
        return rid

    async def p4(self, out: dict[str, Any], rid: str) -> None:
        n = self.n
        progress(f"P4 controller: `rollout rollback {rid}` ({n} devices)")
        self.phase = "p4"
        self.sampled_rollout = rid
        before = self.raw.answers(rid, "rolled_back")
        t0 = time.monotonic()
        await self.requester.result(
            {"kind": "control_rollout", "rolloutId": rid, "action": "rollback"}, wait_s=60
        )
        answered = time.monotonic()  # a final status from now on is the rollback's
        deadline = t0 + self.args.timeout
        while len(self.raw.devices_with(rollout=rid, phase="rolled_back")) < n:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        back = self.raw.devices_with(rollout=rid, phase="rolled_back")
        last = self.raw.rollout_last(rid, "rolled_back")
        done = await self.finish(rid, t0, {"RolledBack"}, after=answered)
        self.phase = "between"
        done["devices_back"] = len(back)
        done["devices_back_s"] = round(last - t0, 3) if len(back) >= n else None
        done["rolled_back_answers"] = self.raw.answers(rid, "rolled_back") - before
        done["sim"] = self.sim_counts(await self.report(), rid, "rolled_back")
        await asyncio.sleep(1.0)
        progress(f"P4 raw baseline: rollback commands to {n} devices by plain paho")

        def rollback(_device: str) -> tuple[str, bytes]:
            cmd = RollbackCommand(
                command_id=f"raw-{uuid.uuid4().hex}",
                expires_at=datetime.now(UTC) + timedelta(seconds=600),
            )
            return cmd.command_id, cmd.to_wire()

        raw = await self.raw_round(rollback, "rolled_back", self.args.timeout)
        back_s = done.get("devices_back_s")
        out["p4"] = {
            "controller": done,
            "raw": raw,
            "ratio": round(back_s / raw["seconds"], 2) if back_s and raw["seconds"] else None,
        }
        progress(
            f"P4: devices back in {back_s} s, status {done.get('status')} after "
            f"{done.get('seconds')} s; raw {raw['seconds']} s, ratio {out['p4']['ratio']}x"
        )

    async def p5(self, out: dict[str, Any]) -> None:
        """Telemetry from the simulated devices themselves, `--p5-rate` windows/s."""
        rate, seconds = self.args.p5_rate, self.args.p5_seconds
        progress(f"P5: periodic telemetry paused; {rate:g} windows/s for {seconds:g} s")

        async def send() -> int:
            before = await self.telemetry_sent()
            per = rate / len(self.workers)
            await self.all_workers("burst", rate=per, seconds=seconds)
            return await self.telemetry_sent() - before

        out["p5"] = await self.ingest("P5", send)

    async def p5raw(self, out: dict[str, Any]) -> None:
        """The controller's ingest past what the simulated devices can send: one plain
        paho client (the bench's raw login) sends every device's windows, built once
        with the simulator's shapes and sketches, `--p5-rate` windows/s."""
        rate, seconds = self.args.p5_rate, self.args.p5_seconds
        progress(f"P5 raw source: one paho client sends {rate:g} windows/s for {seconds:g} s")
        messages = telemetry_messages(self.devices, self.active_ref)

        async def send() -> int:
            endpoint = self.raw.endpoint
            sent, _ = await asyncio.to_thread(flood, endpoint, messages, rate, seconds)
            return sent

        out["p5raw"] = await self.ingest("P5 raw source", send)

    async def telemetry_sent(self) -> int:
        return sum(p["stats"].get("telemetry_sent", 0) for p in await self.all_workers("report"))

    async def ingest(self, label: str, send: Callable[[], Awaitable[int]]) -> dict[str, Any]:
        """What the controller accepted and dropped (by reason, from its metrics) of the
        windows `send` sent, against what the raw subscriber received of them."""
        await self.all_workers("telemetry", on=False)
        await asyncio.sleep(2.0)
        m0 = await self.controller.metrics()
        raw0, _ = self.raw.telemetry_count()
        t0 = time.monotonic()
        sent = await send()
        send_s = time.monotonic() - t0
        # Until the controller's counts stop moving (its queue drained) or match what was sent.
        # Each scrape costs the controller a few ms (every collector, /proc), which the raw
        # subscriber does not pay: scraped every 0.5 s, and the moment the last message
        # was taken is interpolated inside the last interval at the rate of the one before.
        accepted = 0.0
        deadline = time.monotonic() + max(60.0, 4 * self.args.p5_seconds)
        last_change = polled = time.monotonic()
        rate = 0.0
        while time.monotonic() < deadline:
            m = await self.controller.metrics()
            now = time.monotonic()
            now_acc = metric(m, "hotswap_messages_total", kind="telemetry") - metric(
                m0, "hotswap_messages_total", kind="telemetry"
            )
            if now_acc != accepted:
                gained = now_acc - accepted
                last_change = min(now, polled + gained / rate) if rate > 0 and accepted > 0 else now
                rate = gained / (now - polled) if now > polled else 0.0
                accepted = now_acc
            polled = now
            dropped = metric(m, "hotswap_device_messages_dropped_total") - metric(
                m0, "hotswap_device_messages_dropped_total"
            )
            if accepted + dropped >= sent or now - last_change > 5.0:
                break
            await asyncio.sleep(0.5)
        m1 = await self.controller.metrics()
        raw1, raw_last = self.raw.telemetry_count()
        await self.all_workers("telemetry", on=True)

        def delta(name: str, **labels: str) -> int:
            return round(metric(m1, name, **labels) - metric(m0, name, **labels))

        ok = delta("hotswap_messages_total", kind="telemetry", outcome="accepted")
        rejected = delta("hotswap_messages_total", kind="telemetry", outcome="rejected")
        reasons = {
            r: delta("hotswap_device_messages_dropped_total", reason=r)
            for r in (
                "rate_limited",
                "too_large",
                "malformed",
                "identity_mismatch",
                "identity_claim",
                "db_error",
                "backlog",
            )
        }
        raw_n = raw1 - raw0
        ctrl_s = last_change - t0
        raw_s = raw_last - t0
        ctrl_rate = ok / ctrl_s if ctrl_s > 0 else 0.0
        raw_rate = raw_n / raw_s if raw_s > 0 else 0.0
        result = {
            "sent": sent,
            "send_s": round(send_s, 3),
            "send_rate": round(sent / send_s) if send_s else None,
            "raw_received": raw_n,
            "raw_rate": round(raw_rate),
            "controller_accepted": ok,
            "controller_rejected": rejected,
            "controller_stored": ok - reasons["db_error"],
            "dropped": reasons,
            # Each lost message counted once: a too-large, malformed or mismatched one is
            # `rejected` (and dropped by reason); a rate-limited or backlogged one only
            # dropped.
            "unaccounted": sent - ok - rejected - reasons["rate_limited"] - reasons["backlog"],
            "controller_rate": round(ctrl_rate),
            "controller_s": round(ctrl_s, 3),
            "ratio": round(ctrl_rate / raw_rate, 3) if raw_rate else None,
            "count_ratio": round(ok / raw_n, 3) if raw_n else None,
        }
        progress(
            f"{label}: sent {sent}, raw received {raw_n} ({result['raw_rate']}/s), controller "
            f"accepted {ok} ({result['controller_rate']}/s), dropped {reasons}, "
            f"unaccounted {result['unaccounted']}, ratio {result['ratio']}"
        )
        return result

    async def p6(self, out: dict[str, Any]) -> None:
        hold = self.args.hold_s
        progress(f"P6: holding {self.n} connections for {hold:g} s")
        before = (await self.report())["stats"]
        self.phase = "p6"
        samples = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < hold:
            await asyncio.sleep(min(1.0, hold))
            self.check_controller()
            samples.append(rss_kb(self.controller.pid))
        self.phase = "between"
        after = await self.report()
        stats = after["stats"]
        out["p6"] = {
            "hold_s": hold,
            "connected": after["connected"],
            "unplanned_disconnects": stats.get("unplanned_disconnects", 0)
            - before.get("unplanned_disconnects", 0),
            "reconnects": stats.get("reconnects", 0) - before.get("reconnects", 0),
            "controller_rss_mb": round(
                max((s.get("VmRSS", 0) for s in samples), default=0) / 1024, 1
            ),
            "controller_hwm_mb": round(
                max((s.get("VmHWM", 0) for s in samples), default=0) / 1024, 1
            ),
        }
        progress(
            f"P6: {out['p6']['connected']}/{self.n} connected, "
            f"{out['p6']['unplanned_disconnects']} unplanned disconnects, controller RSS "
            f"{out['p6']['controller_rss_mb']} MB"
        )


async def push_models(
    broker: Mosquitto, s3: str, bucket: str, key: Path, work: Path
) -> dict[str, dict[str, Any]]:
    """`hotswap model push` (the CLI, as an operator) of each version; their registrations."""
    env = (
        os.environ
        | DEMO_CREDENTIALS
        | {
            "HOTSWAP_MQTT_URL": broker.url,
            "HOTSWAP_CREDENTIALS": str(broker.credentials("operator")),
            "HOTSWAP_S3_ENDPOINT": s3,
            "HOTSWAP_S3_BUCKET": bucket,
            "HOTSWAP_SIGNING_KEY": str(key),
        }
    )

    async def push(version: str, seed: int) -> dict[str, Any]:
        path = work / f"{MODEL}-{version}.tflite"
        path.write_bytes(build_dense_model(seed=seed))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker.cli",
            "model",
            "push",
            str(path),
            "--name",
            MODEL,
            "--version",
            version,
            "--json",
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"model push {version}: {err.decode().strip()}")
        row: dict[str, Any] = json.loads(out)
        row["data"] = path.read_bytes()
        return row

    rows = await asyncio.gather(*(push(v, i + 1) for i, v in enumerate(VERSIONS)))
    return dict(zip(VERSIONS, rows, strict=True))


def spawn_workers(count: int) -> list[WorkerHandle]:
    ctx = multiprocessing.get_context("spawn")
    handles = []
    for i in range(count):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child,), name=f"fleet-worker-{i}", daemon=True)
        proc.start()
        child.close()
        handles.append(WorkerHandle(proc, parent))
    return handles


def stop_workers(workers: list[WorkerHandle]) -> None:
    for w in workers:
        w.process.join(10)
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(5)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()


@contextlib.asynccontextmanager
async def running(args: argparse.Namespace) -> AsyncIterator[Bench]:
    """Everything the benchmark needs, started; all of it stopped on the way out."""
    raise_nofile_limit()
    work = Path(tempfile.mkdtemp(prefix="hotswap-fleet-"))
    stack = contextlib.AsyncExitStack()
    try:
        broker = stack.enter_context(Mosquitto(work / "broker"))
        s3 = stack.enter_context(S3Server())
        bucket = "hotswap-fleet"
        boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=bucket)
        progress(
            f"mosquitto at {broker.url} (pid {broker.process.pid if broker.process else '?'}),"
            f" S3 at {s3.endpoint}, work dir {work}"
        )
        private, _public = init_keys(work / "keys")
        regions = [f"region-{i}" for i in range(args.regions)]
        devices = [
            DeviceIdentity(f"sim-{i:05d}", regions[i % len(regions)], "camera")
            for i in range(args.devices)
        ]
        t0 = time.perf_counter()
        logins = await provision_fleet(broker, devices, work / "devices", how=args.provision)
        provision_s = time.perf_counter() - t0
        progress(f"provisioned {len(devices)} devices in {provision_s:.1f} s ({args.provision})")
        raw_login = await create_raw_identity(broker)
        db_url = stack.enter_context(fresh_database(args.db_url, work))
        controller = Controller(
            broker,
            s3.endpoint,
            bucket,
            db_url,
            work,
            source=args.controller_src,
            log_level=args.controller_log_level,
        )
        await controller.start()
        stack.push_async_callback(controller.stop)
        requester = await stack.enter_async_context(Requester(broker.endpoint("operator")))
        deadline = time.monotonic() + 60
        while (await requester.request({"kind": "ping"}, record=False, wait_s=2)) is None:
            if not controller.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the controller did not answer:\n{controller.log_tail()}")
        progress(f"controller up (pid {controller.pid}, db {db_url.split('@')[-1]})")
        watcher = await stack.enter_async_context(StatusWatcher(broker.endpoint("operator")))
        raw_endpoint = MqttEndpoint(
            broker.host, broker.port, False, raw_login.username, raw_login.password
        )
        raw = RawClient(raw_endpoint).start()
        stack.callback(raw.stop)
        models = await push_models(broker, s3.endpoint, bucket, private, work)
        key = load_private_key(private)
        signed = {}
        for version, row in models.items():
            data = row["data"]
            manifest = build_manifest(
                name=MODEL, version=version, data=data, signature=read_signature(data)
            )
            signed[version] = sign_manifest(manifest, key)
        progress(f"pushed {MODEL} {', '.join(VERSIONS)} through the CLI")
        controller_dir = broker.credentials("controller")
        command_key = load_private_key(controller_dir / COMMAND_KEY_FILE)
        keys = {}
        if args.verify_signatures:
            pub = load_public_key(controller_dir / COMMAND_PUB_FILE)
            from cryptography.hazmat.primitives import serialization

            keys = {
                key_id(pub): pub.public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                ).hex()
            }
        workers = spawn_workers(max(1, min(args.processes, len(devices))))
        stack.callback(stop_workers, workers)
        bench = Bench(
            args,
            work,
            broker,
            controller,
            requester,
            watcher,
            raw,
            workers,
            command_key,
            models,
            signed,
            bucket,
            s3.endpoint,
            devices,
        )
        await bench.all_workers(
            "init",
            host=broker.host,
            port=broker.port,
            telemetry_interval_s=args.telemetry_interval,
            activate_delay_s=args.activate_delay_ms / 1000,
            controller_keys=keys,
        )

        async def stop_all() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bench.all_workers("stop"), 60)

        stack.push_async_callback(stop_all)
        bench.provision_s = provision_s
        v1 = models["1.0.0"]
        active = ModelRef(name=MODEL, version="1.0.0", sha256=v1["sha256"]).model_dump()
        bench.active_ref = active
        bench.logins = logins
        yield bench
    finally:
        await stack.aclose()
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(",")) if args.only else set(PHASES)
    out: dict[str, Any] = {
        "devices": args.devices,
        "processes": args.processes,
        "regions": args.regions,
        "db": "postgresql" if (args.db_url or "").startswith("postgresql") else "sqlite",
        "simulated": "devices skip the download, manifest signature and digest, the "
        "interpreter and health watch"
        + ("" if args.verify_signatures else ", and the command signature check"),
    }
    async with running(args) as bench:
        out["provision_s"] = round(bench.provision_s, 2)
        out["provision"] = args.provision
        logins = bench.logins
        per = -(-bench.n // len(bench.workers))
        t0 = time.monotonic()
        rows = [
            (
                d.device_id,
                d.region,
                d.device_type,
                logins[d.device_id].username,
                logins[d.device_id].password,
            )
            for d in bench.devices
        ]
        starts = await asyncio.gather(
            *(
                w.call("start", devices=rows[i * per : (i + 1) * per], active=bench.active_ref)
                for i, w in enumerate(bench.workers)
            )
        )
        connected = sum(s["connected"] for s in starts)
        out["connect_s"] = round(time.monotonic() - t0, 2)
        progress(f"{connected}/{bench.n} devices connected in {out['connect_s']} s")
        while True:
            bench.check_controller()
            online = 0
            offset = 0
            while True:  # every page of `device list`
                answer = await bench.requester.request(
                    {"kind": "list_devices", "offset": offset, "limit": 1000},
                    record=False,
                    wait_s=30,
                )
                page = answer["result"] if answer and answer.get("ok") else []
                online += sum(bool(r.get("online")) for r in page)
                offset += len(page)
                if len(page) < 1000:
                    break
            if online >= bench.n:
                break
            if time.monotonic() - t0 > args.timeout:
                raise RuntimeError(f"only {online}/{bench.n} devices registered")
            await asyncio.sleep(0.5)
        out["registration_s"] = round(time.monotonic() - t0, 2)
        progress(f"controller lists {bench.n} devices online after {out['registration_s']} s")
        sampler = asyncio.create_task(bench.sampler())
        try:
            last_ok: str | None = None
            # A phase that fails is reported (`error`) and the next one still runs.
            if "p1" in only:
                last_ok = await phase(bench, out, "p1", bench.p1) or last_ok
            if "canary" in only:
                last_ok = await phase(bench, out, "canary", bench.canary) or last_ok
            if "p4" in only:
                if last_ok is None:  # nothing rolled out yet: a direct rollout to roll back
                    last_ok = await phase(bench, out, "p1", bench.p1)
                if last_ok is not None:
                    rid = last_ok

                    async def p4(o: dict[str, Any]) -> None:
                        await bench.p4(o, rid)

                    await phase(bench, out, "p4", p4)
            if "p5" in only:
                await phase(bench, out, "p5", bench.p5)
            if "p5raw" in only:
                await phase(bench, out, "p5raw", bench.p5raw)
            if "p6" in only:
                await phase(bench, out, "p6", bench.p6)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        report = await bench.report()
        out["controller_alive"] = bench.controller.alive()
        out["requests"] = summarize_requests(bench.requester.samples)
        out["controller_rss_mb"] = round(
            max((s.get("VmRSS", 0) for s in bench.rss), default=0) / 1024, 1
        )
        out["controller_hwm_mb"] = round(
            max((s.get("VmHWM", 0) for s in bench.rss), default=0) / 1024, 1
        )
        out["status_max_bytes"] = bench.watcher.max_bytes
        out["sim"] = {
            "connected": report["connected"],
            "stats": dict(report["stats"]),
            "commands": dict(report["commands"]),
            "events": dict(report["events"]),
            "versions": dict(report["versions"]),
            "last_errors": report["last_errors"][:5],
        }
        out["unplanned_disconnects"] = report["stats"].get("unplanned_disconnects", 0)
    return out


async def phase(
    bench: Bench, out: dict[str, Any], name: str, body: Callable[[dict[str, Any]], Any]
) -> Any:
    """Run one phase; on failure record it under `out[name]["error"]` (with the controller's
    last log lines) and return None."""
    try:
        return await body(out)
    except Exception as exc:
        bench.phase = "between"
        progress(f"{name} failed: {type(exc).__name__}: {exc}")
        out.setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"
        out[name]["controller_alive"] = bench.controller.alive()
        out[name]["controller_log_tail"] = bench.controller.log_tail(1500)
        return None


def summarize_requests(samples: Sequence[Any]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in sorted({s.kind for s in samples}):
        mine = [s for s in samples if s.kind == kind]
        times = [s.seconds for s in mine if s.seconds is not None]
        by_kind[kind] = {
            "n": len(mine),
            "unanswered": sum(s.seconds is None for s in mine),
            "refused": sum(s.seconds is not None and not s.ok for s in mine),
            "p50_ms": round(statistics.median(times) * 1e3, 1) if times else None,
            "p99_ms": round((pct(times, 99) or 0) * 1e3, 1) if times else None,
            "max_ms": round(max(times) * 1e3, 1) if times else None,
        }
    return by_kind


def summary(out: dict[str, Any]) -> str:
    lines = [
        f"fleet benchmark: {out['devices']} devices, {out['db']}, {out['processes']} "
        f"worker processes ({out['simulated']})"
    ]
    lines.append(
        f"provisioning {out['provision_s']} s, connect {out['connect_s']} s, "
        f"registration {out['registration_s']} s"
    )
    if "error" in out.get("p1", {}):
        lines.append(f"p1 failed: {out['p1']['error']}")
    elif "p1" in out:
        p1 = out["p1"]
        c = p1["controller"]
        lines.append(
            f"P1 direct: {c.get('status')} in {c.get('seconds')} s ({c.get('per_min')} "
            f"devices/min); raw paho {p1['raw']['seconds']} s; ratio {p1['ratio']}x"
        )
    if "error" in out.get("canary", {}):
        lines.append(f"canary failed: {out['canary']['error']}")
    elif "canary" in out:
        c = out["canary"]
        lines.append(
            f"canary (gated, {c.get('bake_s')} s bake): {c.get('status')} in {c.get('seconds')} s"
        )
    if "error" in out.get("p4", {}):
        lines.append(f"p4 failed: {out['p4']['error']}")
    elif "p4" in out:
        p4 = out["p4"]
        c = p4["controller"]
        lines.append(
            f"P4 rollback: devices back in {c.get('devices_back_s')} s, status "
            f"{c.get('status')} after {c.get('seconds')} s; raw {p4['raw']['seconds']} s;"
            f" ratio {p4['ratio']}x"
        )
    for key, label in (("p5", "P5 telemetry"), ("p5raw", "P5 telemetry, raw source")):
        if "error" in out.get(key, {}):
            lines.append(f"{key} failed: {out[key]['error']}")
        elif key in out:
            p5 = out[key]
            lines.append(
                f"{label}: sent {p5['sent']}, controller accepted "
                f"{p5['controller_accepted']} ({p5['controller_rate']}/s), raw received "
                f"{p5['raw_received']} ({p5['raw_rate']}/s), ratio {p5['ratio']}; dropped "
                f"{p5['dropped']}, unaccounted {p5['unaccounted']}"
            )
    if "error" in out.get("p6", {}):
        lines.append(f"p6 failed: {out['p6']['error']}")
    elif "p6" in out:
        p6 = out["p6"]
        lines.append(
            f"P6 hold {p6['hold_s']} s: {p6['connected']} connected, "
            f"{p6['unplanned_disconnects']} unplanned disconnects, controller RSS "
            f"{p6['controller_rss_mb']} MB"
        )
    for kind, r in out.get("requests", {}).items():
        lines.append(
            f"request {kind}: n={r['n']} p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms, "
            f"unanswered {r['unanswered']}"
        )
    lines.append(
        f"controller RSS max {out['controller_rss_mb']} MB; retained status max "
        f"{out['status_max_bytes']} bytes; unplanned disconnects "
        f"{out['unplanned_disconnects']}"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--db-url", default=None, help="default: SQLite in the run's temp dir")
    p.add_argument("--processes", type=int, default=2, help="worker processes of devices")
    p.add_argument("--regions", type=int, default=4)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--only", default=None, help=f"comma-separated phases of {','.join(PHASES)}")
    p.add_argument("--hold-s", type=float, default=10.0, help="P6: how long to hold")
    p.add_argument("--p5-rate", type=float, default=5000.0, help="P5: windows/s, all devices")
    p.add_argument("--p5-seconds", type=float, default=5.0)
    p.add_argument("--telemetry-interval", type=float, default=5.0, help="periodic windows, s")
    p.add_argument("--timeout", type=float, default=600.0, help="per rollout and per phase, s")
    p.add_argument("--sample-s", type=float, default=0.5, help="operator request sampling, s")
    p.add_argument(
        "--activate-delay-ms",
        type=float,
        default=0.0,
        help="simulated work between `verified` and `activated`",
    )
    p.add_argument(
        "--verify-signatures",
        action="store_true",
        help="devices check the controller's command signatures",
    )
    p.add_argument(
        "--controller-src",
        type=Path,
        default=None,
        help="run the controller from this source tree (PYTHONPATH)",
    )
    p.add_argument("--controller-log-level", default="info")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--provision",
        choices=("api", "import"),
        default="api",
        help="api: the running broker's dynamic-security API; import: its file, restarted",
    )
    args = p.parse_args(argv)
    if args.devices < 1 or args.processes < 1 or args.regions < 1:
        p.error("--devices, --processes and --regions must be >= 1")
    unknown = set(args.only.split(",")) - set(PHASES) if args.only else set()
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}: use {','.join(PHASES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        out = asyncio.run(run(args))
    except KeyboardInterrupt:
        progress("interrupted; everything it started is stopped")
        return 130
    if args.json:
        print(json.dumps(out, indent=None))
    else:
        print(summary(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
