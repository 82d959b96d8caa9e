import os

import pytest
import torch

os.environ.setdefault("PGVAR_EXAMPLE_SMOKE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
