"""The broker's per-client queues (mosquitto.conf): deep enough that a controller busy
for a moment gets every device event of a fleet's burst, with the real mosquitto."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import Mosquitto
from shared import topics
from shared.settings import MqttEndpoint
from tests.conftest import device_endpoint

BURST = 30_000  # five events each from 6,000 devices: a fleet's answers to one rollout


def _client(endpoint: MqttEndpoint, client_id: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.username_pw_set(endpoint.username, endpoint.password)
    client.max_inflight_messages_set(65535)
    client.max_queued_messages_set(0)
    return client


def test_a_controller_that_stops_reading_for_a_while_gets_every_event_of_a_burst(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The controller's session stops reading (busy), a device sends 30,000 QoS 1 events,
    then the controller reads again: every event arrives. With the old limit of 10,000
    queued messages, mosquitto dropped 19,900 of them without a word to anyone."""
    controller = mosquitto.endpoint("controller")
    received = 0
    subscribed, reading = threading.Event(), threading.Event()

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        nonlocal received
        reading.wait(120)  # busy: its network thread reads nothing more meanwhile
        received += 1

    sub = _client(controller, "hotswap-controller")
    sub.on_message = on_message
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect(controller.host, controller.port)
    sub.loop_start()
    sub.subscribe(topics.ALL_DEVICE_EVENTS, qos=1)
    assert subscribed.wait(10)

    device = device_endpoint(mosquitto, "dev-1")
    pub = _client(device, "dev-1")
    pub.connect(device.host, device.port)
    pub.loop_start()
    try:
        payload = b'{"phase":"activated","pad":"' + b"x" * 200 + b'"}'
        sent = [pub.publish(topics.device_events("dev-1"), payload, qos=1) for _ in range(BURST)]
        for info in sent:
            info.wait_for_publish(60)
        reading.set()  # reading again
        deadline, last = time.monotonic() + 60, -1
        while received < BURST and time.monotonic() < deadline:
            if received == last:
                time.sleep(0.5)  # nothing new in the last half second
                if received == last:
                    break
            last = received
            time.sleep(0.5)
        assert received == BURST
    finally:
        reading.set()
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()
