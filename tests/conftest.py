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


_MUJOCO_LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "MUJOCO_LOG.TXT")
_MUJOCO_LOG_EXISTED = os.path.exists(_MUJOCO_LOG)


def pytest_sessionfinish(session, exitstatus):
    """MuJoCo appends its warnings (e.g. the deprecated ``settotalmass``) to ``MUJOCO_LOG.TXT`` in the working
    folder; the test command leaves no file behind in the checkout."""
    if not _MUJOCO_LOG_EXISTED and os.path.exists(_MUJOCO_LOG):
        os.remove(_MUJOCO_LOG)
