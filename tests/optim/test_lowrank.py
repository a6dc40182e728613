"""Low-rank directions (engine) and the methods built on them: LOZO, LOZO-M, SubZero.

Each method is checked against a plain-torch reference that draws the same factors from the
engine's counter hash (written out here, not through `LowRank`), builds z with a matmul and
follows the released code's update; then bit-exact replay and resume, hyperparameter errors,
and `zotune train` end to end."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import zotune
from zotune.cli import main
from zotune.engine import native as _native
from zotune.engine.directions import (
    CORE_SALT,
    LEFT_SALT,
    RIGHT_SALT,
    Gaussian,
    LowRank,
    derive_seed,
    hash32,
    matrix_shape,
)
from zotune.engine.space import Offset, ParameterSpace
from zotune.optim import build
from zotune.optim.lozo import REFRESH_SALT

_G = Gaussian()


def gaussian(key: int, n: int, start: int = 0) -> torch.Tensor:
    """n draws of the engine's Gaussian law under `key` (torch code, as in test_methods)."""
    u = hash32(key, start, n)
    return _G.table[u >> 20] + ((u & 0xFFFFF).float() * 2.0**-20) * _G.delta[u >> 20]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def problem(seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) * 0.5
    return model, x, y


def loss_of(model, x, y):
    return lambda: nn.functional.mse_loss(model(x), y)


# -- the direction -------------------------------------------------------------------------


def test_low_rank_z_is_its_factors_product_in_any_split():
    """z = U Vᵀ per matrix; any block start (mid-row included) gives the same bits as a whole
    draw, and the ordered float32 sum equals a float64 matmul to float32 rounding."""
    shapes = {0: (300, 500), 1: (7, 3)}
    d = LowRank(shapes, rank=3)
    d.bind(11, 99)
    whole = d.draw_(torch.empty(150_000), 11, 0, 0)
    u, v = d.factors(11, 0)
    assert u.shape == (300, 3) and v.shape == (500, 3)
    assert torch.equal(u.reshape(-1), gaussian(derive_seed(11, 0, LEFT_SALT), 900))
    assert torch.equal(v.reshape(-1), gaussian(derive_seed(99, 0, RIGHT_SALT), 1500))
    exact = (u.double() @ v.double().T).float().view(-1)
    assert torch.allclose(whole, exact, rtol=1e-6, atol=1e-6)
    for start, n in [(0, 65536), (65536, 65536), (123, 4567), (499, 2), (149_990, 10)]:
        part = d.draw_(torch.empty(n), 11, 0, start)
        assert torch.equal(part, whole[start : start + n]), start
    assert d.rank_of(1) == 3 and LowRank({0: (2, 5)}, rank=4).rank_of(0) == 2
    dense = d.draw_(torch.empty(10), 11, 2, 0)  # a tensor that is no matrix: the law's z
    assert torch.equal(dense, gaussian(derive_seed(11, 2), 10))
    with pytest.raises(KeyError, match="not bound"):
        d.draw_(torch.empty(10), 12, 0, 0)


def test_matrix_shapes():
    assert matrix_shape(torch.empty(4, 6)) == (4, 6)
    assert matrix_shape(torch.empty(1, 6)) == (1, 6)  # LOZO: any 2-D tensor
    assert matrix_shape(torch.empty(1, 6), squeeze=True) is None  # SubZero: squeezed 2-D
    assert matrix_shape(torch.empty(1, 4, 1, 6), squeeze=True) == (4, 6)
    assert matrix_shape(torch.empty(8)) is None
    assert matrix_shape(torch.empty(2, 3, 4)) is None
    assert matrix_shape(torch.empty(8, 64), square=True) == (16, 32)


