"""Users' own tasks, described by a YAML file passed as the task name (or a dict of its keys).

    name: my-sentiment            # optional; default: the file's stem
    kind: classification          # classification (default), multiple-choice, completion or qa
    train: data/train.csv         # paths are relative to the .yaml file: .csv .tsv .jsonl .json .parquet
    dev: data/dev.csv             # optional: without it, dev is drawn from train as MeZO does
    test: data/test.csv
    columns: [text, label]        # optional: column names for header-less CSV/TSV files
    template: "{text} It was"     # the decoder prompt; {column} is replaced by the row's value
    label_column: label
    label_words: {0: terrible, 1: great}   # label value -> word; the order gives label indices
    mlm_template: "{text} It was {mask} ."  # optional: masked-LM prompt, must contain {mask}
    text_columns: [text]          # optional: 1 or 2 fields for encoder heads

Instead of train/dev/test files, `dataset:` names a `datasets` source: a `save_to_disk` folder
(relative to the .yaml file), a single data file, or a hub name with `dataset_config:` (its config)
and optionally `splits: {train: train, dev: validation, test: test}` (see zotune.tasks.hfdata for
the default mapping). From Python, `dataset:` may be a `Dataset` or `DatasetDict` object.

Keys of each kind besides name/kind/template and the data:
    classification   label_column, label_words; optional mlm_template, text_columns
    multiple-choice  choices: a column holding a list of choices, or a list of columns (one per
                     choice); label_column: the 0-based index of the right choice
    completion       completion_column: the text to produce after the prompt (instruction tuning);
                     metric: loss (default: the completion's loss on dev/test), em or f1 (of the
                     greedily generated text)
    qa               answers_column: a string, a list of strings, or SQuAD's {"text": [...]};
                     metric: f1 (default), em or loss

Rules:
- CSV/TSV files have a header line unless `columns` is given. CSV uses standard quoting; TSV is one
  row per line split on tabs. JSONL rows are objects keyed by column name. .json and .parquet files
  are read with `datasets`.
- In templates, `{{` and `}}` stand for literal braces. In `mlm_template`, `{mask}` is kept as is.
- What follows the prompt (a label word, a choice, a completion, an answer) is appended as is if
  it starts with whitespace or the template ends with whitespace (e.g. a newline, as in MeZO's
  "...Yes or No?\\n" + "Yes"); otherwise after one space (as in MeZO's "... It was" + " great").
  Label words for the masked LM are the bare words.
- Completions and answers are trained on followed by a newline (as MeZO's SQuAD), which teaches the
  model where to stop; generated text stops at the first newline, so metric em/f1 needs one-line
  completions.
- YAML is read without implicit booleans, so `Yes`, `No`, `on` stay words (plain YAML would turn them
  into true/false). Label values match label_words keys as text: 1, 1.0 and "1" are the same;
  true/false ignore case (JSON true matches a `true:` key).
- `text_columns` defaults to the columns the template uses, if there are at most 2.
- num_train / num_dev / num_test cap each split with a seeded random subset (MeZO's sampling).

A dataset given directly as the task (a saved folder, a data file or an object, without a task
file) needs columns that say its kind: `prompt` + `completion` (completion, template "{prompt}"),
or `context` + `question` + `answers` (qa, template "{context}\\nQuestion: {question}\\nAnswer:").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from zotune.tasks import hfdata
from zotune.tasks.base import Example, Task, TaskError
from zotune.tasks.files import read_csv, read_jsonl, read_tsv
from zotune.tasks.sampling import Sizes, mezo_splits, subsample


class _Loader(yaml.SafeLoader):
    """YAML without implicit booleans: label words like Yes/No/on stay the strings written."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

# kind name in the task file -> (Task.kind, required keys, optional keys)
KINDS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "classification": (
        "classification",
        ("label_column", "label_words"),
        ("mlm_template", "text_columns"),
    ),
    "multiple-choice": ("multiple_choice", ("choices", "label_column"), ()),
    "completion": ("generation", ("completion_column",), ("metric",)),
    "qa": ("generation", ("answers_column",), ("metric",)),
}
METRICS = {"completion": ("loss", "em", "f1"), "qa": ("f1", "em", "loss")}  # first: the default
COMMON = ("name", "kind", "template", "train", "dev", "test", "columns")
DATASET_KEYS = ("dataset", "dataset_config", "splits")
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_SUFFIX_HINT = "use .csv, .tsv, .jsonl, .json or .parquet"
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")

