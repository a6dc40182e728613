"""The training loop: load, evaluate zero-shot, step with closures, evaluate on dev, report.

Everything a run writes goes to a temporary folder beside `out` that is renamed into place when
the run finishes, so a failed or interrupted run leaves no half-written output directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import checkpoint, distributed, optim, recipes
from .devices import describe_placement
from .memory_usage import peak_memory_mb, reset_peak, rss_mb
from .objectives import length_batches
from .optim.hparams import check as check_hyperparameters
from .reporting import open_reporters, provenance
from .reporting import parse_targets as parse_report_targets
from .settings import ConfigError, coerce_all, setting
from .tasks import Task, load_task
from .tasks.base import Example, better, show


@dataclass
class TrainConfig:
    """One fine-tuning run. Defaults follow MeZO's protocol; `DEMO` is the built-in job.

    Each field's help is the text of its `zotune train` flag (cli.py builds the flags from here).
    """

    model: str = setting(
        "smollm2-135m", "built-in name (smollm2-135m, minilm-l6), local path or hub id"
    )
    task: str = setting(
        "sst2",
        "built-in task name (see `zotune tasks`), path to a task .yaml, or a dataset: a "
        "save_to_disk folder or a .jsonl/.csv/.parquet/.json file (docs/tasks.md)",
    )
    method: str = setting("mezo", "optimizer name (see `zotune methods`)")
    out: str | None = setting(
        None, "output directory, must not exist or be empty (default: runs/MODEL-TASK-METHOD-TIME)"
    )
    steps: int = setting(1000, "training steps")
    lr: float = setting(1e-6, "learning rate")
    eps: float = setting(1e-3, "perturbation scale of zeroth-order methods (> 0)")
    weight_decay: float = setting(0.0, "weight decay")
    batch_size: int = setting(16, "training examples per step")
    queries: int = setting(
        1, "random directions averaged per zeroth-order step (unchanged: the method's default)"
    )
    estimator: str = setting(
        "two-sided",
        "zeroth-order gradient estimator: two-sided or one-sided (unchanged: the method's)",
    )
    direction: str = setting(
        "gaussian", "law of the random directions: gaussian or rademacher (unchanged: the method's)"
    )
    peft: str = setting("full", "what to train: full, lora, prefix or prompt")
    init_head: str = setting(
        "fresh",
        "a classifier's head before training: fresh (random from --seed) or linear-probe (fit by logistic regression on the training set, L2 chosen on dev)",
    )
    lora_r: int = setting(8, "LoRA rank")
    lora_alpha: int = setting(16, "LoRA scaling alpha")
    lora_targets: list[str] | None = setting(
        None,
        "LoRA target module names, e.g. q_proj,v_proj (default: the model family's query/value projections)",
    )
    num_virtual_tokens: int | None = setting(
        None, "virtual tokens of prefix/prompt tuning (default: prefix 5, prompt 10)"
    )
    objective: str = setting("loss", "loss, or a non-differentiable objective: accuracy or f1")
    dtype: str = setting(
        "auto",
        "auto (bfloat16 on a GPU that supports it, else float32; fixed when the run starts), float32, bfloat16 or float16",
    )
    device: str = setting(
        "auto",
        "where to train and evaluate: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps",
    )
    device_map: str | None = setting(
        None,
        "spread a model too large for one device over the GPUs: auto, balanced or sequential (accelerate; docs/hardware.md)",
    )
    max_memory: str | None = setting(
        None, "with --device-map: memory per device, e.g. 0=20GiB,1=20GiB"
    )
    quantize: str = setting(
        "none",
        "load the frozen base in 8bit or 4bit (bitsandbytes) to train --peft lora, prefix or prompt on it",
    )
    gguf_file: str | None = setting(
        None, "which .gguf file to load from a model folder holding several (default: the only one)"
    )
    seed: int = setting(0, "seed of data order, directions and initializations")
    data_dir: str | None = setting(
        None, "folder laid out like shared/data (default: $ZOTUNE_DATA, else the shipped sample)"
    )
    num_train: int = setting(1000, "training examples sampled from the task")
    num_dev: int = setting(500, "dev examples (model selection)")
    num_test: int = setting(1000, "test examples (reported at the best dev step)")
    template: str = setting(
        "mezo", "prompt templates: mezo, or empty (ZO-Bench's, for the tasks that define them)"
    )
    k: int = setting(16, "examples per class of the LM-BFF k-shot tasks")
    kshot_seed: int = setting(42, "seed of the LM-BFF k-shot split (folder <k>-<seed>)")
    eval_every: int = setting(100, "steps between dev evaluations")
    eval_batch_size: int = setting(16, "examples per evaluation forward pass")
    patience: int | None = setting(
        None,
        "stop once this many dev evaluations in a row bring no new best, early stopping on a "
        "plateau (default: none, every step runs)",
    )
    max_length: int = setting(256, "longest input in tokens (longer prompts keep their end)")
    save_weights: bool = setting(False, "also write the trained tensors as weights.safetensors")
    threads: int | None = setting(
        None, "threads that apply the perturbations (default: min(2, CPU cores))"
    )
    lr_scheduler: str = setting(
        "constant", "learning-rate schedule: constant, linear or cosine (to 0 at the last step)"
    )
    warmup_steps: int = setting(0, "steps of linear warmup from 0 before the schedule")
    grad_accum: int = setting(
        1,
        "micro-batches of --batch-size per step, under one direction (gradient accumulation; "
        "under torchrun, split among the ranks)",
    )
    sort_micro_batches: bool = setting(
        False,
        "with --grad-accum K > 1: sort the step's K·b examples by length before cutting them into "
        "micro-batches, so each pads to a shorter longest (the same examples; the same mean "
        "loss up to float rounding where the loss is a mean over examples, as for classification; "
        "about half the tokens on RTE at 4 x 4)",
    )
    full_batch_rows: int = setting(
        0,
        "MeZO-SVRG: training rows its full-batch estimates read (0: all; else a fixed subset drawn from --seed, the large-batch variant for big training sets)",
    )
    save_every: int | None = setting(
        None,
        "steps between checkpoints (default: every 5 minutes, or 99 times a checkpoint's write time if longer); --resume goes on from one",
    )
    keep: str = setting(
        "best", "the model --save-weights, eval --run and export use: best (on dev) or final"
    )
    report_to: str = setting(
        "jsonl", "where metrics go besides metrics.jsonl: tensorboard, wandb (comma-separated)"
    )
    recipe: str = setting(
        "paper",
        "where the settings not given come from: auto (the recipe for the model's kind), "
        "decoder-prefix, encoder-lp, or paper (MeZO's protocol) (default: auto on the command line and in "
        "TrainConfig.with_recipe; paper for TrainConfig(...))",
    )
    extra: dict[str, Any] = setting({}, "method-specific hyperparameters (--set KEY=VALUE)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        # a run's config.yaml also records what produced it: not a setting
        values = {k: v for k, v in values.items() if k != "provenance"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting '{unknown[0]}': valid settings are {', '.join(sorted(known))}"
            )
        values = coerce_all(cls, values)  # "1e-6" -> 1e-6, "true" -> True, or a ConfigError
        return cls(**values)

    @classmethod
    def with_recipe(cls, values: dict[str, Any]) -> TrainConfig:
        """The settings a user gave, the rest from a recipe (`zotune.recipes`: by default the
        one for the model's kind; `recipe: paper` keeps MeZO's protocol, these defaults)."""
        from .models import model_kind
        from .recipes import resolve

        values = {k: v for k, v in values.items() if k != "provenance"}
        cls.from_dict(values)  # unknown settings and wrong types first, as one-line errors
        return cls.from_dict(resolve(coerce_all(cls, values), model_kind))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
            ) from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must be a mapping of setting: value")
        return {str(k).replace("-", "_"): v for k, v in values.items()}

    def validate(self) -> None:
        for name, value in coerce_all(type(self), vars(self)).items():
            setattr(self, name, value)  # the Python API's values get the same conversion
        positive_ints = (
            "steps",
            "batch_size",
            "queries",
            "eval_every",
            "eval_batch_size",
            "max_length",
            "grad_accum",
        )
        for name in positive_ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}"
                )
        for name in ("lr", "eps", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}"
                )
        if self.eps <= 0:
            raise ConfigError(f"--eps must be > 0 (the perturbation scale), got {self.eps}")
        methods = [*optim.available(), *BASELINES]
        if self.method not in methods:
            raise ConfigError(f"unknown method '{self.method}': choose one of {', '.join(methods)}")
        self.extra = self._checked_extra()
        if self.peft not in ("full", "lora", "prefix", "prompt"):
            raise ConfigError(f"unknown --peft '{self.peft}': choose full, lora, prefix or prompt")
        if self.init_head not in ("fresh", "linear-probe"):
            raise ConfigError(
                f"unknown --init-head '{self.init_head}': choose fresh or linear-probe"
            )
        if self.objective not in ("loss", "accuracy", "f1"):
            raise ConfigError(
                f"unknown --objective '{self.objective}': choose loss, accuracy or f1"
            )
        backprop = getattr(optim.OPTIMIZERS.get(self.method), "backprop", False)
        if self.objective != "loss" and backprop:
            raise ConfigError(
                f"--objective {self.objective} has no gradient: use a zeroth-order method with it"
            )
        self._check_placement()
        if self.lr_scheduler not in SCHEDULES:
            raise ConfigError(
                f"unknown --lr-scheduler '{self.lr_scheduler}': choose {', '.join(SCHEDULES)}"
            )
        if not isinstance(self.full_batch_rows, int) or self.full_batch_rows < 0:
            raise ConfigError(
                f"--full-batch-rows must be an integer >= 0, got {self.full_batch_rows}"
            )
        if self.sort_micro_batches and self.grad_accum < 2:
            raise ConfigError(
                "--sort-micro-batches sorts a step's examples into its --grad-accum micro-batches: "
                "give --grad-accum 2 or more"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be an integer >= 0, got {self.warmup_steps}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ConfigError(f"--patience must be a positive integer, got {self.patience}")
        if self.save_every is not None and (
            not isinstance(self.save_every, int) or self.save_every < 1
        ):
            raise ConfigError(f"--save-every must be a positive integer, got {self.save_every}")
        if self.recipe not in recipes.RECIPES:
            raise ConfigError(
                f"unknown --recipe '{self.recipe}': choose {', '.join(recipes.names())}"
            )
        if self.keep not in ("best", "final"):
            raise ConfigError(f"unknown --keep '{self.keep}': choose best or final")
        try:
            self.report_to = ",".join(parse_report_targets(self.report_to))
        except ValueError as e:
            raise ConfigError(f"--report-to: {e}") from None
        if self.lora_targets and self.peft != "lora":
            raise ConfigError(f"--lora-targets applies to --peft lora only, not --peft {self.peft}")

    def _check_placement(self) -> None:
        """--device, --dtype, --device-map, --max-memory, --quantize; an "auto" dtype becomes
        the device's (so config.yaml, --resume and replay use the dtype the run trained in)."""
        from .devices import QUANTIZE, DeviceError, default_dtype, parse_max_memory, resolve_device

        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"unknown --dtype '{self.dtype}': choose auto, float32, bfloat16 or float16"
            )
        if self.device_map is not None and self.device != "auto":
            raise ConfigError("give --device or --device-map, not both")
        if self.device_map not in (None, "auto", "balanced", "balanced_low_0", "sequential"):
            raise ConfigError(
                f"unknown --device-map '{self.device_map}': choose auto, balanced or sequential"
            )
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"unknown --quantize '{self.quantize}': choose 8bit or 4bit")
        if self.quantize != "none" and self.peft == "full" and self.method not in BASELINES:
            raise ConfigError(
                f"--quantize {self.quantize} freezes the base (its integer weights cannot be "
                "perturbed): add --peft lora, prefix or prompt"
            )
        try:
            parse_max_memory(self.max_memory)
            if self.max_memory is not None and self.device_map is None:
                raise DeviceError("--max-memory applies with --device-map only")
            device = resolve_device(self.device)
        except DeviceError as e:
            raise ConfigError(str(e)) from None
        if self.dtype == "auto":
            self.dtype = default_dtype(device)

    def _checked_extra(self) -> dict[str, Any]:
        """`extra` (--set) checked against the method's hyperparameters, values converted to
        their declared types; those the config sets itself (--lr, --eps...) are refused."""
        if self.method in BASELINES:
            spec = BASELINE_OPTIONS[self.method]
        else:
            given = set(optimizer_settings(self, extra=False)) | {"weight_decay"}
            if issubclass(optim.OPTIMIZERS[self.method], optim.ZOOptimizer):
                given |= set(_OWN_DEFAULTS)  # their flags set them, even when left unchanged
            clash = sorted(given & set(self.extra))
            if clash:
                flag = "--" + clash[0].replace("_", "-")
                raise ConfigError(f"set {clash[0]} with {flag}, not --set")
            spec = optim.hyperparameters(self.method, for_model=True)
            spec = {k: v for k, v in spec.items() if k not in given}
        try:
            return check_hyperparameters(self.method, spec, dict(self.extra))
        except ValueError as e:
            raise ConfigError(f"--set: {e}") from None


