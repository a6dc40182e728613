"""Every method: it learns, one step matches a hand computation, its state is as documented,
its hyperparameters are checked, and it resumes from its state dict bit for bit."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import zotune
from zotune.engine.directions import Gaussian, derive_seed, hash32
from zotune.optim import available, build, build_for, split_top
from zotune.testing import bert_config, llama_config

ZO = ["mezo", "zo-sgd", "zo-sgd-mmt", "zo-sgd-sign", "zo-sgd-cons", "zo-adam", "forward-grad",
      "mezo-svrg", "sparse-mezo", "r-mezo", "zo-blockwise", "hybrid-zo-fo"]  # fmt: skip
LR = {"zo-sgd-sign": 2e-3, "zo-adam": 1e-2, "forward-grad": 2e-2, "fo-sgd": 0.1, "fo-adam": 1e-2,
      "zo-sgd-mmt": 3e-3, "hybrid-zo-fo": 1e-2, "sparse-mezo": 2e-2, "r-mezo": 2e-2}  # fmt: skip


def z_of(shape, seed: int, key: int) -> torch.Tensor:
    """z for one tensor, computed with the torch code path (see test_engine for the law)."""
    g = Gaussian()
    out = torch.empty(torch.Size(shape).numel())
    u = hash32(derive_seed(seed, key), 0, out.numel())
    out = g.table[u >> 20] + ((u & 0xFFFFF).float() * 2.0**-20) * g.delta[u >> 20]
    return out.view(shape)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 16)])
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def problem(seed: int = 0):
    torch.manual_seed(seed)
    model = Net()
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) * 0.5
    return model, x, y


def make(method: str, model: nn.Module, x, y, **hp):
    hp.setdefault("lr", LR.get(method, 5e-3))
    if not method.startswith("fo-"):
        hp.setdefault("eps", 1e-3)
    if method == "hybrid-zo-fo":
        hp.setdefault("fo_lr", 5e-2)
    if method == "mezo-svrg":
        hp.setdefault("lr_full", hp["lr"] * 2)
    return build_for(model, method, full_loss=lambda: nn.functional.mse_loss(model(x), y), **hp)


def closure_for(method, opt, model, x, y):
    """The same closure for every method: it returns the loss (FO methods backpropagate it)."""

    def loss():
        return nn.functional.mse_loss(model(x), y)

    return loss


def keys_of(opt, model) -> list[int]:
    """The optimizer's key (position in its tensor list) of each of `model.parameters()`."""
    index = {id(t): k for k, t in enumerate(opt.space.tensors)}
    return [index[id(p)] for p in model.parameters()]


@pytest.mark.parametrize("method", [*ZO, "fo-sgd", "fo-adam"])
def test_every_method_reduces_the_loss(method):
    model, x, y = problem()
    start = nn.functional.mse_loss(model(x), y).item()
    opt = make(
        method, model, x, y, **({"sparsity": 0.5} if method in ("sparse-mezo", "r-mezo") else {})
    )
    closure = closure_for(method, opt, model, x, y)
    for _ in range(150 if method.startswith("fo-") else 400):
        opt.step(closure)
    with torch.no_grad():
        end = nn.functional.mse_loss(model(x), y).item()
    assert end < 0.7 * start, f"{method}: {start:.4f} -> {end:.4f}"


@pytest.mark.parametrize("method", ["mezo", "zo-sgd-mmt", "zo-sgd-sign", "zo-adam", "mezo-svrg", "sparse-mezo", "r-mezo", "zo-blockwise", "zo-sgd-cons", "forward-grad"])  # fmt: skip
def test_trajectories_replay_bit_for_bit(method, tmp_path):
    model, x, y = problem(1)
    initial = copy.deepcopy(model)
    opt = make(method, model, x, y)
    closure = closure_for(method, opt, model, x, y)
    for _ in range(7):
        opt.step(closure)
    path = opt.trajectory.save(tmp_path / "t.zot")
    zotune.replay(initial, path)
    for p, q in zip(model.parameters(), initial.parameters()):
        assert torch.equal(p, q), method


def one_spsa(model, x, y, seed, eps, params, keys):
    """A hand-computed two-sided SPSA scalar at the model's current weights."""
    zs = [z_of(p.shape, seed, k) for k, p in zip(keys, params)]
    with torch.no_grad():
        for p, z in zip(params, zs):
            p.add_(eps * z)
        plus = nn.functional.mse_loss(model(x), y).item()
        for p, z in zip(params, zs):
            p.sub_(2 * eps * z)
        minus = nn.functional.mse_loss(model(x), y).item()
        for p, z in zip(params, zs):
            p.add_(eps * z)
    return (plus - minus) / (2 * eps), zs


