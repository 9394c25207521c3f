"""Batch provisioning (API and import into the plugin's file), revocation of batch-provisioned
and older devices, the O(1) shape of the commands per device, and `--from-file` refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from typer.testing import CliRunner

from broker import dynsec
from broker.cli import app
from broker.launcher import Mosquitto
from broker.provision import (
    DynsecAdmin,
    Provisioned,
    import_devices,
    provision_device,
    provision_devices,
    provision_fleet,
    revoke_device,
)
from shared import topics
from shared.credentials import (
    DeviceIdentity,
    MqttLogin,
    apply_credentials,
    load_credentials,
)
from shared.messages import DeviceRecord
from shared.mqtt import make_client, refused_code
from shared.settings import MqttEndpoint, parse_mqtt_url
from tests.broker.test_device_registry import record

pytestmark = pytest.mark.timeout(120)


def fleet(n: int, regions: tuple[str, ...] = ("eu-west", "us-east")) -> list[DeviceIdentity]:
    return [DeviceIdentity(f"sim-{i:04d}", regions[i % len(regions)], "camera") for i in range(n)]


def login_of(broker: Mosquitto, done: Provisioned) -> MqttEndpoint:
    return apply_credentials(parse_mqtt_url(broker.url), done.credentials)


async def can_connect(endpoint: MqttEndpoint, client_id: str) -> bool:
    try:
        async with make_client(endpoint, identifier=client_id):
            return True
    except aiomqtt.MqttCodeError:
        return False


@pytest.fixture
def control_log(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every command sent on $CONTROL/dynamic-security/v1 (the broker routes nothing there to
    subscribers, so this records at the sender), each with its message's number (`_message`)."""
    seen: list[dict[str, Any]] = []
    messages = [0]
    run, send = DynsecAdmin.run, DynsecAdmin.send

    def note(commands: list[dict[str, Any]]) -> None:
        seen.extend({**c, "_message": messages[0]} for c in commands)
        messages[0] += 1

    async def recorded_run(self: DynsecAdmin, commands: list[dict[str, Any]]) -> Any:
        note(commands)
        return await run(self, commands)

    async def recorded_send(self: DynsecAdmin, commands: list[dict[str, Any]]) -> None:
        note(commands)
        await send(self, commands)

    monkeypatch.setattr(DynsecAdmin, "run", recorded_run)
    monkeypatch.setattr(DynsecAdmin, "send", recorded_send)
    return seen


WRITES = {"createRole", "createClient", "deleteRole", "deleteClient", "addRoleACL"}