# Settings of the baselines that train no weights (`--set demos=32`).
BASELINE_OPTIONS: dict[str, dict[str, optim.Hyperparameter]] = {
    "icl": {"demos": optim.Hyperparameter("demos", int, 32)},
    "linear-probe": {},
}


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
_OWN_DEFAULTS = ("queries", "estimator", "direction")  # left unchanged: the method's defaults


def optimizer_settings(cfg: TrainConfig, *, extra: bool = True) -> dict[str, Any]:
    """The hyperparameters a run gives its optimizer: the learning rate, the perturbation
    settings of a zeroth-order method, then `--set`'s (weight decay goes to its groups)."""
    hp: dict[str, Any] = {"lr": cfg.lr}
    if issubclass(optim.OPTIMIZERS[cfg.method], optim.ZOOptimizer):
        hp.update(eps=cfg.eps, seed=cfg.seed, threads=cfg.threads)
        # left at their defaults, the method's own apply (FZOO: 8 rademacher one-sided queries)
        for name in _OWN_DEFAULTS:
            if getattr(cfg, name) != _DEFAULTS[name]:
                hp[name] = getattr(cfg, name)
    return {**hp, **cfg.extra} if extra else hp


# The built-in job (`zotune train` with no arguments, `make demo`): SmolLM2-135M on SST-2 with
# MeZO prefix tuning, sized for a 2-core CPU in under 10 minutes. Chosen on dev accuracy.
DEMO: dict[str, Any] = dict(
    model="smollm2-135m", task="sst2", **recipes.DECODER.optimizer, **recipes.DECODER.sizes
)


