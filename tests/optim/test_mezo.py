"""MeZO end to end: Algorithm 1 step for step, three draws a step, loss going down, hyperparameters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zotune
from zotune.engine.directions import derive_seed
from zotune.optim import build, param_groups
from zotune.testing import reference_z


def test_mezo_regenerates_z_three_times_per_step():
    model = nn.Sequential(nn.Linear(30, 30), nn.Linear(30, 1))
    opt = build("mezo", model.parameters(), lr=1e-3, eps=1e-3)
    x = torch.randn(4, 30)
    for _ in range(5):
        opt.step(lambda: model(x).sum())
    assert opt.regenerations == 15


def test_mezo_reduces_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(128, 10)
    y = x @ torch.randn(10, 1)

    def closure():
        return nn.functional.mse_loss(model(x), y)

    start = closure().item()
    opt = build("mezo", model.parameters(), lr=2e-3, eps=1e-3, seed=1)
    for _ in range(600):
        opt.step(closure)
    assert closure().item() < 0.3 * start
    assert opt.state_dict()["state"] == {}  # ZO-SGD keeps no per-parameter state


def test_one_mezo_step_matches_algorithm_1():
    """A direct implementation of the paper's Algorithm 1, on the same seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    ref = copy.deepcopy(model)
    lr, eps, wd = 0.05, 1e-3, 0.1
    groups = param_groups(model, wd)
    opt = build("mezo", groups, lr=lr, eps=eps, seed=7)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))

    ref_params = [p for g in param_groups(ref, wd) for p in g["params"]]
    decays = [g["weight_decay"] for g in param_groups(ref, wd) for _ in g["params"]]
    seed = derive_seed(7, 0, 0)
    zs = [reference_z(p.shape, seed, k) for k, p in enumerate(ref_params)]
    with torch.no_grad():
        for p, z in zip(ref_params, zs):
            p.add_(eps * z)
        plus = nn.functional.mse_loss(ref(x), y).item()
        for p, z in zip(ref_params, zs):
            p.sub_(2 * eps * z)
        minus = nn.functional.mse_loss(ref(x), y).item()
        for p, z in zip(ref_params, zs):
            p.add_(eps * z)
        g = (plus - minus) / (2 * eps)
        for p, z, d in zip(ref_params, zs, decays):
            p.sub_(lr * (g * z + d * p))
    # Algorithm 1's θ + εz - 2εz rounds differently from our θ - εz: losses agree to ~1e-7.
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=2e-5, rtol=0)


def test_weight_decay_skips_norms_and_biases_by_module_type():
    class FancyRMSNorm(nn.Module):  # like transformers' LlamaRMSNorm: not an nn.RMSNorm
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4, bias=False))
    model.add_module("norm", FancyRMSNorm())
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_bad_hyperparameters_are_rejected():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="eps"):
        build("mezo", p, lr=1e-3, eps=0.0)
    with pytest.raises(ValueError, match="lr"):
        build("mezo", p, lr=-1.0)
    with pytest.raises(ValueError, match="queries"):
        build("mezo", p, queries=0)
    with pytest.raises(ValueError, match="unknown method"):
        build("mezzo", p)
    assert "mezo" in zotune.optim.available()
