"""The zeroth-order optimizer shell: param groups, `step(closure)`, seeds and the trajectory.

A `ZOOptimizer` is a `torch.optim.Optimizer`, so param groups, `state_dict` and the
`torch.optim.lr_scheduler` classes work as users expect. A method is a composition of three parts:
a direction law (directions.py), an estimator (estimators.py) and an update rule (rules.py).
`step` asks the estimator for scalars, writes a trajectory record, then applies the record;
`replay` applies the same records without any forward pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from ..engine.directions import DIRECTIONS, MASK_SALT, MagnitudeMask, RandomMask, derive_seed
from ..engine.estimators import ESTIMATORS, Closure, Estimate
from ..engine.rules import Rule, Update, new_state
from ..engine.space import Offset, ParameterSpace
from ..engine.trajectory import Trajectory
from .groups import param_groups
from .hparams import Hyperparameter


def _check(name: str, value: float, *, positive: bool = False) -> None:
    bad = not math.isfinite(value) or value < 0 or (positive and value == 0)
    if bad:
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {need}, got {value}")


def _row_reader(space: ParameterSpace, index: int):
    """A forward pre-hook that moves the rows an embedding lookup is about to read."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input")
        if isinstance(ids, torch.Tensor):
            space.read_rows(index, ids)

    return hook


