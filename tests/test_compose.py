"""compose.yaml for Docker users: it parses, and everything it names exists here.

Docker cannot run on these machines, so this checks the file against the
project instead: mounted and built files exist, every `hotswap` command uses
real sub-commands and options of the real CLI, the ports services dial are
ports other services listen on, and the Dockerfile copies what exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import typer.main
import yaml

from broker.cli import app
from controller import metrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
HOTSWAP = {name: s for name, s in SERVICES.items() if s.get("image") == "hotswap:local"}
GRAFANA_PROVISIONING = (
    "docs/grafana/provisioning/datasources/prometheus.yaml",
    "docs/grafana/provisioning/dashboards/hotswap.yaml",
)


def test_compose_has_the_parts_of_the_design() -> None:
    """Broker, MinIO with its bucket, PostgreSQL, controller, three agents, Prometheus,
    Grafana."""
    assert {
        "mosquitto", "minio", "minio-bucket", "postgres", "controller", "prometheus", "grafana",
        "jaeger",
    } <= set(SERVICES)  # fmt: skip
    assert len([n for n in SERVICES if n.startswith("agent-")]) == 3
    assert "hotswap-models" in SERVICES["minio-bucket"]["entrypoint"]


def test_every_mounted_or_built_path_exists() -> None:
    """Bind mounts and the build context/Dockerfile point at files of the project."""
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name


def _resolve(argv: list[str]) -> tuple[Any, list[str]]:
    # typer ships its own click; walk groups by what they do, not by class.
    command: Any = typer.main.get_command(app)
    rest = list(argv)
    while hasattr(command, "list_commands") and rest and not rest[0].startswith("-"):
        sub = command.get_command(
            command.make_context("hotswap", [], resilient_parsing=True), rest[0]
        )
        assert sub is not None, f"no sub-command {rest[0]!r} in {argv}"
        command, rest = sub, rest[1:]
    return command, rest


def test_every_hotswap_command_uses_real_subcommands_and_options() -> None:
    """Each service's argv parses against the real typer app (names and options)."""
    assert {
        "mosquitto", "controller", "agent-1", "agent-2", "agent-3", "keys",
        "provision-1", "provision-2", "provision-3",
    } <= set(HOTSWAP)  # fmt: skip
    for name, service in HOTSWAP.items():
        argv = [str(a) for a in service["command"]]
        command, rest = _resolve(argv)
        options = {opt for p in command.params for opt in p.opts}
        for token in rest:
            if token.startswith("--") and token != "--help":
                assert token in options, (name, token, sorted(options))
        if "--help" not in argv:
            # Parsing for real catches missing required options and bad values.
            ctx = command.make_context(argv[-1], rest, resilient_parsing=False)
            assert ctx.params, name


def test_ports_that_services_dial_are_ports_that_services_serve() -> None:
    """mqtt://mosquitto:1883, http://minio:9000, postgres:5432, controller:19100,
    agent-3:19101, prometheus:9090 (Grafana's data source) and jaeger:4318 all exist."""
    listening = {
        "mosquitto": 1883,  # mosquitto.conf's listener
        "minio": 9000,
        "postgres": 5432,
        "controller": int(_option(SERVICES["controller"]["command"], "--metrics-port")),
        "agent-3": int(_option(SERVICES["agent-3"]["command"], "--metrics-port")),
        "prometheus": 9090,  # prom/prometheus's default
        "jaeger": 4318,  # OTLP over HTTP
    }
    conf = (ROOT / "mosquitto.conf").read_text()
    assert re.search(r"^listener 1883\b", conf, re.M)
    # Scraped from Prometheus's container: bound to every interface, not loopback.
    for name in ("controller", "agent-3"):
        assert _option(SERVICES[name]["command"], "--metrics-host") == "0.0.0.0", name  # noqa: S104
    assert listening["controller"] == metrics.DEFAULT_PORT != 9100  # node_exporter's
    text = "".join(
        (ROOT / f).read_text()
        for f in ("compose.yaml", "broker/prometheus.yml", *GRAFANA_PROVISIONING)
    )
    dialled = set(re.findall(r"(?:://|@|\")([a-z][a-z0-9-]*):(\d+)", text))
    assert dialled, "no host:port references found"
    for host, port in dialled:
        if host in SERVICES:
            assert listening.get(host) == int(port), (host, port)