def batches(n: int, batch_size: int, seed: int):
    """Endless minibatches of indices: a fresh seeded permutation each epoch."""
    rng = np.random.RandomState(seed)
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size].tolist()


def micro_batches(batch: list[Example], k: int, *, sort: bool = False) -> list[list[Example]]:
    """A step's batch cut into k equal micro-batches, in data order or, with `sort`, by length
    (stable, so examples of equal length keep the data order): each then pads to a shorter
    longest, and the mean of the k micro-batch losses is the batch's mean loss all the same."""
    b = len(batch) // k
    if sort:
        return length_batches(batch, b)[1]
    return [batch[i * b : (i + 1) * b] for i in range(k)]


def load_for(cfg: TrainConfig, task: Task | None = None) -> tuple[Task, Any, Any]:
    """The task, the (PEFT-wrapped) model and the objective a config names (`task`: one
    already loaded, e.g. from a `datasets` object, instead of cfg.task)."""
    from .models import apply_peft, load_model
    from .objectives import make_objective

    task = task or load_task(
        cfg.task,
        cfg.data_dir,
        num_train=cfg.num_train,
        num_dev=cfg.num_dev,
        num_test=cfg.num_test,
        seed=cfg.seed,
        template=cfg.template,
        k=cfg.k,
        kshot_seed=cfg.kshot_seed,
    )
    if cfg.batch_size > len(task.train):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the {len(task.train)} training examples: lower it"
        )
    torch.manual_seed(cfg.seed)
    loaded = load_model(
        cfg.model,
        dtype=cfg.dtype,
        gguf_file=cfg.gguf_file,
        num_labels=max(task.num_labels, 2),
        seed=cfg.seed,
        device=cfg.device,
        device_map=cfg.device_map,
        max_memory=cfg.max_memory,
        quantize=cfg.quantize,
    )
    if cfg.init_head == "linear-probe":
        _linear_probe_head(cfg, task, loaded)
    if cfg.peft != "full":
        loaded = apply_peft(
            loaded,
            cfg.peft,
            r=cfg.lora_r,
            alpha=cfg.lora_alpha,
            target_modules=cfg.lora_targets,
            num_virtual_tokens=cfg.num_virtual_tokens,
            seed=cfg.seed,
        )
    objective = make_objective(loaded, task.kind, max_length=cfg.max_length, metric=task.metric)
    return task, loaded, objective


