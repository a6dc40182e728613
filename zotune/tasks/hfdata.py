"""Rows from the `datasets` library: saved folders, hub names, JSON/Parquet files and objects.

`datasets` is optional (the `hub` extra); it is imported only when one of these sources is used.
Every source ends up as named splits of plain row dicts, each with a place ("row 3 of split
'train' of data/my_ds") that error messages can point at.

Default split mapping (a `splits:` key in the task file overrides it): train is the "train" split;
test is "test", else "validation" (or "dev"); dev is "validation" (or "dev") when test came from
"test", and otherwise is drawn from train as MeZO does. A single Dataset, or a single data file, is
one "train" split: dev and test are then drawn from it, disjointly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zotune.tasks.base import TaskError

Rows = list[tuple[str, dict]]  # (where, row)
SPLIT_KEYS = ("train", "dev", "test")
_DEV_NAMES = ("validation", "dev")
_FORMATS = {".json": "json", ".parquet": "parquet"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise TaskError(
            "this task source needs the `datasets` package: pip install 'zotune[hub]'"
        ) from None
    return datasets


def is_dataset(obj: object) -> bool:
    """Whether `obj` is a `datasets.Dataset` or `DatasetDict` (without importing `datasets`)."""
    return type(obj).__module__.startswith("datasets.") and type(obj).__name__ in (
        "Dataset",
        "DatasetDict",
    )


def is_saved(folder: Path) -> bool:
    """Whether `folder` was written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return folder.is_dir() and any(
        (folder / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def load_saved(folder: Path) -> Any:
    try:
        return _datasets().load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise TaskError(f"cannot load the saved dataset {folder}: {e}") from None


def load_file(file: Path) -> Any:
    """A .json (JSON lines or an array of objects) or .parquet file, as one Dataset."""
    fmt = _FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise TaskError(f"{file}: `datasets` reads .json and .parquet files here")
    try:
        return _datasets().load_dataset(fmt, data_files=str(file), split="train")
    except Exception as e:  # pyarrow and datasets raise many types for a damaged file
        problem = str(e).strip().split("\n")[0][:200]
        raise TaskError(f"cannot read {file} as {fmt}: {problem}") from None


def load_hub(name: str, config: str | None) -> Any:
    """A dataset from the Hugging Face hub (all its splits), or an error saying why not."""
    datasets = _datasets()
    try:
        return datasets.load_dataset(name, config)
    except Exception as e:  # offline, unknown name, missing config...: one line, with the fix
        problem = str(e).strip().split("\n")[0][:200]
        raise TaskError(
            f"cannot load dataset {name!r} (config {config!r}) from the hub: {problem}; "
            "check the name and config, or point `dataset:` at a local folder or file"
        ) from None


def _rows(ds: Any, label: str) -> Rows:
    return [(f"row {i} of {label}", row) for i, row in enumerate(ds.to_list(), start=1)]


def split_rows(
    data: Any, source: str, mapping: dict[str, str] | None
) -> tuple[dict[str, Rows], list[str]]:
    """{"train": rows, maybe "dev", maybe "test"} of a Dataset or DatasetDict, and notes."""
    if not hasattr(data, "keys"):  # a single Dataset: one split
        if mapping:
            raise TaskError(
                f"{source} is a single Dataset without named splits: remove `splits:` from the task"
            )
        return {"train": _rows(data, source)}, []
    names = list(data.keys())
    if mapping:
        unknown = [k for k in mapping if k not in SPLIT_KEYS]
        if unknown:
            raise TaskError(f"splits: has key '{unknown[0]}': use train, dev and test")
        if "train" not in mapping:
            raise TaskError("splits: must name the train split, e.g. {train: train, test: test}")
        chosen = dict(mapping)
    else:
        dev_name = next((n for n in _DEV_NAMES if n in names), None)
        chosen = {"train": "train"}
        if "test" in names:
            chosen["test"] = "test"
            if dev_name:
                chosen["dev"] = dev_name
        elif dev_name:
            chosen["test"] = dev_name
    for key, split in chosen.items():
        if split not in names:
            raise TaskError(
                f"{source} has no split {split!r} (for {key}): it has {', '.join(names)}; "
                "map them with `splits: {train: ..., dev: ..., test: ...}` in a task file"
            )
    notes = []
    if not mapping and chosen.get("test") in _DEV_NAMES:
        notes.append(
            f"{source} has no test split: test is its {chosen['test']!r} split and dev is drawn "
            "from train, as MeZO does"
        )
    out = {key: _rows(data[split], f"split {split!r} of {source}") for key, split in chosen.items()}
    return out, notes
