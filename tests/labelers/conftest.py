"""The labelers' tests compare full-size official networks (ViT-B at 448, SAM, DINOv2) with omniforge's: their
large matrix products run 1.5-2.5x faster on torch's default threads than on the session's one."""

import pytest


@pytest.fixture(autouse=True)
def default_torch_threads(session_torch_threads):
    import torch

    torch.set_num_threads(session_torch_threads)
    yield
    torch.set_num_threads(1)
