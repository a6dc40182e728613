"""Bugs found in review of the methods, each with the test that failed before its fix."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zotune
from zotune.cli import main
from zotune.engine.directions import Gaussian
from zotune.optim import build

ROOT = Path(__file__).parents[2]


def test_documented_gaussian_cut_off_and_fourth_moment_are_the_measured_ones():
    table = Gaussian().table.double()
    a, b = table[:-1], table[1:]
    fourth = float(((b**5 - a**5) / (5 * (b - a))).mean())  # exact, per linear cell
    cut = f"±{float(table[-1]):.3f}"
    for text in ((ROOT / "docs/engine.md").read_text(), zotune.engine.directions.__doc__):
        assert cut in text and f"{fourth:.4f}" in text
        assert not re.search(r"±3\.9[;,) ]", text)


def test_zo_sgd_cons_refuses_two_learning_rates_before_moving_the_weights():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    before = [a.detach().clone(), b.detach().clone()]
    opt = build("zo-sgd-cons", [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-2}])
    with pytest.raises(ValueError, match="one learning rate"):
        opt.step(lambda: float((a**2).sum() + (b**2).sum()))
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and opt.space.at_rest()


def test_hybrid_zo_fo_saves_its_zeroth_order_layers_too(tiny_model_dir, tmp_path):
    """Hybrid ZO-FO turns off requires_grad on the ZO part: --save-weights kept only the FO
    top, and the run is not replayable, so the ZO-trained layers were lost."""
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--method", "hybrid-zo-fo", "--peft", "full"]
    args += ["--steps", "2", "--eval-every", "2", "--num-train", "16", "--num-dev", "8"]
    args += ["--num-test", "8", "--lr", "1e-2", "--save-weights", "--keep", "final"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    saved = load_file(str(out / "weights.safetensors"))
    assert any(".layers.0." in name for name in saved)  # the lower, zeroth-order part
    assert any("lm_head" in name or ".layers.1." in name for name in saved)  # the FO top


def test_blockwise_blocks_are_layers_whatever_the_weight_decay(tmp_path):
    """layer_groups splits a layer into decayed and undecayed groups; each group was a block,
    so weight decay changed the method (5 blocks at wd 0, 9 at wd 0.1) and its forward passes."""
    from transformers import LlamaForCausalLM

    from zotune.optim import build_for, replay
    from zotune.testing import llama_config

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(50, num_hidden_layers=3)).eval()
    ids = torch.randint(0, 50, (2, 6))
    runs = {}
    for wd in (0.0, 0.1):
        model = LlamaForCausalLM(llama_config(50, num_hidden_layers=3)).eval()
        model.load_state_dict(base.state_dict())
        opt = build_for(model, "zo-blockwise", weight_decay=wd, lr=1e-3, eps=1e-3)
        for _ in range(2):
            opt.step(lambda m=model: m(input_ids=ids, labels=ids).loss)
        runs[wd] = (len(opt.blocks), opt.forward_passes)
        if wd:
            opt.trajectory.name_tensors(model, opt.space.tensors)
            opt.trajectory.save(tmp_path / "run.zot")
            fresh = LlamaForCausalLM(llama_config(50, num_hidden_layers=3)).eval()
            fresh.load_state_dict(base.state_dict())
            replay(fresh, tmp_path / "run.zot")
            assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    assert runs[0.0] == runs[0.1]
    assert runs[0.0][0] == 6  # embeddings, 3 layers, final norm, head


def test_sparse_mezo_keeps_its_fraction_of_tensors_with_tied_values(tmp_path):
    """A zero tensor (LoRA's B) has threshold 0: every entry moved at the first step (|θ| <= 0)
    and none ever again. Ties at the threshold now keep the intended share, every step."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 64) * 0.1)
    b = torch.nn.Parameter(torch.zeros(64, 8))
    initial = [a.detach().clone(), b.detach().clone()]
    opt = build("sparse-mezo", [a, b], lr=1e-3, sparsity=0.8)
    for step in range(6):
        before = [a.detach().clone(), b.detach().clone()]
        opt.step(lambda: a.sum() + 3 * (b**2).sum() + b.sum())
        moved = [(t != t0).float().mean().item() for t, t0 in zip((a, b), before)]
        assert 0.17 < moved[1] < 0.24, (step, moved)  # B: ≈20% (a hashed share of the ties)
        if step == 0:  # (A's fixed threshold then lets its mask drift, as the paper's does)
            assert moved[0] == round(0.2 * a.numel()) / a.numel()
        if step == 2:
            state = copy.deepcopy(opt.state_dict())
            at_3 = [a.detach().clone(), b.detach().clone()]
    assert opt.space.at_rest()
    zotune.replay(initial, opt.trajectory.save(tmp_path / "t.zot"))  # the thresholds follow
    assert torch.equal(initial[0], a) and torch.equal(initial[1], b)
    ra, rb = (torch.nn.Parameter(t) for t in at_3)
    resumed = build("sparse-mezo", [ra, rb], lr=1e-3, sparsity=0.8)
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.step(lambda: ra.sum() + 3 * (rb**2).sum() + rb.sum())
    assert torch.equal(ra, a) and torch.equal(rb, b)
