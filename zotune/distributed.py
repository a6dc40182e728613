"""Data-parallel and query-parallel zeroth-order training on torch.distributed.

A zeroth-order step's gradient is a few scalars, so ranks that share the run's seed only
exchange losses: every rank draws the same global batch and the same directions, evaluates its
share, all-gathers the scalars (float64, a few bytes a rank) and applies the same update. There
is no gradient all-reduce and no weight broadcast.

`torchrun --nproc-per-node N -m zotune train ...` runs one step over N ranks laid out as a grid:

- data parallel over D ranks: the step's `--grad-accum` micro-batches of `--batch-size` are
  split among them (rank d evaluates micro-batches d·K/D ... (d+1)·K/D − 1); each loss the
  estimator sees is `MicroBatches.mean` of all K micro-batch losses, gathered in micro-batch
  order, so the run is the single-process `--grad-accum K` run bit for bit;
- query parallel over Q ranks: with `--queries q`, rank group j evaluates directions
  j·q/Q ... (j+1)·q/Q − 1 of the step, then the q projected gradients are gathered in order
  (`estimators.combine`): the single-process q-query run bit for bit.

D = gcd(N, K), Q = N / D (data parallel first); Q must divide q. The run's arithmetic depends on
its config alone, not on N: a run resumes on any number of ranks that fits its K and q.
Evaluation and MeZO-SVRG's full-batch loss are sharded by batches over all ranks and gathered.
Rank 0 writes the run directory; the other ranks write theirs to a temporary folder, deleted at
the end. The scalars travel over gloo (they are host floats, also when the model is on a GPU).
A rank that dies or stops answering for ZOTUNE_DIST_TIMEOUT seconds (default 1800) ends the run
on every rank with `RankFailed` (rank 0 first checkpoints the last completed step when the
failure came inside a step, which is undone).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .engine.estimators import Estimate, MicroBatches, combine, loss_value
from .settings import ConfigError

# Methods whose step is not a function of a few gathered losses.
NOT_DISTRIBUTED = {
    "fo-sgd": "backpropagates (data-parallel backprop all-reduces gradients: use DDP)",
    "fo-adam": "backpropagates (data-parallel backprop all-reduces gradients: use DDP)",
    "hybrid-zo-fo": "backpropagates through its top layers",
    "forward-grad": "computes forward-mode gradients of each micro-batch",
    "zo-blockwise": "updates block by block within a step (a failed rank would leave it half done)",
    "linear-probe": "trains no weights by steps",
    "icl": "trains no weights",
}

TIMEOUT_ENV = "ZOTUNE_DIST_TIMEOUT"


class RankFailed(ConnectionError):
    """Another rank died or stopped answering: the run cannot go on (every rank raises this)."""


def grid(ranks: int, micro_batches: int, queries: int) -> tuple[int, int]:
    """(D, Q): data-parallel and query-parallel ranks, D·Q = ranks, D dividing the step's
    micro-batches and Q its queries; data parallel first (it finds a grid when one exists)."""
    data = math.gcd(ranks, micro_batches)
    query = ranks // data
    if queries % query:
        raise ConfigError(
            f"{ranks} ranks cannot share a step of {micro_batches} micro-batches "
            f"(--grad-accum) and {queries} directions (--queries): make --grad-accum a multiple "
            f"of {ranks}, or --queries a multiple of {query}"
        )
    return data, query


@dataclass
class World:
    """The ranks of a run and what each does; the default is one process (no communication)."""

    rank: int = 0
    size: int = 1
    data: int = 1  # D: ranks splitting each step's micro-batches
    queries: int = 1  # Q: ranks splitting each step's directions
    timeout: float = 0.0
    group: Any = field(default=None, repr=False)  # a gloo group of all ranks (None: the default)
    scratch: Path | None = field(default=None, repr=False)

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run directory (rank 0)."""
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        return self.rank % self.data

    @property
    def query_rank(self) -> int:
        return self.rank // self.data

    # -- the hooks of the training loop ---------------------------------------------------
    def same(self, value: Any) -> Any:
        """Rank 0's value, on every rank (e.g. a default run name made from the time)."""
        if self.size == 1:
            return value
        box = [value]
        self._collective(
            "agreeing on the run", torch.distributed.broadcast_object_list, box, 0, group=self.group
        )
        return box[0]

    def run_dir(self, out: Path, resume: bool) -> Path:
        """Where this rank writes the run: `out` on rank 0, a temporary folder elsewhere (with
        links to the checkpoint and a copy of the config when resuming: every rank loads it)."""
        if self.writes:
            return out
        from .checkpoint import CHECKPOINT, OLD

        self.scratch = Path(tempfile.mkdtemp(prefix=f"zotune-rank{self.rank}-"))
        if resume:
            if (out / "config.yaml").exists():
                shutil.copy(out / "config.yaml", self.scratch / "config.yaml")
            for name in (CHECKPOINT, OLD):
                if (out / name).exists():
                    (self.scratch / name).symlink_to((out / name).resolve())
        return self.scratch

    def closure(self, loss: Callable[[Any], Any], micro: Sequence[Sequence[Any]]) -> Any:
        """The closure of one step over its K micro-batches: returns the loss over all of them
        (as one process accumulating them would), evaluating only this rank's share."""
        if self.size == 1:
            if len(micro) == 1:
                return lambda b=micro[0]: loss(b)
            return MicroBatches([lambda b=b: loss(b) for b in micro])
        share = len(micro) // self.data
        mine = micro[self.data_rank * share : (self.data_rank + 1) * share]
        return _ShardedMicroBatches([lambda b=b: loss(b) for b in mine], self)

    def split_queries(self, opt: Any) -> None:
        """Make `opt` evaluate only this rank's slice of each step's directions and gather the
        projected gradients of the others (nothing with one query group)."""
        if self.queries == 1:
            return
        original = opt.estimate

        def estimate(closure: Any, seeds: list[int]) -> Estimate:
            share = len(seeds) // self.queries
            part = original(closure, seeds[self.query_rank * share : (self.query_rank + 1) * share])
            try:
                values = torch.tensor([*part.grads, *part.losses], dtype=torch.float64)
                rows = self._gather(values, "gathering the projected gradients")
            except BaseException:
                opt.space.transition(part.pending, None)  # never leave the model perturbed
                raise
            parts = [
                _part(seeds[j * share : (j + 1) * share], rows[j * self.data + self.data_rank])
                for j in range(self.queries)
            ]
            merged = combine(opt.estimator, parts)
            merged.pending = part.pending
            return merged

        opt.estimate = estimate

    def agreed(self, stop: dict[str, int]) -> Any:
        """The loop's view of stop requests (SIGINT, SIGTERM): with several ranks a request
        counts once all ranks have exchanged it (`step_end`), so they stop at the same step."""
        return stop if self.size == 1 else _AgreedStop(stop)

    def step_end(
        self, stop: Any, forward_passes: int, tokens: int, rows: int
    ) -> tuple[int, int, int]:
        """After each step: agree on stop requests; returns the step's forward passes, the tokens
        and the rows they read, each summed over the ranks."""
        if self.size == 1:
            return forward_passes, tokens, rows
        signal = stop.requests.get("signal", 0)
        values = torch.tensor([signal, forward_passes, tokens, rows], dtype=torch.int64)
        gathered = self._gather(values, "a step")
        if int(gathered[:, 0].max()):
            stop.agreed["signal"] = int(gathered[:, 0].max())
        passes, tokens, rows = (int(n) for n in gathered[:, 1:].sum(0).tolist())
        return passes, tokens, rows

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], what: str) -> list[Any]:
        """[fn(item) for item in items], item i computed on rank i mod N and the results
        gathered, in order, on every rank (every rank must hold the same weights)."""
        if self.size == 1:
            return [fn(item) for item in items]
        mine = [fn(items[i]) for i in range(self.rank, len(items), self.size)]
        gathered: list[Any] = [None] * self.size
        self._collective(
            what, torch.distributed.all_gather_object, gathered, mine, group=self.group
        )
        return [gathered[i % self.size][i // self.size] for i in range(len(items))]

    def evaluate(self, objective: Any, examples: Sequence[Any], batch_size: int) -> dict:
        """`objective.evaluate(examples, batch_size)`, its batches computed on all ranks."""
        if self.size == 1:
            return objective.evaluate(examples, batch_size=batch_size)
        from .objectives import length_batches

        examples, batches = length_batches(examples, batch_size)
        return objective.combine(
            examples, self.map(objective.evaluate_batch, batches, "evaluation")
        )

    # -- communication ----------------------------------------------------------------------
    def _gather(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's `values` (same shape on all), stacked in rank order."""
        out = [torch.empty_like(values) for _ in range(self.size)]
        self._collective(what, torch.distributed.all_gather, out, values, group=self.group)
        return torch.stack(out)

    def _collective(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:  # gloo: a closed connection or a timeout
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            # gloo's first sentence, without its source location
            detail = re.sub(r"^\[[^\]]*\] ", "", detail).split(". ")[0][:200]
            raise RankFailed(
                f"rank {self.rank} of {self.size}: another rank stopped answering during {what} "
                f"(it exited, or took longer than {TIMEOUT_ENV}={self.timeout:g} s): {detail}"
            ) from None


def _part(seeds: list[int], row: torch.Tensor) -> Estimate:
    grads = row[: len(seeds)].tolist()
    losses = row[len(seeds) :].tolist()
    return Estimate(seeds, grads, 0.0, len(losses), None, losses)


class _ShardedMicroBatches:
    """A rank's micro-batches of a step: calling it evaluates them and returns `MicroBatches.mean`
    of every rank's micro-batch losses in micro-batch order (one all-gather of float64)."""

    def __init__(self, losses: list[Callable[[], Any]], world: World):
        self.losses, self.world = losses, world

    def __call__(self) -> float:
        mine = torch.tensor([loss_value(loss()) for loss in self.losses], dtype=torch.float64)
        rows = self.world._gather(mine, "a forward pass")
        first = self.world.query_rank * self.world.data  # this query group's data ranks
        return MicroBatches.mean(rows[first : first + self.world.data].flatten().tolist())


class _AgreedStop:
    """Stop requests as the loop sees them: `requests` is what this rank's signal handler set;
    `"signal" in stop` turns true only at the step where the ranks agreed on it."""

    def __init__(self, requests: dict[str, int]):
        self.requests = requests
        self.agreed: dict[str, int] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.agreed

    def __getitem__(self, key: str) -> int:
        return self.agreed[key]


_current = World()


def world() -> World:
    """The ranks of the run in progress (one process outside `launched`)."""
    return _current


def launched_rank() -> int:
    """This process's rank as its launcher (torchrun, accelerate launch) set it; 0 without."""
    return int(os.environ.get("RANK", "0"))


def check(cfg: Any, ranks: int) -> tuple[int, int]:
    """The grid of a run on `ranks` ranks, or a ConfigError saying why it cannot be split."""
    from . import optim

    reason = NOT_DISTRIBUTED.get(cfg.method)
    if reason is None and getattr(optim.OPTIMIZERS.get(cfg.method), "backprop", False):
        reason = "backpropagates"
    if reason:
        raise ConfigError(f"{cfg.method} runs in one process only: it {reason}")
    return grid(ranks, cfg.grad_accum, cfg.queries)


@contextlib.contextmanager
def launched(cfg: Any) -> Iterator[World]:
    """The run's `World`: one process, unless a launcher set WORLD_SIZE > 1 (then this joins
    the process group over gloo, or uses the one already initialized) or the caller
    initialized a process group of several ranks. Checks the method and the grid first."""
    global _current
    dist = torch.distributed
    ours = False
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = launched_rank(), int(os.environ.get("WORLD_SIZE", "1"))
        ours = size > 1
    if size == 1:
        yield _current
        return
    cfg.validate()
    data, queries = check(cfg, size)
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "1800"))
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds > 0")
    if ours:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE is set but not {missing[0]}: launch with torchrun")
        try:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        except RuntimeError as e:
            raise RankFailed(f"rank {rank} could not join the process group: {e}") from None
    group = None
    if not ours and "gloo" not in str(dist.get_backend()):  # e.g. the caller's NCCL group
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    if torch.cuda.is_available():  # one GPU per rank of a node (ranks may share one)
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
    _current = World(rank, size, data, queries, timeout, group)
    try:
        with contextlib.ExitStack() as stack:
            if rank:  # rank 0 alone prints; every rank's errors still go to stderr
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
            yield _current
    finally:
        if _current.scratch is not None:
            shutil.rmtree(_current.scratch, ignore_errors=True)
        _current = World()
        if group is not None:
            dist.destroy_process_group(group)
        if ours:
            dist.destroy_process_group()
