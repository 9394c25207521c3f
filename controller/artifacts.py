"""Artifacts in S3: upload a model and its signed manifest, check, presign GETs.

Does network I/O (boto3, blocking: the async service calls it in a thread).
Credentials follow boto3's usual environment variables; devices never get any,
only presigned URLs.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from shared.errors import StorageError
from shared.manifest import SignedManifest


def artifact_key(name: str, version: str) -> str:
    return f"models/{name}/{version}/model.tflite"


def manifest_key(name: str, version: str) -> str:
    return f"models/{name}/{version}/manifest.json"


class ArtifactStore:
    def __init__(self, endpoint: str | None, bucket: str, region: str = "us-east-1") -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self._s3: Any = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            config=Config(
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 2, "mode": "standard"},
                signature_version="s3v4",
            ),
        )

    def _where(self) -> str:
        return f"S3 bucket {self.bucket!r} at {self.endpoint or 'AWS'}"

    def _fail(self, action: str, exc: Exception) -> StorageError:
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket",):
                return StorageError(f"{self._where()} does not exist")
            if code in ("404", "NoSuchKey", "NotFound"):
                return StorageError(f"{action}: object not found in {self._where()}")
            return StorageError(f"{action} failed in {self._where()}: {code or exc}")
        if isinstance(exc, EndpointConnectionError):
            return StorageError(f"cannot reach S3 at {self.endpoint or 'AWS'}")
        return StorageError(f"{action} failed in {self._where()}: {exc}")

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (the demo; real buckets are provisioned)."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self._s3.create_bucket(Bucket=self.bucket)
            except (ClientError, BotoCoreError) as exc:
                raise self._fail("create bucket", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("head bucket", exc) from exc

    def put_model(self, name: str, version: str, data: bytes, signed: SignedManifest) -> str:
        """Upload artifact, then manifest; return the artifact's key."""
        key = artifact_key(name, version)
        try:
            self._s3.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType="application/octet-stream"
            )
            self._s3.put_object(
                Bucket=self.bucket,
                Key=manifest_key(name, version),
                Body=signed.model_dump_json(by_alias=True).encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("upload", exc) from exc
        return key

    def object_size(self, key: str) -> int:
        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(f"look up {key}", exc) from exc
        return int(head["ContentLength"])

    def presign_get(self, key: str, ttl_s: int) -> str:
        try:
            url: str = self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl_s
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("presign", exc) from exc
        return url
