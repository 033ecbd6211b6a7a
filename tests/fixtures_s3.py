"""Pytest fixtures for a real S3-compatible server (moto's threaded server) on loopback.

Import them from a conftest: ``from fixtures_s3 import s3_server, s3_bucket``.

`s3_server` (session scope) exports the endpoint and dummy credentials through os.environ, so code under
test, subprocesses and Ray workers started later all reach the same server through the standard AWS
variables; the previous environment is restored when the session ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Variables that could redirect or re-authenticate requests away from the test server.
_S3_ENV_REMOVED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port), export AWS_* variables, yield the endpoint URL."""
    from moto.server import ThreadedMotoServer

    from omniforge import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    names = (*_S3_ENV, *_S3_ENV_REMOVED, "AWS_ENDPOINT_URL", "NO_PROXY", "no_proxy")
    saved = {name: os.environ.get(name) for name in names}
    for name in _S3_ENV_REMOVED:
        os.environ.pop(name, None)
    os.environ.update(_S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = no_proxy
    storage.reset_s3_client()
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        storage.reset_s3_client()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, uniquely named bucket on the test server, as ``s3://<bucket>``; emptied and removed after."""
    from omniforge import storage

    bucket = f"omniforge-test-{uuid.uuid4().hex[:16]}"
    client = storage.s3_client()
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        try:
            storage.delete_tree(f"s3://{bucket}")
            client.delete_bucket(Bucket=bucket)
        except Exception:  # noqa: BLE001 - cleanup of a throwaway in-memory bucket
            pass