def test_low_rank_spaces_restore_exactly_float32_units_in_the_kernel():
    torch.manual_seed(0)
    tensors = [torch.randn(40, 30), torch.randn(30), torch.randn(20, 20).bfloat16()]
    start = [t.clone() for t in tensors]
    space = ParameterSpace(tensors)
    space.direction = LowRank({0: (40, 30), 2: (20, 20)}, rank=2)
    space.direction.bind(5, 6)
    space.transition(None, Offset(5, 1e-3))
    assert not torch.equal(tensors[0], start[0])
    space.transition(Offset(5, 1e-3), Offset(5, -1e-3))
    space.transition(Offset(5, -1e-3), None)
    assert all(torch.equal(t, s) for t, s in zip(tensors, start))
    # the bf16 matrix on the torch path; the float32 matrix and bias in the kernel, if built
    built = _native.lib() is not None
    assert space.at_rest() and space.units_moved == {
        "kernel": 6 if built else 0,
        "torch": 3 if built else 9,
    }


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize(
    "method,hp",
    [("lozo", {"queries": 2}), ("lozo-m", {}), ("subzero", {"momentum": 0.5})],
)
def test_the_kernel_moves_low_rank_matrices_bit_for_bit_as_torch(method, hp, monkeypatch):
    """The C kernel forms a matrix's z from the step's factors, in the torch path's order: a
    matrix of two torch blocks (the second starting mid-row), a bias and a weight-decayed
    group move the same bits with and without it; LOZO-M's updates (N·Vᵀ, dense momentum)
    stay on the torch path, everything else moves in the kernel."""
    torch.manual_seed(0)
    weights = [torch.randn(600, 500) * 0.02, torch.randn(500) * 0.02, torch.randn(33, 9)]
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        params = [nn.Parameter(w.clone()) for w in weights]
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}]
        opt = build(method, groups, lr=1e-2, eps=1e-3, rank=3, interval=2, **hp)
        for _ in range(3):  # (across a refresh of the factors)
            opt.step(lambda ps=params: sum(((p - 0.1) ** 2).sum() for p in ps))
        runs.append([p.detach().clone() for p in params])
        moved = opt.space.units_moved
        if native == "0":
            assert moved["kernel"] == 0
        else:
            assert moved["kernel"] > 0
            # LOZO-M's rule has no kernel form: its update passes (3 tensors) take the torch path
            assert moved["torch"] == (3 * 3 if method == "lozo-m" else 0)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_low_rank_methods_attach_embeddings_whose_rows_are_z_rows():
    """An embedding's rows move lazily when they are its z's rows (test_rows checks the bits);
    SubZero's `square` factoring reshapes the table, so its rows are not z's rows."""
    emb = nn.Embedding(32, 8)
    model = nn.Sequential(emb, nn.Linear(8, 8))
    assert build("lozo", model.parameters(), lr=1e-3).attach(model, [emb]) == ["0"]
    square = build("subzero", model.parameters(), lr=1e-3, square=True)
    assert square.attach(model, [emb]) == []


# -- the methods against plain-torch references ---------------------------------------------


def ref_factors(run_seed, t, key, shape, rank, interval, orthonormal=False):
    """(L, R) of step t as the methods draw them, written out from the hash."""
    m, n = shape
    r = min(rank, m, n)
    s = derive_seed(run_seed, t, 0)
    refresh = derive_seed(run_seed, t - t % interval, REFRESH_SALT)
    v = gaussian(derive_seed(refresh, key, RIGHT_SALT), n * r).view(n, r)
    if not orthonormal:
        return gaussian(derive_seed(s, key, LEFT_SALT), m * r).view(m, r), v
    u = gaussian(derive_seed(refresh, key, LEFT_SALT), m * r).view(m, r)

    def qr(a):
        q, rr = torch.linalg.qr(a.double())
        return q * torch.where(rr.diagonal() < 0, -1.0, 1.0).double()

    core = gaussian(derive_seed(s, key, CORE_SALT), r * r).view(r, r).double()
    return qr(u) @ core * (math.sqrt(m * n) / r), qr(v)