def test_dockerfile_copies_files_that_exist() -> None:
    """Every COPY source of broker/Dockerfile is in the build context."""
    copies = [
        line.split()[1:-1]
        for line in (ROOT / "broker" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    ]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source


def _option(argv: list[Any], name: str) -> str:
    return str(argv[argv.index(name) + 1])


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Mount point -> (volume or path, read-only)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        found[target] = (source, mode == ["ro"])
    return found


def _volume_of(service: dict[str, Any], path: str) -> tuple[str, bool]:
    """The volume `path` lies on in `service` (longest mount prefix)."""
    mounts = _mounts(service)
    matches = [t for t in mounts if path == t or path.startswith(t.rstrip("/") + "/")]
    assert matches, (path, mounts)
    return mounts[max(matches, key=len)]


def test_every_identity_comes_from_the_brokers_volume_or_its_provisioner() -> None:
    """The secure broker writes its identities into its data volume; the controller, the cli
    and the provisioners read them from there (read-only); each agent mounts, read-only, the
    credentials volume its own provisioner writes, and the device ids are distinct."""
    broker = SERVICES["mosquitto"]
    data_dir = _option(broker["command"], "--data-dir")
    broker_volume, read_only = _volume_of(broker, data_dir)
    assert not read_only
    admin = f"{data_dir}/credentials/admin"
    controller = SERVICES["controller"]
    assert _option(controller["command"], "--credentials") == f"{data_dir}/credentials/controller"
    assert _volume_of(controller, f"{data_dir}/credentials/controller") == (broker_volume, True)
    cli = SERVICES["cli"]
    operator = cli["environment"]["HOTSWAP_CREDENTIALS"]
    assert operator == f"{data_dir}/credentials/operator"
    assert _volume_of(cli, operator) == (broker_volume, True)
    devices = set()
    for n in (1, 2, 3):
        provision, agent = SERVICES[f"provision-{n}"], SERVICES[f"agent-{n}"]
        argv = provision["command"]
        assert _option(argv, "--credentials") == admin
        assert _volume_of(provision, admin) == (broker_volume, True)
        assert "--keep-existing" in argv  # compose re-runs it on every `up`
        written, read_only = _volume_of(provision, _option(argv, "--out"))
        assert not read_only
        assert _volume_of(agent, _option(agent["command"], "--credentials")) == (written, True)
        assert "provision-" + str(n) in agent["depends_on"]
        devices.add(_option(argv, "--device-id"))
    assert len(devices) == 3


def test_prometheus_scrapes_the_services_that_serve_metrics() -> None:
    """broker/prometheus.yml's targets are the controller's and the gateway agent's
    --metrics-port, and the file compose mounts is that one."""
    prometheus = SERVICES["prometheus"]
    source, target = prometheus["volumes"][0].split(":")[:2]
    assert (ROOT / source).resolve() == ROOT / "broker" / "prometheus.yml"
    assert target == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((ROOT / source).read_text())
    targets = {
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    }
    assert targets == {
        f"controller:{_option(SERVICES['controller']['command'], '--metrics-port')}",
        f"agent-3:{_option(SERVICES['agent-3']['command'], '--metrics-port')}",
    }


def test_grafana_provisions_the_prometheus_data_source_and_the_dashboard() -> None:
    """The mounted provisioning names the Prometheus service and a dashboards path that is
    the mounted dashboards directory; the dashboard's data source uid is the provisioned one."""
    mounts = _mounts(SERVICES["grafana"])
    assert mounts["/etc/grafana/provisioning"] == ("./docs/grafana/provisioning", True)
    dashboards_source, _ = mounts["/var/lib/grafana/dashboards"]
    provisioning = ROOT / "docs" / "grafana" / "provisioning"
    for f in GRAFANA_PROVISIONING:
        assert (ROOT / f).is_file() and (ROOT / f).is_relative_to(provisioning), f
    source = yaml.safe_load((ROOT / GRAFANA_PROVISIONING[0]).read_text())["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((ROOT / GRAFANA_PROVISIONING[1]).read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    files = sorted((ROOT / dashboards_source).glob("*.json"))
    assert [f.name for f in files] == ["hotswap.json"]
    dashboard = json.loads(files[0].read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if p.get("type") != "row"} | {
        t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])
    }
    assert uids == {source["uid"]}


def test_every_hotswap_process_sends_its_traces_to_jaeger() -> None:
    """The controller, the agents and the cli export spans (OTLP over HTTP) to the jaeger
    service, which listens there; nothing else names a trace backend."""
    for name in ("controller", "agent-1", "agent-2", "agent-3", "cli"):
        env = SERVICES[name].get("environment", {})
        assert env.get("OTEL_EXPORTER_OTLP_ENDPOINT") == "http://jaeger:4318", name
    assert "4318:4318" in SERVICES["jaeger"]["ports"]
    assert SERVICES["jaeger"]["image"].startswith("jaegertracing/all-in-one")


def test_the_observability_images_are_pinned_to_a_release() -> None:
    """Prometheus, Grafana and Jaeger name a release (`:latest` changes under the
    provisioned dashboard and the scrape configuration without anyone noticing)."""
    for name in ("prometheus", "grafana", "jaeger"):
        image = SERVICES[name]["image"]
        _, _, tag = image.rpartition(":")
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), (name, image)
