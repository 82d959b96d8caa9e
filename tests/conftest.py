import os

import pytest
import torch

os.environ.setdefault("PGVAR_EXAMPLE_SMOKE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

# Test tensors are small: one intra-op thread is faster, and avoids OpenMP spin-waiting when the machine's
# two cores are shared (SubprocVecEnv workers, a second test process).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
