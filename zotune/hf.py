"""Zeroth-order training inside a Hugging Face `Trainer` (and TRL's `SFTTrainer`).

`ZOTrainer` is a `transformers.Trainer` that steps with a zotune method: everything else is the
Trainer's own (TrainingArguments, datasets and collators, evaluation and compute_metrics,
callbacks, report_to, checkpoints and resume, load_best_model_at_end, PEFT models, LR
schedulers). It overrides `create_optimizer` (the zotune optimizer, from `ZOArguments` and the
Trainer's learning rate and weight decay), `training_step` (a forward-only step) and `log` (the
projected gradient in place of a gradient norm that is always 0).

    trainer = ZOTrainer(model=model, args=TrainingArguments(...), zo_args=ZOArguments("mezo"),
                        train_dataset=train, data_collator=collator)
    trainer.train()

A ZO step needs the loss at several points for the same batch, so it runs in `training_step`
once the accumulation window's K micro-batches have arrived (`gradient_accumulation_steps`):
every evaluation of the loss is then the sum of the K micro-batch losses, scaled as the
Trainer scales them for backward, under the same perturbation — one estimate over the K·b
examples, as `zotune train --grad-accum` does. The Trainer's own `optimizer.step()` that
follows finds nothing left to do. Nothing calls backward (hybrid-zo-fo backpropagates its
top layers inside its own step, as in `zotune train`). The model is in train mode, as in any
Trainer step, and every loss of a step sees the same random numbers, so dropout masks are the
same at each perturbation. docs/hf.md lists what is supported and what is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import find_batch_size

from .engine.directions import DIRECTIONS, derive_seed
from .engine.estimators import MicroBatches
from .optim import OPTIMIZERS, ZOOptimizer, build_for, hyperparameters
from .optim.hparams import check

__all__ = ["ZOArguments", "ZOTrainer", "ZOTrainerMixin"]  # and ZOSFTTrainer, made on first use

# Settings that come from TrainingArguments or ZOArguments' own fields, never from `hparams`.
_ELSEWHERE = {
    "lr": "TrainingArguments.learning_rate",
    "weight_decay": "TrainingArguments.weight_decay",
    "eps": "ZOArguments.eps",
    "queries": "ZOArguments.queries",
    "direction": "ZOArguments.direction",
    "seed": "TrainingArguments.seed",
}
_NOISE_KEY = 0x44524F50  # the step's dropout seed: derive_seed(seed, step, _NOISE_KEY)


@dataclass
class ZOArguments:
    """The zeroth-order settings of a `ZOTrainer`, next to the usual `TrainingArguments`.

    A separate dataclass rather than a `TrainingArguments` subclass: the same object then goes
    with any arguments class a Trainer takes (TRL's `SFTConfig` is one), and
    `HfArgumentParser((TrainingArguments, ZOArguments))` parses both from one command line.
    The learning rate, weight decay and LR schedule are TrainingArguments' (`learning_rate`,
    `weight_decay`, `lr_scheduler_type`, `warmup_steps`...): ZO methods want far smaller rates
    than the Trainer's default 5e-5 for full fine-tuning (MeZO: 1e-7 to 1e-6; LoRA or prefix
    tuning: 1e-4 to 1e-2). TrainingArguments.seed seeds the random directions (and each step's
    dropout masks; `data_seed`, if set, the data order).

    Args:
        method: a zotune method (`zotune.optim.available()`), first-order ones excepted.
        eps: the perturbation scale ε.
        queries: q, random directions averaged per step (default: the method's own, e.g. 1
            for MeZO, 8 for FZOO).
        direction: the law of z, "gaussian" or "rademacher" (default: the method's own).
        hparams: the method's other hyperparameters (`zotune.optim.hyperparameters(method,
            for_model=True)`), e.g. {"betas": (0.9, 0.999)} for zo-adam, {"sparsity": 0.8,
            "mask": "magnitude"} for sparse-mezo; values may be text ("0.9,0.999"), and the
            whole a JSON object as text (`--hparams '{"betas": "0.9,0.99"}'`).
    """

    method: str = "mezo"
    eps: float = 1e-3
    queries: int | None = None
    direction: str | None = None
    # (or a JSON object as text, as HfArgumentParser passes it from a command line)
    hparams: dict[str, Any] | str | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = hyperparameters(self.method, for_model=True)  # ValueError: unknown method
        if not issubclass(OPTIMIZERS[self.method], ZOOptimizer):
            raise ValueError(
                f"{self.method} is a first-order method: train with transformers.Trainer itself"
            )
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float, str)):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if self.queries is None:
            self.queries = spec["queries"].default
        if self.direction is None:
            self.direction = spec["direction"].default
        known = {"eps": self.eps, "queries": self.queries, "direction": self.direction}
        given = check(self.method, spec, known)
        self.eps, self.queries, self.direction = given["eps"], given["queries"], given["direction"]
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")
        if self.queries < 1:
            raise ValueError(f"queries must be an integer >= 1, got {self.queries}")
        if self.direction not in DIRECTIONS:
            raise ValueError(
                f"unknown direction '{self.direction}': choose one of {', '.join(DIRECTIONS)}"
            )
        hparams = {} if self.hparams is None else self.hparams
        if isinstance(hparams, str):
            try:
                hparams = json.loads(hparams)
            except json.JSONDecodeError as e:
                raise ValueError(f"hparams is not valid JSON: {e}") from None
        if not isinstance(hparams, dict):
            raise ValueError(f"hparams must be a dict (or a JSON object as text), got {hparams!r}")
        for key in hparams:
            if key in _ELSEWHERE:
                raise ValueError(f"set {key} as {_ELSEWHERE[key]}, not in ZOArguments.hparams")
        self.hparams = check(self.method, spec, dict(hparams))


class _SteppedInTrainingStep(torch.optim.Optimizer):
    """The optimizer the Trainer holds: the zotune optimizer, whose step has already run in
    `training_step` when the Trainer calls `step()`, so that call does nothing. Param groups
    (which the LR scheduler sets), state and state dicts are the zotune optimizer's own, so
    `optimizer.pt` in a checkpoint holds its trajectory, step count and rule state."""

    def __init__(self, zo: ZOOptimizer):  # (no Optimizer.__init__: nothing of its own to hold)
        self.zo = zo

    param_groups = property(
        lambda self: self.zo.param_groups, lambda self, v: setattr(self.zo, "param_groups", v)
    )
    state = property(lambda self: self.zo.state, lambda self, v: setattr(self.zo, "state", v))
    defaults = property(
        lambda self: self.zo.defaults, lambda self, v: setattr(self.zo, "defaults", v)
    )

    def state_dict(self) -> dict[str, Any]:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zo.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise ValueError("a zotune optimizer's parameters are fixed when it is built")

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # (no gradients; hybrid-zo-fo clears its own)

    def step(self, closure: Any = None) -> Any:
        return None if closure is None else self.zo.step(closure)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.zo!r})"


class ZOTrainerMixin:
    """The zeroth-order step for any `transformers.Trainer` subclass (`ZOTrainer`,
    `ZOSFTTrainer`): put it first in the bases. Takes `zo_args: ZOArguments` (default: MeZO)."""

    def __init__(self, *args: Any, zo_args: ZOArguments | None = None, **kwargs: Any):
        self.zo_args = ZOArguments() if zo_args is None else zo_args
        if not isinstance(self.zo_args, ZOArguments):
            raise ValueError(f"zo_args must be a ZOArguments, got {type(self.zo_args).__name__}")
        super().__init__(*args, **kwargs)
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            raise ValueError(
                "ZOTrainer builds its optimizer from zo_args: pass optimizers=(None, scheduler)"
            )
        args_ = self.args
        if args_.fp16:
            raise ValueError(
                "fp16=True scales gradients, and a ZO step has none: use bf16=True, or load "
                "the model in float16"
            )
        if args_.world_size > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("ZOTrainer runs in one process (no DDP, DeepSpeed or FSDP)")
        self._micro: list[dict[str, Any]] = []  # the accumulation window's micro-batches so far
        self._micro_step = -1  # the global step they belong to

    @property
    def zo_optimizer(self) -> ZOOptimizer | None:
        """The zotune optimizer (its trajectory, step count, forward passes), once built."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, _SteppedInTrainingStep):
            opt = getattr(opt, "optimizer", None)  # (accelerate's AcceleratedOptimizer)
        return None if opt is None else opt.zo

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The zotune optimizer over the model's trainable parameters (`build_for`), at the
        Trainer's learning rate and weight decay; the Trainer's LR scheduler then drives it."""
        if self.optimizer is None:
            zo, args = self.zo_args, self.args
            if zo.method == "mezo-svrg" and args.dataloader_persistent_workers:
                raise ValueError(
                    "mezo-svrg's full-batch loss needs dataloader_persistent_workers=False"
                )
            opt = build_for(
                self.model if model is None else model,
                zo.method,
                weight_decay=args.weight_decay,
                full_loss=self._full_training_loss,
                lr=args.learning_rate,
                eps=zo.eps,
                queries=zo.queries,
                direction=zo.direction,
                seed=args.seed,
                **zo.hparams,
            )
            self.optimizer = _SteppedInTrainingStep(opt)
        return self.optimizer

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Keep the micro-batch; at the last one of the accumulation window, take the ZO step
        over all of them. Returns the step's loss then (the mean of the losses it evaluated,
        ≈ L(θ)), 0 before, so the Trainer's logged loss is the step's."""
        model.train()
        if self.state.global_step != self._micro_step:
            self._micro, self._micro_step = [], self.state.global_step
        self._micro.append(self._prepare_inputs(inputs))
        device = self.args.device
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=device)  # more micro-batches of this step to come
        micro, self._micro = self._micro, []
        # The Trainer backpropagates Σ_k ℓ_k, each ℓ_k scaled for accumulation by the loss
        # itself (num_items_in_batch) or by 1/K; MicroBatches averages, hence the factor.
        k = len(micro)
        factor = k if self._loss_scaled_for_accumulation(num_items_in_batch) else 1
        loss_of = partial(self._micro_batch_loss, model, num_items_in_batch, factor)
        closure = MicroBatches(
            [self._same_noise(partial(loss_of, b), i) for i, b in enumerate(micro)]
        )
        zo = self.zo_optimizer
        assert zo is not None, "training_step before create_optimizer"
        loss = zo.step(closure)
        return torch.tensor(float(loss), device=device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with `grad_norm` (always 0: no gradients) replaced by the last
        step's mean |projected gradient|, as `zotune train` logs it."""
        zo = self.zo_optimizer
        if "grad_norm" in logs and zo is not None and zo.trajectory.records:
            grads = zo.trajectory.records[-1].get("grads") or [0.0]
            logs["grad_norm"] = sum(abs(g) for g in grads) / len(grads)
        super().log(logs, *args, **kwargs)

    # -- helpers ------------------------------------------------------------------------
    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether the loss is already divided over the whole window (as Trainer.training_step
        decides it)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool(accepts and num_items_in_batch is not None) or (
            getattr(self, "compute_loss_func", None) is not None
        )

    def _micro_batch_loss(
        self, model: torch.nn.Module, num_items: Any, factor: int, inputs: dict[str, Any]
    ) -> torch.Tensor:
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        with self.compute_loss_context_manager():  # (a copy: compute_loss may pop "labels")
            loss = self.compute_loss(model, dict(inputs), **kwargs)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        return loss * factor if factor != 1 else loss

    def _same_noise(self, loss: Any, *key: int) -> Any:
        """`loss` under the same random numbers at every call within this step (keyed by the
        step and `key`): dropout then draws the same masks at each perturbation (common random
        numbers), so the losses differ by the move alone. The Trainer's random stream is left
        as it was."""
        zo = self.zo_optimizer
        assert zo is not None
        seed = derive_seed(zo.seed, zo.steps, _NOISE_KEY, *key)
        device = self.args.device
        cuda = [device] if device.type == "cuda" else []

        def closure() -> Any:
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                torch.manual_seed(seed)
                return loss()

        return closure

    def _full_training_loss(self) -> float:
        """MeZO-SVRG's full-batch loss: the training set in order, in eval-size batches (the
        same dropout masks at both perturbations)."""
        return float(self._same_noise(self._training_set_loss, -1)())

    def _training_set_loss(self) -> float:
        loader = self.get_eval_dataloader(self.train_dataset)
        model = self.model_wrapped
        total, rows = 0.0, 0
        for inputs in loader:
            inputs = self._prepare_inputs(inputs)
            n = find_batch_size(inputs) or 1
            with self.compute_loss_context_manager():
                total += float(self.compute_loss(model, inputs).detach()) * n
            rows += n
        return total / max(rows, 1)


class ZOTrainer(ZOTrainerMixin, Trainer):
    """`transformers.Trainer` with a zeroth-order step: `ZOTrainer(model=..., args=
    TrainingArguments(...), zo_args=ZOArguments(method="mezo", eps=1e-3), ...)`; every other
    argument is the Trainer's. See the module docstring for what it changes."""


class _NeedsTRL:
    """Stands for ZOSFTTrainer where TRL is not installed."""

    def __init__(self, *args: Any, **kwargs: Any):
        raise ImportError("ZOSFTTrainer needs TRL, which is not installed: pip install trl")


_sft_trainer: type | None = None


def _zo_sft_trainer() -> type:
    """ZOSFTTrainer: TRL's `SFTTrainer` with the zeroth-order step (made on first use, so that
    `import zotune.hf` neither needs nor loads TRL)."""
    global _sft_trainer
    try:
        from trl import SFTTrainer
    except ImportError:
        return type("ZOSFTTrainer", (_NeedsTRL,), {"__module__": __name__})
    if _sft_trainer is None:

        class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer):
            """TRL's `SFTTrainer` with a zeroth-order step: `ZOSFTTrainer(model=...,
            args=SFTConfig(...), zo_args=ZOArguments(...), train_dataset=...)`; the loss of
            each forward pass is SFTTrainer's (completion-only, packing... as configured)."""

        ZOSFTTrainer.__module__ = __name__
        _sft_trainer = ZOSFTTrainer
    return _sft_trainer


def __getattr__(name: str) -> Any:
    if name == "ZOSFTTrainer":
        return _zo_sft_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
