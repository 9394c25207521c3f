"""Artifacts in S3: upload a model and its signed manifest, check, presign GETs, find orphans.

Keys are content-addressed: `models/{name}/{version}/{sha256}.tflite` and
`models/{name}/{version}/{sha256}.manifest.json`, so that no upload can change
the bytes behind a registered version (other bytes land under another key).
`find_orphans` is pure; `ArtifactStore` does network I/O (boto3, blocking: the
async service calls it in a thread). Credentials follow boto3's usual
environment variables; devices never get any, only presigned URLs.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from shared.errors import StorageError
from shared.manifest import SignedManifest

MODELS_PREFIX = "models/"
# Keys of the layout before content addressing (one fixed name per version).
LEGACY_ARTIFACT = "model.tflite"
LEGACY_MANIFEST = "manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
# Uploads above this go in parts, several at a time, each part reported as it lands.
_PART_BYTES = 8 * 1024 * 1024
UploadProgress = Callable[[int, int], None]  # (bytes sent so far, bytes in all)


def _checked_sha256(sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise ValueError(f"invalid sha256 {sha256!r}: expected 64 lowercase hex digits")
    return sha256


def artifact_key(name: str, version: str, sha256: str) -> str:
    return f"{MODELS_PREFIX}{name}/{version}/{_checked_sha256(sha256)}.tflite"


def manifest_key(name: str, version: str, sha256: str) -> str:
    return f"{MODELS_PREFIX}{name}/{version}/{_checked_sha256(sha256)}.manifest.json"


def manifest_key_of(artifact: str) -> str:
    """The key of the manifest uploaded beside the artifact `artifact` (either layout)."""
    head, _, leaf = artifact.rpartition("/")
    if leaf == LEGACY_ARTIFACT:
        return f"{head}/{LEGACY_MANIFEST}"
    return artifact.removesuffix(".tflite") + ".manifest.json"


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object of the bucket, as listed."""

    key: str
    size: int
    last_modified: datetime


def find_orphans(
    objects: Iterable[StoredObject], registered: Iterable[str], *, before: datetime
) -> list[StoredObject]:
    """Objects under `models/` that no registered artifact key (`registered`) refers to.

    An artifact refers to itself and to its manifest. Only objects last modified
    before `before` count, so that a push between its upload and its
    registration is not taken for an orphan. Sorted by key.
    """
    referenced: set[str] = set()
    for key in registered:
        referenced |= {key, manifest_key_of(key)}
    return sorted(
        (
            o
            for o in objects
            if o.key.startswith(MODELS_PREFIX)
            and o.key not in referenced
            and o.last_modified < before
        ),
        key=lambda o: o.key,
    )


class ArtifactStore:
    def __init__(
        self,
        endpoint: str | None,
        bucket: str,
        region: str = "us-east-1",
        *,
        upload_progress: UploadProgress | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.upload_progress = upload_progress
        # boto3 is imported here: a fifth of a second of start-up that most commands never use.
        import boto3

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
            return StorageError(
                f"cannot reach S3 at {self.endpoint or 'AWS'}", reason="storage_unreachable"
            )
        if isinstance(exc, NoCredentialsError):
            return StorageError(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE)",
                reason="bad_credentials",
            )
        return StorageError(f"{action} failed in {self._where()}: {exc}")

    def check_bucket(self, *, create: bool = False) -> bool:
        """Check that the bucket exists and answers us; with `create`, create it if missing.

        True if it was created. StorageError otherwise: `storage_unreachable` (nothing
        answers at the endpoint), `bad_credentials` (none, or refused), `no_bucket`.
        """
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(
                    f"{self._where()} refused our S3 credentials ({code})",
                    reason="bad_credentials",
                ) from exc
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise self._fail("check bucket", exc) from exc
        except BotoCoreError as exc:
            raise self._fail("check bucket", exc) from exc
        if not create:
            raise StorageError(
                f"{self._where()} does not exist: create it, or pass --create-bucket",
                reason="no_bucket",
            )
        try:
            self._s3.create_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("create bucket", exc) from exc
        return True

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
        """Upload artifact, then manifest, under the manifest's sha256; return the artifact's key.

        The keys name the sha256 the manifest promises: `hotswap model push`
        builds the manifest from `data`, so they are the bytes' own.
        """
        sha256 = signed.unverified().sha256
        key = artifact_key(name, version, sha256)
        try:
            self._upload(key, data)
            self._s3.put_object(
                Bucket=self.bucket,
                Key=manifest_key(name, version, sha256),
                Body=signed.model_dump_json(by_alias=True).encode(),
                ContentType="application/json",
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("upload", exc) from exc
        return key

    def _upload(self, key: str, data: bytes) -> None:
        """The artifact: one PUT, or parts above `_PART_BYTES`, telling `upload_progress`."""
        report = self.upload_progress
        if report is None or len(data) <= _PART_BYTES:
            self._s3.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType="application/octet-stream"
            )
            if report is not None:
                report(len(data), len(data))
            return
        from boto3.s3.transfer import TransferConfig

        sent = 0
        lock = threading.Lock()  # parts land on the transfer manager's threads

        def landed(n: int) -> None:
            nonlocal sent
            with lock:
                sent += n
                report(sent, len(data))

        self._s3.upload_fileobj(
            io.BytesIO(data),
            self.bucket,
            key,
            ExtraArgs={"ContentType": "application/octet-stream"},
            Callback=landed,
            Config=TransferConfig(multipart_threshold=_PART_BYTES, multipart_chunksize=_PART_BYTES),
        )

    def list_objects(self, prefix: str = MODELS_PREFIX) -> list[StoredObject]:
        """Every object whose key starts with `prefix`."""
        found: list[StoredObject] = []
        try:
            for page in self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                found += [
                    StoredObject(str(o["Key"]), int(o["Size"]), o["LastModified"])
                    for o in page.get("Contents", [])
                ]
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("list objects", exc) from exc
        return found

    def delete_objects(self, keys: Sequence[str]) -> None:
        """Delete `keys`; StorageError naming the first key S3 would not delete."""
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            try:
                answer = self._s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._fail("delete objects", exc) from exc
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"delete {first.get('Key')} failed in {self._where()}: "
                    f"{first.get('Code') or first.get('Message')}"
                    + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                )

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
