"""Runs moto's S3 server in-process for the demo and the tests.

A real S3 HTTP API on a free local port (moto is an optional dependency: the
`demo` extra). Production and compose.yaml use a real S3 or MinIO instead.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType

from broker.launcher import free_port, wait_for_port
from shared.errors import StorageError

# moto accepts any credentials; boto3 insists on having some.
DEMO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "hotswap-demo",
    "AWS_SECRET_ACCESS_KEY": "hotswap-demo-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def ensure_demo_credentials() -> None:
    """Set boto3's usual variables to demo values where the user set none."""
    for key, value in DEMO_CREDENTIALS.items():
        os.environ.setdefault(key, value)


class S3Server:
    """moto's threaded S3 server on 127.0.0.1:<free port>."""

    def __init__(self, port: int | None = None) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StorageError(
                "the embedded S3 server needs moto: pip install 'hotswap[demo]'"
            ) from exc
        self.port = port or free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        # werkzeug logs every request at INFO on its own handler; only problems matter here.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        ensure_demo_credentials()
        self._server.start()
        if not wait_for_port("127.0.0.1", self.port, 10.0):
            raise StorageError(f"moto S3 server did not start on port {self.port}")
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
