"""FZOO, HiZOO and AdaMeZO: each against a small plain-torch reference (same seeds, same
directions), replayed bit for bit, resumed bit for bit, and trained end to end."""

from __future__ import annotations

import copy
import io
import json
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zotune
from zotune.cli import main
from zotune.engine import native as _native
from zotune.engine.directions import derive_seed, hash32
from zotune.optim import build
from zotune.testing import reference_z

NEW = ["fzoo", "hizoo", "adamezo"]


def rademacher(n: int, seed: int, key: int) -> torch.Tensor:
    """The rademacher law's z: the hash's top bit as ±1 (engine.md)."""
    return (hash32(derive_seed(seed, key), 0, n) >> 31).float() * 2 - 1


def quadratic(seed: int = 0):
    """Two tensors and a loss with different curvature per coordinate."""
    torch.manual_seed(seed)
    a, b = torch.randn(12), torch.randn(3, 5)
    target = [torch.randn(12), torch.randn(3, 5)]
    scale = [torch.rand(12) * 3 + 0.1, torch.rand(3, 5) + 0.1]

    def loss(ws):
        return sum((s * (w - t) ** 2).sum() for w, t, s in zip(ws, target, scale))

    return [a, b], loss


def test_fzoo_matches_a_plain_torch_reference():
    ws, loss = quadratic()
    ref = [w.clone() for w in ws]
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    lr, eps, n, seed = 1e-2, 1e-3, 4, 3
    opt = build("fzoo", params, lr=lr, eps=eps, queries=n, seed=seed)
    for t in range(5):
        opt.step(lambda: loss(params))
        base = float(loss(ref))
        zs = [[rademacher(w.numel(), derive_seed(seed, t, k), i).view(w.shape)
               for i, w in enumerate(ref)] for k in range(n)]  # fmt: skip
        losses = [float(loss([w + eps * z for w, z in zip(ref, zk)])) for zk in zs]
        sigma = statistics.pstdev(losses)
        for i in range(len(ref)):
            step = sum((lk - base) * zk[i] for lk, zk in zip(losses, zs)) / (n * sigma)
            ref[i] = ref[i] - lr * step
    for p, r in zip(params, ref):
        assert torch.allclose(p, r, atol=1e-5), (p - r).abs().max()
    assert opt.forward_passes == 5 * (n + 1)
    assert ref[0].ne(ws[0]).all()  # it moved


def test_hizoo_matches_a_plain_torch_reference():
    ws, loss = quadratic(1)
    ref = [w.clone() for w in ws]
    hess = [torch.ones_like(w) for w in ws]
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    lr, eps, alpha, seed = 1e-2, 1e-2, 0.3, 5
    opt = build("hizoo", params, lr=lr, eps=eps, smooth=alpha, seed=seed)
    for t in range(4):
        opt.step(lambda: loss(params))
        zs = [reference_z(w.shape, derive_seed(seed, t, 0), i) for i, w in enumerate(ref)]
        base = float(loss(ref))
        plus = float(loss([w + eps * z / h.sqrt() for w, z, h in zip(ref, zs, hess)]))
        minus = float(loss([w - eps * z / h.sqrt() for w, z, h in zip(ref, zs, hess)]))
        g = (plus - minus) / (2 * eps)
        c = abs(plus + minus - 2 * base) / (2 * eps**2)
        for i, z in enumerate(zs):
            hess[i] = (1 - alpha) * hess[i] + alpha * c * hess[i] * z * z
            ref[i] = ref[i] - lr * g * z / hess[i].sqrt()
    for p, r in zip(params, ref):
        assert torch.allclose(p, r, rtol=1e-4, atol=1e-5), (p - r).abs().max()
    for p, h in zip(params, hess):
        assert torch.allclose(opt.state[p]["hessian"], h, rtol=1e-4)
        assert not torch.allclose(h, torch.ones_like(h))  # the estimate moved off its start
    assert opt.forward_passes == 12 and opt.regenerations == pytest.approx(12)


def test_adamezo_matches_a_plain_torch_reference():
    ws, loss = quadratic(2)
    ref = [w.clone() for w in ws]
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    lr, eps, window, (b1, b2), delta, seed = 1e-2, 1e-3, 3, (0.7, 0.9), 1e-5, 7
    opt = build("adamezo", params, lr=lr, eps=eps, window=window, betas=(b1, b2), seed=seed)
    history = []
    for t in range(6):
        opt.step(lambda: loss(params))
        zs = [reference_z(w.shape, derive_seed(seed, t, 0), i) for i, w in enumerate(ref)]
        plus = float(loss([w + eps * z for w, z in zip(ref, zs)]))
        minus = float(loss([w - eps * z for w, z in zip(ref, zs)]))
        history.append(((plus - minus) / (2 * eps), zs))
        recent = history[-window:]
        for i in range(len(ref)):
            m = sum(b1 ** (len(recent) - 1 - j) * g * zs[i] for j, (g, zs) in enumerate(recent))
            v = sum(
                b2 ** (len(recent) - 1 - j) * (g * zs[i]) ** 2 for j, (g, zs) in enumerate(recent)
            )
            ref[i] = ref[i] - lr * m / (v.sqrt() + delta)
    for p, r in zip(params, ref):
        assert torch.allclose(p, r, rtol=1e-4, atol=1e-5), (p - r).abs().max()
    assert opt.state == {}  # no moment memory
    assert opt.regenerations == pytest.approx(2 * 6 + sum(min(t + 1, window) for t in range(6)))


