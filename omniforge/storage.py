"""One storage layer for local paths and ``s3://`` URIs.

A URI is a local path, a ``file://`` URL or ``s3://bucket/key``. Every function here takes URI strings
and behaves the same on both backends, so jobs never branch on where their data lives.

S3 access goes through one cached boto3 client per process (thread-safe), with adaptive retries for
throttling, 5xx and connection errors. The endpoint comes from the conventional ``AWS_ENDPOINT_URL``
(or ``AWS_ENDPOINT_URL_S3``) environment variable, which boto3 reads itself; credentials come from the
standard AWS chain. Errors are raised as :class:`omniforge.errors.StorageError` with a one-line message
naming the URI and what to do; messages never contain credentials.

Writes are atomic (:func:`atomic_writer`): the data goes to a temporary file first and only a complete
file is moved into place (``os.replace`` locally, a completed single or multipart upload on S3).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

from omniforge.errors import StorageError

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"

# Client and transfer settings (module attributes so tests and tuning code can change them).
S3_MAX_ATTEMPTS = 10
S3_MAX_POOL_CONNECTIONS = 32
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
READ_BUFFER_SIZE = 8 * 1024 * 1024  # buffer of open_input on S3: one ranged GET per 8 MiB read
BODY_READ_ATTEMPTS = 5  # ranged GETs whose body read fails mid-stream are retried this many times
BODY_RETRY_BASE_DELAY = 0.2  # seconds, doubled per attempt

T = TypeVar("T")


class ObjectNotFound(StorageError):
    """The object, file or bucket a URI names does not exist."""


# --------------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith(S3_SCHEME)


def normalize(uri: str) -> str:
    """Canonical form of a URI: local paths absolute (``file://`` stripped), no trailing slash."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        key = key.rstrip("/")
        return f"{S3_SCHEME}{bucket}/{key}" if key else f"{S3_SCHEME}{bucket}"
    if uri.startswith(FILE_SCHEME):
        uri = uri[len(FILE_SCHEME) :]
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (empty parts are skipped)."""
    out = uri
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: write s3://<bucket>/<key>")
    return bucket, key


def _local(uri: str) -> str:
    return normalize(uri)


def _dir_prefix(key: str) -> str:
    """An S3 key as a "directory" prefix: ``a/b`` -> ``a/b/``, ``""`` -> ``""``."""
    key = key.rstrip("/")
    return key + "/" if key else ""


# --------------------------------------------------------------------------------------------------
# S3 client and error translation

_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[tuple[Any, ...], Any] = {}


def s3_client() -> Any:
    """The process-wide boto3 S3 client (thread-safe; rebuilt after fork or an endpoint change)."""
    cache_key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        S3_MAX_ATTEMPTS,
    )
    client = _CLIENTS.get(cache_key)
    if client is not None:
        return client
    with _CLIENT_LOCK:
        client = _CLIENTS.get(cache_key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "adaptive"},
                max_pool_connections=S3_MAX_POOL_CONNECTIONS,
            )
            # boto3 >= 1.28 reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 itself.
            client = boto3.session.Session().client("s3", config=config)
            _CLIENTS[cache_key] = client
    return client


def reset_s3_client() -> None:
    """Forget the cached S3 client(s); the next call builds a new one from the current environment."""
    with _CLIENT_LOCK:
        _CLIENTS.clear()


def _endpoint_for_messages() -> str:
    """The S3 endpoint without any user-info part, safe to print."""
    try:
        url = s3_client().meta.endpoint_url
    except Exception:  # noqa: BLE001 - only used to build a message
        return "the S3 endpoint"
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_ACCESS_CODES = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}


def _s3_error(uri: str, exc: BaseException) -> StorageError:
    """Translate a botocore exception into a one-line StorageError (never quoting credentials)."""
    from botocore import exceptions as bex

    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            bucket = _split_s3(uri)[0]
            return ObjectNotFound(f"{uri} not found: bucket {bucket!r} does not exist; check the URI")
        if code in _NOT_FOUND_CODES:
            return ObjectNotFound(f"{uri} not found: check the URI")
        if code in _ACCESS_CODES:
            return StorageError(
                f"access to {uri} denied ({code}): check the AWS credentials and the bucket's permissions"
            )
        return StorageError(
            f"S3 request for {uri} failed ({code or status}): retry, or check {_endpoint_for_messages()}"
        )
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StorageError(
            f"no AWS credentials to access {uri}: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ProxyConnectionError)):
        return StorageError(
            f"cannot reach S3 endpoint {_endpoint_for_messages()} for {uri}: set AWS_ENDPOINT_URL / credentials"
        )
    return StorageError(f"S3 access to {uri} failed ({type(exc).__name__}): retry, or check AWS_ENDPOINT_URL")


def _local_error(uri: str, exc: OSError) -> StorageError:
    """Translate an OSError on a local path into a one-line StorageError."""
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFound(f"{uri} not found: check the path")
    if isinstance(exc, PermissionError):
        return StorageError(f"permission denied for {uri}: check the file permissions")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri} is a directory, not a file: check the path")
    return StorageError(f"cannot access {uri}: {exc.strerror or type(exc).__name__}")


@contextlib.contextmanager
def _translated(uri: str) -> Iterator[None]:
    """Re-raise OS and botocore errors for `uri` as StorageError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise _local_error(uri, exc) from exc
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(uri, exc) from exc


def _is_transient_read_error(exc: BaseException) -> bool:
    """Errors of a streaming body read worth retrying (connection reset, truncated body, timeouts)."""
    from botocore import exceptions as bex
    from urllib3 import exceptions as u3ex

    transient = (
        bex.ResponseStreamingError,
        bex.IncompleteReadError,
        bex.ReadTimeoutError,
        bex.ConnectionClosedError,
        u3ex.ProtocolError,
        u3ex.ReadTimeoutError,
        ConnectionError,
        TimeoutError,
    )
    return isinstance(exc, transient)


def _with_body_retries(uri: str, fn: Callable[[], T]) -> T:
    """Run a GET-and-read-body call, retrying transient mid-stream failures with exponential backoff.

    botocore retries the request itself (throttling, 5xx, connection errors) but not a body whose
    stream is cut off after the response headers arrived; this covers that case.
    """
    delay = BODY_RETRY_BASE_DELAY
    with _translated(uri):
        for _ in range(BODY_READ_ATTEMPTS - 1):
            try:
                return fn()
            except Exception as exc:
                if not _is_transient_read_error(exc):
                    raise
                time.sleep(delay)
                delay *= 2
        return fn()


def _s3_get(uri: str, start: int = 0, end: int | None = None) -> bytes:
    """GET an object, or the inclusive byte range [start, end] of it (b"" when the range starts past
    the end of the object); a body read that is cut off is retried."""
    from botocore.exceptions import ClientError

    bucket, key = _split_s3(uri)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if start > 0 or end is not None:
        kwargs["Range"] = f"bytes={start}-{'' if end is None else end}"

    def get() -> bytes:
        try:
            response = s3_client().get_object(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            raise
        body = response["Body"]
        try:
            return body.read()
        finally:
            body.close()

    return _with_body_retries(uri, get)


# --------------------------------------------------------------------------------------------------
# Reading


def read_bytes(uri: str, offset: int = 0, size: int | None = None) -> bytes:
    """Read a whole file, or `size` bytes from `offset` (a ranged GET on S3).

    Like a file read, fewer bytes come back when the range runs past the end of the file.
    """
    if offset < 0 or (size is not None and size < 0):
        raise ValueError(f"invalid range offset={offset} size={size}")
    if size == 0:
        return b""
    if is_s3(uri):
        return _s3_get(uri, offset, None if size is None else offset + size - 1)
    with _translated(uri), open(_local(uri), "rb") as f:
        if offset:
            f.seek(offset)
        return f.read() if size is None else f.read(size)


class _S3RawReader(io.RawIOBase):
    """A seekable, read-only raw file over one S3 object; every read is a ranged GET."""

    def __init__(self, uri: str, size: int):
        super().__init__()
        self._uri = uri
        self._size = size
        self._pos = 0

    @property
    def name(self) -> str:
        return self._uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        if n <= 0:
            return 0
        data = _s3_get(self._uri, self._pos, self._pos + n - 1)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        if self._pos >= self._size:
            return b""
        data = _s3_get(self._uri, self._pos, self._size - 1)
        self._pos += len(data)
        return data


def open_input(uri: str) -> BinaryIO:
    """Open a URI for reading as a seekable binary file object (use it as a context manager).

    On S3 the object is read lazily through ranged GETs behind an 8 MiB buffer, so pyarrow's
    ParquetFile and tarfile (including its streaming "r|" mode) can read it without downloading the
    whole object.
    """
    if is_s3(uri):
        raw = _S3RawReader(uri, size(uri))
        return io.BufferedReader(raw, buffer_size=READ_BUFFER_SIZE)  # type: ignore[return-value]
    with _translated(uri):
        return open(_local(uri), "rb")


# --------------------------------------------------------------------------------------------------
# Writing


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE)


def is_partial_write(uri: str) -> bool:
    """Whether `uri` is the temporary file of a local atomic write that never finished (its process died)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return not is_s3(uri) and name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_writer(uri: str) -> Iterator[BinaryIO]:
    """Yield a temporary local file (opened "wb"); on clean exit, move it into place at `uri` atomically.

    Locally the temporary file is ``.<name>.<random>.tmp`` in the destination directory (created if
    needed); it is flushed, fsynced and renamed over `uri`. On S3 it lives in the system temp dir and is
    uploaded with boto3's transfer manager, which completes a single or multipart upload only at the
    end, so a partial object is never visible. If the block raises, nothing appears at `uri` and the
    temporary file is removed.
    """
    if is_s3(uri):
        _split_s3(uri)  # validate before writing anything
        fd, tmp_path = tempfile.mkstemp(prefix=".omniforge-upload-", suffix=".tmp")
        os.close(fd)
    else:
        path = _local(uri)
        tmp_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        with _translated(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(tmp_path, "xb").close()  # created with the usual permissions (umask applies)
    try:
        with open(tmp_path, "wb") as f:
            yield f
            f.flush()
            if not is_s3(uri):
                os.fsync(f.fileno())
        _commit(tmp_path, uri)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)


def _commit(tmp_path: str, uri: str) -> None:
    """Move a finished temporary file into place at `uri`."""
    with _translated(uri):
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            s3_client().upload_file(tmp_path, bucket, key, Config=_transfer_config())
            return
        path = _local(uri)
        os.replace(tmp_path, path)
        _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    """Persist a rename (best effort: not every filesystem allows fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(uri) as f:
        f.write(data)


# --------------------------------------------------------------------------------------------------
# Metadata, listing, deleting


def exists(uri: str) -> bool:
    """True when `uri` is an existing file/object, or a directory/prefix with something under it."""
    if not is_s3(uri):
        return os.path.exists(_local(uri))
    bucket, key = _split_s3(uri)
    client = s3_client()
    with _translated(uri):
        if not key.strip("/"):
            try:
                client.head_bucket(Bucket=bucket)
                return True
            except Exception as exc:
                if isinstance(_s3_error(uri, exc), ObjectNotFound):
                    return False
                raise
        if not key.endswith("/"):
            try:
                client.head_object(Bucket=bucket, Key=key)
                return True
            except Exception as exc:
                if not isinstance(_s3_error(uri, exc), ObjectNotFound):
                    raise
        try:
            response = client.list_objects_v2(Bucket=bucket, Prefix=_dir_prefix(key), MaxKeys=1)
        except Exception as exc:
            if isinstance(_s3_error(uri, exc), ObjectNotFound):
                return False
            raise
        return response.get("KeyCount", 0) > 0


def size(uri: str) -> int:
    """Byte size of a file/object."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _translated(uri):
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    with _translated(uri):
        return os.path.getsize(_local(uri))


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[tuple[str, int]]:
    """All files under a directory / S3 prefix, recursively, as sorted (uri, byte size) pairs.

    `uri` is treated as a directory (on S3, the prefix ``<key>/``). `suffixes` filters by name ending,
    case-insensitively (e.g. ``(".tar",)``). A missing local directory lists as empty; a missing bucket
    raises StorageError.
    """
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    files = _list_s3(uri) if is_s3(uri) else _list_local(uri)
    if wanted:
        files = [(u, n) for u, n in files if u.lower().endswith(wanted)]
    return sorted(files)


def _list_local(uri: str) -> list[tuple[str, int]]:
    root = _local(uri)
    out: list[tuple[str, int]] = []
    if not os.path.isdir(root):
        return out
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                out.append((path, os.stat(path).st_size))
            except OSError:  # a broken symlink: listed, so that reading it fails visibly later
                out.append((path, 0))
    return out


def _list_s3(uri: str) -> list[tuple[str, int]]:
    bucket, key = _split_s3(uri)
    out: list[tuple[str, int]] = []
    paginator = s3_client().get_paginator("list_objects_v2")
    with _translated(uri):
        for page in paginator.paginate(Bucket=bucket, Prefix=_dir_prefix(key)):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # skip "directory marker" objects
                    out.append((f"{S3_SCHEME}{bucket}/{obj['Key']}", int(obj["Size"])))
    return out


def delete(uri: str) -> None:
    """Delete one file/object (no error when it does not exist)."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _translated(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    with _translated(uri), contextlib.suppress(FileNotFoundError):
        os.remove(_local(uri))


def delete_tree(uri: str) -> None:
    """Delete a directory / S3 prefix and everything under it (no error when it does not exist)."""
    if not is_s3(uri):
        path = _local(uri)
        with _translated(uri):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        return
    bucket, key = _split_s3(uri)
    client = s3_client()
    paginator = client.get_paginator("list_objects_v2")
    with _translated(uri):
        for page in paginator.paginate(Bucket=bucket, Prefix=_dir_prefix(key)):
            objects = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if objects:  # a page holds at most 1000 keys, the delete_objects limit
                _delete_objects(uri, bucket, objects)


def _delete_objects(uri: str, bucket: str, objects: list[dict[str, str]]) -> None:
    response = s3_client().delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    errors = response.get("Errors") or []
    if errors:
        first = errors[0]
        raise StorageError(
            f"could not delete {len(errors)} objects under {uri} (first: {first.get('Key')}, "
            f"{first.get('Code')}): check permissions and retry"
        )
