"""The engine: directions, exact moves, estimators, MeZO, trajectories."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import zotune
from zotune.engine import native as _native
from zotune.engine.directions import Gaussian, MagnitudeMask, RandomMask, derive_seed, hash32
from zotune.engine.estimators import one_sided, two_sided
from zotune.engine.moves import KernelTerms, KernelUpdate
from zotune.engine.native import PAD, UpdateMode
from zotune.engine.space import Offset, ParameterSpace
from zotune.engine.torch_path import BLOCK
from zotune.optim import build, param_groups
from zotune.testing import bert_config, llama_config


def draw_z(shape, seed: int, key: int, direction: str = "gaussian") -> torch.Tensor:
    """z for one tensor, read off by moving a zero tensor to 0 + 1·z."""
    t = torch.zeros(shape)
    ParameterSpace([t], keys=[key], direction=direction).transition(None, Offset(seed, 1.0))
    return t


def reference_z(shape, seed: int, key: int) -> torch.Tensor:
    """A separate, pure-Python implementation of the documented law (lowbias32 of a keyed Weyl
    sequence, then the table)."""
    m32 = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m32
        x ^= x >> 15
        x = (x * 0x846CA68B) & m32
        return x ^ (x >> 16)

    table, delta = Gaussian().table.tolist(), Gaussian().delta
    k = derive_seed(seed, key)
    out = []
    for i in range(torch.Size(shape).numel()):
        u = mix((i * (k & m32 | 1) + (k >> 32)) & m32)
        c, f = u >> 20, (u & 0xFFFFF) / 2**20
        out.append(
            torch.tensor(table[c], dtype=torch.float32)
            + torch.tensor(f, dtype=torch.float32) * delta[c]
        )
    return torch.stack(out).view(shape)


def test_z_depends_only_on_seed_and_key():
    a, b = torch.zeros(7, 5), torch.zeros(BLOCK + 11)  # b spans two blocks
    ParameterSpace([a, b], keys=[0, 1]).transition(None, Offset(123, 1.0))
    b2, a2 = torch.zeros(BLOCK + 11), torch.zeros(7, 5)
    ParameterSpace([b2, a2], keys=[1, 0], threads=1).transition(None, Offset(123, 1.0))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert torch.equal(b, draw_z(b.shape, 123, 1))  # alone, without the other tensor
    assert torch.equal(a, reference_z(a.shape, 123, 0))
    assert torch.equal(b, reference_z(b.shape, 123, 1))
    assert not torch.equal(a, draw_z(a.shape, 124, 0))
    assert not torch.equal(a, draw_z(a.shape, 123, 2))


def test_directions_are_uncorrelated_across_steps_keys_and_neighbours():
    """One mixer round over a keyed Weyl sequence (the law's hash): no correlation a 2^18-element
    direction could show between consecutive steps, neighbouring keys or nearby elements, and
    equally filled table cells (deterministic: fixed seeds)."""
    n = 1 << 18
    steps = [draw_z((n,), s, 3) for s in range(8)]
    keys = [draw_z((n,), 7, k) for k in range(8)]
    limit = 5 / n**0.5  # 5 standard errors of a correlation of n independent pairs
    for zs in (steps, keys):
        assert max(abs(float((a * b).mean())) for a, b in zip(zs, zs[1:])) < limit
    for lag in (1, 2, 8, 384, 65536):
        assert max(abs(float((z[:-lag] * z[lag:]).mean())) for z in steps) < limit
    u = torch.cat([hash32(derive_seed(s, 0), 0, n) for s in range(4)])
    cells = torch.bincount(u >> 20, minlength=4096).double()
    expected = u.numel() / 4096
    assert ((cells - expected) ** 2 / expected).sum() / 4095 < 1.2  # chi-square per degree


def test_directions_have_unit_variance():
    table = Gaussian().table.double()
    assert torch.equal(table, -table.flip(0))  # symmetric: mean exactly 0
    var = ((table[:-1] ** 2 + table[:-1] * table[1:] + table[1:] ** 2) / 3).mean()
    assert abs(var - 1) < 1e-6
    g = draw_z((400_000,), 1, 0)
    r = draw_z((400_000,), 1, 0, "rademacher")
    assert abs(g.mean()) < 0.01 and abs(g.var() - 1) < 0.01
    assert abs((g.abs() < 1).float().mean() - 0.6827) < 0.005  # shaped like a normal
    assert abs((g**4).mean() - 3) < 0.1
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.01


class TorchOnly:
    """An engine update with no kernel form: the torch path applies it."""

    def __init__(self, fn):
        self.fn = fn

    def apply(self, block):
        self.fn(block)

    def kernel(self, key):
        return None


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize(
    "direction,method,extra",
    [
        ("gaussian", "mezo", {}),
        ("rademacher", "mezo", {}),
        ("gaussian", "zo-sgd-mmt", {}),
        ("gaussian", "zo-sgd-sign", {}),
        ("gaussian", "zo-sgd-sign", {"official": True}),
        ("gaussian", "zo-adam", {}),
        ("gaussian", "sparse-mezo", {"sparsity": 0.7}),
        ("gaussian", "mezo", {"queries": 2}),  # two-term updates: g = c1·z1 + c2·z2
        ("gaussian", "sparse-mezo", {"sparsity": 0.7, "queries": 2}),
        ("gaussian", "r-mezo", {"sparsity": 0.7}),
        ("gaussian", "r-mezo", {"sparsity": 0.7, "queries": 2}),
        ("gaussian", "r-mezo", {"sparsity": 1e-12}),  # keeps every hash: limit 2^32 - 1
        ("gaussian", "zo-adam", {"queries": 2}),
        ("gaussian", "zo-sgd-sign", {"official": True, "queries": 2}),
        ("gaussian", "mezo", {"queries": 3}),  # three terms run as torch blocks
        ("gaussian", "mezo-svrg", {"refresh": 2}),
    ],
)
def test_c_kernel_and_torch_code_agree_bit_for_bit(direction, method, extra, monkeypatch):
    torch.manual_seed(0)
    weights = [torch.randn(2 * BLOCK + 77) * 0.02, torch.randn(33, 9)]
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        ts = [w.clone() for w in weights]
        model = nn.ParameterList([nn.Parameter(t) for t in ts])
        groups = [{"params": [model[0]], "weight_decay": 0.1}, {"params": [model[1]]}]
        opt = build(method, groups, lr=1e-2, eps=1e-3, direction=direction, **extra)
        if method == "mezo-svrg":
            opt.full_closure = lambda m=model: sum((p**2).sum() for p in m.parameters())
        snapshots = []
        for _ in range(3):
            opt.step(lambda m=model: sum((p**2).sum() for p in m.parameters()))
            snapshots += [p.detach().clone() for p in model.parameters()]
        space = ParameterSpace([t.detach() for t in model.parameters()], direction=direction)
        space.transition(None, Offset(5, 1e-3))
        snapshots += [p.detach().clone() for p in model.parameters()]
        runs.append(snapshots)
        moved = {k: opt.space.units_moved[k] + space.units_moved[k] for k in ("kernel", "torch")}
        if native == "1" and not extra.get("queries") and method != "mezo-svrg":  # 3 a step
            assert moved == {"kernel": 3 * 3 * 2 + 2, "torch": 0}
        if native == "1":  # every move of one or two terms runs in the kernel; three do not
            assert (moved["torch"] > 0) == (extra.get("queries") == 3)
        else:
            assert moved["kernel"] == 0
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
@pytest.mark.parametrize("method", ["mezo", "zo-sgd-sign", "zo-sgd-mmt", "zo-adam"])
def test_updates_alone_agree_with_the_torch_path_bit_for_bit(method, direction, monkeypatch):
    """An update with the weights at θ0 (an attached table's, block-wise ZO's, a replay's):
    the kernel draws z inside the update loop; the torch path draws it first."""
    torch.manual_seed(0)
    weights = [torch.randn(BLOCK + 13) * 0.02, torch.randn(29, 7)]
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        model = nn.ParameterList([nn.Parameter(w.clone()) for w in weights])
        groups = [{"params": [model[0]], "weight_decay": 0.1}, {"params": [model[1]]}]
        opt = build(method, groups, lr=1e-2, eps=1e-3, direction=direction)
        for step, c in enumerate((0.7, -1.3, 0.0)):
            record = {"lr": [1e-2, 1e-2], "wd": [0.1, 0.0]}
            opt.steps = step
            opt.space.transition(None, None, opt.update_for([(11 + step, c)], record))
        runs.append([p.detach().clone() for p in model])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
def test_a_move_that_fails_before_the_kernel_runs_leaves_the_weights_restorable():
    torch.manual_seed(0)
    tensors = [torch.randn(1000) * 1e-4, torch.randn(3000) * 1e-4]  # many kept-aside values
    before = [t.clone() for t in tensors]
    space = ParameterSpace(tensors)
    space.transition(None, Offset(1, 1e-3))

    class Failing:
        def apply(self, block):
            raise AssertionError("the kernel path should not call the torch update")

        def kernel(self, key):  # the second tensor's terms fail, after the first's were taken
            if key == 1:
                raise RuntimeError("bad rule arguments")
            return KernelUpdate(2, 1e-3, 0.0, KernelTerms(UpdateMode.SGD, 1.0))

    update = Failing()
    with pytest.raises(RuntimeError, match="bad rule"):
        space.transition(Offset(1, 1e-3), None, update)
    assert space.at == Offset(1, 1e-3)
    space.transition(Offset(1, 1e-3), None)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize("mask", [None, "magnitude", "random"])
def test_what_the_torch_path_keeps_aside_the_kernel_restores(mask):
    """An update without a kernel form runs as torch ops, and may end perturbed: its records
    go where the kernel will look for them, so the next pass restores θ0' bit for bit."""
    torch.manual_seed(0)
    tensors = [torch.randn(3000) * 1e-3, torch.randn(BLOCK + 40) * 0.05]  # many kept aside
    masks = {
        None: None,
        "magnitude": MagnitudeMask(tensors, range(2), 0.5),
        "random": RandomMask(0.5),
    }
    expected = [t * 0.5 for t in tensors]
    space = ParameterSpace(tensors, mask=masks[mask])
    space.mask_seed = 7

    halve = TorchOnly(lambda block: block.theta.mul_(0.5))  # the torch path moves every unit
    space.transition(None, Offset(3, 1e-2), halve)
    assert not space.at_rest() and space.torch_path.empty()  # kept in the kernel's records
    assert not torch.equal(tensors[0], expected[0])
    space.transition(Offset(3, 1e-2), Offset(3, -1e-2))  # the kernel, reading those records
    space.transition(Offset(3, -1e-2), None)
    assert space.at_rest()
    assert all(torch.equal(a, b) for a, b in zip(tensors, expected))


def test_a_space_given_another_mask_perturbs_by_the_new_one():
    """The kernel's table holds the magnitude thresholds: a new mask object is read afresh."""
    torch.manual_seed(0)
    w = torch.randn(5000)
    before = w.clone()
    space = ParameterSpace([w], mask=MagnitudeMask([w], [0], 0.8))
    for sparsity in (0.8, 0.3):
        space.mask = MagnitudeMask([w], [0], sparsity)
        space.transition(None, Offset(1, 1e-3))
        moved = (w != before).float().mean().item()
        assert abs(moved - (1 - sparsity)) < 0.02
        space.transition(Offset(1, 1e-3), None)
        assert torch.equal(w, before)


@pytest.mark.skipif(_native.lib() is None, reason="kernel records")
def test_a_pass_from_theta0_drops_a_stale_kernel_record():
    """A record left by a pass that ran out of memory must not survive a pass from θ0 that keeps
    nothing aside (scale 0): its flags would put stale values back on the way home."""
    torch.manual_seed(0)
    w = torch.randn(4096)
    before = w.clone()
    space = ParameterSpace([w])
    n = w.numel()
    stale = torch.full((n // 8,), 0xFF, dtype=torch.uint8)  # every element flagged
    space.kernel.records.store(0, n, (stale, torch.zeros(n + PAD), None), 0)
    space.transition(None, Offset(1, 0.0))
    space.transition(Offset(1, 0.0), None)
    assert torch.equal(w, before)


def test_a_space_mask_is_replaced_only_at_theta0():
    """A perturbation is undone (and flipped to -εz) by the mask it was made with: a new mask
    while perturbed is refused, and the weights still come back exactly."""
    torch.manual_seed(0)
    w = torch.randn(5000)
    before = w.clone()
    space = ParameterSpace([w], mask=MagnitudeMask([w], [0], 0.8))
    space.transition(None, Offset(1, 1e-3))
    for mask in (MagnitudeMask([w], [0], 0.3), None):
        with pytest.raises(RuntimeError, match="at θ0"):
            space.mask = mask
    space.transition(Offset(1, 1e-3), Offset(1, -1e-3))
    assert abs((w != before).float().mean().item() - 0.2) < 0.02
    space.transition(Offset(1, -1e-3), None)
    assert torch.equal(w, before)
    space.mask = None  # at θ0: fine


@pytest.mark.parametrize("method", ["zo-sgd-sign", "mezo", "zo-sgd-mmt"])
def test_a_flat_loss_leaves_the_weights_exactly_where_they_were(method):
    """Equal losses give ĝ = 0 everywhere: sign(0) = 0, so no rule moves a weight, and the
    restore returns every one bit for bit (the kernel and the torch path alike)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3000) * 0.05), nn.Parameter(torch.randn(77))]
    before = [p.detach().clone() for p in params]
    opt = build(method, params, lr=1e-2, eps=1e-3)
    for _ in range(2):
        opt.step(lambda: torch.tensor(1.0))
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("method", ["mezo", "zo-adam"])
def test_weights_given_new_storage_between_steps_are_the_ones_trained(method):
    """`p.data = ...` between steps: the kernel's table of units is built again, so steps move
    the new storage and never write the old."""
    torch.manual_seed(0)
    base = [torch.randn(40, 30) * 0.1, torch.randn(30)]
    runs = []
    for swap in (False, True):
        params = [nn.Parameter(t.clone()) for t in base]
        opt = build(method, params, lr=1e-2, eps=1e-3)

        def loss(params=params):
            return (params[0].sum(0) * params[1]).square().sum()

        opt.step(loss)
        old = params[0].data
        if swap:
            params[0].data = old.clone()
        frozen = old.clone()
        opt.step(loss)
        opt.step(loss)
        if swap:
            assert torch.equal(old, frozen)  # the old storage is left alone
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_perturb_and_restore_is_exact(dtype):
    torch.manual_seed(0)
    tensors = [(torch.randn(300, 70) * 0.05).to(dtype), torch.randn(BLOCK + 5).to(dtype)]
    before = [t.clone() for t in tensors]
    space = ParameterSpace(tensors)
    eps = 1e-2 if dtype != torch.float32 else 1e-3
    for seed in (1, 2, 3):
        space.transition(None, Offset(seed, eps))
        changed = sum((t != b).sum().item() for t, b in zip(tensors, before))
        assert changed > 0.5 * sum(t.numel() for t in tensors)  # it really perturbs
        space.transition(Offset(seed, eps), Offset(seed, -eps))
        space.transition(Offset(seed, -eps), None)
        for t, b in zip(tensors, before):
            assert torch.equal(t, b)  # bit for bit


def test_perturbation_is_theta_plus_eps_z():
    torch.manual_seed(0)
    t = torch.randn(1000)
    orig = t.clone()
    ParameterSpace([t]).transition(None, Offset(9, 1e-3))
    assert torch.allclose(t, orig + 1e-3 * reference_z((1000,), 9, 0), atol=1e-7, rtol=0)


def test_two_sided_estimator_is_unbiased_on_a_quadratic():
    torch.manual_seed(0)
    d = 40
    a = torch.randn(d, d)
    hess = a @ a.T / d + torch.eye(d)
    b = torch.randn(d)
    theta = torch.randn(d)
    true_grad = hess @ theta + b
    space = ParameterSpace([theta], threads=1)

    def loss():
        return 0.5 * theta @ hess @ theta + b @ theta

    total = torch.zeros(d)
    n = 1500
    for s in range(n):
        est = two_sided(space, loss, [s], 1e-3)
        space.transition(est.pending, None)
        total += est.grads[0] * reference_z((d,), s, 0)
    cos = torch.nn.functional.cosine_similarity(total / n, true_grad, dim=0)
    assert cos > 0.9


def test_closure_call_counts():
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    calls = []

    def closure():
        calls.append(1)
        return model(x).pow(2).mean()

    for queries, estimator, expected in [
        (1, "two-sided", 2),
        (3, "two-sided", 6),
        (3, "one-sided", 4),
    ]:
        calls.clear()
        opt = build(
            "mezo", model.parameters(), lr=1e-3, eps=1e-3, queries=queries, estimator=estimator
        )
        opt.step(closure)
        assert len(calls) == expected
        assert opt.forward_passes == expected


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


def test_failing_closure_leaves_weights_restored():
    w = nn.Parameter(torch.randn(50))
    before = w.detach().clone()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return w.sum()

    opt = build("mezo", [w], lr=1e-3, eps=1e-3)
    with pytest.raises(RuntimeError):
        opt.step(closure)
    assert torch.equal(w.detach(), before)


def test_one_sided_estimator_matches_finite_difference():
    w = torch.tensor([1.0, -2.0, 0.5])
    space = ParameterSpace([w], threads=1)

    def loss():
        return float((w**2).sum())

    est = one_sided(space, loss, [5], 1e-3)
    z = reference_z((3,), 5, 0)
    space.transition(est.pending, None)
    expected = (float(((w + 1e-3 * z) ** 2).sum()) - loss()) / 1e-3
    assert est.grads[0] == pytest.approx(expected, rel=1e-3)


def opt_config() -> OPTConfig:
    return OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)  # fmt: skip


def _train_tiny_bert(base, method: str, extra: dict, attach: bool, batches, labels):
    """Steps of `method` on a copy of `base`; returns losses, weights, whether each forward
    saw the unread embedding rows unperturbed, and what `attach` applied to."""
    model = copy.deepcopy(base)
    table = model.bert.embeddings.word_embeddings.weight
    opt = build(method, model.parameters(), lr=1e-3, eps=1e-3, **extra)
    e = model.bert.embeddings
    tables = [e.word_embeddings, e.position_embeddings, e.token_type_embeddings]
    names = opt.attach(model, tables) if attach else []
    seen, losses, before = [], [], table.detach().clone()

    def loss(ids):
        out = model(input_ids=ids).logits
        unread = torch.ones(table.shape[0], dtype=torch.bool)
        unread[ids.unique()] = False
        seen.append(torch.equal(table.detach()[unread], before[unread]))
        return torch.nn.functional.cross_entropy(out, labels)

    if method == "mezo-svrg":
        opt.full_closure = lambda: loss(batches[0])
    for ids in batches:
        before = table.detach().clone()
        losses.append(opt.step(lambda ids=ids: loss(ids)))
    return losses, [p.detach().clone() for p in model.parameters()], seen, names


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize(
    "method,extra",
    [
        ("mezo", {}),
        ("mezo", {"queries": 2}),
        ("zo-adam", {}),
        ("sparse-mezo", {"sparsity": 0.5}),
        ("r-mezo", {"sparsity": 0.5}),
        ("r-mezo", {"sparsity": 0.5, "queries": 2}),
        ("mezo-svrg", {"refresh": 2}),
        ("zo-sgd-cons", {}),
    ],
)
def test_lazy_embedding_rows_change_no_loss_and_no_weight(method, extra):
    """`attach` perturbs only the rows a batch reads: same losses, same weights, bit for bit."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(bert_config(200, num_labels=2)).eval()
    batches = [torch.randint(0, 60 + 40 * k, (4, 12)) for k in range(4)]
    labels = torch.tensor([0, 1, 1, 0])
    loss_a, weights_a, seen_a, _ = _train_tiny_bert(base, method, extra, False, batches, labels)
    loss_b, weights_b, seen_b, names = _train_tiny_bert(base, method, extra, True, batches, labels)
    assert names == [
        "bert.embeddings.word_embeddings",
        "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings",
    ]
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    if method != "mezo-svrg":  # (its anchor passes hold other values in every row)
        assert not all(seen_a) and all(seen_b)  # eager perturbs unread rows, lazy does not


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize("method", ["mezo", "r-mezo", "sparse-mezo"])
def test_lazy_rows_split_over_threads_change_nothing(method):
    """Batches that read over 128 rows are moved in one segment per thread."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(bert_config(200, num_labels=2)).eval()
    batches = [torch.randint(0, 200, (16, 24)) for _ in range(3)]
    labels = torch.randint(0, 2, (16,))
    extra = {"sparsity": 0.5} if method != "mezo" else {}
    loss_a, weights_a, _, _ = _train_tiny_bert(base, method, extra, False, batches, labels)
    loss_b, weights_b, _, _ = _train_tiny_bert(base, method, extra, True, batches, labels)
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))


@pytest.mark.skipif(_native.lib() is None, reason="attached rows need the C kernel")
def test_attach_defaults_to_the_input_embedding_and_skips_overridden_lookups():
    bert = BertForSequenceClassification(bert_config(64, num_labels=2))
    opt = build("mezo", bert.parameters(), lr=1e-3)
    assert opt.attach(bert) == ["bert.embeddings.word_embeddings"]
    opt = build("mezo", (opt_model := OPTForCausalLM(opt_config())).parameters(), lr=1e-3)
    positions = opt_model.model.decoder.embed_positions  # looks up positions + 2, not its input
    assert opt.attach(opt_model, [positions, opt_model.get_input_embeddings()]) == []  # tied


@pytest.mark.skipif(_native.lib() is None, reason="attached rows need the C kernel")
def test_attach_hook_reads_ids_passed_by_keyword():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 1)

        def forward(self, ids):
            return self.out(self.emb(input=ids).mean(1)).square().mean()

    torch.manual_seed(0)
    base, ids = Bag(), torch.randint(0, 20, (4, 6))
    runs = []
    for attach in (False, True):
        model = copy.deepcopy(base)
        opt = build("mezo", model.parameters(), lr=1e-2, eps=1e-3)
        if attach:
            assert opt.attach(model, [model.emb]) == ["emb"]
        losses = [opt.step(lambda m=model: m(ids)) for _ in range(3)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()], opt.regenerations))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    # regenerations count z drawn over the weights: 3 full passes a step without attach; with
    # it, the table's 800 weights are drawn once (the update), and the rows the forwards read
    # three times (to +εz before the first, straight to -εz after it, back after the second)
    n_other, rows_read = 17, ids.unique().numel() * 16
    assert runs[0][2] == 9
    assert runs[1][2] == pytest.approx(3 * (3 * n_other + 800 + 3 * rows_read) / (n_other + 800))


@pytest.mark.skipif(_native.lib() is None, reason="attached rows need the C kernel")
def test_attached_rows_follow_ids_changed_in_place_between_forwards():
    """The second forward of a step skips the row lookup only for the very same ids, unchanged:
    a batch tensor rewritten in place between the two forwards has its new rows moved."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(60, 16), nn.Linear(16, 1)
    ids = torch.randint(0, 20, (4, 6))
    runs = []
    for attach in (False, True):
        model = nn.ModuleDict({"emb": copy.deepcopy(emb), "head": copy.deepcopy(head)})
        opt = build("mezo", model.parameters(), lr=1e-2, eps=1e-3)
        if attach:
            assert opt.attach(model, [model["emb"]]) == ["emb"]
        batch = ids.clone()

        def loss(model=model, batch=batch):
            out = model["head"](model["emb"](batch).mean(1)).square().mean()
            batch.add_(7)  # the next call reads other rows, from the same tensor
            return out

        losses = [opt.step(loss) for _ in range(3)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.skipif(_native.lib() is None, reason="attached rows need the C kernel")
def test_attach_skips_tied_and_untrained_embeddings():
    tied = LlamaForCausalLM(llama_config(64, tie_word_embeddings=True))
    assert build("mezo", tied.parameters(), lr=1e-3).attach(tied) == []
    untied = LlamaForCausalLM(llama_config(64, tie_word_embeddings=False))
    opt = build("mezo", untied.parameters(), lr=1e-3)
    assert opt.attach(untied) == opt.attach(untied) == ["model.embed_tokens"]
    assert len(opt._row_hooks) == 1  # attaching twice hooks once
    frozen = [p for n, p in untied.named_parameters() if "embed" not in n]
    assert build("mezo", frozen, lr=1e-3).attach(untied) == []


@pytest.mark.skipif(
    _native.lib() is None or platform.machine() not in ("x86_64", "AMD64"),
    reason="needs the kernel, built here for x86-64",
)
def test_the_kernel_built_without_avx2_agrees_with_the_torch_path(tmp_path, monkeypatch):
    """CPUs without AVX2 (ARM, older x86) run the kernel's plain C loops: build it so here and
    check every fused path against the torch code (updates alone included: their draw buffer
    must hold a whole chunk when no vector loop went first)."""
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    # (not inlined, with stack canaries: a buffer overrun aborts instead of passing unseen)
    flags = [*_native.FLAGS, "-mno-avx2", "-fno-inline", "-fstack-protector-all"]
    monkeypatch.setattr(_native, "FLAGS", flags)
    monkeypatch.setattr(_native, "_lib", False)
    assert _native.lib() is not None
    torch.manual_seed(0)
    weights = [torch.randn(3 * 1024 + 21) * 0.02, torch.randn(13, 7)]
    for method, extra in [
        ("mezo", {}),
        ("zo-sgd-mmt", {}),
        ("zo-sgd-sign", {}),
        ("zo-adam", {}),
        ("sparse-mezo", {"sparsity": 0.7}),
        ("r-mezo", {"sparsity": 0.7}),
    ]:
        runs = []
        for native in ("1", "0"):
            monkeypatch.setenv("ZOTUNE_NATIVE", native)
            model = nn.ParameterList([nn.Parameter(w.clone()) for w in weights])
            opt = build(method, model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, **extra)
            for _ in range(2):
                opt.step(lambda m=model: sum((p**2).sum() for p in m.parameters()))
            record = {"lr": [1e-2], "wd": [0.1]}
            opt.space.transition(None, None, opt.update_for([(99, 0.5)], record))
            runs.append([p.detach().clone() for p in model])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), method


@pytest.mark.skipif(
    _native.compiler() is None or _native.mode() == "off",
    reason="no C compiler, or the kernel turned off",
)
def test_the_c_kernel_compiles_where_a_compiler_exists():
    """Every kernel test skips without the library: a source that fails to compile must fail."""
    assert _native.lib() is not None
