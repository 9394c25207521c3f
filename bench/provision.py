"""Provisioning benchmark: devices per second through each path, on fresh real brokers.

    python bench/provision.py --devices 10000 --json

Each path runs against a fresh mosquitto (dynamic-security plugin, the
project's config) in a temporary directory, in the same run:

* `per_device`: the path every device took before batches, replayed here step
  by step as `provision_device` did it (the service-role check in a session of
  its own; then a read, a message of three commands making one role with both
  cmd topics and the client, the record, and the directory written file by
  file with an fsync each), one device at a time; on `--per-device-devices`
  devices (default 300), since it grows with the square of N;
* `api_batch`: `provision_devices` through the running broker's API (the same
  two write commands per device, in messages of up to 50 commands; records
  published 500 at a time); on `--api-devices` (default 1000), for the same
  reason: the plugin rewrites its whole file after every command;
* `import`: `provision_fleet` (the broker stopped, `import_devices` writes all
  roles and clients into the plugin's file at once, the broker started, records
  published) on `--devices`, and on the small N too, for ratios at equal N.

Then, on the broker holding `--devices` imported devices, one more device
through the API and one revocation (both pay the plugin's rewrite of the whole
file). Prints the per-device time of each path and the ratios; `--json` for
the figures as one JSON object. Does process, network and file I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import dynsec
from broker.launcher import Mosquitto
from broker.provision import (
    DynsecAdmin,
    provision_device,
    provision_devices,
    provision_fleet,
    revoke_device,
    update_service_roles,
)
from shared import topics
from shared.credentials import (
    CONTROLLER_KEY_FILE,
    DEVICE_FILE,
    MQTT_FILE,
    DeviceIdentity,
    MqttLogin,
    device_json,
    login_json,
    private_dir,
    write_secret,
)
from shared.keys import write_atomic
from shared.messages import DeviceRecord
from shared.settings import MqttEndpoint

REGIONS = ("eu-west", "us-east", "ap-south", "sa-east")


def fleet(n: int, prefix: str = "sim") -> list[DeviceIdentity]:
    return [
        DeviceIdentity(f"{prefix}-{i:06d}", REGIONS[i % len(REGIONS)], "camera") for i in range(n)
    ]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def timed(run: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await run()
    return time.perf_counter() - started


def old_device_role(device: DeviceIdentity) -> dynsec.Role:
    """The role a device got before region roles: its topics and its region's cmd topic."""
    region = dynsec.region_role(device.region)
    own = dynsec.device_role(device.device_id)
    return dynsec.Role(own.name, own.acls + region.acls)


async def old_provision_device(
    admin: MqttEndpoint, admin_dir: Path, device: DeviceIdentity, out: Path
) -> None:
    """What `provision_device` did for a new device before batches, step by step."""
    await update_service_roles(admin)
    login = MqttLogin(device.device_id, dynsec.new_password(), client_id=device.device_id)
    role = old_device_role(device)
    async with DynsecAdmin(admin) as api:
        assert await api.get_client(device.device_id) is None
        answers = await api.run(
            [
                dynsec.delete_role(role.name),
                dynsec.create_role(role),
                dynsec.create_client(login, (role.name,)),
            ]
        )
        assert all(a.error is None for a in answers[1:]), answers
        record = DeviceRecord(
            device_id=device.device_id, region=device.region, device_type=device.device_type
        )
        await api.publish_retained(topics.device_registry(device.device_id), record.to_wire())
    private_dir(out)
    write_secret(out / MQTT_FILE, login_json(login))
    write_atomic(out / DEVICE_FILE, device_json(device))
    write_atomic(out / CONTROLLER_KEY_FILE, (admin_dir / "command.pub").read_bytes())