Row = dict
Rows = list[tuple[str, Row]]  # (where: "line 3 of data.csv" / "row 3 of ...", row)


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


def _glue(template: str, text: str) -> str:
    """`text` as appended to the prompt: as is after whitespace, else after one space."""
    return text if template[-1:].isspace() or text[:1].isspace() else " " + text


# ---- the task description -----------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
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
        raise TaskError(
            f"{path} should hold a YAML mapping with keys such as kind, template, train"
        )
    return spec


def _check_spec(spec: dict, origin: str) -> str:
    """Validate the keys of a task description; returns its kind."""
    kind = spec.get("kind", "classification")
    if kind not in KINDS:
        raise TaskError(f"unknown kind {kind!r} in {origin}: choose one of {', '.join(KINDS)}")
    required, optional = KINDS[kind][1], KINDS[kind][2]
    allowed = (*COMMON, *DATASET_KEYS, *required, *optional)
    everything = {k for _, r, o in KINDS.values() for k in (*r, *o)}
    for key in spec:
        if key in everything and key not in allowed:
            raise TaskError(
                f"key '{key}' in {origin} does not apply to kind {kind}: its keys are "
                f"{', '.join(required + optional)}"
            )
        if key not in allowed:
            raise TaskError(
                f"unknown key '{key}' in {origin}: allowed keys are {', '.join(allowed)}"
            )
    has_data = spec.get("dataset") is not None
    files = [k for k in ("train", "dev", "test") if spec.get(k) not in (None, "")]
    if has_data and files:
        raise TaskError(
            f"{origin} names both a dataset and a '{files[0]}' file: keep one of the two"
        )
    if not has_data:
        for key in DATASET_KEYS[1:]:
            if key in spec:
                raise TaskError(f"key '{key}' in {origin} needs a `dataset:` key beside it")
    needed = ("template", *required) if has_data else ("train", "test", "template", *required)
    for key in needed:
        if spec.get(key) in (None, "", {}, []):
            raise TaskError(
                f"{origin} is missing required key '{key}': add it (see zotune.tasks.custom)"
            )
    for key in (
        "name",
        "train",
        "dev",
        "test",
        "template",
        "label_column",
        "mlm_template",
        "completion_column",
        "answers_column",
        "dataset_config",
    ):
        if key in spec and not isinstance(spec[key], str):
            raise TaskError(f"key '{key}' in {origin} should be a string, got {spec[key]!r}")
    if has_data and not (isinstance(spec["dataset"], str) or hfdata.is_dataset(spec["dataset"])):
        raise TaskError(
            f"key 'dataset' in {origin} should be a folder, file or hub name, or a Dataset object"
        )
    splits = spec.get("splits")
    if splits is not None and not (
        isinstance(splits, dict) and all(isinstance(v, str) for v in splits.values())
    ):
        raise TaskError(
            f"key 'splits' in {origin} should map train/dev/test to split names, e.g. "
            "{train: train, test: validation}"
        )
    for key in ("columns", "text_columns"):
        value = spec.get(key)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(c, str) for c in value)
        ):
            raise TaskError(
                f"key '{key}' in {origin} should be a list of column names, got {value!r}"
            )
    choices = spec.get("choices")
    column_list = isinstance(choices, list) and all(isinstance(c, str) for c in choices)
    if choices is not None and not (isinstance(choices, str) or column_list and len(choices) >= 2):
        raise TaskError(
            f"key 'choices' in {origin} should be a column holding lists, or a list of 2 or more "
            f"columns, got {choices!r}"
        )
    if kind == "classification" and not isinstance(spec["label_words"], dict):
        raise TaskError(
            f"key 'label_words' in {origin} should map label values to words, e.g. {{0: terrible, 1: great}}"
        )
    if "mlm_template" in spec and "{mask}" not in spec["mlm_template"]:
        raise TaskError(
            f"mlm_template in {origin} has no {{mask}}: put {{mask}} where the label word goes"
        )
    if len(spec.get("text_columns") or []) > 2:
        raise TaskError(
            f"text_columns in {origin} has {len(spec['text_columns'])} names: give 1 or 2"
        )
    if "metric" in spec and spec["metric"] not in METRICS[kind]:
        raise TaskError(
            f"unknown metric {spec['metric']!r} in {origin}: for kind {kind} choose "
            f"{', '.join(METRICS[kind])}"
        )
    return kind