@pytest.mark.parametrize("method", ["zo-sgd-mmt", "zo-sgd-sign", "zo-adam"])
def test_one_step_matches_hand_computation(method):
    model, x, y = problem(2)
    ref = copy.deepcopy(model)
    lr, eps = 1e-2, 1e-3
    opt = make(method, model, x, y, lr=lr, eps=eps)
    for _ in range(2):
        opt.step(closure_for(method, opt, model, x, y))
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(2):
        g, zs = one_spsa(ref, x, y, derive_seed(0, t, 0), eps, params, keys_of(opt, model))
        with torch.no_grad():
            for i, (p, z) in enumerate(zip(params, zs)):
                est = g * z
                if method == "zo-sgd-mmt":
                    m[i] = 0.9 * m[i] + est
                    p.sub_(lr * m[i])
                elif method == "zo-sgd-sign":
                    p.sub_(lr * est.sign())
                else:
                    m[i] = 0.9 * m[i] + 0.1 * est
                    v[i] = 0.999 * v[i] + 0.001 * est**2
                    mh, vh = m[i] / (1 - 0.9 ** (t + 1)), v[i] / (1 - 0.999 ** (t + 1))
                    p.sub_(lr * mh / (vh.sqrt() + 1e-8))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-4, rtol=1e-3), method


def test_state_memory_is_as_documented():
    model, x, y = problem()
    n = sum(p.numel() for p in model.parameters())
    for method, buffers in [("mezo", 0), ("zo-sgd-sign", 0), ("zo-sgd-mmt", 1), ("zo-adam", 2)]:
        opt = make(method, model, x, y)
        opt.step(closure_for(method, opt, model, x, y))
        numel = sum(t.numel() for s in opt.state.values() for t in s.values())
        assert numel == buffers * n, method


def test_fo_baselines_match_torch_optim():
    for method, cls, kw in [("fo-sgd", torch.optim.SGD, {}), ("fo-adam", torch.optim.Adam, {})]:
        model, x, y = problem(3)
        ref = copy.deepcopy(model)
        opt = make(method, model, x, y, lr=1e-2, max_grad_norm=None)  # (clipping: test_protocols)
        opt.step(closure_for(method, opt, model, x, y))
        ref_opt = cls(ref.parameters(), lr=1e-2, **kw)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)


def test_conservative_keeps_the_best_of_three_points():
    model, x, y = problem(4)
    opt = make("zo-sgd-cons", model, x, y, lr=5.0)  # a huge step: plain SGD would blow up
    loss = closure_for("zo-sgd-cons", opt, model, x, y)
    before = loss().item()
    for _ in range(5):
        opt.step(loss)
        with torch.no_grad():
            assert loss().item() <= before + 1e-6
            before = loss().item()
    assert opt.forward_passes == 25


def test_forward_grad_equals_autograd_directional_derivative():
    model, x, y = problem(5)
    opt = make("forward-grad", model, x, y, lr=0.0)
    seed = derive_seed(0, 0, 0)
    params = list(model.parameters())
    loss = nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, params)
    keys = keys_of(opt, model)
    expected = sum((g * z_of(p.shape, seed, k)).sum() for k, g, p in zip(keys, grads, params))
    opt.step(closure_for("forward-grad", opt, model, x, y))
    assert opt.trajectory.records[0]["grads"][0] == pytest.approx(expected.item(), rel=1e-4)
    assert opt.forward_passes == 1


def test_svrg_anchor_is_a_real_copy_and_one_seed_serves_both_points():
    model, x, y = problem(6)
    opt = make("mezo-svrg", model, x, y, refresh=3)
    calls = []
    real = opt.full_closure
    opt.full_closure = lambda: real()

    def closure():
        calls.append([p.detach().clone() for p in opt.space.tensors])
        return nn.functional.mse_loss(model(x), y)

    opt.step(closure)  # full-batch step: anchor taken
    anchor = [a.clone() for a in opt.anchor]
    opt.step(closure)  # minibatch step: 4 forwards
    assert all(torch.equal(a, b) for a, b in zip(opt.anchor, anchor))  # θ moved, θ̄ did not
    assert any(not torch.equal(p, a) for p, a in zip(opt.space.tensors, opt.anchor))
    assert len(calls) == 4
    # Forwards 1, 2 at θ ± εz and 3, 4 at θ̄ ± εz: the same z, so the offsets are equal.
    for k in range(len(anchor)):
        d_theta = calls[0][k] - calls[1][k]
        d_anchor = calls[2][k] - calls[3][k]
        assert torch.allclose(d_theta, d_anchor, atol=1e-6)
        assert torch.allclose(calls[2][k] + calls[3][k], 2 * anchor[k], atol=1e-6)
    record = opt.trajectory.records[1]
    assert record["kind"] == "mini" and len(record["grads"]) == 2


