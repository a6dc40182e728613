"""Recipes: what a run takes, for every setting the user leaves out, from its model's kind.

MeZO's paper protocol (full parameters, lr 1e-6, 20,000 steps and more) does not move a model
in the few hundred steps a first try on a CPU runs, so `zotune train` fills the settings a user
does not give from a recipe that learns visibly within minutes on the built-in models, chosen on
dev, and prints which. `--recipe paper` takes TrainConfig's own defaults (MeZO's protocol)
instead. A recipe's optimizer settings (lr, eps, batch size) belong to its method and scheme:
when the user picks another `--method` or `--peft`, only its sizes (steps, evaluation, data) are
taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str  # one line, printed at the start of a run
    optimizer: dict[str, Any]  # method, peft and what only suits them (lr, eps, batch size...)
    sizes: dict[str, Any]  # steps, evaluation and data sizes


# SmolLM2-135M on SST-2 (the README's demo): prefix tuning chosen on dev over LoRA (lr 5e-4:
# no change in 60 steps; 5e-3: diverged) and prompt tuning (no change in 60 steps).
DECODER = Recipe(
    name="decoder-prefix",
    summary="MeZO prefix tuning, lr 3e-2, eps 0.1, batch 8, 150 steps",
    optimizer=dict(method="mezo", peft="prefix", lr=3e-2, eps=1e-1, batch_size=8),
    sizes=dict(steps=150, eval_every=50, num_train=500, num_dev=100, num_test=200),
)

# MiniLM-L6 on SST-2 (1,000 train, 200 dev rows; lr grid 1e-5, 2e-5, 3e-5, 1e-4 chosen on dev):
# a fresh head barely learns under ZO (51.5 -> 55.5% dev in 500 steps), the linear-probe head
# starts at 76.0%; MeZO on all weights from it reached 78.0% at lr 1e-5 and drifted down or
# diverged above (the fitted head's weights are large). docs/runs.md has the table.
ENCODER = Recipe(
    name="encoder-lp",
    summary="linear-probe head, then MeZO on all weights, lr 1e-5, eps 1e-3, batch 16, 500 steps",
    optimizer=dict(
        method="mezo", peft="full", init_head="linear-probe", lr=1e-5, eps=1e-3, batch_size=16
    ),
    sizes=dict(steps=500, eval_every=100, num_train=1000, num_dev=200, num_test=500),
)

PAPER = Recipe(
    name="paper",
    summary="MeZO's paper protocol: full parameters, lr 1e-6, eps 1e-3, batch 16, 1000 steps",
    optimizer={},
    sizes={},
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (DECODER, ENCODER, PAPER)}
# (masked LMs, prompted through their MLM head, have no recipe chosen yet: MeZO's protocol)
BY_KIND: dict[str, Recipe] = {"causal": DECODER, "classifier": ENCODER}


def names() -> list[str]:
    return ["auto", *RECIPES]


def resolve(values: dict[str, Any], kind_of: Callable[[str, str | None], str]) -> dict[str, Any]:
    """`values` (the settings a user gave) completed from the recipe they name (default auto:
    the one for the model's kind, `kind_of(model, gguf_file)`), its name under "recipe"."""
    name = values.get("recipe", "auto")
    if name == "auto":
        from .train import TrainConfig  # (the default model)

        kind = kind_of(values.get("model", TrainConfig.model), values.get("gguf_file"))
        recipe = BY_KIND.get(kind, PAPER)
    elif name in RECIPES:
        recipe = RECIPES[name]
    else:
        return values  # (TrainConfig.validate names the valid recipes)
    filled = dict(recipe.sizes)
    if not _clash(recipe, values):
        filled.update(recipe.optimizer)
    return {**filled, **values, "recipe": recipe.name}


def _clash(recipe: Recipe, values: dict[str, Any]) -> list[str]:
    """The settings the user chose that the recipe's optimizer settings do not suit."""
    return (
        [k for k in ("method", "peft") if k in values and values[k] != recipe.optimizer.get(k)]
        if recipe.optimizer
        else []
    )


def describe(cfg: Any) -> str:
    """The line a run prints at its start about its recipe."""
    recipe = RECIPES.get(cfg.recipe, PAPER)
    if recipe is PAPER:
        return f"recipe paper: {PAPER.summary}"
    line = f"using recipe {recipe.name} ({recipe.summary}) for what was not set"
    chosen = {"method": cfg.method, "peft": cfg.peft}
    clash = _clash(recipe, chosen)
    if clash:
        k = clash[0]
        line += f"; with --{k} {chosen[k]} only its sizes apply: set --lr and --eps for it"
    return line + "; --recipe paper for MeZO's paper protocol"