@pytest.mark.parametrize("method", NEW)
def test_new_methods_replay_and_resume_bit_for_bit(method, tmp_path):
    ws, loss = quadratic(4)
    hp = {"lr": 1e-2, "eps": 1e-3, "window": 3} if method == "adamezo" else {"lr": 1e-2}
    if method == "hizoo":
        hp["smooth"] = 0.1
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = build(method, params, **hp)
    for t in range(7):
        opt.step(lambda: loss(params))
        if t == 2:
            state, at_3 = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    replayed = [w.clone() for w in ws]
    zotune.replay(replayed, opt.trajectory.save(tmp_path / "t.zot"))
    assert all(torch.equal(r, p) for r, p in zip(replayed, params))
    resumed = [torch.nn.Parameter(w) for w in at_3]
    again = build(method, resumed, **hp)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(4):
        again.step(lambda: loss(resumed))
    assert all(torch.equal(r, p) for r, p in zip(resumed, params))


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize("method", NEW)
def test_new_methods_move_the_same_bits_with_and_without_the_kernel(method, monkeypatch):
    ws, loss = quadratic(5)
    big = torch.randn(70_000) * 0.02  # more than one torch block
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        params = [torch.nn.Parameter(w.clone()) for w in (*ws, big)]
        hp = {"hizoo": {"smooth": 0.3}, "adamezo": {"window": 3}}.get(method, {})  # (H moves)
        groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}]
        opt = build(method, groups, lr=1e-2, eps=1e-3, **hp)
        for _ in range(4):  # (adamezo: past its window of 3, with a masked one below)
            opt.step(lambda ps=params: loss(ps[:2]) + (ps[2] ** 2).sum())
        runs.append([p.detach().clone() for p in params])
        runs[-1] += [s.clone() for p in params for s in opt.state[p].values()]  # (H)
        moved = opt.space.units_moved
        if native == "0":
            assert moved["kernel"] == 0
        else:  # perturbations and updates alike (fzoo: 8 terms; hizoo: z/√H and H's update;
            # adamezo: the window's moments)
            assert moved["kernel"] > 0 and moved["torch"] == 0
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("method", NEW)
def test_new_methods_train_end_to_end_and_replay(method, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--task", "sst2", "--method", method,
            "--peft", "lora", "--steps", "3", "--eval-every", "3", "--batch-size", "4",
            "--lr", "1e-3", "--eps", "1e-2", "--num-train", "12", "--num-dev", "8",
            "--num-test", "8", "--save-weights", "--keep", "final", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    per_step = {"fzoo": 9, "hizoo": 3, "adamezo": 2}[method]
    assert summary["method"] == method and summary["forward_passes"] == 3 * per_step
    assert main(["replay", str(out), "--out", str(tmp_path / "w"), "--keep", "final"]) == 0
    rebuilt = load_file(str(tmp_path / "w" / "weights.safetensors"))
    saved = load_file(str(out / "weights.safetensors"))
    assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved)


@pytest.mark.parametrize("method,lr", [("fzoo", 3e-3), ("hizoo", 5e-3), ("adamezo", 3e-3)])
def test_new_methods_reduce_the_loss(method, lr):
    from test_methods import make, problem  # (this folder is on pytest's path)

    model, x, y = problem()
    start = torch.nn.functional.mse_loss(model(x), y).item()
    opt = make(method, model, x, y, lr=lr)
    for _ in range(300):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
    with torch.no_grad():
        end = torch.nn.functional.mse_loss(model(x), y).item()
    assert end < 0.3 * start, f"{method}: {start:.4f} -> {end:.4f}"


def test_zotune_methods_lists_every_method_with_its_forwards_and_a_line(capsys):
    from zotune.optim import available

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["method", "forwards/step"]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert set(listed) == set(available())
    for name in available():
        cls = zotune.optim.OPTIMIZERS[name]
        assert cls.summary and cls.forwards, name  # set on the class, read by the CLI
        assert cls.forwards in listed[name] and cls.summary in listed[name]
    docs = (Path(__file__).parents[2] / "docs/methods.md").read_text()
    assert all(f"`{name}`" in docs for name in available())  # and documented


def test_the_stated_forwards_are_what_a_step_costs():
    from test_methods import _tiny

    for name in zotune.optim.available():
        model, loss = _tiny("llama")
        hp = {} if name.startswith("fo-") else {"eps": 1e-2}
        opt = zotune.optim.build_for(model, name, lr=1e-3, full_loss=loss, **hp)
        opt.step(loss)
        if name == "zo-blockwise":
            assert opt.forward_passes == 2 * len(opt.blocks) and opt.forwards == "2 × blocks"
            continue
        assert str(opt.forward_passes) in opt.forwards, (name, opt.forward_passes, opt.forwards)


def test_hizoo_reads_the_hessian_a_state_dict_brings():
    """Loading a state dict gives H new buffers: the kernel's table must read those (it holds
    H's addresses), so going back to step 2 and stepping again repeats the same steps."""
    ws, loss = quadratic(6)
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = build("hizoo", params, lr=1e-2, smooth=0.3)
    for _ in range(2):
        opt.step(lambda: loss(params))
    state, at_2 = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    for _ in range(2):
        opt.step(lambda: loss(params))
    first = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, at_2):
            p.copy_(w)
    opt.load_state_dict(state)
    for _ in range(2):
        opt.step(lambda: loss(params))
    assert all(torch.equal(a, p) for a, p in zip(first, params))
    assert not torch.equal(opt.state[params[0]]["hessian"], torch.ones(12))
