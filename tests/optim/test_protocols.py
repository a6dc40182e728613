"""The seeds' own protocols as options: ZO-Bench's AdamW fallback for Sign and Cons, MeZO-SVRG's
learning-rate annealing, FO baselines clipped as the HF Trainer does, R-MeZO's mask interval."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zotune
from zotune.engine.directions import derive_seed
from zotune.optim import build
from zotune.testing import reference_z


def hf_adamw(p, grad, state, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
    """Hugging Face's transformers.AdamW step (correct_bias=True), written out."""
    state["t"] = state.get("t", 0) + 1
    m = state.setdefault("m", torch.zeros_like(p)).mul_(b1).add_(grad, alpha=1 - b1)
    v = state.setdefault("v", torch.zeros_like(p)).mul_(b2).addcmul_(grad, grad, value=1 - b2)
    size = lr * (1 - b2 ** state["t"]) ** 0.5 / (1 - b1 ** state["t"])
    p = p - size * m / (v.sqrt() + eps)
    return p - lr * wd * p


def problem():
    torch.manual_seed(0)
    target, scale = torch.randn(20), torch.rand(20) + 0.5
    return torch.randn(20), lambda w: float((scale * (w - target) ** 2).sum())


def spsa(f, w, seed, eps):
    z = reference_z(w.shape, seed, 0)
    return (f(w + eps * z) - f(w - eps * z)) / (2 * eps), z


def test_zo_sgd_sign_official_adamw_is_hf_adamw_on_sign_g_times_z():
    w0, f = problem()
    w = nn.Parameter(w0.clone())
    lr, eps, wd = 1e-2, 1e-3, 0.1
    opt = build("zo-sgd-sign", [w], lr=lr, eps=eps, weight_decay=wd, official="adamw")
    ref, state = w0.clone(), {}
    for t in range(4):
        opt.step(lambda: f(w.detach()))
        g, z = spsa(f, ref, derive_seed(0, t, 0), eps)
        ref = hf_adamw(ref, (1.0 if g > 0 else -1.0) * z, state, lr, wd)
    assert torch.allclose(w.detach(), ref, atol=1e-6)
    assert set(opt.state[w]) == {"exp_avg", "exp_avg_sq"}


def test_zo_sgd_cons_official_adamw_takes_the_official_moves():
    w0, f = problem()
    w = nn.Parameter(w0.clone())
    lr, eps = 5e-2, 1e-3
    opt = build("zo-sgd-cons", [w], lr=lr, eps=eps, official="adamw")
    ref, state, moves = w0.clone(), {}, []
    for t in range(6):
        opt.step(lambda: f(w.detach()))
        base = f(ref)
        g, z = spsa(f, ref, derive_seed(0, t, 0), eps)
        ref = hf_adamw(ref, g * z, state, lr)
        first = f(ref)
        ref = hf_adamw(ref, -2 * g * z, state, lr)
        second = f(ref)
        step = [1.0, -2.0]
        if first > base and base < second:
            ref = hf_adamw(ref, g * z, state, lr)
            step.append(1.0)
        elif first <= base and first < second:
            ref = hf_adamw(ref, 2 * g * z, state, lr)
            step.append(2.0)
        moves.append(step)
    assert torch.allclose(w.detach(), ref, atol=1e-5)
    assert [r["moves"] for r in opt.trajectory.records] == moves
    assert {len(m) for m in moves} == {2, 3}  # both kinds of step happened
    assert opt.adam_steps == state["t"]


@pytest.mark.parametrize("method", ["zo-sgd-sign", "zo-sgd-cons"])
def test_official_adamw_variants_replay_and_resume_bit_for_bit(method, tmp_path):
    w0, f = problem()
    w = nn.Parameter(w0.clone())
    opt = build(method, [w], lr=5e-2, eps=1e-3, official="adamw")
    for t in range(6):
        opt.step(lambda: f(w.detach()))
        if t == 2:
            state, at_3 = copy.deepcopy(opt.state_dict()), w.detach().clone()
    replayed = w0.clone()
    zotune.replay([replayed], opt.trajectory.save(tmp_path / "t.zot"))
    assert torch.equal(replayed, w.detach())
    r = nn.Parameter(at_3)
    again = build(method, [r], lr=5e-2, eps=1e-3, official="adamw")
    again.load_state_dict(state)
    for _ in range(3):
        again.step(lambda: f(r.detach()))
    assert torch.equal(r, w)


