"""MeZO's train/dev/test sampling protocol (methods.md 1.1), plus what to do when a split is missing.

MeZO draws `num_train + num_dev` rows from the train split with
`np.random.RandomState(seed).permutation(len(train))[:num_train + num_dev]`; the last `num_dev`
become dev, the rest train. Test is the validation split, `permutation(len(val))[:num_test]` under
the same seed (so a split smaller than `num_test` is used whole, in permuted order, as MeZO does).

A train split smaller than `num_train + num_dev` shrinks the way MeZO's code does: dev keeps
`num_dev` rows and train gets the rest (WSC: 54 train / 500 dev). MeZO would leave train empty when
the split has no more than `num_dev` rows; we split it in the requested train:dev ratio instead.
Every such deviation is returned as a plain-English note.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from zotune.tasks.base import TaskError

T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    """How many examples to draw per split, and the sampling seed."""

    num_train: int
    num_dev: int
    num_test: int
    seed: int


def subsample(rows: list[T], num: int, seed: int) -> list[T]:
    """MeZO's `sample_subset`: the first `num` of a seeded permutation."""
    order = np.random.RandomState(seed).permutation(len(rows))[:num]
    return [rows[i] for i in order]


def _train_dev(
    rows: list[T], sizes: Sizes, name: str, what: str
) -> tuple[list[T], list[T], list[str]]:
    """Split `rows` (already in sampling order) into train and dev the MeZO way."""
    n, want_train, want_dev = len(rows), sizes.num_train, sizes.num_dev
    notes = []
    if n >= want_train + want_dev:
        n_dev, n_train = want_dev, want_train
    elif n > want_dev:
        n_dev, n_train = want_dev, n - want_dev
        notes.append(
            f"{name}: {what} has {n} rows, fewer than num_train + num_dev = {want_train + want_dev}; "
            f"as in MeZO, dev keeps {want_dev} and train gets the remaining {n_train} "
            f"(pass a smaller num_dev for more training rows)"
        )
    else:
        n_dev = n * want_dev // (want_train + want_dev)
        n_train = n - n_dev
        hint = (
            " (MeZO's scripts pass num_dev=100 for CB and COPA)" if name in ("cb", "copa") else ""
        )
        notes.append(
            f"{name}: {what} has only {n} rows, not more than num_dev = {want_dev}, so MeZO's rule "
            f"would leave no training rows; split {n_train} train / {n_dev} dev in the requested "
            f"{want_train}:{want_dev} ratio instead{hint}"
        )
    if n_train < 1:
        raise TaskError(f"{name}: {what} has {n} rows, too few to draw a training set from")
    picked = rows[: n_train + n_dev]
    return picked[:n_train], picked[n_train:], notes


def mezo_splits(
    name: str,
    train: list[T] | None,
    val: list[T] | None,
    sizes: Sizes,
    *,
    train_file: str = "the train split",
    val_file: str = "the validation split",
) -> tuple[list[T], list[T], list[T], list[str]]:
    """Draw (train, dev, test, notes) from a task's train and validation rows.

    Either split may be None (missing on disk): then all three are drawn, disjointly, from the one
    that exists, and a note says so.
    """
    rng = np.random.RandomState
    if train is not None and val is not None:
        order = rng(sizes.seed).permutation(len(train))
        tr, dev, notes = _train_dev([train[i] for i in order], sizes, name, train_file)
        return tr, dev, subsample(val, sizes.num_test, sizes.seed), notes

    pool, pool_file = (train, train_file) if train is not None else (val, val_file)
    assert pool is not None, "caller must check that at least one split exists"
    missing = val_file if train is not None else train_file
    n = len(pool)
    total = sizes.num_train + sizes.num_dev + sizes.num_test
    if n >= total:
        n_test = sizes.num_test
    else:
        n_test = max(1, n * sizes.num_test // total)
    notes = [
        f"{name}: {missing} is missing, so train, dev and test are all drawn, disjointly, from "
        f"{pool_file} ({n} rows); test is not the official evaluation set, so scores are not "
        f"comparable with published ones"
    ]
    order = rng(sizes.seed).permutation(n)
    test = [pool[i] for i in order[:n_test]]
    rest = [pool[i] for i in order[n_test:]]
    if n < total:
        # Shrink train and dev in the requested ratio, like test above, rather than MeZO's rule.
        n_dev = len(rest) * sizes.num_dev // (sizes.num_train + sizes.num_dev)
        if len(rest) - n_dev < 1:
            raise TaskError(
                f"{name}: {pool_file} has {n} rows, too few to draw train, dev and test from"
            )
        notes.append(
            f"{name}: {n} rows are fewer than num_train + num_dev + num_test = {total}; "
            f"using {len(rest) - n_dev} train / {n_dev} dev / {n_test} test"
        )
        return rest[: len(rest) - n_dev], rest[len(rest) - n_dev :], test, notes
    return (
        rest[: sizes.num_train],
        rest[sizes.num_train : sizes.num_train + sizes.num_dev],
        test,
        notes,
    )
