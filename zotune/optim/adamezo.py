"""AdaMeZO-style ZO-Adam without moment memory (Cai, Chen & Zhu, ICML 2026, arXiv 2605.00650;
official code shawnnn3di/AdaMeZO): Adam-style moments rebuilt at every step from the last W
steps' seeds and projected gradients, which the trajectory holds anyway."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from ..engine.directions import derive_seed
from ..engine.rules import WindowAdam
from .base import ZOOptimizer


class AdaMeZO(ZOOptimizer):
    """Two-sided SPSA (MeZO's estimate, g_t) and the update of the official `zo_update`:

        m_t = Σ_{j<W} β1^j·g_{t−j}·z_{t−j},   v_t = Σ_{j<W} β2^j·g_{t−j}²·z_{t−j}² (element-wise),
        θ ← θ − η(m_t/(√v_t + δ) + λθ),

    over the last W = `window` steps (this one included; fewer at the start). Nothing is kept
    between steps but the trajectory's (seed, g) records: memory is the weights only.
    Defaults are the official README's (W = 10, β1 = 0.7, β2 = 0.9, δ = 1e-5). Differences
    from the official code: it multiplies the step by 100 (here folded into η: our η = 100 ×
    theirs) and takes plain MeZO steps for the first W steps; here the window just starts
    shorter. Unlike ZO-Adam there are no (1 − β) factors and no bias correction (the ratio
    m/√v makes them a constant factor, folded into η).

    Cost per step: 2 forward passes; 2 regenerations in the estimate and W in the update pass
    (W + 2 in all: the cost grows with the window). Every pass runs in the C kernel (the
    update draws the W directions chunk by chunk and sums m and v as the torch code does).
    Needs queries = 1.
    """

    name = "adamezo"
    summary: ClassVar[str] = "ZO-Adam with moments rebuilt from the last W seeds, no moment memory"
    forwards: ClassVar[str] = "2"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-5,
        window: int = 10,
        betas: tuple[float, float] = (0.7, 0.9),
        delta: float = 1e-5,
        **kw: Any,
    ):
        b1, b2 = betas
        if int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window}")
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or delta <= 0:
            raise ValueError(f"betas must be in [0, 1) and delta > 0, got {betas}, {delta}")
        if kw.get("queries", 1) != 1:
            raise ValueError("adamezo uses one query per step")
        config = dict(window=int(window), betas=[b1, b2], delta=delta)
        super().__init__(params, WindowAdam(b1, b2, delta), lr=lr, config=config, **kw)
        self.window = int(window)

    def coefficients(self, record: dict[str, Any]) -> list[tuple[int, float]]:
        """(seed, g) of the last W steps, oldest first, this record's last (the trajectory
        holds the earlier ones: a replay or a resume sees the same window)."""
        past = self.trajectory.records[max(0, self.steps - self.window + 1) : self.steps]
        first = self.steps - len(past)
        out = []
        for k, r in enumerate([*past, record]):
            seed = r["seeds"][0] if "seeds" in r else derive_seed(self.seed, first + k, 0)
            out.append((seed, r["grads"][0]))
        return out
