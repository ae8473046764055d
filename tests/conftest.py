"""Shared fixtures: tiny random checkpoints (built once per session) and engines over them."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter, on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.tiny_models import build_checkpoint, falcon_h1_config, falcon_mamba_config


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def h1_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("falcon_h1"), falcon_h1_config())


@pytest.fixture(scope="session")
def mamba_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("falcon_mamba"), falcon_mamba_config())
