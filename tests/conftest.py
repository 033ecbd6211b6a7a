"""Shared fixtures: one real S3-compatible server on loopback, one local Ray cluster and one small labeled corpus
per session, one torch thread."""

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


@pytest.fixture(scope="session")
def tiny_labels(tmp_path_factory, ray_address) -> str:
    """The session's small labeled corpus (tests/tiny_labels.py), read-only: copy it to write beside it."""
    import tiny_labels as T

    root = T.label_tiny_corpus(tmp_path_factory.mktemp("tiny_labels"), ray_address)
    before = T.digest(root)
    yield root
    changed = sorted(set(before.items()) ^ set(T.digest(root).items()))
    assert not changed, f"a test wrote into the shared tiny_labels root: {sorted({p for p, _ in changed})[:5]}"


@pytest.fixture(scope="session")
def ddp_corpus(tmp_path_factory) -> tuple[str, str]:
    """(token root, tokenizers dir) of tests/_helpers.py's write_ddp_corpus, read-only."""
    from _helpers import write_ddp_corpus

    return write_ddp_corpus(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="session")
def torchrun_ddp(ddp_corpus, tmp_path_factory):
    """The output folder of one 2-process torchrun DDP run of tests/_helpers.py's ddp_train_args on ddp_corpus,
    read-only: tests/model/test_fm_train.py checks the run, tests/pipeline/test_train_job.py trains the same under
    Ray Train and compares the losses."""
    from _helpers import torchrun_train

    out = tmp_path_factory.mktemp("torchrun") / "ddp"
    torchrun_train(ddp_corpus, out, "ddp")
    return out


@pytest.fixture(scope="session", autouse=True)
def session_torch_threads():
    """One torch thread in the test process unless a test asks for more; yields torch's default count. Two
    OpenMP threads on a shared 2-core machine stall on every small op: a tiny FourM trains ~6x faster on one
    (the pixels test: 10 s against 56 s). The full-size official models of tests/labelers/ are faster on the
    default threads (tests/labelers/conftest.py). Subprocesses that run torch get OMP_NUM_THREADS=1 from their
    test; Ray actors set their own threads."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(1)
    yield default
    torch.set_num_threads(default)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (the session's count outside tests/labelers/); modules of small-tensor tests
    use it with `pytestmark`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