def test_sparse_mezo_perturbs_exactly_the_intended_fraction():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(100, 50))
    b = nn.Parameter(torch.randn(1000))
    opt = build("sparse-mezo", [w, b], lr=1e-2, eps=1e-3, sparsity=0.8)
    before = [w.detach().clone(), b.detach().clone()]
    seen = []

    def closure():
        seen.append(
            [(w != before[0]).float().mean().item(), (b != before[1]).float().mean().item()]
        )
        return (w**2).sum() + (b**3).sum()

    opt.step(closure)
    for fractions in seen:
        for f in fractions:
            assert abs(f - 0.2) < 0.002  # each layer: exactly its 20% smallest |w| move
    for t, t0 in zip((w, b), before):
        small = t0.abs() <= t0.abs().flatten().kthvalue(round(0.2 * t0.numel())).values
        assert torch.equal(t[~small], t0[~small])  # masked weights bit-identical
        assert (t[small] != t0[small]).float().mean() > 0.9
    assert opt.space.at_rest()  # nothing mask-sized outlives the step


def test_random_mask_keeps_its_ratio_and_changes_per_step():
    w = nn.Parameter(torch.randn(300, 40))
    opt = build("r-mezo", [w], lr=0.0, eps=1e-2, sparsity=0.75)
    masks = []

    def closure():
        masks.append((w != w0).clone())
        return w.sum()

    for _ in range(2):
        w0 = w.detach().clone()
        opt.step(closure)
    n = w.numel()
    assert abs(masks[0].sum().item() - 0.25 * n) < 5 * (n * 0.25 * 0.75) ** 0.5  # Bernoulli(1/4)
    assert torch.equal(masks[0], masks[1])  # both sides of a step share the mask
    assert not torch.equal(masks[0], masks[2])


def test_blockwise_uses_distinct_seeds_and_perturbs_one_block_at_a_time():
    model, x, y = problem(7)
    opt = make("zo-blockwise", model, x, y)
    groups = opt.param_groups
    snapshots = []

    def closure():
        snapshots.append([p.detach().clone() for p in model.parameters()])
        return nn.functional.mse_loss(model(x), y)

    opt.step(closure)
    assert len(snapshots) == 2 * len(groups) == 6
    seeds = {opt.block_seed(b) for b in range(len(groups))}
    assert len(seeds) == len(groups)
    for b in range(len(groups)):
        plus, minus = snapshots[2 * b], snapshots[2 * b + 1]
        differs = {i for i, (u, v) in enumerate(zip(plus, minus)) if not torch.equal(u, v)}
        block = {id(p) for p in groups[b]["params"]}
        assert differs == {i for i, p in enumerate(model.parameters()) if id(p) in block}


def test_hybrid_backprops_only_through_the_top():
    model, x, y = problem(8)
    lower, top = split_top(model, 1)
    assert {id(p) for p in top} == {
        id(p) for p in [*model.layers[1].parameters(), *model.head.parameters()]
    }
    opt = make("hybrid-zo-fo", model, x, y)
    opt.step(closure_for("hybrid-zo-fo", opt, model, x, y))
    assert all(not p.requires_grad for p in lower) and all(p.grad is None for p in lower)
    assert opt.forward_passes == 3


def test_bad_method_hyperparameters():
    p = [nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match="sparsity"):
        build("sparse-mezo", p, sparsity=1.5)
    with pytest.raises(ValueError, match="momentum"):
        build("zo-sgd-mmt", p, momentum=1.0)
    with pytest.raises(ValueError, match="full_closure"):
        build("mezo-svrg", p).step(lambda: p[0].sum())
    with pytest.raises(ValueError, match="model"):
        build("forward-grad", p).step(lambda: p[0].sum())


def test_unknown_hyperparameters_are_errors_that_list_the_valid_ones():
    p = [nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError) as e:
        build("mezo", p, momentum=0.9)  # a momentum MeZO does not have: not silently ignored
    assert str(e.value) == (
        "unknown hyperparameter 'momentum' for mezo: valid ones are lr, eps, weight_decay, "
        "queries, estimator, direction, seed, threads, mask, sparsity"
    )
    with pytest.raises(ValueError, match="'betas' for fo-sgd: valid ones are lr, momentum"):
        build("fo-sgd", p, betas=(0.9, 0.99))
    model, x, y = problem()
    with pytest.raises(ValueError, match="'fo_layer' for hybrid-zo-fo: valid ones are .*fo_layers"):
        build_for(model, "hybrid-zo-fo", fo_layer=1)
    with pytest.raises(ValueError, match="unknown hyperparameter 'model' for forward-grad"):
        build_for(model, "forward-grad", model=model)  # build_for passes the model itself
    with pytest.raises(TypeError):
        zotune.optim.MeZO(p, momentum=0.9)  # the classes themselves take no stray keyword