def reference_run(method, model, x, y, steps, lr, eps, rank, interval, beta=0.9):
    """The released code's arithmetic in plain torch (float64 products), keys as the optimizer's."""
    params = list(model.parameters())
    momentum = [None] * len(params)
    ortho = method == "subzero"
    for t in range(steps):
        zs, us, vs = [], [], []
        for k, p in enumerate(params):
            if p.dim() == 2 and (not ortho or min(p.shape) > 1):  # SubZero: squeezed 2-D
                u, v = ref_factors(0, t, k, tuple(p.shape), rank, interval, ortho)
                zs.append((u.double() @ v.double().T).float())
                us.append(u.double())
                vs.append(v.double())
            else:
                zs.append(gaussian(derive_seed(derive_seed(0, t, 0), k), p.numel()).view(p.shape))
                us.append(None)
                vs.append(None)
        with torch.no_grad():
            for p, z in zip(params, zs):
                p.add_(eps * z)
            plus = loss_of(model, x, y)().item()
            for p, z in zip(params, zs):
                p.sub_(2 * eps * z)
            minus = loss_of(model, x, y)().item()
            for p, z in zip(params, zs):
                p.add_(eps * z)
            g = (plus - minus) / (2 * eps)
            for k, (p, z) in enumerate(zip(params, zs)):
                if method != "lozo-m":
                    p.sub_(lr * g * z)
                    continue
                if us[k] is None:  # dense momentum, m_0 = g z
                    step = g * z.double()
                    momentum[k] = step if t == 0 else beta * momentum[k] + (1 - beta) * step
                    p.sub_((lr * momentum[k]).float())
                    continue
                step = g * us[k]
                if t == 0:
                    momentum[k] = step
                else:
                    if t % interval == 0:  # project onto the new V
                        _, v_old = ref_factors(0, t - 1, k, tuple(p.shape), rank, interval)
                        proj = v_old.double().T @ vs[k] / p.shape[1]
                        momentum[k] = momentum[k] @ proj
                    momentum[k] = beta * momentum[k] + (1 - beta) * step
                p.sub_((lr * momentum[k] @ vs[k].T).float())


@pytest.mark.parametrize("method", ["lozo", "lozo-m", "subzero"])
def test_steps_match_a_plain_torch_reference(method):
    """Five steps across two refreshes of V (interval 2): same factors, same update."""
    model, x, y = problem(2)
    ref, initial = copy.deepcopy(model), copy.deepcopy(model)
    lr, eps, rank, interval, steps = 2e-2, 1e-3, 3, 2, 5
    opt = build(method, model.parameters(), lr=lr, eps=eps, rank=rank, interval=interval)
    for _ in range(steps):
        opt.step(loss_of(model, x, y))
    reference_run(method, ref, x, y, steps, lr, eps, rank, interval)
    for p, q, p0 in zip(model.parameters(), ref.parameters(), initial.parameters()):
        assert torch.allclose(p, q, atol=5e-5, rtol=1e-4), method
        assert (p - p0).abs().max() > 100 * (p - q).abs().max(), method  # (a real move)


