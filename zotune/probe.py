"""Linear probing (MeZO's LP baseline): logistic regression on frozen features.

Features: the last layer's hidden state at the prompt's last token (decoders) or the first
token (encoders); for a classifier's own head (`fit_head`, the LP step of LP-then-ZO), exactly
what its final linear layer consumes (BERT: the dropped-out pooler output). The head is fit by
full-batch L-BFGS on the training set, with the L2 strength chosen on dev from a small grid; the
model itself never changes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .tasks.base import Example

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def features(
    loaded: Any, examples: Sequence[Example], batch_size: int = 16, max_length: int = 256
) -> torch.Tensor:
    model, tok = loaded.model, loaded.tokenizer
    causal = loaded.kind == "causal"
    tok.padding_side = "left" if causal else "right"
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        texts = [ex.prompt if causal else ex.texts[0] for ex in chunk]
        pairs = [ex.texts[1] if len(ex.texts) > 1 else None for ex in chunk]
        kw = dict(return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        enc = tok(texts, **kw) if causal or None in pairs else tok(texts, pairs, **kw)
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
        out.append((hidden[:, -1] if causal else hidden[:, 0]).float().cpu())
    return torch.cat(out)


def classifier_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that produces a sequence classifier's logits: the last `Linear` with
    `num_labels` outputs (BERT's `classifier`, RoBERTa's `classifier.out_proj`...)."""
    labels = getattr(model.config, "num_labels", None)
    heads = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m.out_features == labels and m.bias is not None
    ]
    if not heads:
        raise ValueError(f"found no linear layer with {labels} outputs and a bias to fit")
    return heads[-1]


@torch.no_grad()
def head_inputs(
    loaded: Any, examples: Sequence[Example], batch_size: int = 16, max_length: int = 256
) -> torch.Tensor:
    """(N, in_features) float32: what the classifier's head receives for each example, taken by
    a forward hook on the head while the model runs as training runs it (its objective's
    tokenization, eval mode)."""
    from .objectives import ClassifierObjective

    objective = ClassifierObjective(loaded, "classification", max_length=max_length)
    head = classifier_head(loaded.model)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        for i in range(0, len(examples), batch_size):
            objective.logits(examples[i : i + batch_size])
    finally:
        hook.remove()
        loaded.model.train(was_training)
    if any(x.dim() != 2 for x in seen):
        raise ValueError("the classification head takes one vector per sequence only")
    return torch.cat([x.float().cpu() for x in seen])


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> torch.nn.Linear:
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head


def _accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (head(x).argmax(1) == y).float().mean().item() if len(y) else 0.0


def _select(
    xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], classes: int
) -> tuple[dict[str, Any], torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """Standardize with the training statistics (xs[0]), fit one head per L2 strength, keep the
    best on dev (xs[1]; the first on ties). Returns (scores per split, head on standardized
    features, mean, std)."""
    mean, std = xs[0].mean(0), xs[0].std(0) + 1e-6
    zs = [(x - mean) / std for x in xs]
    best, best_head = None, None
    for l2 in L2_GRID:
        head = _fit(zs[0], ys[0], classes, l2)
        acc = [_accuracy(head, z, y) for z, y in zip(zs, ys)]
        if best is None or acc[1] > best["dev"]["accuracy"]:
            names = ("train", "dev", "test")
            best = {"l2": l2, **{n: {"accuracy": a} for n, a in zip(names, acc)}}
            best_head = head
    return best, best_head, mean, std


def _labels(split: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([ex.label for ex in split])


def linear_probe(
    loaded: Any,
    train: Sequence[Example],
    dev: Sequence[Example],
    test: Sequence[Example],
    classes: int,
    batch_size: int = 16,
    max_length: int = 256,
) -> dict[str, Any]:
    """Fit on train, choose L2 on dev, report dev and test accuracy. A classifier is probed on
    what its own head receives (BERT: the pooler's output), the features `fit_head` fits, so
    this baseline is the starting point of LP-then-ZO runs; a decoder on its last token's
    final hidden state."""
    if not all(ex.label >= 0 for ex in [*train, *dev]):
        raise ValueError("linear probing needs a classification task")
    splits = (train, dev, test)
    if loaded.kind == "classifier":
        xs = [_cached_head_inputs(loaded, s, batch_size, max_length) for s in splits]
    else:
        xs = [features(loaded, s, batch_size, max_length) for s in splits]
    best, *_ = _select(xs, [_labels(s) for s in splits], classes)
    return best


def _cached_head_inputs(
    loaded: Any, examples: Sequence[Example], batch_size: int, max_length: int
) -> torch.Tensor:
    """`head_inputs`, kept in the cache (`ZOTUNE_CACHE`, default ~/.cache/zotune; `off` keeps
    nothing): a grid of LP-then-ZO runs on one task computes the frozen encoder's features once.
    The key covers the weights below the head, the examples and the truncation length."""
    root = os.environ.get("ZOTUNE_CACHE", "")
    if root.strip().lower() == "off":
        return head_inputs(loaded, examples, batch_size, max_length)
    head = classifier_head(loaded.model)
    h = hashlib.sha256(f"{max_length}|{loaded.model.__class__.__name__}".encode())
    for p in loaded.model.parameters():
        if p is not head.weight and p is not head.bias:
            h.update(p.detach().float().cpu().numpy().tobytes())
    for ex in examples:
        h.update(repr((ex.texts, ex.label)).encode())
    path = Path(root or Path.home() / ".cache" / "zotune") / "probe" / f"{h.hexdigest()[:24]}.pt"
    if path.exists():
        return torch.load(path)
    x = head_inputs(loaded, examples, batch_size, max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(x, tmp)
    os.replace(tmp, path)
    return x


def fit_head(
    loaded: Any,
    train: Sequence[Example],
    dev: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 256,
) -> dict[str, Any]:
    """Linear probing into a classifier's own head (the LP of LP-then-ZO): logistic regression on
    the head's inputs over `train`, L2 chosen on `dev`, the standardization folded into the
    weights (W' = W/std, b' = b - W·mean/std) and copied into the head. Deterministic: the same
    model and examples give the same head. Returns the probe's l2 and train/dev accuracy."""
    if not train or not all(ex.label >= 0 for ex in [*train, *dev]):
        raise ValueError("a linear-probe head needs a classification task with training examples")
    head = classifier_head(loaded.model)
    xs = [_cached_head_inputs(loaded, s, batch_size, max_length) for s in (train, dev)]
    best, fit, mean, std = _select(xs, [_labels(train), _labels(dev)], head.out_features)
    w = fit.weight.detach().double() / std.double()
    b = fit.bias.detach().double() - w @ mean.double()
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype))
        head.bias.copy_(b.to(head.bias.dtype))
    return best
