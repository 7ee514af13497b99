import os
import sys
import zlib

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

ON_GPU = jax.default_backend() == "gpu"


def pytest_report_header(config):
    mode = "compiled (Triton)" if ON_GPU else "interpret mode"
    return f"jax {jax.__version__} on {jax.devices()[0].device_kind}; Pallas kernels run {mode}"


@pytest.fixture
def rng(request):
    """Fresh random inputs for every test case, reproducible from the test's name."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(variant) -> directory of a tiny random HF model, made once per session."""
    from hf_checkpoints import save_checkpoint

    made = {}

    def get(variant: str):
        if variant not in made:
            made[variant] = save_checkpoint(variant, tmp_path_factory.mktemp(variant))
        return made[variant]

    return get


@pytest.fixture(scope="session")
def llama_with_tokenizer(checkpoint, tmp_path_factory):
    """The tiny llama checkpoint with a tokenizer beside it: text prompts and detokenised output."""
    import shutil

    from hf_checkpoints import save_tokenizer

    directory = tmp_path_factory.mktemp("llama_with_tokenizer")
    shutil.copytree(checkpoint("llama"), directory, dirs_exist_ok=True)
    return save_tokenizer(directory)