@pytest.mark.parametrize("n", [12, 60])
async def test_a_batch_costs_two_write_commands_per_device_in_few_messages(
    mosquitto: Mosquitto, tmp_path: Path, n: int, control_log: list[dict[str, Any]]
) -> None:
    """Per new device exactly createRole + createClient; per region one createRole; messages
    of at most 50 commands, so their count grows by one per 25 devices, not one per device."""
    done = await provision_devices(
        mosquitto.endpoint("admin"), mosquitto.credentials("admin"), fleet(n), tmp_path
    )
    seen = control_log
    assert [d.outcome for d in done] == ["created"] * n
    writes = [c for c in seen if c["command"] in WRITES]
    by_kind = {k: sum(1 for c in writes if c["command"] == k) for k in WRITES}
    assert by_kind == {
        "createRole": n + 2, "createClient": n, "deleteRole": 0, "deleteClient": 0,
        "addRoleACL": 0,
    }  # fmt: skip
    per_message: dict[int, int] = {}
    for command in seen:
        per_message[command["_message"]] = per_message.get(command["_message"], 0) + 1
    write_messages = {c["_message"] for c in writes}
    assert all(per_message[m] <= 50 for m in write_messages)
    assert len(write_messages) == -(-(2 * n + 2) // 50)  # ceil: messages are full but the last
    # the service-role check (1 message), reads (2 per device, 100 devices a message), writes
    assert len(per_message) == 1 + -(-n // 100) + len(write_messages)


async def test_batch_devices_get_their_own_directories_and_registry_records(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Each device: OUT_DIR/<id> with a 0600 login bound to its id, its identity, the
    controller key; its retained record; it logs in under its own client id only."""
    devices = fleet(3, regions=("eu-west", "us-east", "eu-west"))
    done = await provision_devices(
        mosquitto.endpoint("admin"), mosquitto.credentials("admin"), devices, tmp_path / "out"
    )
    for device, provisioned in zip(devices, done, strict=True):
        creds = load_credentials(tmp_path / "out" / device.device_id)
        assert creds == provisioned.credentials
        assert creds.device == device and creds.login.client_id == device.device_id
        assert stat.S_IMODE((creds.directory / "mqtt.json").stat().st_mode) == 0o600
        assert stat.S_IMODE(creds.directory.stat().st_mode) == 0o700
        assert creds.controller_key is not None
        got = await record(mosquitto, device.device_id)
        assert (got.region, got.device_type, got.revoked) == (device.region, "camera", False)
        assert await can_connect(login_of(mosquitto, provisioned), device.device_id)
        assert not await can_connect(login_of(mosquitto, provisioned), "someone-else")


async def test_a_batch_is_refused_whole_before_the_broker_changes(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """One device already provisioned (or one reserved id) refuses the batch: nobody is created;
    with keep_existing the existing one is kept and the others created."""
    admin, admin_dir = mosquitto.endpoint("admin"), mosquitto.credentials("admin")
    devices = fleet(4)
    await provision_device(admin, admin_dir, devices[2], tmp_path / devices[2].device_id)
    with pytest.raises(Exception, match="sim-0002 is already provisioned"):
        await provision_devices(
            admin, admin_dir, devices[:2] + devices[3:] + [devices[2]], tmp_path / "x"
        )
    with pytest.raises(Exception, match="reserved"):
        await provision_devices(
            admin,
            admin_dir,
            [DeviceIdentity(dynsec.CONTROLLER, "eu-west", "camera")],
            tmp_path / "y",
        )
    async with DynsecAdmin(admin) as api:
        for device in devices[:2] + devices[3:]:
            assert await api.get_client(device.device_id) is None
    assert not (tmp_path / "x").exists()
    done = await provision_devices(admin, admin_dir, devices, tmp_path, keep_existing=True)
    assert [d.outcome for d in done] == ["created", "created", "kept", "created"]


async def test_revoking_a_batch_provisioned_device_cuts_it_off_and_spares_its_region(
    mosquitto: Mosquitto, tmp_path: Path, control_log: list[dict[str, Any]]
) -> None:
    """Revoke: the connected device is disconnected at once (not at its keepalive) and refused
    afterwards, with a constant set of commands; its region's other device still gets the
    region's commands."""
    devices = fleet(4, regions=("eu-west",))
    done = await provision_devices(
        mosquitto.endpoint("admin"), mosquitto.credentials("admin"), devices, tmp_path
    )
    victim, neighbour = done[0], done[1]
    kicked = asyncio.Event()

    async def hold() -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async with make_client(
                login_of(mosquitto, victim), identifier="sim-0000", keepalive=60
            ) as c:
                await c.subscribe(topics.device_cmd("sim-0000"), qos=1)
                async for _ in c.messages:
                    pass
        kicked.set()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.3)
    control_log.clear()
    await revoke_device(mosquitto.endpoint("admin"), "sim-0000")
    seen = control_log
    await asyncio.wait_for(kicked.wait(), 10)  # well before the 60 s keepalive
    await holder
    assert [c["command"] for c in seen] == [
        "getRole", "getRole", "getRole", "getClient", "deleteClient", "deleteRole",
    ]  # fmt: skip
    assert not await can_connect(login_of(mosquitto, victim), "sim-0000")
    assert (await record(mosquitto, "sim-0000")).revoked
    async with make_client(login_of(mosquitto, neighbour), identifier="sim-0001") as n:
        assert refused_code(await n.subscribe(topics.region_cmd("eu-west"), qos=1)) is None
        async with make_client(mosquitto.endpoint("controller"), identifier="test-ctl") as ctl:
            await ctl.publish(topics.region_cmd("eu-west"), b"still-there", qos=1)
        async with asyncio.timeout(5):
            message = await anext(aiter(n.messages))
    assert message.payload == b"still-there"


def old_style_role(device: DeviceIdentity) -> dynsec.Role:
    """The one role a device got before region roles: its topics and its region's cmd."""
    own = dynsec.device_role(device.device_id)
    return dynsec.Role(own.name, own.acls + dynsec.region_role(device.region).acls)


async def test_a_device_of_the_older_layout_keeps_working_is_replaced_and_revoked(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """An older broker's device (one role with both cmd topics) reads its region next to batch
    devices of that region; --force gives it the new layout; revoke cuts it off."""
    admin, admin_dir = mosquitto.endpoint("admin"), mosquitto.credentials("admin")
    old = DeviceIdentity("cam-old", "eu-west", "camera")
    login = MqttLogin("cam-old", "old-password-123456", client_id="cam-old")
    async with DynsecAdmin(admin) as api:
        answers = await api.run(
            [
                dynsec.create_role(old_style_role(old)),
                dynsec.create_client(login, (dynsec.device_role_name("cam-old"),)),
            ]
        )
    assert all(a.error is None for a in answers), answers
    await provision_devices(admin, admin_dir, fleet(2, regions=("eu-west",)), tmp_path / "new")
    endpoint = apply_credentials(
        parse_mqtt_url(mosquitto.url), load_credentials_for(tmp_path / "old", login, old)
    )
    async with make_client(endpoint, identifier="cam-old") as c:
        assert refused_code(await c.subscribe(topics.region_cmd("eu-west"), qos=1)) is None
        assert refused_code(await c.subscribe(topics.device_cmd("sim-0000"), qos=1)) is not None
    await revoke_device(admin, "cam-old")
    assert not await can_connect(endpoint, "cam-old")
    # Another older device, replaced with --force, gets the device + region roles.
    again = DeviceIdentity("cam-old2", "eu-west", "camera")
    async with DynsecAdmin(admin) as api:
        await api.run(
            [
                dynsec.create_role(old_style_role(again)),
                dynsec.create_client(
                    MqttLogin("cam-old2", "pw-old2-123456", client_id="cam-old2"),
                    (dynsec.device_role_name("cam-old2"),),
                ),
            ]
        )
    replaced = await provision_device(admin, admin_dir, again, tmp_path / "old2", force=True)
    assert replaced.outcome == "replaced"
    async with DynsecAdmin(admin) as api:
        client = await api.get_client("cam-old2")
        (answer,) = await api.run([dynsec.get_role(dynsec.device_role_name("cam-old2"))])
    assert client is not None
    assert [r["rolename"] for r in client["roles"]] == list(
        dynsec.device_role_names("cam-old2", "eu-west")
    )
    assert {a["topic"] for a in answer.data["role"]["acls"]} == {
        a.topic for a in dynsec.device_role("cam-old2").acls
    }
    assert await can_connect(login_of(mosquitto, replaced), "cam-old2")


def load_credentials_for(out: Path, login: MqttLogin, device: DeviceIdentity) -> Any:
    """A credentials directory for a device created by hand (the older layout)."""
    from shared.credentials import device_json, login_json, private_dir, write_secret

    private_dir(out)
    write_secret(out / "mqtt.json", login_json(login))
    write_secret(out / "device.json", device_json(device))
    return load_credentials(out)


async def test_provision_fleet_imports_into_the_plugin_file_and_restarts_the_broker(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """All devices land in the plugin's file in one write (no API commands for them), the
    restarted broker accepts them, their records are published, the API works afterwards."""
    devices = fleet(40, regions=("eu-west", "us-east", "ap-south"))
    done = await provision_fleet(mosquitto, devices, tmp_path)
    config = json.loads((mosquitto.data_dir / "dynamic-security.json").read_text())
    clients = dynsec.config_clients(config)
    for device in devices:
        assert clients[device.device_id] == set(
            dynsec.device_role_names(device.device_id, device.region)
        )
    roles = [r["rolename"] for r in config["roles"]]
    assert sorted(r for r in roles if r.startswith(dynsec.REGION_ROLE_PREFIX)) == [
        "hotswap-region-ap-south", "hotswap-region-eu-west", "hotswap-region-us-east",
    ]  # fmt: skip
    assert len(roles) == len(set(roles))
    for provisioned in (done[0], done[17], done[39]):
        assert await can_connect(
            login_of(mosquitto, provisioned), provisioned.credentials.login.username
        )
    assert (await record(mosquitto, "sim-0038")).region == "ap-south"
    late = await provision_device(
        mosquitto.endpoint("admin"), mosquitto.credentials("admin"),
        DeviceIdentity("late-1", "eu-west", "camera"), tmp_path / "late",
    )  # fmt: skip
    assert await can_connect(login_of(mosquitto, late), "late-1")
    await revoke_device(mosquitto.endpoint("admin"), "sim-0017")
    assert not await can_connect(login_of(mosquitto, done[17]), "sim-0017")


def test_import_refuses_a_running_broker_and_existing_devices(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The plugin would overwrite the file: a running broker is refused; so is an existing
    device unless --force, which gives it a new password."""
    devices = fleet(3)
    with pytest.raises(Exception, match="is running: stop it first"):
        import_devices(mosquitto.data_dir, devices, tmp_path / "a")
    mosquitto.stop()
    first = import_devices(mosquitto.data_dir, devices, tmp_path / "a")
    with pytest.raises(Exception, match="sim-0001 is already provisioned"):
        import_devices(mosquitto.data_dir, devices[1:2], tmp_path / "b")
    again = import_devices(mosquitto.data_dir, devices[1:2], tmp_path / "b", force=True)
    assert again[0].outcome == "replaced"
    mosquitto.start()
    assert asyncio.run(can_connect(login_of(mosquitto, again[0]), "sim-0001"))
    assert not asyncio.run(can_connect(login_of(mosquitto, first[1]), "sim-0001"))
    assert asyncio.run(can_connect(login_of(mosquitto, first[2]), "sim-0002"))


# ------------------------------------------------------------------ the CLI


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def from_file_args(broker: Mosquitto, csv: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "device", "provision", "--from-file", str(csv), "--out-dir", str(out_dir),
        "--mqtt-url", broker.url, "--credentials", str(broker.credentials("admin")), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cam-1,eu-west\n", "devices.csv line 1: expected id,region,type, got 2 field(s)"),
        (
            "id,region,type\ncam-1,eu-west,camera\ncam 2,eu-west,camera\n",
            "devices.csv line 3: invalid device id 'cam 2'",
        ),
        (
            "cam-1,eu-west,camera\ncam-1,us-east,camera\n",
            "line 2: device cam-1 is already on line 1",
        ),
        ("# nothing\n\n", "lists no devices"),
        ("cam-1,eu/west,camera\n", "line 1: invalid region 'eu/west'"),
        ("hotswap-admin,eu-west,camera\n", "reserved for a broker identity"),
    ],
)
def test_from_file_refuses_bad_input_with_one_error_line(
    mosquitto: Mosquitto, tmp_path: Path, content: str, message: str
) -> None:
    """A malformed line, a bad id, a duplicate, an empty list, a reserved id: exit 2, one
    `error:` line naming the problem, nothing created."""
    csv = tmp_path / "devices.csv"
    csv.write_text(content)
    code, stdout, stderr = invoke(*from_file_args(mosquitto, csv, tmp_path / "out", "--json"))
    assert code == 2, stderr
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stdout == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--device-id", "cam-1"],
        ["--out", "x"],
    ],
)
def test_from_file_and_single_device_flags_do_not_mix(
    mosquitto: Mosquitto, tmp_path: Path, extra: list[str]
) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text("cam-1,eu-west,camera\n")
    code, _, stderr = invoke(*from_file_args(mosquitto, csv, tmp_path / "out", *extra))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("error: --from-file takes --out-dir")


def test_missing_file_and_missing_flags_are_one_line_errors(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    code, _, stderr = invoke(*from_file_args(mosquitto, tmp_path / "nope.csv", tmp_path / "out"))
    assert code == 2 and stderr.startswith("error: cannot read") and len(stderr.splitlines()) == 1
    admin = str(mosquitto.credentials("admin"))
    code, _, stderr = invoke("device", "provision", "--credentials", admin, "--device-id", "x")
    assert (
        code == 2 and stderr.startswith("error: give --device-id") and len(stderr.splitlines()) == 1
    )


def test_from_file_provisions_every_device_and_a_rerun_keeps_them(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """--json lists each device and the counts; --keep-existing again: all kept, same logins."""
    csv = tmp_path / "devices.csv"
    csv.write_text("id,region,type\ncam-1,eu-west,camera\ncam-2,us-east,gateway\n\n# more later\n")
    code, stdout, stderr = invoke(*from_file_args(mosquitto, csv, tmp_path / "out", "--json"))
    assert code == 0, stderr
    shown = json.loads(stdout)
    assert shown["counts"] == {"created": 2, "replaced": 0, "kept": 0}
    assert [(d["deviceId"], d["outcome"]) for d in shown["devices"]] == [
        ("cam-1", "created"), ("cam-2", "created"),
    ]  # fmt: skip
    assert load_credentials(tmp_path / "out" / "cam-2").device == DeviceIdentity(
        "cam-2", "us-east", "gateway"
    )
    login = (tmp_path / "out" / "cam-1" / "mqtt.json").read_bytes()
    code, stdout, stderr = invoke(
        *from_file_args(mosquitto, csv, tmp_path / "out", "--keep-existing", "--json")
    )
    assert code == 0, stderr
    assert json.loads(stdout)["counts"] == {"created": 0, "replaced": 0, "kept": 2}
    assert (tmp_path / "out" / "cam-1" / "mqtt.json").read_bytes() == login


def test_device_import_writes_a_stopped_broker_and_refuses_a_running_one(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """`device import`: exit 2 with one line while the broker runs; stopped: the devices are
    accepted once it starts, and `provision --from-file --keep-existing` publishes records."""
    csv = tmp_path / "devices.csv"
    csv.write_text("cam-1,eu-west,camera\ncam-2,us-east,camera\n")
    args = ["device", "import", "--data-dir", str(mosquitto.data_dir), "--from-file", str(csv),
            "--out-dir", str(tmp_path / "out")]  # fmt: skip
    code, _, stderr = invoke(*args)
    assert code == 2 and "is running: stop it first" in stderr and len(stderr.splitlines()) == 1
    mosquitto.stop()
    code, stdout, stderr = invoke(*args, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["counts"]["created"] == 2
    mosquitto.start()
    code, stdout, stderr = invoke(
        *from_file_args(mosquitto, csv, tmp_path / "out", "--keep-existing", "--json")
    )
    assert code == 0, stderr
    assert json.loads(stdout)["counts"]["kept"] == 2
    got = asyncio.run(record(mosquitto, "cam-2"))
    assert isinstance(got, DeviceRecord) and got.region == "us-east"
    creds = load_credentials(tmp_path / "out" / "cam-1")
    assert asyncio.run(
        can_connect(apply_credentials(parse_mqtt_url(mosquitto.url), creds), "cam-1")
    )
