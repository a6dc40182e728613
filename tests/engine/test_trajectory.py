"""Trajectories: kilobytes a run, replayed bit for bit."""

from __future__ import annotations

import copy

import torch
from torch import nn

import zotune
from zotune.optim import build, param_groups


def test_replay_rebuilds_weights_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    initial = copy.deepcopy(model)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    opt = build("mezo", param_groups(model, 0.01), lr=1e-2, eps=1e-3, queries=2, seed=3)
    opt.trajectory.name_tensors(model, opt.space.tensors)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for _ in range(30):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
        sched.step()
    path = opt.trajectory.save(tmp_path / "run.traj")
    assert zotune.replay(initial, path) == 30
    for p, q in zip(model.parameters(), initial.parameters()):
        assert torch.equal(p, q)


def test_trajectory_is_kilobytes(tmp_path):
    w = torch.zeros(10)
    opt = build("mezo", [w], lr=1e-3, eps=1e-3)
    for i in range(2000):
        opt.step(lambda i=i: float(w.sum()) + i * 1e-3)
    path = opt.trajectory.save(tmp_path / "t.traj")
    assert path.stat().st_size < 40_000
    fresh = torch.zeros(10)
    zotune.replay([fresh], path)
    assert torch.equal(fresh, w)
