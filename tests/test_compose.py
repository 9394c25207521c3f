"""compose.yaml for Docker users: it parses, and everything it names exists here.

Docker cannot run on these machines, so this checks the file against the
project instead: mounted and built files exist, every `hotswap` command uses
real sub-commands and options of the real CLI, the ports services dial are
ports other services listen on, and the Dockerfile copies what exists.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.main
import yaml

from broker.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
HOTSWAP = {name: s for name, s in SERVICES.items() if s.get("image") == "hotswap:local"}


def test_compose_has_the_parts_of_the_design() -> None:
    """Broker, MinIO with its bucket, PostgreSQL, controller, three agents, Prometheus."""
    assert {"mosquitto", "minio", "minio-bucket", "postgres", "controller", "prometheus"} <= set(
        SERVICES
    )
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
    assert {"controller", "agent-1", "agent-2", "agent-3", "keys"} <= set(HOTSWAP)
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
    """mqtt://mosquitto:1883, http://minio:9000, postgres:5432, controller:9100 all exist."""
    listening = {
        "mosquitto": 1883,  # mosquitto.conf's listener
        "minio": 9000,
        "postgres": 5432,
        "controller": 9100,
    }
    conf = (ROOT / "mosquitto.conf").read_text()
    assert re.search(r"^listener 1883\b", conf, re.M)
    assert "--metrics-port" in SERVICES["controller"]["command"]
    assert (
        SERVICES["controller"]["command"][
            SERVICES["controller"]["command"].index("--metrics-port") + 1
        ]
        == "9100"
    )
    text = (ROOT / "compose.yaml").read_text() + (ROOT / "broker" / "prometheus.yml").read_text()
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
