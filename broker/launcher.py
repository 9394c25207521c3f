"""Runs a local, secure mosquitto for the demo, the tests and `hotswap broker run`.

Finds the binary and its dynamic-security plugin, creates the broker's
identities on the first start of a data directory (broker.identities), renders
the project's mosquitto.conf for a port, that directory and optional TLS
files, starts the process and waits until it accepts MQTT connections.
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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from broker.identities import IDENTITIES, credentials_root, ensure_identities
from shared.credentials import CA_FILE, endpoint_for
from shared.errors import BrokerError
from shared.keys import write_atomic
from shared.settings import MqttEndpoint, parse_mqtt_url

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


PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)
_MULTIARCH_ROOT = "/usr/lib"


def find_dynsec_plugin() -> Path:
    """The dynamic-security plugin, from $HOTSWAP_MOSQUITTO_DYNSEC or the usual lib dirs."""
    explicit = os.environ.get("HOTSWAP_MOSQUITTO_DYNSEC")
    if explicit:
        if not Path(explicit).is_file():
            raise BrokerError(f"HOTSWAP_MOSQUITTO_DYNSEC={explicit} is not a file")
        return Path(explicit)
    for directory in _PLUGIN_DIRS:
        for candidate in (
            Path(directory) / PLUGIN_NAME,
            Path(directory) / "mosquitto" / PLUGIN_NAME,
        ):
            if candidate.is_file():
                return candidate
    for candidate in sorted(Path(_MULTIARCH_ROOT).glob(f"*/{PLUGIN_NAME}")):  # other arches
        return candidate
    raise BrokerError(
        f"mosquitto's dynamic-security plugin ({PLUGIN_NAME}) was not found in "
        f"{', '.join(_PLUGIN_DIRS)}: install mosquitto >= 2.0 or set HOTSWAP_MOSQUITTO_DYNSEC"
    )


def project_config() -> Path:
    """The project's mosquitto.conf: the repository's, else the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "mosquitto.conf", here / "mosquitto.conf"):
        if candidate.is_file():
            return candidate
    raise BrokerError("mosquitto.conf not found next to the broker package")


# Options that belong to the listener above them (mosquitto.conf(5)).
_LISTENER_KEYS = frozenset(
    {
        "cafile", "capath", "certfile", "keyfile", "crlfile", "ciphers", "ciphers_tls1.3",
        "dhparamfile", "tls_version", "require_certificate", "use_identity_as_username",
        "use_subject_as_username", "use_username_as_clientid", "protocol", "socket_domain",
        "mount_point", "max_connections", "bind_interface", "http_dir",
    }
)  # fmt: skip
TLS_SERVER_CERT = "server.crt"
TLS_SERVER_KEY = "server.key"


