"""Shared fixtures: a real mosquitto per test, moto's real S3 HTTP API, keys, models."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.launcher import Mosquitto
from broker.s3server import S3Server
from shared.keys import init_keys, load_private_key
from shared.model_builder import build_dense_model


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto on a free port, with its own data directory."""
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@dataclass
class S3:
    endpoint: str
    bucket: str


@pytest.fixture
def s3(s3_server: S3Server) -> S3:
    """A fresh bucket on moto's S3 server."""
    bucket = f"hotswap-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=bucket)
    return S3(s3_server.endpoint, bucket)


@dataclass
class KeyPair:
    private_path: Path
    public_path: Path
    private: Ed25519PrivateKey


@pytest.fixture
def signing_keys(tmp_path: Path) -> KeyPair:
    priv, pub = init_keys(tmp_path / "keys")
    return KeyPair(priv, pub, load_private_key(priv))


@pytest.fixture(scope="session")
def model_v1() -> bytes:
    return build_dense_model(seed=1)


@pytest.fixture(scope="session")
def model_v2() -> bytes:
    return build_dense_model(seed=2)


@pytest.fixture(scope="session")
def model_other_signature() -> bytes:
    """Same family, different tensor signature (5 inputs instead of 4)."""
    return build_dense_model(input_size=5, seed=3)
