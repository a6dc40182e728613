"""The parameter space: exact moves, the kernel and torch paths agreeing bit for bit, records, masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zotune.engine import native as _native
from zotune.engine.directions import MagnitudeMask, RandomMask
from zotune.engine.moves import KernelTerms, KernelUpdate
from zotune.engine.native import PAD, UpdateMode
from zotune.engine.space import Offset, ParameterSpace
from zotune.engine.torch_path import BLOCK
from zotune.optim import build
from zotune.testing import reference_z


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
        ("gaussian", "mezo", {"queries": 3}),  # three terms
        ("rademacher", "mezo", {"queries": 8, "estimator": "one-sided"}),  # FZOO's eight
        ("gaussian", "zo-adam", {"queries": 5}),
        ("gaussian", "adamezo", {"window": 2}),  # moments from the window's terms
        ("rademacher", "adamezo", {"window": 3, "mask": "random", "sparsity": 0.5}),
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
        if native == "1":  # every move runs in the kernel, whatever its number of terms
            assert moved["torch"] == 0 and moved["kernel"] > 0
        else:
            assert moved["kernel"] == 0
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize("method,extra", [("sparse-mezo", {}), ("zo-adam", {"mask": "magnitude"})])
def test_tied_magnitude_masks_agree_between_the_kernel_and_torch(method, extra, monkeypatch):
    """Tensors with ties at their threshold (zeros, ones, a few repeated values) keep a hashed
    share of the tied entries: the kernel and the torch path pick the same ones, every step."""
    torch.manual_seed(0)
    repeated = torch.randn(BLOCK + 300) * 0.02
    repeated[: BLOCK // 2] = 0.01  # ties at a threshold that is not 0
    weights = [torch.zeros(2 * BLOCK + 77), torch.ones(33, 9), repeated, torch.randn(40)]
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        model = nn.ParameterList([nn.Parameter(w.clone()) for w in weights])
        opt = build(method, model.parameters(), lr=1e-2, eps=1e-3, sparsity=0.7, **extra)
        assert opt.space.mask.ties.keys() == {0, 1, 2}
        snapshots = []
        for _ in range(4):
            before = [p.detach().clone() for p in model]
            opt.step(lambda m=model: sum(((p - 0.3) ** 2).mean() for p in m))
            snapshots += [p.detach().clone() for p in model]
            for p, p0 in list(zip(model, before))[:3] if method == "sparse-mezo" else ():
                # each tied tensor moves ≈30% of its entries (Adam's moments move more)
                assert 0.25 < (p != p0).float().mean() < 0.35
        moved = opt.space.units_moved
        assert moved["torch" if native == "1" else "kernel"] == 0
        runs.append(snapshots)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


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
            return KernelUpdate(((2, 1.0),), 1e-3, 0.0, KernelTerms(UpdateMode.SGD, 1.0))

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


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize("rule", ["hessian-informed", "sgd"])
def test_z_scaled_by_a_hessian_moves_the_same_bits_in_the_kernel_and_torch(rule, monkeypatch):
    """A space whose z is scaled by 1/√H (HiZOO): offsets, an update of H and θ, and a target
    after it (at the updated H) agree bit for bit between the kernel and the torch path. The
    kernel takes HiZOO's update; another rule's estimate of z/√H runs as torch ops."""
    from zotune.engine.rules import SGD, Update
    from zotune.optim.hizoo import HessianInformed

    torch.manual_seed(0)
    weights = [torch.randn(2 * BLOCK + 77) * 0.02, torch.randn(33, 9)]
    hessians = [torch.rand(2 * BLOCK + 77) * 3 + 0.05, torch.rand(33, 9) + 0.5]
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        ts, hs = [w.clone() for w in weights], [h.clone() for h in hessians]
        space = ParameterSpace(ts)
        space.z_scale = lambda i, hs=hs: hs[i]
        kind = HessianInformed(0.3, 2.7) if rule == "hessian-informed" else SGD()
        update = Update(kind, ((4, -0.8),), 0, (1e-2, 1e-2), (0.1, 0.0), [0, 1], [
            {"hessian": h} for h in hs
        ])  # fmt: skip
        space.transition(None, Offset(4, 1e-3))
        runs.append([t.clone() for t in ts])
        space.transition(Offset(4, 1e-3), Offset(4, -1e-3))
        runs[-1] += [t.clone() for t in ts]
        space.transition(Offset(4, -1e-3), Offset(9, 1e-3), update)
        runs[-1] += [t.clone() for t in ts] + [h.clone() for h in hs]
        space.transition(Offset(9, 1e-3), None)
        assert space.at_rest()
        runs[-1] += [t.clone() for t in ts]
        moved = space.units_moved
        if native == "0":
            assert moved["kernel"] == 0
        elif rule == "hessian-informed":
            assert moved["torch"] == 0 and moved["kernel"] == 4 * len(space.units)
        else:  # the update pass only
            assert moved["torch"] == len(space.units)
    updated = runs[0][6:8]  # H after the update
    assert all(torch.equal(h, h0) == (rule == "sgd") for h, h0 in zip(updated, hessians))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="torch without OpenMP")
def test_worker_threads_run_torch_ops_on_one_openmp_thread_and_the_caller_keeps_its_own():
    """A torch-path lane's ops would each start an OpenMP team per worker, contending for the
    cores: the space's workers run theirs on one thread; torch's setting is left as it was."""
    threads = torch.get_num_threads()
    space = ParameterSpace([torch.zeros(8)], threads=2)
    info = space.pool().submit(torch.__config__.parallel_info).result()
    assert "omp_get_max_threads() : 1\n" in info
    assert torch.get_num_threads() == threads
    mine = torch.__config__.parallel_info()
    assert f"omp_get_max_threads() : {threads}\n" in mine or threads == 1
