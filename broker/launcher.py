"""Runs a local mosquitto for the demo, the tests and `hotswap broker run`.

Finds the binary, renders the project's mosquitto.conf for a port and a data
directory, starts the process and waits until it accepts MQTT connections.
Does process and file I/O.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from shared.errors import BrokerError

_SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/bin")
INSTALL_HINT = (
    "mosquitto is not installed: install Debian's package with "
    "'apt-get install -y mosquitto' (macOS: 'brew install mosquitto')"
)


def find_mosquitto() -> Path:
    """The mosquitto binary, from $HOTSWAP_MOSQUITTO, $PATH or the usual sbin dirs."""
    explicit = os.environ.get("HOTSWAP_MOSQUITTO")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BrokerError(f"HOTSWAP_MOSQUITTO={explicit} is not an executable; {INSTALL_HINT}")
        return Path(explicit)
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path=os.pathsep.join(_SEARCH_PATH)
    )
    if not found:
        raise BrokerError(INSTALL_HINT)
    return Path(found)


def project_config() -> Path:
    """The project's mosquitto.conf: the repository's, else the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "mosquitto.conf", here / "mosquitto.conf"):
        if candidate.is_file():
            return candidate
    raise BrokerError("mosquitto.conf not found next to the broker package")


def render_config(
    template: str,
    *,
    port: int,
    data_dir: Path,
    bind: str = "127.0.0.1",
    user: str | None = None,
) -> str:
    """The project's config with our listener, persistence dir and log file.

    `user`: started as root, mosquitto switches to the `mosquitto` user unless
    told otherwise, and could then not write the data directory we own.
    """
    out: list[str] = [f"user {user}"] if user else []
    for line in template.splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() else ""
        if key == "listener" and not out_has_listener(out):
            out.append(f"listener {port} {bind}")
        elif key == "listener":
            continue  # extra listeners (e.g. TLS) need files the launcher does not make
        elif key == "persistence_location":
            out.append(f"persistence_location {data_dir}/")
        elif key == "log_dest":
            out.append(f"log_dest file {data_dir / 'mosquitto.log'}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def out_has_listener(lines: list[str]) -> bool:
    return any(line.startswith("listener ") for line in lines)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like mosquitto itself: connections in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


class Mosquitto:
    """A mosquitto process on `port` with its state under `data_dir`.

    Use as a context manager, or `start()` / `stop()`; `restart()` keeps the
    data directory, so retained messages and persistent sessions survive.
    """

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir.resolve()
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"mqtt://{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> Mosquitto:
        binary = find_mosquitto()
        if not port_is_free(self.host, self.port):
            # Checked first: a broker already there would answer the readiness probe.
            raise BrokerError(f"port {self.port} on {self.host} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "mosquitto.conf"
        conf.write_text(
            render_config(
                project_config().read_text(),
                port=self.port,
                data_dir=self.data_dir,
                bind=self.host,
                user=getpass.getuser(),
            )
        )
        self.process = subprocess.Popen(
            [str(binary), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = self.process.stderr
                err = stderr.read().decode(errors="replace") if stderr else ""
                if stderr:
                    stderr.close()
                log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                raise BrokerError(
                    f"mosquitto exited with code {self.process.returncode} on port {self.port}: "
                    f"{''.join((err or log).strip().splitlines()[-1:])}"
                )
            if wait_for_port(self.host, self.port, 0.2):
                return self
        self.stop()
        raise BrokerError(f"mosquitto did not accept connections on port {self.port} in {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is not None:
            if proc.stderr:
                proc.stderr.close()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
