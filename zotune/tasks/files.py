"""Reading task files (JSON, JSONL, TSV, CSV; plain or gzip-compressed) with one-line errors.

Every reader returns rows together with their 1-based line number, so that the loaders can say
exactly which line of which file is wrong. Errors from `json`, `csv` and `gzip` never escape: they
are rephrased as `TaskError`s that name the file and the fix.

TSV files are read the GLUE way: one row per line, fields split on tabs, no quoting (GLUE and LM-BFF
sentences contain bare quote characters, which a quoting-aware reader would mangle).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

from zotune.tasks.base import TaskError

DATA_HINT = "set --data-dir or ZOTUNE_DATA to a folder laid out like shared/data"


def package_data_dir() -> Path:
    """The small data folder shipped inside the package (only `sst2/`)."""
    return Path(__file__).resolve().parent.parent / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The `data_dir` argument, else env ZOTUNE_DATA, else the package's own `zotune/data`."""
    if data_dir is not None and str(data_dir) != "":
        root = Path(data_dir).expanduser()
    elif os.environ.get("ZOTUNE_DATA"):
        root = Path(os.environ["ZOTUNE_DATA"]).expanduser()
    else:
        return package_data_dir()
    if not root.is_dir():
        raise TaskError(f"data dir {root} does not exist: {DATA_HINT}")
    return root


def existing(path: Path) -> Path | None:
    """`path`, or `path.gz` when only a compressed copy exists, or None."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def require(path: Path) -> Path:
    """Like `existing`, but a missing file is an error that says how to point at the data."""
    found = existing(path)
    if found is None:
        raise missing(path)
    return found


def missing(*paths: Path) -> TaskError:
    """The error for data files that are not there."""
    what = "file" if len(paths) == 1 else "files"
    return TaskError(f"missing data {what} {' and '.join(str(p) for p in paths)}: {DATA_HINT}")


def read_text(path: Path) -> str:
    """The whole file as text; gzip is detected by the `.gz` suffix."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
                return f.read()
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise missing(path) from None
    except UnicodeDecodeError as e:
        raise TaskError(
            f"cannot read {path}: not UTF-8 text ({e.reason}); save it as UTF-8"
        ) from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise TaskError(f"cannot read {path}: {e}; check the file is complete") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    text = read_text(path)
    # Split on "\n" only (not str.splitlines) so that stray \x0b, \x1c or \u2028 inside a sentence
    # do not break a row in two.
    out = []
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            out.append((i, line))
    return out


def read_json(path: Path) -> object:
    """A whole-file JSON document."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise TaskError(
            f"malformed JSON in {path} at line {e.lineno}: {e.msg}; check the file is complete"
        ) from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """One JSON object per line; blank lines are skipped."""
    rows = []
    for lineno, line in _lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(
                f"malformed line {lineno} in {path}: not valid JSON ({e.msg}); expected one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise TaskError(
                f"malformed line {lineno} in {path}: expected a JSON object, got {type(obj).__name__}"
            )
        rows.append((lineno, obj))
    return rows


def read_tsv(path: Path) -> list[tuple[int, list[str]]]:
    """Tab-separated rows (header included, if the file has one)."""
    return [(lineno, line.split("\t")) for lineno, line in _lines(path)]


def read_csv(path: Path, delimiter: str = ",") -> list[tuple[int, list[str]]]:
    """Comma-separated rows with standard CSV quoting (header included, if any)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as e:
        raise TaskError(f"malformed CSV in {path} near line {reader.line_num}: {e}") from None
    return rows


def get(obj: dict, key: str, path: Path, lineno: int) -> object:
    """A required field of a JSON row; a missing one names the line and the field."""
    if not isinstance(obj, dict):
        raise TaskError(
            f"malformed line {lineno} in {path}: expected a JSON object with field '{key}', "
            f"got {type(obj).__name__}"
        )
    if key not in obj or obj[key] is None:
        raise TaskError(
            f"malformed line {lineno} in {path}: missing field '{key}' (has {', '.join(sorted(obj)) or 'none'})"
        )
    return obj[key]


def get_str(obj: dict, key: str, path: Path, lineno: int) -> str:
    """A required string field of a JSON row."""
    value = get(obj, key, path, lineno)
    if not isinstance(value, str):
        raise TaskError(
            f"malformed line {lineno} in {path}: field '{key}' should be a string, got {type(value).__name__}"
        )
    return value


def bad_label(value: object, path: Path, lineno: int, allowed: list[object]) -> TaskError:
    """The error for a label value outside the task's label set."""
    choices = ", ".join(repr(a) for a in allowed)
    return TaskError(
        f"unknown label {value!r} on line {lineno} of {path}: expected one of {choices}"
    )