def test_official_values_are_checked():
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="official must be one of false, true, adamw"):
        build("zo-sgd-sign", [w], official="adam")
    with pytest.raises(ValueError, match="official must be one of false, adamw"):
        build("zo-sgd-cons", [w], official=True)


def test_mezo_svrg_anneals_its_learning_rates_as_the_released_scripts(tmp_path):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(10))
    w0 = w.detach().clone()
    calls = [0]

    def rising():  # a loss that keeps growing: the heuristic must anneal
        calls[0] += 1
        return float((w.detach() ** 2).sum()) + 0.05 * calls[0]

    opt = build("mezo-svrg", [w], lr=1e-4, lr_full=1e-3, refresh=2, anneal=3, anneal_every=2)
    opt.full_closure = rising
    for _ in range(40):
        opt.step(rising)
    mini = [r["lr"][0] for r in opt.trajectory.records if r["kind"] == "mini"]
    full = [r["lr"][0] for r in opt.trajectory.records if r["kind"] == "full"]
    assert mini[:4] == [1e-4] * 4 and full[:5] == [1e-3] * 5  # nothing before 4n minibatches
    assert mini[-1] == pytest.approx(1e-6) and full[-1] == pytest.approx(1e-5)  # the floors
    assert 1e-4 / 3 in mini and 1e-3 / 3 in full  # one factor at a time
    replayed = w0.clone()
    zotune.replay([replayed], opt.trajectory.save(tmp_path / "t.zot"))
    assert torch.equal(replayed, w.detach())
    plain = build("mezo-svrg", [nn.Parameter(w0.clone())], lr=1e-4, lr_full=1e-3)
    assert "anneal" not in plain.config  # off by default
    with pytest.raises(ValueError, match="anneal_every"):
        build("mezo-svrg", [w], anneal=3)


def test_fo_baselines_clip_the_gradient_norm_at_one_as_the_hf_trainer():
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randn(32, 1) * 10  # a large loss: a gradient norm over 1
    for method, cls in [("fo-sgd", torch.optim.SGD), ("fo-adam", torch.optim.Adam)]:
        for clip in (1.0, None):
            model = nn.Linear(8, 1)
            ref = copy.deepcopy(model)
            hp = {} if clip == 1.0 else {"max_grad_norm": clip}  # 1.0 is the default
            opt = build(method, model.parameters(), lr=1e-2, **hp)
            opt.step(lambda m=model: nn.functional.mse_loss(m(x), y))
            ref_opt = cls(ref.parameters(), lr=1e-2)
            nn.functional.mse_loss(ref(x), y).backward()
            norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip or float("inf"))
            assert norm > 1
            ref_opt.step()
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    with pytest.raises(ValueError, match="max_grad_norm"):
        build("fo-sgd", [nn.Parameter(torch.zeros(2))], max_grad_norm=-1)


def test_r_mezo_resamples_its_mask_every_k_steps():
    w = nn.Parameter(torch.randn(400))
    opt = build("r-mezo", [w], lr=0.0, eps=1e-2, sparsity=0.75, resample=3)
    masks = []
    for _ in range(7):
        w0 = w.detach().clone()
        seen = []
        opt.step(lambda w0=w0, seen=seen: seen.append(w.detach() != w0) or float(w.sum()))
        masks.append(seen[0])
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    assert not torch.equal(masks[2], masks[3])
    assert torch.equal(masks[3], masks[5]) and not torch.equal(masks[5], masks[6])
    every = build("r-mezo", [nn.Parameter(torch.randn(400))], lr=0.0, sparsity=0.75)
    assert "resample" not in every.config  # 1, the default: every step, as before