# ---- reading the data ---------------------------------------------------------------------------


def _read_file(file: Path, key: str, origin: str, columns: list[str] | None) -> Rows:
    """(where, row) pairs of one data file."""
    if not file.is_file():
        raise TaskError(
            f"missing data file {file} (named by '{key}' in {origin}): fix the path; "
            "paths are relative to the .yaml file"
        )
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return [(f"line {n} of {file}", row) for n, row in read_jsonl(file)]
    if suffix in (".json", ".parquet"):
        return hfdata.split_rows(hfdata.load_file(file), str(file), None)[0]["train"]
    if suffix not in (".csv", ".tsv"):
        raise TaskError(f"unsupported data file {file}: {_SUFFIX_HINT}")
    rows = read_csv(file) if suffix == ".csv" else read_tsv(file)
    if columns is None:
        if not rows:
            raise TaskError(
                f"empty file {file}: expected a header line, or set columns: in {origin}"
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
        out.append((f"line {lineno} of {file}", dict(zip(header, fields))))
    return out


def _open_dataset(source: Any, base: Path, config: str | None) -> tuple[Any, str]:
    """A `dataset:` value that is not a single file: a Dataset/DatasetDict, and its name."""
    if hfdata.is_dataset(source):
        return source, "the dataset"
    local = (base / source).expanduser()
    if local.is_dir():
        if not hfdata.is_saved(local):
            raise TaskError(
                f"{local} is not a saved dataset (no dataset_dict.json or state.json): "
                "write it with Dataset.save_to_disk, or name data files with train/test keys"
            )
        return hfdata.load_saved(local), str(local)
    if local.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise TaskError(f"dataset {local} not found: fix the path (relative to the task file)")
    return hfdata.load_hub(source, config), source


def _splits(spec: dict, base: Path, origin: str) -> tuple[dict[str, Rows], list[str], str]:
    """The rows of each split the task names, notes, and where the train split came from."""
    source = spec.get("dataset")
    if source is not None:
        if isinstance(source, str) and (base / source).expanduser().is_file():
            file = (base / source).expanduser().resolve()  # one file: one split, "train"
            return (
                {"train": _read_file(file, "dataset", origin, spec.get("columns"))},
                [],
                str(file),
            )
        data, label = _open_dataset(source, base, spec.get("dataset_config"))
        rows, notes = hfdata.split_rows(data, label, spec.get("splits"))
        return rows, notes, label
    files = {k: (base / spec[k]).resolve() for k in ("train", "dev", "test") if spec.get(k)}
    rows = {k: _read_file(f, k, origin, spec.get("columns")) for k, f in files.items()}
    return rows, [], str(files["train"])


def _infer(columns: list[str], source: str) -> dict:
    """The task description a dataset's columns imply, or an error saying to write one."""
    have = set(columns)
    if {"prompt", "completion"} <= have:
        return {"kind": "completion", "template": "{prompt}", "completion_column": "completion"}
    if {"context", "question", "answers"} <= have:
        return {
            "kind": "qa",
            "template": "{context}\nQuestion: {question}\nAnswer:",
            "answers_column": "answers",
        }
    raise TaskError(
        f"cannot tell the task kind of {source} from its columns ({', '.join(columns)}): write a "
        f"task .yaml with `dataset: {source}` and the keys kind, template and the kind's columns, "
        "e.g. `kind: completion`, `template: '{instruction}'`, `completion_column: output` "
        "(see docs/tasks.md)"
    )


# ---- one row -> what the kind needs -------------------------------------------------------------


def _index(value: object, n: int, where: str) -> int:
    """A 0-based choice index from a row (an int, or digits in a CSV cell)."""
    text = _norm(value)
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text):
        raise TaskError(
            f"label {value!r} on {where} should be the 0-based index of the right choice"
        )
    if not 0 <= int(text) < n:
        raise TaskError(
            f"label {text} on {where} is out of range for {n} choices: use 0 to {n - 1}"
        )
    return int(text)


