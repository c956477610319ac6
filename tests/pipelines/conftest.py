import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import _tiny_sd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion built in JAX (no torch): 8x8 images, 4x4 latents."""
    return _tiny_sd.build(tmp_path_factory.mktemp("tiny_tok"))
