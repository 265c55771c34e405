"""Object-store locations beside local paths: one small client for what the project itself reads
and writes remotely (dataset indexes, prepare outputs, checkpoints), next to litdata's own
streaming of the token chunks.

``s3://`` (AWS and S3-compatible servers: MinIO, Ceph, R2, moto) goes through boto3 directly, so
that every failure can be told apart and explained (unreachable endpoint, missing bucket, refused
credentials, missing object). The endpoint and the credentials come from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ...) or, for the endpoint only, from ``storage_options={"endpoint_url": ...}``;
credentials are never taken as arguments, so nothing that holds them is ever saved or logged.
``gs://``, ``azure://`` and ``hf://`` are read through litdata's own downloaders (the code that
streams their chunks), where litdata's extras for them are installed; ``gs://`` is also written
through litdata's provider. Listing is ``s3://`` only, so checkpoints go to ``s3://``.

Clients are created lazily in the process that uses them and re-created after a fork: neither
boto3 nor the providers are fork-safe, and DataLoader workers fork.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "REMOTE_SCHEMES",
    "ObjectStore",
    "StorageError",
    "is_remote",
    "join",
    "storage_options",
]

REMOTE_SCHEMES = ("s3://", "gs://", "azure://", "hf://")


def is_remote(path: str | Path | None) -> bool:
    """Whether ``path`` is an object-store URL (rather than a local or mounted path)."""
    return path is not None and str(path).startswith(REMOTE_SCHEMES)


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a URL or a local path alike (a URL keeps its scheme)."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base).joinpath(*parts))


def storage_options(endpoint_url: str | None = None) -> dict[str, Any]:
    """litdata's / boto3's client options for a configured endpoint (empty: the AWS defaults and
    variables decide). Holds no credential, by design."""
    return {"endpoint_url": endpoint_url} if endpoint_url else {}


class StorageError(RuntimeError):
    """An object-store operation failed; the message names the URL, the cause and the fix."""


# Error codes of S3 and S3-compatible servers, grouped by what the user must change.
_MISSING_BUCKET = {"NoSuchBucket"}
_MISSING_OBJECT = {"NoSuchKey", "404", "NotFound"}
_MISSING_OBJECT_ERRORS = {"NotFound", "ResourceNotFoundError", "EntryNotFoundError"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}


class ObjectStore:
    """Files under one URL prefix (``s3://bucket/prefix``); paths below it are relative keys."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        if not is_remote(url):
            raise ValueError(f"{url!r} is not an object-store URL ({', '.join(REMOTE_SCHEMES)}).")
        self.url = url.rstrip("/")
        parsed = urlparse(self.url)
        self.scheme = parsed.scheme
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.storage_options = dict(storage_options or {})
        if not self.bucket:
            raise ValueError(f"{url!r} names no bucket: write it as {self.scheme}://BUCKET/PATH.")
        self._client: Any = None
        self._client_pid = -1

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:  # picklable: the client is rebuilt where it is used
        return {**self.__dict__, "_client": None, "_client_pid": -1}

    # -- plumbing --------------------------------------------------------------------------------

    def child(self, *parts: str) -> ObjectStore:
        return ObjectStore(join(self.url, *parts), self.storage_options)

    def key(self, rel: str = "") -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    def url_of(self, rel: str = "") -> str:
        return join(self.url, rel) if rel else self.url

    @property
    def client(self) -> Any:
        if self._client is None or self._client_pid != os.getpid():
            if self.scheme == "s3":
                import boto3  # a dependency of litdata; imported here to keep data/ light
                from botocore.config import Config

                # Bounded retries: a failure is reported within seconds instead of litdata's
                # minutes of adaptive retrying (its client is the one that streams chunks).
                self._client = boto3.session.Session().client(
                    "s3",
                    config=Config(
                        retries={"max_attempts": 3, "mode": "standard"},
                        connect_timeout=10,
                        read_timeout=120,
                    ),
                    **self.storage_options,
                )
            else:
                from litdata.streaming.fs_provider import _get_fs_provider

                self._client = _get_fs_provider(self.url, self.storage_options)
            self._client_pid = os.getpid()
        return self._client

    def explain(self, error: BaseException, rel: str = "", doing: str = "read") -> StorageError:
        """A StorageError naming the URL, what went wrong and what to change."""
        url = self.url_of(rel)
        endpoint = self.storage_options.get("endpoint_url") or os.environ.get(
            "AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL", "")
        )
        where = f" at {endpoint}" if endpoint else ""
        name = type(error).__name__
        code = ""
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
            why = (
                f"cannot reach the object store{where}: {error}. Check that the server runs and that "
                f"storage.endpoint_url (or AWS_ENDPOINT_URL) points at it."
            )
        elif name in ("NoCredentialsError", "PartialCredentialsError"):
            why = (
                "no credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
                "in the environment of every node."
            )
        elif code in _MISSING_BUCKET:
            why = f"the bucket {self.bucket!r} does not exist{where}. Create it or fix the URL."
        elif code in _BAD_CREDENTIALS:
            why = (
                f"the store{where} refused the credentials ({code}). Check AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions."
            )
        elif code in _MISSING_OBJECT or isinstance(error, FileNotFoundError):
            why = "no such object."
        else:
            why = f"{name}: {error}"
        return StorageError(f"Cannot {doing} {url}: {why}")

    def _missing(self, error: BaseException) -> bool:
        response = getattr(error, "response", None)
        code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
        return (
            code in _MISSING_OBJECT
            or isinstance(error, FileNotFoundError)
            # google.cloud's, azure's and huggingface_hub's "no such object"
            or type(error).__name__ in _MISSING_OBJECT_ERRORS
        )

    # -- operations ------------------------------------------------------------------------------

    def check_bucket(self) -> None:
        """Raise a StorageError unless the bucket exists and the credentials are accepted."""
        if self.scheme != "s3":
            return  # the providers have no cheap bucket probe; reads report their own errors
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - every failure is explained to the user
            response = getattr(e, "response", None)
            if isinstance(response, dict) and str(response.get("Error", {}).get("Code")) == "404":
                e.response["Error"]["Code"] = "NoSuchBucket"  # HEAD has no body: 404 = no bucket
            raise self.explain(e, doing="open") from e

    def exists(self, rel: str = "") -> bool:
        try:
            if self.scheme == "s3":
                self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
                return True
            self.read_bytes(rel)  # the downloaders have no existence probe
            return True
        except (FileNotFoundError, StorageError) as e:
            if isinstance(e, FileNotFoundError):
                return False
            raise
        except Exception as e:  # noqa: BLE001
            if self._missing(e):
                return False
            raise self.explain(e, rel) from e

    def read_bytes(self, rel: str = "") -> bytes:
        """The object's bytes; FileNotFoundError if it does not exist, StorageError otherwise."""
        try:
            if self.scheme == "s3":
                return self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "object")
                self._downloader(tmp).download_file(self.url_of(rel), local)
                return Path(local).read_bytes()
        except Exception as e:  # noqa: BLE001
            if self._missing(e):
                raise FileNotFoundError(f"{self.url_of(rel)} does not exist") from e
            raise self.explain(e, rel) from e

    def _downloader(self, cache_dir: str) -> Any:
        from litdata.streaming.downloader import get_downloader

        return get_downloader(self.url, cache_dir, [], self.storage_options)

    def read_text(self, rel: str = "") -> str:
        return self.read_bytes(rel).decode()

    def put_bytes(self, rel: str, data: bytes) -> None:
        try:
            if self.scheme == "s3":
                self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)
                return
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "object")
                Path(local).write_bytes(data)
                self.client.upload_file(local, self.url_of(rel))
        except Exception as e:  # noqa: BLE001
            raise self.explain(e, rel, doing="write") from e

    def put_text(self, rel: str, text: str) -> None:
        self.put_bytes(rel, text.encode())

    def upload(self, local: str | Path, rel: str) -> None:
        try:
            if self.scheme == "s3":
                self.client.upload_file(str(local), self.bucket, self.key(rel))
            else:
                self.client.upload_file(str(local), self.url_of(rel))
        except Exception as e:  # noqa: BLE001
            raise self.explain(e, rel, doing="write") from e

    def download(self, rel: str, local: str | Path) -> None:
        """Copy one object to ``local``, atomically (a ``.part`` file renamed when complete)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(local.name + ".part")
        try:
            if self.scheme == "s3":
                self.client.download_file(self.bucket, self.key(rel), str(part))
            else:
                self._downloader(str(local.parent)).download_file(self.url_of(rel), str(part))
        except Exception as e:  # noqa: BLE001
            part.unlink(missing_ok=True)
            if self._missing(e):
                raise FileNotFoundError(f"{self.url_of(rel)} does not exist") from e
            raise self.explain(e, rel) from e
        os.replace(part, local)

    def list(self, rel: str = "") -> list[str]:
        """Every object key under ``rel/``, relative to this store's prefix, sorted."""
        return sorted(self.sizes(rel))

    def sizes(self, rel: str = "") -> dict[str, int]:
        """{key relative to this store's prefix: size in bytes} of every object under ``rel/``."""
        if self.scheme != "s3":
            raise StorageError(
                f"Cannot list {self.url_of(rel)}: listing is supported for s3:// (and S3-compatible) "
                f"stores only."
            )
        base = self.key(rel)
        base = f"{base}/" if base else ""
        strip = len(f"{self.prefix}/") if self.prefix else 0
        found: dict[str, int] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base
            )
            for page in pages:
                found.update((o["Key"][strip:], int(o["Size"])) for o in page.get("Contents", []))
        except Exception as e:  # noqa: BLE001
            raise self.explain(e, rel, doing="list") from e
        return found

    def delete(self, rel: str) -> None:
        try:
            if self.scheme == "s3":
                self.client.delete_object(Bucket=self.bucket, Key=self.key(rel))
            else:
                self.client.delete_file_or_directory(self.url_of(rel))
        except Exception as e:  # noqa: BLE001
            if not self._missing(e):
                raise self.explain(e, rel, doing="delete") from e

    def delete_tree(self, rel: str) -> None:
        """Every object under ``rel/`` (S3: listed then deleted in batches of 1000)."""
        if self.scheme != "s3":
            self.delete(rel)
            return
        keys = [self.key(k) for k in self.list(rel)]
        try:
            for i in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[i : i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
        except Exception as e:  # noqa: BLE001
            raise self.explain(e, rel, doing="delete") from e