def _choices(row: Row, spec: dict, where: str) -> tuple[str, ...]:
    names = spec["choices"]
    if isinstance(names, list):
        values = [row[c] for c in names]
    else:
        values = row[names]
        if not isinstance(values, list | tuple):
            raise TaskError(
                f"choices {names!r} on {where} should be a list, got {type(values).__name__}: "
                "use a JSONL/parquet/datasets column of lists, or `choices: [col1, col2]`"
            )
        if len(values) < 2:
            raise TaskError(f"choices {names!r} on {where} has {len(values)}: give at least 2")
    out = tuple(_text(v) for v in values)
    if any(not c.strip() for c in out):
        raise TaskError(f"empty choice on {where}: give every choice some text")
    return out


def _answers(value: object, where: str, column: str) -> tuple[str, ...]:
    if (
        isinstance(value, dict) and "text" in value
    ):  # SQuAD's {"text": [...], "answer_start": [...]}
        value = value["text"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(a, str) for a in value):
        raise TaskError(
            f"'{column}' on {where} should be a string, a list of strings or {{'text': [...]}}, "
            f"got {type(value).__name__}"
        )
    answers = tuple(a for a in value if a.strip())
    if not answers:
        raise TaskError(f"no answer in '{column}' on {where}: give at least one non-empty answer")
    return answers


def _parse(kind: str, spec: dict, row: Row, where: str, words: dict[str, str]) -> Any:
    """What a row of this kind contributes besides its prompt: a label, choices, answers."""
    if kind == "classification":
        label = _norm(row[spec["label_column"]])
        if label not in words:
            choices = ", ".join(repr(k) for k in words)
            raise TaskError(
                f"unknown label {row[spec['label_column']]!r} on {where}: expected one of {choices}"
            )
        return list(words).index(label)
    if kind == "multiple-choice":
        choices = _choices(row, spec, where)
        return choices, _index(row[spec["label_column"]], len(choices), where)
    if kind == "completion":
        column = spec["completion_column"]
        completion = _text(row[column])
        if not completion.strip():
            raise TaskError(f"empty completion in '{column}' on {where}: every row needs one")
        if spec.get("metric", "loss") != "loss" and "\n" in completion.strip():
            raise TaskError(
                f"completion on {where} spans several lines, but generated text stops at the first "
                "newline: use metric: loss, or one-line completions"
            )
        return (completion,)
    return _answers(row[spec["answers_column"]], where, spec["answers_column"])


# ---- loading ------------------------------------------------------------------------------------


def load(path: Path, sizes: Sizes) -> Task:
    """Load a user task from its YAML description."""
    spec = _read_yaml(path)
    return build(spec, path.parent, str(path), sizes, default_name=path.stem)


def load_dataset_task(source: Any, spec: dict | None, sizes: Sizes) -> Task:
    """A task from a `datasets` object, a saved folder or a data file given as the task itself;
    `spec` (the task-file keys, without the data) says how to read it, else the columns do."""
    if hfdata.is_dataset(source):
        name = "dataset"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise TaskError(f"{path} not found: pass a built-in task, a task .yaml or a dataset")
        name, source = path.stem if path.is_file() else path.name, str(path.resolve())
    if spec is not None and not isinstance(spec, dict):
        raise TaskError(f"spec should be a dict of task-file keys, got {type(spec).__name__}")
    if spec is not None and any(
        spec.get(k) is not None for k in ("dataset", "train", "dev", "test")
    ):
        raise TaskError("spec: the data are the dataset given as the task; drop dataset/train/test")
    origin = "the task spec" if name == "dataset" else source
    return build({**(spec or {}), "dataset": source}, Path.cwd(), origin, sizes, name)


