"""Fixtures shared by the controller's engine tests (no broker): a controller on a real
SQLite file and moto's S3, with model m@2.0 registered and no publisher attached yet,
and `Recorder`, the publisher they attach (a test double for the MQTT client only)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.properties import Properties

from controller.service import Controller, ControllerConfig
from shared import topics
from shared.keys import init_keys, load_private_key
from shared.manifest import build_manifest, sign_manifest
from shared.messages import COMMAND, RolloutStatus
from shared.settings import MqttEndpoint
from shared.tflite import read_signature
from tests.conftest import S3


@dataclass
class Recorder:
    """Records every publish (topic, payload, retain)."""

    published: list[tuple[str, bytes, bool]] = field(default_factory=list)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        self.published.append((topic, payload, retain))

    def commands(self, kind: type[Any]) -> list[tuple[str, Any]]:
        out = []
        for topic, payload, _ in self.published:
            if topic.endswith("/cmd"):
                command = COMMAND.validate_json(payload)
                if isinstance(command, kind):
                    out.append((topic, command))
        return out

    def status(self, rollout_id: str) -> tuple[RolloutStatus, int]:
        """The last retained status of a rollout, and its size in bytes."""
        topic = topics.rollout_status(rollout_id)
        payload = [p for t, p, retain in self.published if t == topic and retain][-1]
        return RolloutStatus.model_validate_json(payload), len(payload)


@pytest.fixture
def detached_engine(tmp_path: Path, s3: S3, model_v1: bytes) -> Controller:
    """The controller's engine, never connected: each test attaches its own publisher."""
    config = ControllerConfig(
        mqtt=MqttEndpoint(host="127.0.0.1", port=1, tls=False),  # never connected
        db_url=f"sqlite:///{tmp_path / 'controller.db'}",
        s3_endpoint=s3.endpoint,
        s3_bucket=s3.bucket,
        status_interval_s=0.0,
        step_gap_s=0.0,
    )
    controller = Controller(config)
    priv, _ = init_keys(tmp_path / f"k{uuid.uuid4().hex[:6]}")
    manifest = build_manifest(
        name="m", version="2.0", data=model_v1, signature=read_signature(model_v1)
    )
    controller.store.register_model(sign_manifest(manifest, load_private_key(priv)), "m/2", 0.0)
    return controller