@pytest.mark.parametrize("method", ["lozo", "subzero"])
def test_threads_change_no_bit(method):
    runs = []
    for threads in (1, 2):
        model, x, y = problem(3)
        opt = build(method, model.parameters(), lr=1e-2, interval=2, threads=threads)
        for _ in range(3):
            opt.step(loss_of(model, x, y))
        runs.append(list(model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_subzero_factors_are_orthonormal_and_z_has_a_dense_z_norm():
    d = LowRank({0: (64, 48)}, rank=8, orthonormal=True)
    d.bind(3, 4)
    right = d.right(4, 0)
    assert torch.allclose(right.T @ right, torch.eye(8), atol=1e-5)
    norms = []
    for s in range(200):
        d.bind(s, 4)
        norms.append(float(d.draw_(torch.empty(64 * 48), s, 0, 0).pow(2).sum()))
    assert abs(sum(norms) / len(norms) / (64 * 48) - 1) < 0.05  # E‖z‖² = mn


def test_subzero_basis_is_cached_for_its_span_only_and_refreshed_at_its_boundaries():
    """The cache holds the current span's U and V only (bounded memory); they change exactly
    at steps 3 and 6 (interval 3); each step's L is drawn once per seed and kept for that step
    only, and every cached factor equals a fresh direction's draw, bit for bit."""
    model, x, y = problem(4)
    opt = build("subzero", model.parameters(), lr=1e-2, rank=3, interval=3)
    d = opt.direction
    bases = []
    for t in range(7):
        opt.step(loss_of(model, x, y))
        assert {key[0] for key in d._kept} == {opt.refresh_seed(t)}, t
        assert set(d._lefts) == {derive_seed(0, t, 0)}  # (this step's L only)
        bases.append(
            (
                d.right(opt.refresh_seed(t), 0),
                d._kept[(opt.refresh_seed(t), 0, torch.device("cpu"))][1],
            )
        )
        seed = derive_seed(0, t, 0)
        fresh = LowRank(d.shapes, 3, orthonormal=True)
        fresh.bind(seed, opt.refresh_seed(t))
        for key, (m, n) in d.shapes.items():
            assert torch.equal(d.draw_(torch.empty(m * n), seed, key, 0),
                               fresh.draw_(torch.empty(m * n), seed, key, 0))  # fmt: skip
    changed = [t for t in range(1, 7) if not torch.equal(bases[t][0], bases[t - 1][0])]
    assert changed == [3, 6]
    assert [t for t in range(1, 7) if not torch.equal(bases[t][1], bases[t - 1][1])] == [3, 6]


def test_a_seed_bound_again_to_another_basis_draws_in_that_basis():
    """SubZero's L = U·Z0 depends on the refresh seed: rebinding a step seed drops its kept L."""
    d = LowRank({0: (12, 10)}, rank=2, orthonormal=True)
    out = torch.empty(120)
    d.bind(5, 100)
    first = d.draw_(out, 5, 0, 0).clone()
    d.bind(5, 200)
    other = LowRank({0: (12, 10)}, rank=2, orthonormal=True)
    other.bind(5, 200)
    again = d.draw_(out, 5, 0, 0)
    assert not torch.equal(first, again)
    assert torch.equal(again, other.draw_(torch.empty(120), 5, 0, 0))
    for s in range(10):  # (the kept L's are bounded)
        d.bind(s, 200)
        d.draw_(out, s, 0, 0)
    assert len(d._lefts) == d.LEFT_SEEDS
    u, _ = d.factors(9, 0)
    u.zero_()  # (factors are copies: the kept L is untouched)
    assert torch.equal(d.draw_(torch.empty(120), 9, 0, 0), other_draw(9))


def other_draw(seed: int) -> torch.Tensor:
    d = LowRank({0: (12, 10)}, rank=2, orthonormal=True)
    d.bind(seed, 200)
    return d.draw_(torch.empty(120), seed, 0, 0)


def test_v_is_kept_for_interval_steps_and_u_is_fresh():
    model, x, y = problem()
    opt = build("lozo", model.parameters(), lr=1e-3, rank=2, interval=3)
    seen = []
    for _ in range(4):
        opt.step(loss_of(model, x, y))
        seed = derive_seed(0, opt.steps - 1, 0)
        seen.append(opt.direction.factors(seed, 0))
    (u0, v0), (u1, v1), (u2, v2), (u3, v3) = seen
    assert torch.equal(v0, v1) and torch.equal(v1, v2) and not torch.equal(v2, v3)
    assert not torch.equal(u0, u1)


def test_lozo_m_keeps_its_momentum_as_the_low_rank_factor():
    model, x, y = problem()
    opt = build("lozo-m", model.parameters(), lr=1e-3, rank=2)
    opt.step(loss_of(model, x, y))
    numel = {name: p.numel() for name, p in model.named_parameters()}
    state = sum(t.numel() for s in opt.state.values() for t in s.values())
    matrices = 16 * 2 + 16 * 2 + 1 * 1  # m·r per matrix (the head is 1 × 16: r = 1)
    biases = numel["a.bias"] + numel["b.bias"] + numel["head.bias"]
    assert state == matrices + biases


# -- replay, resume, errors, the command line -----------------------------------------------


@pytest.mark.parametrize(
    "method,hp",
    [("lozo", {}), ("lozo-m", {"queries": 2}), ("subzero", {}), ("subzero", {"square": True})],
)
def test_trajectories_replay_bit_for_bit(method, hp, tmp_path):
    model, x, y = problem(1)
    initial = copy.deepcopy(model)
    opt = build(method, model.parameters(), lr=1e-2, interval=3, weight_decay=0.01, **hp)
    for _ in range(7):
        opt.step(loss_of(model, x, y))
    path = opt.trajectory.save(tmp_path / "t.zot")
    assert zotune.replay(initial.parameters(), path) == 7
    for p, q in zip(model.parameters(), initial.parameters()):
        assert torch.equal(p, q), method


@pytest.mark.parametrize("method", ["lozo-m", "subzero"])
def test_resume_from_a_state_dict_is_bit_identical(method):
    hp = dict(lr=1e-2, interval=3, **({"momentum": 0.5} if method == "subzero" else {}))
    model, x, y = problem(9)
    start = copy.deepcopy(model)
    whole = build(method, model.parameters(), **hp)
    for _ in range(7):
        whole.step(loss_of(model, x, y))
    first = build(method, start.parameters(), **hp)
    for _ in range(4):  # (stops mid-span: V was drawn at step 3)
        first.step(loss_of(start, x, y))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(start)
    resumed = build(method, resumed_model.parameters(), **hp)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(3):
        resumed.step(loss_of(resumed_model, x, y))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), method
    assert resumed.trajectory.records == whole.trajectory.records


@pytest.mark.parametrize(
    "method,hp,message",
    [
        ("lozo", {"rank": 0}, "rank must be an integer >= 1, got 0"),
        ("lozo", {"rank": -2}, "rank must be an integer >= 1"),
        ("lozo-m", {"interval": 0}, "interval must be an integer >= 1, got 0"),
        ("lozo-m", {"beta": 1.0}, "beta must be in \\[0, 1\\)"),
        ("subzero", {"rank": 0}, "rank must be an integer >= 1"),
        ("subzero", {"momentum": -0.1}, "momentum must be in \\[0, 1\\)"),
        ("subzero", {"interval": "often"}, "interval must be an integer"),
    ],
)
def test_bad_hyperparameters_are_one_line_errors(method, hp, message):
    model, _, _ = problem()
    with pytest.raises(ValueError, match=message) as err:
        build(method, model.parameters(), **hp)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["lozo", "lozo-m", "subzero"])
def test_zotune_train_end_to_end_and_replay(tiny_model_dir, tmp_path, capsys, method):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--task", "sst2", "--method", method,
            "--peft", "full", "--steps", "4", "--eval-every", "2", "--batch-size", "4",
            "--lr", "1e-3", "--eps", "1e-2", "--num-train", "12", "--num-dev", "8",
            "--num-test", "8", "--set", "interval=3", "--save-weights", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["forward_passes"] == 8
    assert main(["replay", str(out), "--out", str(tmp_path / "w"), "--keep", "final"]) == 0
    saved = load_file(str(out / "weights.safetensors"))
    assert main(["replay", str(out), "--out", str(tmp_path / "b")]) == 0
    rebuilt = load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert saved.keys() == rebuilt.keys() and all(torch.equal(saved[k], rebuilt[k]) for k in saved)


def test_zotune_train_rejects_a_bad_rank_in_one_line(tiny_model_dir, tmp_path, capsys):
    args = ["train", "--model", tiny_model_dir, "--task", "sst2", "--method", "lozo",
            "--steps", "2", "--set", "rank=0", "--out", str(tmp_path / "x"), "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "rank must be an integer >= 1" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
