"""Tasks: built-in benchmark tasks (MeZO / ZO-Bench / LM-BFF) and users' own YAML tasks.

    from zotune.tasks import load_task
    task = load_task("sst2")                    # built-in name
    task = load_task("my_task.yaml")            # a user's task file (see zotune.tasks.custom)
    task = load_task("my_saved_dataset/")       # a `datasets` folder, a data file, or a Dataset
                                                # object, of a kind its columns tell (or `spec=`)

Data live in a folder laid out like shared/data (`sst2/train.tsv`, `rte/train.jsonl`,
`k-shot-1k-test/SST-2/16-42/...`): the `data_dir` argument, else env ZOTUNE_DATA, else the
package's own `zotune/data`, which only holds a small SST-2 sample.

Families: `glue` (sst2), `superglue` (rte cb boolq wsc wic copa multirc record), `squad` (squad,
drop), `lmbff` (kshot-*), `custom` (YAML, and `datasets` sources through `zotune.tasks.hfdata`). Sampling follows MeZO (see `zotune.tasks.sampling`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zotune.tasks import custom, glue, hfdata, lmbff, squad, superglue
from zotune.tasks.base import KINDS, Example, Task, TaskError
from zotune.tasks.files import resolve_data_dir
from zotune.tasks.sampling import Sizes

__all__ = ["KINDS", "Example", "Task", "TaskError", "available_tasks", "load_task"]

_BUILTIN = ("sst2", *superglue.TASKS, "squad", "drop", *lmbff.TASKS)
# ZO-Bench defines its "empty" templates (`--template_ver 1`) for these tasks only.
_EMPTY_TEMPLATE = ("sst2", "rte", "copa")
_TEMPLATES = ("mezo", "empty")


def available_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return list(_BUILTIN)


def load_task(
    name: str | os.PathLike | Any,
    data_dir: str | os.PathLike | None = None,
    *,
    num_train: int = 1000,
    num_dev: int = 500,
    num_test: int = 1000,
    seed: int = 0,
    template: str = "mezo",
    k: int = 16,
    kshot_seed: int = 42,
    spec: dict | None = None,
) -> Task:
    """Load a built-in task by name, or a user's task from a `.yaml`/`.yml` path.

    Train and dev are drawn from the train split and test from the validation split, as MeZO
    does (`num_*`, `seed`). LM-BFF k-shot tasks (`kshot-*`) read the fixed `<k>-<kshot_seed>`
    split instead; only `num_test` applies to them. `template` is "mezo" or "empty" (ZO-Bench's
    prompt-free variant, defined for sst2, rte and copa). Bad input raises `TaskError`.

    `name` may also be a dataset: a `datasets.Dataset`/`DatasetDict`, a `save_to_disk` folder, or
    a .csv/.tsv/.jsonl/.json/.parquet file. `spec` then holds the task-file keys that say how to
    read it (kind, template, columns; see zotune.tasks.custom); without it the columns must tell
    the kind (prompt + completion, or context + question + answers).
    """
    for arg, value, low in (
        ("num_train", num_train, 1),
        ("num_dev", num_dev, 0),
        ("num_test", num_test, 1),
        ("seed", seed, 0),
        ("k", k, 1),
        ("kshot_seed", kshot_seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TaskError(f"{arg} must be an integer >= {low}, got {value!r}")
    if seed > 2**32 - 1:
        raise TaskError(f"seed must be below 2**32 (numpy's limit), got {seed}")
    if template not in _TEMPLATES:
        raise TaskError(f"unknown template {template!r}: choose one of {', '.join(_TEMPLATES)}")
    sizes = Sizes(num_train, num_dev, num_test, seed)

    if hfdata.is_dataset(name):
        return custom.load_dataset_task(name, spec, sizes)
    text = os.fspath(name)
    builtin = text.strip().lower() in _BUILTIN
    if spec is not None or (
        not builtin and (Path(text).is_dir() or text.lower().endswith(custom.FILE_SUFFIXES))
    ):
        if template != "mezo":
            raise TaskError(
                f"template {template!r} does not apply to a dataset: give `template` in spec"
            )
        return custom.load_dataset_task(text, spec, sizes)
    if text.lower().endswith((".yaml", ".yml")):
        if template != "mezo":
            raise TaskError(
                f"template {template!r} does not apply to a task file: its template is the one in {text}"
            )
        return custom.load(Path(text), sizes)
    key = text.strip().lower()
    if key not in _BUILTIN:
        raise TaskError(
            f"unknown task {text!r}: choose one of {', '.join(_BUILTIN)}, or pass a path to a "
            "task .yaml or a dataset (saved folder or data file)"
        )
    if template == "empty" and key not in _EMPTY_TEMPLATE:
        raise TaskError(
            f"task {key!r} has no 'empty' template (ZO-Bench defines it for "
            f"{', '.join(_EMPTY_TEMPLATE)} only): use template='mezo'"
        )

    root = resolve_data_dir(data_dir)
    if key == "sst2":
        return glue.load(key, root, template, sizes)
    if key in superglue.TASKS:
        return superglue.load(key, root, template, sizes)
    if key in ("squad", "drop"):
        return squad.load(key, root, template, sizes)
    return lmbff.load(key, root, num_test, k, kshot_seed)
