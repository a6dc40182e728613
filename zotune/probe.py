"""Linear probing (MeZO's LP baseline): logistic regression on frozen features.

Features: the last layer's hidden state at the prompt's last token (decoders) or the first
token (encoders). The head is fit by full-batch L-BFGS on the training set, with the L2 strength
chosen on dev from a small grid; the model itself never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def linear_probe(
    loaded: Any,
    train: Sequence[Example],
    dev: Sequence[Example],
    test: Sequence[Example],
    classes: int,
) -> dict[str, Any]:
    """Fit on train, choose L2 on dev, report dev and test accuracy."""
    if not all(ex.label >= 0 for ex in [*train, *dev]):
        raise ValueError("linear probing needs a classification task")
    xs = [features(loaded, split) for split in (train, dev, test)]
    mean, std = xs[0].mean(0), xs[0].std(0) + 1e-6  # standardize with train statistics
    xs = [(x - mean) / std for x in xs]
    ys = [torch.tensor([ex.label for ex in split]) for split in (train, dev, test)]
    best = None
    for l2 in L2_GRID:
        head = _fit(xs[0], ys[0], classes, l2)
        with torch.no_grad():
            acc = [
                (head(x).argmax(1) == y).float().mean().item() if len(y) else 0.0
                for x, y in zip(xs, ys)
            ]
        if best is None or acc[1] > best["dev"]["accuracy"]:
            best = {
                "l2": l2,
                "train": {"accuracy": acc[0]},
                "dev": {"accuracy": acc[1]},
                "test": {"accuracy": acc[2]},
            }
    return best
