"""Users' own classification tasks, described by a YAML file passed as the task name.

    name: my-sentiment            # optional; default: the file's stem
    train: data/train.csv         # paths are relative to the .yaml file; .csv, .tsv or .jsonl
    dev: data/dev.csv             # optional: without it, dev is drawn from train as MeZO does
    test: data/test.csv
    columns: [text, label]        # optional: column names for header-less CSV/TSV files
    template: "{text} It was"     # the decoder prompt; {column} is replaced by the row's value
    label_column: label
    label_words: {0: terrible, 1: great}   # label value -> word; the order gives label indices
    mlm_template: "{text} It was {mask} ."  # optional: masked-LM prompt, must contain {mask}
    text_columns: [text]          # optional: 1 or 2 fields for encoder heads

Rules:
- CSV/TSV files have a header line unless `columns` is given. CSV uses standard quoting; TSV is one
  row per line split on tabs. JSONL rows are objects keyed by column name.
- In templates, `{{` and `}}` stand for literal braces. In `mlm_template`, `{mask}` is kept as is.
- Candidate for a label word: the word itself if it starts with whitespace or the template ends
  with whitespace (e.g. a newline, as in MeZO's "...Yes or No?\\n" + "Yes"); otherwise " " + word
  (as in MeZO's "... It was" + " great"). Label words for the masked LM are the bare words.
- YAML is read without implicit booleans, so `Yes`, `No`, `on` stay words (plain YAML would turn them
  into true/false). Label values match label_words keys as text: 1, 1.0 and "1" are the same;
  true/false ignore case (JSON true matches a `true:` key).
- `text_columns` defaults to the columns the template uses, if there are at most 2.
- num_train / num_dev / num_test cap each split with a seeded random subset (MeZO's sampling).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from zotune.tasks.base import Example, Task, TaskError
from zotune.tasks.files import bad_label, read_csv, read_jsonl, read_tsv
from zotune.tasks.sampling import Sizes, mezo_splits, subsample


class _Loader(yaml.SafeLoader):
    """YAML without implicit booleans: label words like Yes/No/on stay the strings written."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

REQUIRED = ("train", "test", "template", "label_column", "label_words")
OPTIONAL = ("name", "dev", "columns", "mlm_template", "text_columns")
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")

Row = dict


