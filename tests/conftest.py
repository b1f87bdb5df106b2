"""Shared fixtures and markers for the fxsurgeon test suite."""

from __future__ import annotations

import copy

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def snapshot():
    """snapshot(model) → a checker that asserts the model's state_dict and modes did not change."""

    def take(model):
        state = copy.deepcopy(model.state_dict())
        modes = {n: m.training for n, m in model.named_modules()}
        grads = {n: p.requires_grad for n, p in model.named_parameters()}

        def check():
            assert state_equal(state, model.state_dict()), "the caller's model was modified"
            assert modes == {n: m.training for n, m in model.named_modules()}, "train/eval modes changed"
            assert grads == {n: p.requires_grad for n, p in model.named_parameters()}, "requires_grad changed"

        return check

    return take
