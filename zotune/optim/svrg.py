"""MeZO-SVRG (Gautam et al., 2024, arXiv 2404.08080), as the paper intends: a stored anchor and
one shared direction for the two minibatch estimates."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from ..engine.estimators import Closure, two_sided
from ..engine.rules import SGD
from .base import ZOOptimizer


class MeZOSVRG(ZOOptimizer):
    """Variance-reduced MeZO.

    Every `refresh` steps (a full-batch step): g_F = SPSA estimate of the full-batch loss at θ
    (`full_closure`, which may loop over the data in chunks), seed s_F; the anchor θ̄ ← θ (a
    real copy); θ ← θ − η₁·g_F·z_F.
    Otherwise (a minibatch step, seed s): with the same z at both points,
        g₁ = SPSA at θ,  g₂ = SPSA at θ̄  (same batch, same z),
        θ ← θ − η₂·[(g₁ − g₂)·z + g_F·z_F].
    The full-batch estimate is kept as (s_F, g_F), not as a dense vector.

    Cost: full-batch step, 2 forward passes over the full set and 4 regenerations; minibatch step,
    4 forward passes and 7 regenerations in 6 passes over the weights (θ stays perturbed while
    θ̄ is evaluated, and the update restores it; the official code needs 5 forwards). Memory:
    one copy of the trainable parameters (θ̄).
    `lr` is η₂ (minibatch), `lr_full` is η₁.

    `anneal` (off by default; the released scripts use 3–5) adds the official scripts'
    learning-rate heuristic, with `anneal_every` = their batches per epoch, n: at the start of
    every n-th step, once more than 4n minibatch losses were seen, if the mean of the last n
    is over 1.05 × the mean of those 3n to 2n back, η₁ ← max(η₁/anneal, 1e-5) and
    η₂ ← max(η₂/anneal, 1e-6) (their floors, which raise a rate that starts below them). The
    rates in force are recorded each step, so a replay follows them (use it with a constant
    schedule: a torch LR scheduler sets η₂ at every step). The official code's
    anchor is not the control variate this class computes (a shallow copy that follows the
    live weights, and independent seeds for the two estimates: a minibatch step there is
    η₂·g_F plus two independent SPSA noise terms); this class keeps the paper's.
    """

    name = "mezo-svrg"
    summary: ClassVar[str] = "MeZO with an SVRG control variate at a stored anchor"
    forwards: ClassVar[str] = "4 (full-batch step: 2)"
    wired: ClassVar[tuple[str, ...]] = ("full_closure",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-6,
        lr_full: float = 1e-5,
        refresh: int = 2,
        anneal: float = 0.0,
        anneal_every: int = 0,
        full_closure: Callable[[], Any] | None = None,
        **kw: Any,
    ):
        if int(refresh) != refresh or refresh < 1:
            raise ValueError(f"refresh must be an integer >= 1, got {refresh}")
        if anneal and (anneal <= 1 or int(anneal_every) != anneal_every or anneal_every < 1):
            raise ValueError(
                f"anneal (a factor > 1) needs anneal_every >= 1 steps, got {anneal}, {anneal_every}"
            )
        if kw.get("queries", 1) != 1 or kw.get("estimator", "two-sided") != "two-sided":
            raise ValueError("mezo-svrg uses one two-sided query per estimate")
        config = dict(lr_full=lr_full, refresh=int(refresh))
        if anneal:
            config.update(anneal=anneal, anneal_every=int(anneal_every))
        super().__init__(params, SGD(), lr=lr, config=config, **kw)
        self.lr_full, self.refresh = lr_full, int(refresh)
        self.anneal, self.anneal_every = anneal, int(anneal_every)
        self.minibatch_losses: list[float] = []  # the last 3n (anneal), and how many in all
        self.minibatch_count = 0
        self.full_closure = full_closure
        self.anchor: list[torch.Tensor] | None = None
        self.full: tuple[int, float] | None = None  # (s_F, g_F) of the last full-batch step

    @classmethod
    def arguments_for(
        cls,
        model: torch.nn.Module,
        *,
        weight_decay: float,
        full_loss: Callable[[], Any] | None,
        options: dict[str, Any],
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        groups, _ = super().arguments_for(
            model, weight_decay=weight_decay, full_loss=full_loss, options=options
        )
        return groups, {"full_closure": full_loss}

    def extra_state(self) -> dict[str, Any]:
        """The anchor θ̄ (the optimizer's own tensors, as torch's state) and (s_F, g_F)."""
        return {
            **super().extra_state(),
            "anchor": self.anchor,
            "full": self.full,
            "lr_full": self.lr_full,
            "minibatch_losses": list(self.minibatch_losses),
            "minibatch_count": self.minibatch_count,
        }

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        super().load_extra_state(extra)
        anchor, full = extra.get("anchor"), extra.get("full")
        if anchor is not None and len(anchor) != len(self.space.tensors):
            raise ValueError(
                f"the saved anchor has {len(anchor)} tensors, not {len(self.space.tensors)}"
            )
        self.anchor = (
            None
            if anchor is None
            else [
                a.to(device=p.device, dtype=p.dtype, copy=True)
                for p, a in zip(self.space.tensors, anchor)
            ]
        )
        self.full = None if full is None else (int(full[0]), float(full[1]))
        self.lr_full = float(extra.get("lr_full", self.lr_full))
        self.minibatch_losses = [float(x) for x in extra.get("minibatch_losses", [])]
        self.minibatch_count = int(extra.get("minibatch_count", 0))

    def _anneal(self) -> None:
        """The official scripts' heuristic (class doc), at the start of a step."""
        n = self.anneal_every
        if not self.anneal or self.steps % n or self.minibatch_count <= 4 * n:
            return
        recent = sum(self.minibatch_losses[-n:]) / n
        earlier = sum(self.minibatch_losses[-3 * n : -2 * n]) / n
        if recent / earlier > 1.05:
            self.lr_full = max(self.lr_full / self.anneal, 1e-5)
            for group in self.param_groups:
                group["lr"] = max(group["lr"] / self.anneal, 1e-6)

    def coefficients(self, record: dict[str, Any]) -> list[tuple[int, float]]:
        (s,) = self.seeds_of(record)
        if record["kind"] == "full":
            return [(s, record["grads"][0])]
        g1, g2 = record["grads"]
        return [(s, g1 - g2), (record["full_seed"], record["full_grad"])]

    def seeds_of(self, record: dict[str, Any]) -> list[int]:
        return record["seeds"] if "seeds" in record else self.step_seeds(1)

    @torch.no_grad()
    def step(self, closure: Closure) -> float:  # type: ignore[override]
        self._anneal()
        seeds = self.step_seeds(1)
        groups = self.param_groups
        self.begin_step()
        if self.steps % self.refresh == 0:
            if self.full_closure is None:
                raise ValueError(
                    "mezo-svrg needs opt.full_closure: the loss over the full training set"
                )
            est = two_sided(self.space, self.full_closure, seeds, self.eps)
            self.space.transition(est.pending, None)
            self.anchor = [p.detach().clone() for p in self.space.tensors]
            self.full = (seeds[0], est.grads[0])
            record = {"kind": "full", "grads": est.grads, "lr": [self.lr_full] * len(groups)}
            self.apply({**record, "wd": [g["weight_decay"] for g in groups]})
            self.forward_passes += est.forward_passes
            return est.loss
        est = two_sided(self.space, closure, seeds, self.eps)
        # θ stays at θ − εz while the anchor is evaluated in the anchor's storage; the update
        # then restores θ in its own pass (one pass over the weights fewer)
        try:
            with self.space.holding(self.anchor):
                at_anchor = two_sided(self.space, closure, seeds, self.eps)
                self.space.transition(at_anchor.pending, None)
        except BaseException:
            self.space.transition(est.pending, None)
            raise
        record = {
            "kind": "mini",
            "grads": [est.grads[0], at_anchor.grads[0]],
            "full_seed": self.full[0],
            "full_grad": self.full[1],
            "lr": [g["lr"] for g in groups],
            "wd": [g["weight_decay"] for g in groups],
        }
        self.apply(record, est.pending)
        self.forward_passes += est.forward_passes + at_anchor.forward_passes
        if self.anneal:
            self.minibatch_count += 1
            self.minibatch_losses = [*self.minibatch_losses, est.loss][-3 * self.anneal_every :]
        return est.loss