def _norm(value: object) -> str:
    """A label value as text, so that YAML keys, CSV cells and JSON values compare equal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text.lower() if text.lower() in ("true", "false") else text


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fields(template: str) -> list[str]:
    """Column names used by a template, in order of first use."""
    names = [m.group(1) for m in _FIELD.finditer(template) if m.group(1) is not None]
    return list(dict.fromkeys(n.strip() for n in names))


def _fill(template: str, row: Row, keep_mask: bool = False) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]  # "{{" -> "{", "}}" -> "}"
        key = m.group(1).strip()
        if keep_mask and key == "mask":
            return "{mask}"
        return _text(row[key])

    return _FIELD.sub(sub, template)


def _read_spec(path: Path) -> dict:
    if not path.is_file():
        raise TaskError(f"task file {path} not found: pass the path of an existing .yaml task file")
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().split("\n")[0]
        raise TaskError(f"cannot parse {path} as YAML{where} ({problem}): fix the syntax") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path} should hold a YAML mapping with keys {', '.join(REQUIRED)}")
    unknown = [str(k) for k in spec if k not in REQUIRED + OPTIONAL]
    if unknown:
        raise TaskError(
            f"unknown key '{unknown[0]}' in {path}: allowed keys are {', '.join(REQUIRED + OPTIONAL)}"
        )
    for key in REQUIRED:
        if spec.get(key) in (None, "", {}, []):
            raise TaskError(
                f"{path} is missing required key '{key}': add it (see zotune.tasks.custom)"
            )
    for key in ("name", "train", "dev", "test", "template", "label_column", "mlm_template"):
        if key in spec and not isinstance(spec[key], str):
            raise TaskError(f"key '{key}' in {path} should be a string, got {spec[key]!r}")
    for key in ("columns", "text_columns"):
        value = spec.get(key)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(c, str) for c in value)
        ):
            raise TaskError(
                f"key '{key}' in {path} should be a list of column names, got {value!r}"
            )
    if not isinstance(spec["label_words"], dict):
        raise TaskError(
            f"key 'label_words' in {path} should map label values to words, e.g. {{0: terrible, 1: great}}"
        )
    if "mlm_template" in spec and "{mask}" not in spec["mlm_template"]:
        raise TaskError(
            f"mlm_template in {path} has no {{mask}}: put {{mask}} where the label word goes"
        )
    if len(spec.get("text_columns") or []) > 2:
        raise TaskError(
            f"text_columns in {path} has {len(spec['text_columns'])} names: give 1 or 2"
        )
    return spec


def _read_rows(
    file: Path, key: str, yaml_path: Path, columns: list[str] | None
) -> list[tuple[int, Row]]:
    """(line number, row) pairs of one data file."""
    if not file.is_file():
        raise TaskError(
            f"missing data file {file} (named by '{key}' in {yaml_path}): fix the path; "
            "paths are relative to the .yaml file"
        )
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(file)
    if suffix not in (".csv", ".tsv"):
        raise TaskError(f"unsupported data file {file}: use .csv, .tsv or .jsonl")
    rows = read_csv(file) if suffix == ".csv" else read_tsv(file)
    if columns is None:
        if not rows:
            raise TaskError(
                f"empty file {file}: expected a header line, or set columns: in {yaml_path}"
            )
        header, rows = [c.strip() for c in rows[0][1]], rows[1:]
    else:
        header = columns
    sep = "comma" if suffix == ".csv" else "tab"
    out = []
    for lineno, fields in rows:
        if len(fields) != len(header):
            raise TaskError(
                f"malformed line {lineno} in {file}: expected {len(header)} {sep}-separated fields "
                f"({', '.join(header)}), got {len(fields)}"
            )
        out.append((lineno, dict(zip(header, fields))))
    return out


def load(path: Path, sizes: Sizes) -> Task:
    """Load a user task from its YAML description."""
    spec = _read_spec(path)
    name = spec.get("name") or path.stem
    template, label_column = spec["template"], spec["label_column"]
    words = {_norm(k): "" if v is None else str(v) for k, v in spec["label_words"].items()}
    if len(words) != len(spec["label_words"]):
        raise TaskError(
            f"label_words in {path} has two keys that are the same value: make them distinct"
        )
    if any(not w.strip() for w in words.values()):
        raise TaskError(f"label_words in {path} has an empty word: give every label a word")
    keys = list(words)
    used = _fields(template) + [f for f in _fields(spec.get("mlm_template", "")) if f != "mask"]
    if "" in used:
        raise TaskError(
            f"a template in {path} has an empty {{}}: write {{column}} or {{{{ for a literal brace"
        )
    text_columns = spec.get("text_columns") or (
        _fields(template) if len(_fields(template)) <= 2 else []
    )
    needed = list(dict.fromkeys([*used, label_column, *text_columns]))

    files = {
        key: (path.parent / spec[key]).resolve()
        for key in ("train", "dev", "test")
        if spec.get(key)
    }
    splits: dict[str, list[tuple[Row, int]]] = {}
    for key, file in files.items():
        parsed = []
        for lineno, row in _read_rows(file, key, path, spec.get("columns")):
            absent = [c for c in needed if c not in row]
            if absent:
                raise TaskError(
                    f"no column '{absent[0]}' on line {lineno} of {file} (has {', '.join(map(str, row))}): "
                    f"fix the template, label_column or text_columns in {path}, or the columns list"
                )
            label = _norm(row[label_column])
            if label not in words:
                raise bad_label(row[label_column], file, lineno, keys)
            parsed.append((row, keys.index(label)))
        if not parsed:
            raise TaskError(f"no data rows in {file}: the '{key}' split is empty")
        splits[key] = parsed

    notes: list[str] = []
    if "dev" not in splits:
        train, dev, test, notes = mezo_splits(
            name, splits["train"], splits["test"], sizes, train_file=str(files["train"])
        )
        notes.insert(0, f"{name}: no dev file in {path}, so dev is drawn from train as MeZO does")
    else:
        train = subsample(splits["train"], sizes.num_train, sizes.seed)
        dev = subsample(splits["dev"], sizes.num_dev, sizes.seed)
        test = subsample(splits["test"], sizes.num_test, sizes.seed)

    bare = tuple(w.strip() for w in words.values())
    glued = template[-1:].isspace()
    candidates = tuple(w if glued or w[:1].isspace() else " " + w for w in words.values())
    if not text_columns:
        notes.append(
            f"{name}: texts are empty because the template uses more than 2 columns; "
            "set text_columns (1 or 2 names) to use encoder classification heads"
        )
    mlm = spec.get("mlm_template")

    def render(row: Row, label: int) -> Example:
        return Example(
            prompt=_fill(template, row),
            candidates=candidates,
            label=label,
            texts=tuple(_text(row[c]) for c in text_columns),
            mlm_prompt=_fill(mlm, row, keep_mask=True) if mlm else "",
            label_words=bare if mlm else (),
        )

    return Task(
        name=name,
        kind="classification",
        metric="accuracy",
        train=[render(r, y) for r, y in train],
        dev=[render(r, y) for r, y in dev],
        test=[render(r, y) for r, y in test],
        num_labels=len(words),
        notes=notes,
    )