def _linear_probe_head(cfg: TrainConfig, task: Task, loaded: Any) -> None:
    """--init-head linear-probe: the classifier's head fit to the frozen features (LP-then-ZO)."""
    from .probe import fit_head

    if loaded.kind != "classifier":
        raise ConfigError(
            f"--init-head linear-probe needs a classifier model, but {cfg.model} loads as kind {loaded.kind}"
        )
    if task.kind != "classification":
        raise ConfigError(f"--init-head linear-probe needs a classification task, not {task.kind}")
    try:
        fit = fit_head(loaded, task.train, task.dev, cfg.eval_batch_size, cfg.max_length)
    except ValueError as e:
        raise ConfigError(f"--init-head linear-probe: {e}") from None
    print(
        f"linear-probe head: train {100 * fit['train']['accuracy']:.1f}%, "
        f"dev {100 * fit['dev']['accuracy']:.1f}% (l2 {fit['l2']:g})",
        file=sys.stderr,
    )


def build_optimizer(
    cfg: TrainConfig, model: torch.nn.Module, objective: Any = None, task: Task | None = None
) -> torch.optim.Optimizer:
    """The optimizer a config names, over the model's trainable parameters (`build_for`; with
    the objective and task, MeZO-SVRG gets the full training set's loss)."""
    full = (
        full_batch_loss(objective.counted(objective.loss), task, cfg)
        if objective is not None and task
        else None
    )
    return optim.build_for(
        model,
        cfg.method,
        weight_decay=cfg.weight_decay,
        full_loss=full,
        **optimizer_settings(cfg),
    )


