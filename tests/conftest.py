"""Shared fixtures: one real S3-compatible server on loopback and one local Ray cluster per session."""

import pytest

from fixtures_s3 import s3_bucket, s3_server  # noqa: F401


@pytest.fixture(scope="session")
def ray_address(s3_server):  # noqa: F811 - the S3 env must exist before Ray starts its workers
    """The GCS address of a session-wide local Ray cluster (subprocess drivers connect to it too)."""
    import ray

    from omniforge.pipeline._ray import ensure_ray

    ensure_ray(None)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: two OpenMP threads on a shared 2-core machine stall on every small op (one
    is 10-70x faster here). Modules of small-tensor tests use it with `pytestmark`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