class ZOOptimizer(torch.optim.Optimizer):
    """Base class of zeroth-order optimizers (see the subclasses for update rules and costs).

    Args:
        params: parameters or param groups (dicts may set `lr` and `weight_decay`).
        lr: learning rate η (a torch LR scheduler may change it between steps).
        eps: perturbation scale ε.
        weight_decay: λ, applied per group (see `zotune.optim.param_groups` to skip norms/biases).
        queries: q, the number of random directions averaged per step.
        estimator: "two-sided" or "one-sided".
        direction: "gaussian" or "rademacher".
        seed: seeds every step's directions; the same seed and data give the same run.
        threads: worker threads for the perturbation loop (default: up to 2).
        mask: sparse perturbation: "none", "magnitude" (Sparse MeZO: smallest-|θ| entries, per
            tensor thresholds fixed at the start) or "random" (a fresh random mask each step).
        sparsity: fraction of each tensor's entries a mask leaves out (0 <= sparsity < 1).
        config: (for subclasses) their own hyperparameters, recorded in the trajectory's config.

    The hyperparameters a method accepts are its constructor's keywords (`zotune.optim.build`
    rejects any other). `state_dict()` holds everything a resume needs: besides torch's state
    (the rule's buffers) and param groups, the step count, seed, forward passes, the
    trajectory's records and what a method keeps between steps (`extra_state`).
    """

    name = "zo"
    summary: ClassVar[str] = ""  # one line for `zotune methods` (each registered class sets it)
    forwards: ClassVar[str] = ""  # forward passes per step at the defaults, as text
    replayable = True  # a trajectory of this optimizer rebuilds the weights
    backprop = False  # needs a differentiable loss (a backward pass)
    # constructor arguments `build_for` fills from the model (e.g. forward-grad's `model`)
    wired: ClassVar[tuple[str, ...]] = ()
    # options `build_for` alone takes: they choose the param groups (e.g. hybrid's fo_layers)
    model_options: ClassVar[dict[str, Hyperparameter]] = {}

    def __init__(
        self,
        params: Iterable[Any],
        rule: Rule,
        *,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        queries: int = 1,
        estimator: str = "two-sided",
        direction: str = "gaussian",
        seed: int = 0,
        threads: int | None = None,
        mask: str = "none",
        sparsity: float = 0.0,
        config: Mapping[str, Any] | None = None,
    ):
        _check("lr", lr)
        _check("eps", eps, positive=True)
        _check("weight_decay", weight_decay)
        if int(queries) != queries or queries < 1:
            raise ValueError(f"queries must be an integer >= 1, got {queries}")
        if estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator '{estimator}': choose one of {', '.join(ESTIMATORS)}"
            )
        if mask not in ("none", "magnitude", "random"):
            raise ValueError(f"unknown mask '{mask}': choose none, magnitude or random")
        if not (0 <= sparsity < 1) or (mask != "none" and sparsity == 0):
            raise ValueError(f"sparsity must be in (0, 1) with a mask (0 without), got {sparsity}")
        if direction not in DIRECTIONS:
            raise ValueError(
                f"unknown direction '{direction}': choose one of {', '.join(DIRECTIONS)}"
            )
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.rule, self.eps, self.queries, self.seed = rule, eps, int(queries), seed
        self.estimator = estimator
        self.config = dict(
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            queries=int(queries),
            estimator=estimator,
            direction=direction,
            seed=seed,
            mask=mask,
            sparsity=sparsity,
            **(config or {}),
        )
        tensors, self._group_of = [], []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                tensors.append(p)
                self._group_of.append(gi)
        masks = {
            "none": lambda: None,
            "magnitude": lambda: MagnitudeMask(tensors, range(len(tensors)), sparsity),
            "random": lambda: RandomMask(sparsity),
        }
        self.space = ParameterSpace(
            tensors, direction=direction, mask=masks[mask](), threads=threads
        )
        self.steps = 0
        self.forward_passes = 0
        self.trajectory = Trajectory(self.name, self.config, tensors)
        self.trajectory.groups = list(self._group_of)
        self._row_hooks: list[Any] = []

    def attach(
        self, model: torch.nn.Module, embeddings: Iterable[torch.nn.Module] | None = None
    ) -> list[str]:
        """Perturb only the embedding rows each forward pass of `model` reads (a forward
        pre-hook on the embedding sees the token ids). The other rows would be perturbed and
        restored unseen: skipping that changes no loss and no weight, bit for bit, and saves
        two of a step's three draws of z over the table (MiniLM-L6: half its weights).

        `embeddings` defaults to the model's input embedding (`get_input_embeddings()`); pass
        others only if the model reads their weights nowhere but through their lookup (some
        models read a table's `.weight` directly, e.g. DeBERTa's relative positions, which no
        hook can see). An embedding is used when it is a plain `nn.Embedding` lookup (its
        forward not overridden: OPT's positional embedding picks other rows than its argument),
        trained here, not tied to another module (an output layer reads every row), without
        max_norm, and its rows are a multiple of 8 wide. Returns the names of those used."""
        if embeddings is None:
            get = getattr(model, "get_input_embeddings", None)
            embeddings = [get()] if get is not None else []
        wanted = {id(m) for m in embeddings if m is not None}
        tensors = {id(t): i for i, t in enumerate(self.space.tensors)}
        owners: dict[int, int] = {}
        for m in model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        names = []
        for name, m in model.named_modules():
            plain = (
                isinstance(m, torch.nn.Embedding) and type(m).forward is torch.nn.Embedding.forward
            )
            if id(m) not in wanted or not plain or m.max_norm is not None:
                continue
            i = tensors.get(id(m.weight))
            if i is None or owners[id(m.weight)] != 1:
                continue
            if i not in self.space.rows.lazy:  # (attaching twice hooks once)
                if not self.space.lazy_rows(i):
                    continue
                hook = m.register_forward_pre_hook(_row_reader(self.space, i), with_kwargs=True)
                self._row_hooks.append(hook)
            names.append(name)
        return names

    @classmethod
    def arguments_for(
        cls,
        model: torch.nn.Module,
        *,
        weight_decay: float,
        full_loss: Callable[[], Any] | None,
        options: dict[str, Any],
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """What `build_for` gives the constructor for `model`: the param groups and the
        arguments named in `wired`. Default: decay / no-decay groups (`param_groups`)."""
        return param_groups(model, weight_decay), {}

    # -- resume ---------------------------------------------------------------------------
    def spaces(self) -> list[ParameterSpace]:
        """Every parameter space this optimizer moves (block-wise ZO has one per block)."""
        return [self.space]

    def extra_state(self) -> dict[str, Any]:
        """What a method keeps between steps beyond torch's `state` (for `state_dict`)."""
        mask = self.space.mask
        if not isinstance(mask, MagnitudeMask):
            return {}
        return {
            "thresholds": dict(mask.thresholds),
            "ties": dict(mask.ties),
            "follow": sorted(mask.follow),
        }

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        if "thresholds" in extra:  # Sparse MeZO's thresholds (and its tied tensors' state)
            mask = MagnitudeMask([], [], self.config["sparsity"])
            mask.thresholds = {int(k): float(h) for k, h in extra["thresholds"].items()}
            mask.ties = {int(k): int(t) for k, t in extra.get("ties", {}).items()}
            mask.follow = {int(k) for k in extra.get("follow", ())}
            for space in self.spaces():
                space.mask = mask

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus a "zotune" entry: the step count, seed, forward
        passes, trajectory records and the method's extra state (plain tensors, lists, dicts:
        `torch.save` / `torch.load(weights_only=True)` carry it). Like torch's, its tensors are
        the optimizer's own (save or copy it before stepping on)."""
        out = super().state_dict()
        out["zotune"] = {
            "method": self.trajectory.method,
            "steps": self.steps,
            "seed": self.seed,
            "forward_passes": self.forward_passes,
            "records": copy.deepcopy(self.trajectory.records),
            "extra": self.extra_state(),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from `state_dict()` of the same method over the same parameters: the next
        step is the one the saved optimizer would have taken, bit for bit."""
        state_dict = dict(state_dict)
        ours = state_dict.pop("zotune", None)
        if ours is None:
            raise ValueError("not a zotune optimizer state dict (no 'zotune' entry)")
        if ours["method"] != self.trajectory.method:
            raise ValueError(
                f"the state dict is {ours['method']}'s, this optimizer is {self.trajectory.method}"
            )
        super().load_state_dict(state_dict)
        # torch casts state to each parameter's dtype; the rules keep float32 buffers (and the
        # optimizer keeps its own copy, never the caller's tensors)
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, i in zip(params, saved):
            if i in state_dict["state"]:
                self.state[p] = {
                    k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
                    for k, v in state_dict["state"][i].items()
                }
        self.steps, self.seed = int(ours["steps"]), int(ours["seed"])
        self.config["seed"] = self.trajectory.config["seed"] = self.seed
        self.forward_passes = int(ours["forward_passes"])
        self.trajectory.records = copy.deepcopy(list(ours["records"]))
        self.load_extra_state(ours["extra"])

    # -- hooks for subclasses -------------------------------------------------------------
    def estimate(self, closure: Closure, seeds: list[int]) -> Estimate:
        return ESTIMATORS[self.estimator](self.space, closure, seeds, self.eps)

    def coefficients(self, record: dict[str, Any]) -> list[tuple[int, float]]:
        """ĝ = Σ c_k z_k for one record; default: the mean over queries."""
        q = len(record["grads"])
        return [(s, g / q) for s, g in zip(self.seeds_of(record), record["grads"])]

    def seeds_of(self, record: dict[str, Any]) -> list[int]:
        """A record stores seeds only when they are not the default ones derived from the step."""
        return record["seeds"] if "seeds" in record else self.step_seeds(len(record["grads"]))

    # -- the step ---------------------------------------------------------------------------
    def step_seeds(self, queries: int | None = None) -> list[int]:
        return [derive_seed(self.seed, self.steps, k) for k in range(queries or self.queries)]

    @torch.no_grad()
    def step(self, closure: Closure) -> float:  # type: ignore[override]
        """One step: call `closure` (a forward pass returning the loss, no backward) as the
        estimator needs, update the parameters in place, and return the step's loss."""
        if closure is None:
            raise ValueError("zeroth-order optimizers need a closure that returns the loss")
        self.begin_step()
        est = self.estimate(closure, self.step_seeds())
        record = {
            "grads": est.grads,
            "lr": [g["lr"] for g in self.param_groups],
            "wd": [g["weight_decay"] for g in self.param_groups],
        }
        self.apply(record, est.pending)
        self.forward_passes += est.forward_passes
        return est.loss

    def apply(self, record: dict[str, Any], pending: Offset | None = None) -> None:
        """Apply one trajectory record, restoring `pending` in the same pass."""
        if pending is None:  # (a replay: the weights are at this step's θ0)
            self.begin_step()
        else:
            self.space.mask_seed = derive_seed(self.seed, self.mask_step(), MASK_SALT)
        self.space.transition(pending, None, self.update_for(self.coefficients(record), record))
        self.trajectory.append(record)
        self.steps += 1

    def mask_step(self) -> int:
        """The step whose seed draws this step's random mask (R-MeZO may keep one a while)."""
        return self.steps

    def begin_step(self) -> None:
        """Before a step's first move, at θ0: set the step's mask seed in every space and let
        a magnitude mask re-threshold the tensors that started tied (`MagnitudeMask.refresh`).
        A pure function of the step and θ0: calling it again at the same point changes
        nothing."""
        mask = self.space.mask
        if isinstance(mask, MagnitudeMask):
            mask.refresh(self.space.tensors, self.space.keys)
        for space in self.spaces():
            space.mask_seed = derive_seed(self.seed, self.mask_step(), MASK_SALT)

    def update_for(self, coeffs: list[tuple[int, float]], record: dict[str, Any]) -> Update | None:
        """The engine update of this optimizer's rule for ĝ = Σ c_k z_k (None if no coefficient)."""
        if not coeffs:
            return None
        states: list[dict[str, torch.Tensor]] = []
        if self.rule.buffers:  # create state up front: blocks run on threads
            for p in self.space.tensors:
                if p not in self.state:
                    self.state[p] = new_state(self.rule, p)
            states = [self.state[p] for p in self.space.tensors]
        return Update(
            rule=self.rule,
            coeffs=tuple(coeffs),
            step=self.steps,
            lr=tuple(record["lr"]),
            weight_decay=tuple(record["wd"]),
            group_of=self._group_of,
            states=states,
        )

    @property
    def regenerations(self) -> float:
        """Full passes of z drawn so far (MeZO: 3 per step)."""
        return self.space.regenerations
