"""The seeded random-weight builder behind every engine test (tests/support/random_models.py).

The engine tier's "another model" checks are only as honest as this: two seeds must give different
weights, one seed the same weights every time. No ComfyUI needed: the per-tensor initialiser is run on a
small module holding every layer type the checkpoint builder meets.
"""
from __future__ import annotations

import pytest
import torch

import random_models
from model_checks import assert_models_differ


def _module() -> torch.nn.Module:
    return torch.nn.ModuleDict({
        "lin": torch.nn.Linear(16, 8),
        "conv": torch.nn.Conv2d(3, 4, 3),
        "norm": torch.nn.GroupNorm(2, 4),
        "tok": torch.nn.Embedding(10, 8),
        "position": torch.nn.Embedding(5, 8),
    })


def _weights(seed: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    random_models._init_module_tensors(_module(), "p.", seed, torch.float32, out)
    return out


RANDOM_KEYS = ["p.lin.weight", "p.lin.bias", "p.conv.weight", "p.conv.bias", "p.tok.weight", "p.position.weight"]


@pytest.mark.parametrize("a,b", [(0, 1), (1, 2), (0, 12345), (7, 2**31 + 7)])
def test_two_seeds_give_different_weights_in_every_random_tensor(a, b):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    same = [k for k in RANDOM_KEYS if torch.equal(wa[k], wb[k])]
    assert not same, f"seeds {a} and {b} give identical {same}"
    # Constants stay constants (norm weight 1, bias 0) whatever the seed.
    assert torch.equal(wa["p.norm.weight"], torch.ones(4)) and torch.equal(wb["p.norm.bias"], torch.zeros(4))


@pytest.mark.parametrize("seed", [0, 1, 99])
def test_one_seed_gives_identical_weights_every_time(seed):
    wa, wb = _weights(seed), _weights(seed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tensors_of_one_model_are_not_copies_of_each_other():
    # Same shape, different keys: each key has its own stream.
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    out: dict[str, torch.Tensor] = {}
    random_models._init_module_tensors(torch.nn.ModuleDict({"a": a, "b": b}), "", 3, torch.float32, out)
    assert not torch.equal(out["a.weight"], out["b.weight"])


def test_seeds_outside_32_bits_are_refused():
    # torch's CPU generator keeps 32 bits of its seed; a wider seed would silently alias a smaller one.
    with pytest.raises(ValueError, match="seed"):
        _weights(2**32)
    with pytest.raises(ValueError, match="seed"):
        _weights(-1)


def test_assert_models_differ_sees_equal_and_different_weights():
    wa, wb = _weights(0), _weights(1)
    assert assert_models_differ(wa, wb, every_random_tensor=True) == len(RANDOM_KEYS)
    with pytest.raises(AssertionError, match="identical"):
        assert_models_differ(wa, _weights(0))
    one_changed = {**wa, "p.lin.bias": wa["p.lin.bias"] + 1e-3}  # e.g. a patched clone
    assert assert_models_differ(wa, one_changed) == 1
    with pytest.raises(AssertionError, match="seeded alike"):
        assert_models_differ(wa, one_changed, every_random_tensor=True)