async def per_device(root: Path, n: int) -> float:
    with Mosquitto(root / "broker") as broker:
        admin, admin_dir = broker.endpoint("admin"), broker.credentials("admin")

        async def run() -> None:
            for i, device in enumerate(fleet(n)):
                await old_provision_device(
                    admin, admin_dir, device, root / "out" / device.device_id
                )
                if (i + 1) % max(1, n // 5) == 0:
                    log(f"  per-device: {i + 1}/{n}")

        return await timed(run)


async def api_batch(root: Path, n: int) -> float:
    with Mosquitto(root / "broker") as broker:
        admin, admin_dir = broker.endpoint("admin"), broker.credentials("admin")
        return await timed(
            lambda: provision_devices(
                admin, admin_dir, fleet(n), root / "out", progress=lambda m: log(f"  api: {m}")
            )
        )


async def bulk_import(root: Path, n: int, *, extra: bool) -> dict[str, float]:
    with Mosquitto(root / "broker") as broker:
        seconds = await timed(
            lambda: provision_fleet(
                broker, fleet(n), root / "out", progress=lambda m: log(f"  import: {m}")
            )
        )
        figures = {"seconds": seconds}
        if extra:
            admin, admin_dir = broker.endpoint("admin"), broker.credentials("admin")
            one = DeviceIdentity("late-000001", "eu-west", "camera")
            figures["one_more_device_s"] = await timed(
                lambda: provision_device(admin, admin_dir, one, root / "late")
            )
            figures["one_revocation_s"] = await timed(lambda: revoke_device(admin, one.device_id))
        return figures


async def main(args: argparse.Namespace) -> dict[str, Any]:
    small_old = min(args.per_device_devices, args.devices)
    small_api = min(args.api_devices, args.devices)
    out: dict[str, Any] = {"devices": args.devices}
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-provision-") as tmp:
        root = Path(tmp)
        log(f"per-device path, {small_old} devices")
        old_s = await per_device(root / "old", small_old)
        log(f"batched API, {small_api} devices")
        api_s = await api_batch(root / "api", small_api)
        log(f"import, {small_old} devices")
        imp_small = await bulk_import(root / "imp-small", small_old, extra=False)
        log(f"import, {args.devices} devices")
        imp = await bulk_import(root / "imp", args.devices, extra=True)
    ms = lambda s, n: round(s / n * 1000, 3)  # noqa: E731
    out["per_device"] = {
        "n": small_old,
        "seconds": round(old_s, 2),
        "ms_per_device": ms(old_s, small_old),
    }
    out["api_batch"] = {
        "n": small_api,
        "seconds": round(api_s, 2),
        "ms_per_device": ms(api_s, small_api),
    }
    out["import_small"] = {
        "n": small_old, "seconds": round(imp_small["seconds"], 2),
        "ms_per_device": ms(imp_small["seconds"], small_old),
    }  # fmt: skip
    out["import"] = {
        "n": args.devices,
        "seconds": round(imp["seconds"], 2),
        "ms_per_device": ms(imp["seconds"], args.devices),
        "one_more_device_s": round(imp["one_more_device_s"], 3),
        "one_revocation_s": round(imp["one_revocation_s"], 3),
    }
    out["ratios"] = {
        "per_device_over_import_same_n": round(old_s / imp_small["seconds"], 1),
        "per_device_over_import_ms_per_device": round(
            out["per_device"]["ms_per_device"] / out["import"]["ms_per_device"], 1
        ),
        "api_batch_over_import_ms_per_device": round(
            out["api_batch"]["ms_per_device"] / out["import"]["ms_per_device"], 1
        ),
        "per_device_over_api_batch_ms_per_device": round(
            out["per_device"]["ms_per_device"] / out["api_batch"]["ms_per_device"], 1
        ),
    }
    return out


def report(figures: dict[str, Any]) -> None:
    rows = [
        ("per-device API calls", figures["per_device"]),
        ("batched API", figures["api_batch"]),
        ("import (same N as per-device)", figures["import_small"]),
        ("import", figures["import"]),
    ]
    for name, row in rows:
        print(
            f"{name:32s} N={row['n']:6d}  {row['seconds']:8.2f} s  "
            f"{row['ms_per_device']:8.3f} ms/device"
        )
    imp = figures["import"]
    print(
        f"on the {imp['n']}-device broker: one more device through the API "
        f"{imp['one_more_device_s']:.3f} s, one revocation {imp['one_revocation_s']:.3f} s"
    )
    for name, value in figures["ratios"].items():
        print(f"{name}: {value}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--per-device-devices", type=int, default=300)
    parser.add_argument("--api-devices", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="the figures as one JSON object")
    args = parser.parse_args()
    figures = asyncio.run(main(args))
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        report(figures)