def test_hyperparameters_given_as_text_are_converted_or_rejected():
    p = [nn.Parameter(torch.zeros(4))]
    opt = build("zo-adam", p, lr="1e-3", betas="0.8, 0.99", queries="2", seed="7", threads="none")
    assert (opt.param_groups[0]["lr"], opt.queries, opt.seed) == (1e-3, 2, 7)
    assert opt.config["betas"] == [0.8, 0.99] and opt.config["lr"] == 1e-3
    assert build("mezo-svrg", p, lr_full="1e-5", refresh=3.0).refresh == 3
    assert build("zo-sgd-sign", p, official="true").config["official"] is True
    for bad, message in [
        (dict(lr="fast"), "mezo: lr must be a number, got 'fast'"),
        (dict(queries="2.5"), "mezo: queries must be an integer, got '2.5'"),
        (dict(seed=True), "mezo: seed must be an integer, got True"),
        (dict(estimator=2), "mezo: estimator must be a string, got 2"),
    ]:
        with pytest.raises(ValueError) as e:
            build("mezo", p, **bad)
        assert str(e.value) == message
    with pytest.raises(ValueError, match="betas must be 2 comma-separated values"):
        build("zo-adam", p, betas="0.9")
    with pytest.raises(ValueError, match="official must be one of false, true, adamw, got 'maybe'"):
        build("zo-sgd-sign", p, official="maybe")


def _tiny(kind: str):
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 6))
    if kind == "llama":
        model = LlamaForCausalLM(llama_config(64))
        return model, lambda: model(input_ids=ids, labels=ids).loss
    model = BertForSequenceClassification(bert_config(64, num_labels=2))
    labels = torch.tensor([0, 1])
    return model, lambda: nn.functional.cross_entropy(model(input_ids=ids).logits, labels)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_build_for_every_method_on_a_tiny_model(kind):
    for method in available():
        model, loss = _tiny(kind)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        hp = {} if method.startswith("fo-") else {"eps": 1e-2}
        wd = 0.0 if method == "zo-sgd-cons" else 0.01  # (it compares plain steps)
        opt = build_for(model, method, lr=1e-2, weight_decay=wd, full_loss=loss, **hp)
        assert torch.isfinite(torch.tensor(opt.step(loss))), method
        assert opt.forward_passes > 0, method
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert moved, method
        decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        norms = [p for n, p in model.named_parameters() if "norm" in n.lower() and id(p) in decay]
        assert norms and all(decay[id(p)] == 0.0 for p in norms), method  # no decay on norms
        if isinstance(opt, zotune.optim.ZOOptimizer):
            assert None not in opt.trajectory.names, method  # replay finds tensors by name
        if method == "mezo":  # the embedding-row fast path is on by default
            table = "model.embed_tokens" if kind == "llama" else "bert.embeddings.word_embeddings"
            assert opt.attach(model) == [table]


def _resume_run(method, hp, model, x, y, steps, state=None):
    opt = make(method, model, x, y, **hp)
    if state is not None:
        opt.load_state_dict(state)
    loss = closure_for(method, opt, model, x, y)
    for _ in range(steps):
        opt.step(loss)
    return opt


@pytest.mark.parametrize(
    "method,hp",
    [
        ("mezo", {"weight_decay": 0.1}),
        ("zo-adam", {}),
        ("zo-sgd-mmt", {}),
        ("mezo-svrg", {"refresh": 2}),
        ("sparse-mezo", {"sparsity": 0.5}),
    ],
)
def test_resume_from_a_state_dict_is_bit_identical(method, hp):
    n, m = 3, 4  # (an odd n: MeZO-SVRG resumes between a full-batch step and its minibatch step)
    model, x, y = problem(9)
    start = copy.deepcopy(model)
    whole = _resume_run(method, hp, model, x, y, n + m)

    first = _resume_run(method, hp, start, x, y, n)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors, numbers, lists and dicts
    resumed_model = copy.deepcopy(start)  # the weights at step n
    del first
    resumed = _resume_run(method, hp, resumed_model, x, y, m, state)

    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), method
    assert resumed.trajectory.records == whole.trajectory.records
    assert (resumed.steps, resumed.forward_passes) == (whole.steps, whole.forward_passes)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in whole.param_groups]


def test_a_state_dict_loads_only_into_the_same_method():
    model, x, y = problem()
    state = make("mezo", model, x, y).state_dict()
    with pytest.raises(ValueError, match="mezo's, this optimizer is zo-adam"):
        make("zo-adam", model, x, y).load_state_dict(state)
    state.pop("zotune")
    with pytest.raises(ValueError, match="not a zotune optimizer state dict"):
        make("mezo", model, x, y).load_state_dict(state)