@dataclass(frozen=True, slots=True)
class TlsListeners:
    """The TLS listeners to render: server certificate files and their ports.

    `port`: TLS, clients log in with username and password. `cert_port`: TLS
    with a required client certificate whose CN is the username and client id.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    port: int
    cert_port: int | None = None

    @classmethod
    def from_dir(cls, tls_dir: Path, port: int, cert_port: int | None) -> TlsListeners:
        files = [tls_dir / n for n in (CA_FILE, TLS_SERVER_CERT, TLS_SERVER_KEY)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise BrokerError(
                f"TLS directory {tls_dir} lacks {', '.join(missing)} "
                "(create them with `hotswap broker init-tls`)"
            )
        return cls(files[0], files[1], files[2], port, cert_port)


def render_config(
    template: str,
    *,
    port: int,
    data_dir: Path,
    bind: str = "127.0.0.1",
    user: str | None = None,
    plugin: Path | None = None,
    dynsec_config: Path | None = None,
    tls: TlsListeners | None = None,
) -> str:
    """The project's config with our listeners, plugin, persistence dir and log file.

    The template's first listener is plain MQTT on `port`; its second is the TLS
    listener and its third the client-certificate one, each rendered (with the
    files of `tls`) only when `tls` is given and dropped with its options
    otherwise. `user`: started as root, mosquitto switches to the `mosquitto`
    user unless told otherwise, and could then not write the directory we own.
    """
    out: list[str] = [f"user {user}"] if user else []
    listeners = 0
    dropping = False  # inside a listener block we do not render
    tls_files = {}
    if tls is not None:
        tls_files = {"cafile": tls.ca_file, "certfile": tls.cert_file, "keyfile": tls.key_file}
    for line in template.splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() else ""
        if key == "listener":
            listeners += 1
            ports = {1: port, 2: tls.port if tls else None, 3: tls.cert_port if tls else None}
            chosen = ports.get(listeners)
            dropping = chosen is None
            if not dropping:
                out.append(f"listener {chosen} {bind}")
            continue
        if key in _LISTENER_KEYS:
            if dropping:
                continue
            if key in tls_files and listeners > 1:
                out.append(f"{key} {tls_files[key]}")
                continue
        elif key and not key.startswith("#"):
            dropping = False  # a global option ends the listener block
        if key == "persistence_location":
            out.append(f"persistence_location {data_dir}/")
        elif key == "log_dest":
            out.append(f"log_dest file {data_dir / 'mosquitto.log'}")
        elif key == "plugin" and plugin is not None:
            out.append(f"plugin {plugin}")
        elif key == "plugin_opt_config_file" and dynsec_config is not None:
            out.append(f"plugin_opt_config_file {dynsec_config}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


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
    """A secure mosquitto process on `port` with its state under `data_dir`.

    Use as a context manager, or `start()` / `stop()`; `restart()` keeps the
    data directory, so identities, provisioned devices, retained messages and
    persistent sessions survive. With `tls_dir` (a directory with ca.crt,
    server.crt and server.key, as `hotswap broker init-tls` makes) it also
    listens with TLS on `tls_port` and, with client-certificate identity, on
    `tls_cert_port`.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        tls_dir: Path | None = None,
        tls_port: int | None = None,
        tls_cert_port: int | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.host = host
        self.port = port or free_port(host)
        self.tls_dir = tls_dir.resolve() if tls_dir is not None else None
        self.tls_port = (tls_port or free_port(host)) if tls_dir is not None else None
        self.tls_cert_port = (tls_cert_port or free_port(host)) if tls_dir is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    def _url(self, scheme: str, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"{scheme}://{host}:{port}"

    @property
    def url(self) -> str:
        return self._url("mqtt", self.port)

    @property
    def tls_url(self) -> str:
        """mqtts:// on the TLS listener (username and password)."""
        if self.tls_port is None:
            raise BrokerError("this broker has no TLS listener (no TLS directory)")
        return self._url("mqtts", self.tls_port)

    @property
    def tls_cert_url(self) -> str:
        """mqtts:// on the listener that takes a client certificate as identity."""
        if self.tls_cert_port is None:
            raise BrokerError("this broker has no TLS listener (no TLS directory)")
        return self._url("mqtts", self.tls_cert_port)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def credentials_dir(self) -> Path:
        """`credentials/{admin,controller,operator}` live here (written on first start)."""
        return credentials_root(self.data_dir)

    def credentials(self, identity: str) -> Path:
        """The credentials directory of `identity`: admin, controller or operator."""
        if identity not in IDENTITIES:
            raise ValueError(f"unknown broker identity {identity!r}: {', '.join(IDENTITIES)}")
        return self.credentials_dir / identity

    def endpoint(self, identity: str = "controller", *, tls: bool = False) -> MqttEndpoint:
        """This broker's URL (TLS listener with `tls`), logged in as `identity`."""
        url = self.tls_url if tls else self.url
        return endpoint_for(parse_mqtt_url(url), self.credentials(identity))

    def _tls_listeners(self) -> TlsListeners | None:
        if self.tls_dir is None or self.tls_port is None:
            return None
        tls = TlsListeners.from_dir(self.tls_dir, self.tls_port, self.tls_cert_port)
        # Every identity gets the CA, so `--credentials DIR` is enough for mqtts://.
        ca = tls.ca_file.read_bytes()
        for name in IDENTITIES:
            target = self.credentials(name) / CA_FILE
            if not target.is_file() or target.read_bytes() != ca:
                write_atomic(target, ca)
        return tls

    def start(self, timeout: float = 10.0) -> Mosquitto:
        binary = find_mosquitto()
        plugin = find_dynsec_plugin()
        ports = [self.port] + [p for p in (self.tls_port, self.tls_cert_port) if p]
        for port in ports:
            if not port_is_free(self.host, port):
                # Checked first: a broker already there would answer the readiness probe.
                raise BrokerError(f"port {port} on {self.host} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        dynsec_config = ensure_identities(self.data_dir)
        tls = self._tls_listeners()
        conf = self.data_dir / "mosquitto.conf"
        conf.write_text(
            render_config(
                project_config().read_text(),
                port=self.port,
                data_dir=self.data_dir,
                bind=self.host,
                user=getpass.getuser(),
                plugin=plugin,
                dynsec_config=dynsec_config,
                tls=tls,
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
            if all(wait_for_port(self.host, p, 0.2) for p in ports):
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