def full_batch_loss(
    loss: Callable[[Sequence[Example]], torch.Tensor], task: Task, cfg: TrainConfig
) -> Callable[[], float]:
    """`loss` over the whole training set, in chunks (MeZO-SVRG's full-batch estimates), or
    over a fixed subset of `--full-batch-rows` rows drawn from the run's seed."""
    examples, size = task.train, cfg.eval_batch_size
    if 0 < cfg.full_batch_rows < len(examples):
        pick = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed))
        examples = [examples[i] for i in sorted(pick[: cfg.full_batch_rows].tolist())]
    _, chunks = length_batches(examples, size)  # chunks of like length pad less

    def closure() -> float:
        total = 0.0  # (with several ranks, each computes some of the chunks)
        sums = distributed.world().map(
            lambda chunk: float(loss(chunk)) * len(chunk), chunks, "the full-batch loss"
        )
        for value in sums:
            total += value
        return total / len(examples)

    return closure


class _Progress:
    def __init__(self, total: int, quiet: bool, done: int = 0):
        self.quiet, self.total, self.bar = quiet, total, None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def update(self, step: int, loss: float, forwards: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", fwd=forwards, refresh=False)
            self.bar.update(1)
        elif step % max(self.total // 20, 1) == 0 or step == self.total:
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  forward passes {forwards}", flush=True
            )

    def write(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(metrics: dict[str, float]) -> str:
    return show(metrics)


# Methods that train no weights: baselines measured with the same loading, data and summary.
BASELINES = ("linear-probe", "icl")


def icl_objective(cfg: TrainConfig, task: Task, loaded: Any, demos: int) -> Any:
    """The objective with `demos` training examples (drawn with cfg.seed) before every prompt."""
    from .objectives import make_objective

    if demos < 1:
        raise ConfigError(f"demos must be a positive integer, got {demos}")
    rng = np.random.RandomState(cfg.seed)
    picked = [task.train[i] for i in rng.permutation(len(task.train))[:demos]]
    return make_objective(
        loaded,
        task.kind,
        max_length=cfg.max_length,
        demos=picked,
        cache_demos=True,
        metric=task.metric,
    )


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM after checkpointing: `zotune train --resume` goes on."""

    def __init__(self, run: Path, step: int, signum: int):
        super().__init__(f"interrupted at step {step}: resume with `zotune train --resume {run}`")
        self.run, self.step, self.signum = run, step, signum


SCHEDULES = ("constant", "linear", "cosine")
# Without --save-every a checkpoint is written every 5 minutes, or every 99 times as long as the
# last one took to write, whichever is longer: checkpoints take at most 1% of a run's time.
SAVE_SECONDS = 300.0


def lr_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer) -> Any:
    """A LambdaLR for --lr-scheduler with --warmup-steps (None for constant without warmup):
    the factor on each group's lr at step t (0-based): t/warmup during warmup, then 1
    (constant), a linear decay to 0 at the last step, or a half cosine to 0."""
    if cfg.lr_scheduler == "constant" and not cfg.warmup_steps:
        return None
    warm, total = cfg.warmup_steps, cfg.steps

    def factor(t: int) -> float:
        if t < warm:
            return t / warm
        done = (t - warm) / max(total - warm, 1)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - done)
        if cfg.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(
    cfg: TrainConfig, *, quiet: bool = False, resume: bool = False, task: Task | None = None
) -> dict[str, Any]:
    """Run one fine-tuning job in `cfg.out`; returns the summary. The run directory is written
    in place as the run goes (config, metrics, checkpoints, summary with its status); with
    `resume`, an interrupted run in `cfg.out` goes on from its last checkpoint, bit for bit as
    if it had never stopped. Under torchrun, the ranks share each step (`zotune.distributed`).
    `task`: a task already loaded, e.g. `load_task(dataset, spec=..., num_train=...)` of a
    `datasets` object; cfg.task then only names it (pass the same task again to resume)."""
    if task is not None:
        cfg.task = task.name
    with distributed.launched(cfg) as world:
        return _train(cfg, quiet=quiet or not world.writes, resume=resume, task=task)


def _train(cfg: TrainConfig, *, quiet: bool, resume: bool, task: Task | None) -> dict[str, Any]:
    cfg.validate()
    if cfg.out is None:
        cfg.out = distributed.world().same(
            f"runs/{Path(cfg.model).name}-{Path(cfg.task).stem}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    if not resume and Path(cfg.model).exists():  # a local model: found again from anywhere
        cfg.model = str(Path(cfg.model).resolve())
    out = distributed.world().run_dir(Path(cfg.out), resume)  # rank 0's, or a scratch folder
    if resume:
        if cfg.method in BASELINES:
            raise ConfigError(f"{cfg.method} trains nothing: there is nothing to resume")
        if not checkpoint.exists(out):
            raise ConfigError(f"{out} has no checkpoint to resume from: start it again")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"output directory {out} already exists and is not empty: choose another --out"
        )
    start = time.time()
    if not resume:
        print(recipes.describe(cfg), flush=True)
        print(describe_placement(cfg), flush=True)
    task, loaded, objective = load_for(cfg, task)
    model = loaded.model

    if cfg.method == "linear-probe":
        return write_atomically(out, lambda work: _probe(cfg, task, loaded, objective, work, start))
    if cfg.method == "icl":
        demos = int(cfg.extra.get("demos", 32))
        icl = icl_objective(cfg, task, loaded, demos)
        return write_atomically(out, lambda work: _icl(cfg, task, objective, icl, work, start))

    loaded_mb = rss_mb()
    reset_peak()  # the summary's peak covers training, not the transient copies of loading
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        opt = build_optimizer(cfg, model, objective, task)
    except (TypeError, ValueError) as e:  # e.g. an unknown --set key or a bad hyperparameter
        raise ConfigError(f"cannot build {cfg.method}: {e}") from None
    scheduler = lr_schedule(cfg, opt)
    out.mkdir(parents=True, exist_ok=True)
    state = checkpoint.load(out, model, opt, scheduler) if resume else None
    with _stop_signals() as stop:
        summary = _run(cfg, task, loaded, objective, opt, scheduler, out, state, stop, start, quiet)
    summary["loaded_memory_mb"] = round(loaded_mb, 1)
    summary["provenance"] = yaml.safe_load((out / "config.yaml").read_text()).get("provenance")
    _write_json(out / "summary.json", summary)
    return summary


class _stop_signals:
    """SIGINT and SIGTERM (a scheduler's preemption) ask the loop to stop after the current
    step, checkpoint and exit; a second SIGINT stops at once (the last checkpoint stands)."""

    def __enter__(self) -> dict[str, int]:
        self.stop: dict[str, int] = {}
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self.stop

    def _handle(self, signum: int, frame: Any) -> None:
        if "signal" in self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop["signal"] = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically (a temp file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def write_atomically(out: Path, fill) -> dict[str, Any]:
    """Let `fill` write into a temporary folder beside `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = fill(work)
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def _baseline(
    cfg: TrainConfig, task: Task, objective: Any, work: Path, start: float, measure
) -> dict[str, Any]:
    """A method that trains no weights (linear probe, ICL): the zero-shot scores, then
    `measure()` -> (dev, test, forward passes, extra summary fields), written like a run."""
    (work / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    with torch.no_grad():
        zero_shot = objective.evaluate(task.dev, batch_size=cfg.eval_batch_size)
        zero_shot_test = (
            objective.evaluate(task.test, batch_size=cfg.eval_batch_size) if task.test else {}
        )
    dev, test, forward_passes, extra = measure()
    (work / "metrics.jsonl").write_text(json.dumps({"step": 0, "dev": dev, **extra}) + "\n")
    summary = {
        "model": cfg.model,
        "task": cfg.task,
        "method": cfg.method,
        "peft": "none",
        **extra,
        "steps": 0,
        "forward_passes": forward_passes,
        "zero_shot": zero_shot,
        "zero_shot_test": zero_shot_test,
        "dev": dev,
        "test": test,
        "best_step": 0,
        "final_dev": dev,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "wall_seconds": round(time.time() - start, 2),
        "seconds_per_step": 0.0,
        "notes": task.notes,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _probe(
    cfg: TrainConfig, task: Task, loaded: Any, objective: Any, work: Path, start: float
) -> dict[str, Any]:
    """MeZO's linear-probing baseline: a logistic-regression head on frozen features."""
    from .probe import linear_probe

    if task.kind != "classification":
        raise ConfigError("linear-probe needs a classification task")

    def measure():
        splits = (task.train, task.dev, task.test)
        result = linear_probe(
            loaded, *splits, max(task.num_labels, 2), cfg.eval_batch_size, cfg.max_length
        )
        n = len(task.train) + len(task.dev) + len(task.test)
        return result["dev"], result["test"], -(-n // cfg.eval_batch_size), {"l2": result["l2"]}

    return _baseline(cfg, task, objective, work, start, measure)


def _icl(
    cfg: TrainConfig, task: Task, objective: Any, icl: Any, work: Path, start: float
) -> dict[str, Any]:
    """MeZO's in-context baseline: the base model with demonstrations before each prompt."""

    def measure():
        before = icl.forward_passes
        with torch.no_grad():
            dev = icl.evaluate(task.dev, batch_size=cfg.eval_batch_size)
            test = icl.evaluate(task.test, batch_size=cfg.eval_batch_size) if task.test else {}
        return dev, test, icl.forward_passes - before, {"demos": len(icl.demos)}

    return _baseline(cfg, task, objective, work, start, measure)


def _run(
    cfg: TrainConfig,
    task: Task,
    loaded: Any,
    objective: Any,
    opt: torch.optim.Optimizer,
    scheduler: Any,
    out: Path,
    state: checkpoint.LoopState | None,
    stop: dict[str, int],
    start: float,
    quiet: bool,
) -> dict[str, Any]:
    model = loaded.model
    world = distributed.world()
    world.split_queries(opt)
    stop = world.agreed(stop)
    evaluate = lambda examples: world.evaluate(objective, examples, cfg.eval_batch_size)  # noqa: E731
    resumed = state is not None
    if state is None:
        record = {**asdict(cfg), "provenance": provenance()}
        (out / "config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        _write_json(out / "summary.json", {"status": "running", "step": 0})
        with torch.no_grad():
            zero_shot = evaluate(task.dev)
            zero_shot_test = evaluate(task.test) if task.test else {}
        state = checkpoint.LoopState(
            train_rows=0,
            zero_shot=zero_shot,
            zero_shot_test=zero_shot_test,
            best={"step": 0, "dev": zero_shot},
        )
        if cfg.keep == "best" and not getattr(opt, "replayable", False):
            _save_weights(model, opt, out / "best.safetensors", 0)  # until a step beats it
    # metrics.jsonl always (the run's own record); rows past a checkpoint are computed again
    targets = ["jsonl", *(parse_report_targets(cfg.report_to) if world.writes else [])]
    config = yaml.safe_load((out / "config.yaml").read_text())
    log = open_reporters(out, targets, config, resume_step=state.step if resumed else None)
    progress = _Progress(cfg.steps, quiet, done=state.step)
    progress.write(
        f"zero-shot dev: {_fmt(state.zero_shot)}; test: {_fmt(state.zero_shot_test)}"
        if state.step == 0
        else f"resumed at step {state.step} of {cfg.steps}"
    )
    metric = task.metric
    loss_fn = objective.counted(
        objective.nondiff_loss if cfg.objective != "loss" else objective.loss
    )
    k = cfg.grad_accum
    batch_iter = batches(len(task.train), cfg.batch_size * k, cfg.seed)
    for _ in range(state.step):  # the same data order as an uninterrupted run
        next(batch_iter)
    saved_at, saved_step = time.time(), state.step
    earlier = state.wall_seconds  # the sessions before this one
    save_cost = 0.0  # seconds the last checkpoint took: the default interval is >= 99 times it

    def save() -> None:
        nonlocal saved_at, saved_step, save_cost
        t0 = time.time()
        state.wall_seconds = earlier + t0 - start
        if world.writes:
            checkpoint.save(out, model, opt, scheduler, state)
            if getattr(opt, "replayable", False):
                opt.trajectory.save(out / "trajectory.zot")
        saved_at, saved_step = time.time(), state.step
        save_cost = saved_at - t0

    def interrupted(signum: int) -> Interrupted:
        log.close()
        progress.close()
        # (a second Ctrl-C stops mid-step: the last checkpoint's step is where a resume starts)
        status = {"status": "interrupted", "step": saved_step, "steps": cfg.steps}
        _write_json(out / "summary.json", status)
        return Interrupted(Path(cfg.out), saved_step, signum)

    try:
        for step in range(state.step + 1, cfg.steps + 1):
            batch = [task.train[i] for i in next(batch_iter)]
            micro = micro_batches(batch, k, sort=cfg.sort_micro_batches)
            closure = world.closure(loss_fn, micro)  # one process: MicroBatches when k > 1
            t0 = time.perf_counter()
            before, before_s = objective.forward_passes, objective.forward_seconds
            before_tokens, before_rows = objective.forward_tokens, objective.forward_rows
            lr = opt.param_groups[0]["lr"]
            loss = float(opt.step(closure))  # every optimizer: forward only
            if scheduler is not None:
                scheduler.step()
            seconds = time.perf_counter() - t0
            state.step_seconds += seconds
            state.forward_seconds += objective.forward_seconds - before_s
            forwards, tokens, rows = world.step_end(
                stop,
                objective.forward_passes - before,
                objective.forward_tokens - before_tokens,
                objective.forward_rows - before_rows,
            )
            state.train_forwards += forwards
            state.train_tokens += tokens
            if state.train_rows is not None:
                state.train_rows += rows
            state.step = step
            row: dict[str, Any] = {
                "step": step,
                "loss": loss,
                "forward_passes": state.train_forwards,
                **({"rows": state.train_rows} if state.train_rows is not None else {}),
                "tokens": state.train_tokens,
                "lr": lr,
                "seconds": seconds,
                "elapsed": earlier + time.time() - start,
            }
            grads = getattr(opt, "trajectory", None)
            if grads is not None and grads.records and grads.records[-1].get("grads"):
                row["grad_norm"] = sum(abs(g) for g in grads.records[-1]["grads"]) / len(
                    grads.records[-1]["grads"]
                )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                with torch.no_grad():
                    dev = evaluate(task.dev)
                row["dev"] = state.last_dev = dev
                if better(metric, dev[metric], state.best["dev"][metric]):
                    # Test is measured at each new best-on-dev step, never used to choose one.
                    with torch.no_grad():
                        test = evaluate(task.test) if task.test else {}
                    state.best = {"step": step, "dev": dev, "test": test}
                    if cfg.keep == "best" and not getattr(opt, "replayable", False):
                        _save_weights(model, opt, out / "best.safetensors", step)
                progress.write(f"step {step}: dev {_fmt(dev)}")
                if plateaued(cfg, step, state.best["step"]):
                    state.stopped = step
            log.log(step, row)
            progress.update(step, loss, state.train_forwards)
            due = (
                step - saved_step >= cfg.save_every
                if cfg.save_every
                else time.time() - saved_at >= max(SAVE_SECONDS, 99 * save_cost)
            )
            if "signal" in stop or (due and step < cfg.steps and not state.stopped):
                save()
            if "signal" in stop:
                raise interrupted(stop["signal"])
            if state.stopped:
                progress.write(
                    f"step {step}: no new best on dev for {cfg.patience} evaluations: stopping"
                )
                break
    except KeyboardInterrupt:
        raise interrupted(signal.SIGINT) from None
    except distributed.RankFailed as e:
        if opt.steps == state.step == step - 1:  # it failed inside a step, which was undone
            save()
        interrupted(0)
        resume = f"resume it from its last checkpoint with `zotune train --resume {cfg.out}`"
        raise distributed.RankFailed(f"{e}; {resume}") from None
    progress.close()
    log.close()
    state.wall_seconds = earlier + time.time() - start
    if getattr(opt, "replayable", False):
        opt.trajectory.save(out / "trajectory.zot")
    best = dict(state.best)
    if "test" not in best:  # no step beat zero-shot on dev: report the initial model
        best["test"] = state.zero_shot_test
    last = state.step  # cfg.steps, or where a plateau stopped the run
    kept = best["step"] if cfg.keep == "best" else last
    if cfg.save_weights and world.writes:
        _keep_weights(cfg, model, opt, out, kept)
    shutil.rmtree(out / checkpoint.CHECKPOINT, ignore_errors=True)  # the run is complete
    (out / "best.safetensors").unlink(missing_ok=True)
    return {
        "status": "completed",
        "model": cfg.model,
        "task": cfg.task,
        "method": cfg.method,
        "peft": cfg.peft,
        "steps": last,
        **(
            {"stopped_early": f"no new best on dev for {cfg.patience} evaluations"}
            if last < cfg.steps
            else {}
        ),
        "forward_passes": state.train_forwards,
        # rows (examples) the training forward passes read: the full batch's passes are
        # rows / (batch_size x grad_accum), whatever the chunking (MeZO-SVRG's anchor)
        **({"rows": state.train_rows} if state.train_rows is not None else {}),
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "zero_shot": state.zero_shot,
        "zero_shot_test": state.zero_shot_test,
        "dev": best["dev"],
        "test": best["test"],
        "metric": task.metric,
        "best_step": best["step"],
        "kept_step": kept,
        "final_dev": state.last_dev,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "wall_seconds": round(state.wall_seconds, 2),
        "seconds_per_step": round(state.step_seconds / max(last, 1), 4),
        # step time over the time its forward passes took inside it (FO: forward only, so the
        # backward pass counts as overhead)
        "step_to_forward_ratio": round(state.step_seconds / max(state.forward_seconds, 1e-9), 3),
        # training throughput: tokens the steps' forward passes read (batches are padded to
        # their longest example; padding is not counted) per second of step time
        "tokens_per_second": round(state.train_tokens / max(state.step_seconds, 1e-9), 1),
        "notes": task.notes,
    }


def plateaued(cfg: TrainConfig, step: int, best_step: int) -> bool:
    """Whether `cfg.patience` dev evaluations in a row, up to the one at `step`, brought no new
    best (the best may be the starting model, at step 0)."""
    if cfg.patience is None:
        return False
    return step < cfg.steps and step - best_step >= cfg.patience * cfg.eval_every


def _save_weights(
    model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path, step: int, names: Any = None
) -> None:
    """The trained tensors by name, with their step in the file's metadata (`zotune.runs`)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    names = checkpoint.trained_tensors(model, opt) if names is None else names
    tmp = path.with_name(path.name + ".tmp")
    tensors = {n: params[n].detach().contiguous() for n in names}
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)


def _keep_weights(cfg: TrainConfig, model: Any, opt: Any, out: Path, kept: int) -> None:
    """weights.safetensors of the kept model: the current weights when it is the last step;
    else, for a replayable run, the trajectory's first `kept` steps replayed onto a freshly
    loaded model (no second copy of the weights during training); else the snapshot taken at
    the best step."""
    target = out / "weights.safetensors"
    if kept == cfg.steps:
        _save_weights(model, opt, target, kept)
    elif getattr(opt, "replayable", False):
        _, fresh, _ = load_for(cfg)
        optim.replay(fresh.model, out / "trajectory.zot", steps=kept)
        names = checkpoint.trained_tensors(model, opt)
        _save_weights(fresh.model, opt, target, kept, names=names)
    else:
        os.replace(out / "best.safetensors", target)