def build(spec: dict, base: Path, origin: str, sizes: Sizes, default_name: str = "task") -> Task:
    """A task from its description (the YAML keys); relative paths are relative to `base`. A
    description with no template but a `dataset` gets its kind and template from the columns."""
    rows = None
    if spec.get("dataset") is not None and set(spec) <= {"dataset", "name"}:
        rows, notes, train_source = _splits(spec, base, origin)
        first = rows["train"][0][1] if rows["train"] else {}
        label = train_source if isinstance(spec["dataset"], str) else "the dataset"
        spec = {**_infer(list(first), label), **spec}
    kind = _check_spec(spec, origin)
    name = spec.get("name") or default_name
    template = spec["template"]
    words: dict[str, str] = {}
    if kind == "classification":
        words = {_norm(k): "" if v is None else str(v) for k, v in spec["label_words"].items()}
        if len(words) != len(spec["label_words"]):
            raise TaskError(
                f"label_words in {origin} has two keys that are the same value: make them distinct"
            )
        if any(not w.strip() for w in words.values()):
            raise TaskError(f"label_words in {origin} has an empty word: give every label a word")
    used = _fields(template) + [f for f in _fields(spec.get("mlm_template", "")) if f != "mask"]
    if "" in used:
        raise TaskError(
            f"a template in {origin} has an empty {{}}: write {{column}} or {{{{ for a literal brace"
        )
    text_columns: list[str] = []
    if kind == "classification":
        text_columns = spec.get("text_columns") or (
            _fields(template) if len(_fields(template)) <= 2 else []
        )
    choice_columns = spec["choices"] if isinstance(spec.get("choices"), list) else []
    columns = [
        *used,
        *text_columns,
        *choice_columns,
        *[spec[k] for k in ("label_column", "completion_column", "answers_column") if k in spec],
        *([spec["choices"]] if isinstance(spec.get("choices"), str) else []),
    ]
    needed = list(dict.fromkeys(columns))

    if rows is None:
        rows, notes, train_source = _splits(spec, base, origin)
    splits: dict[str, list[tuple[Row, Any]]] = {}
    for key, split in rows.items():
        parsed = []
        for where, row in split:
            absent = [c for c in needed if c not in row]
            if absent:
                raise TaskError(
                    f"no column '{absent[0]}' on {where} (has {', '.join(map(str, row))}): "
                    f"fix the template or column keys in {origin}, or the columns list"
                )
            parsed.append((row, _parse(kind, spec, row, where, words)))
        if not parsed:
            raise TaskError(f"no data rows in the '{key}' split of {origin}")
        splits[key] = parsed

    if "dev" in splits and "test" not in splits:
        raise TaskError(f"{origin} gives a dev split but no test split: name one")
    if "dev" in splits:
        train = subsample(splits["train"], sizes.num_train, sizes.seed)
        dev = subsample(splits["dev"], sizes.num_dev, sizes.seed)
        test = subsample(splits["test"], sizes.num_test, sizes.seed)
    else:
        train, dev, test, more = mezo_splits(
            name, splits["train"], splits.get("test"), sizes, train_file=train_source
        )
        if "test" in splits:
            what = "file" if spec.get("dataset") is None else "split"
            more.insert(
                0, f"{name}: no dev {what} in {origin}, so dev is drawn from train as MeZO does"
            )
        notes = notes + more

    mlm = spec.get("mlm_template")
    bare = tuple(w.strip() for w in words.values())
    candidates = tuple(_glue(template, w) for w in words.values())
    if kind == "classification" and not text_columns:
        notes.append(
            f"{name}: texts are empty because the template uses more than 2 columns; "
            "set text_columns (1 or 2 names) to use encoder classification heads"
        )

    def render(row: Row, value: Any) -> Example:
        prompt = _fill(template, row)
        if kind == "classification":
            return Example(
                prompt=prompt,
                candidates=candidates,
                label=value,
                texts=tuple(_text(row[c]) for c in text_columns),
                mlm_prompt=_fill(mlm, row, keep_mask=True) if mlm else "",
                label_words=bare if mlm else (),
            )
        if kind == "multiple-choice":
            choices, label = value
            return Example(
                prompt=prompt, candidates=tuple(_glue(template, c) for c in choices), label=label
            )
        return Example(prompt=prompt, answers=tuple(_glue(template, a) for a in value))

    metric = {"classification": "accuracy", "multiple-choice": "accuracy"}.get(kind)
    return Task(
        name=name,
        kind=KINDS[kind][0],
        metric=metric or spec.get("metric", METRICS[kind][0]),
        train=[render(r, v) for r, v in train],
        dev=[render(r, v) for r, v in dev],
        test=[render(r, v) for r, v in test],
        num_labels=len(words),
        notes=notes,
    )
