"""LM-BFF k-shot tasks, the data of MeZO's RoBERTa-large experiments (methods.md 1.5).

Files: `<data>/k-shot-1k-test/<TASK>/<k>-<kshot_seed>/train.*` and `dev.*` (MNLI: `dev_matched.tsv`),
test one level up (or inside the seed folder, as in the original tree), any of them possibly
`.gz`. The splits are the files: nothing is resampled. `num_test` only caps test, keeping a
seed-42 random subset in file order.

Formats: SST-2 / RTE / QNLI / MNLI / SNLI are TSVs with a header; text columns are found by
header name and the label is the last field (SNLI rows have 1 or 5 annotator columns before
`gold_label`). sst-5 / mr / trec are header-less CSVs `label,sentence`.

Labels (index: raw value -> label word):
  kshot-sst-2, kshot-mr   0 -> terrible, 1 -> great
  kshot-sst-5             0..4 -> terrible, bad, okay, good, great
  kshot-trec              0..5 -> Description, Entity, Expression, Human, Location, Number
                          (LM-BFF's mapping; the data agree: 0 = "What is tyvek ?", 2 = "What is
                          DSL ?" abbreviations, 4 = "Where ...", 5 = "How many ...")
  kshot-snli, kshot-mnli  entailment, neutral, contradiction -> Yes, Maybe, No
  kshot-rte, kshot-qnli   entailment, not_entailment -> Yes, No

Masked-LM prompts (LM-BFF, paper Table 13, as written in methods.md 1.5), label words bare:
  SST-2 / sst-5 / mr  "<S1> It was {mask} ."
  TREC                "{mask} : <S1>"
  RTE / QNLI / MNLI / SNLI  "<S1> ? {mask} , <S2>"   (QNLI: S1 = question, S2 = sentence)

Decoder prompts (our choice; the label word is the scored continuation). Where MeZO has a decoder
template for the same label words we reuse it, so k-shot and SuperGLUE numbers share a format:
  SST-2 / sst-5 / mr  "<S1> It was" + " <word>"                        (MeZO's SST-2 template)
  TREC                "Question: <S1>\\nAnswer type:" + " <word>"
  RTE                 '<S1>\\nDoes this mean that "<S2>" is true? Yes or No?\\n' + Yes|No   (MeZO RTE)
  MNLI / SNLI         'Suppose <S1> Can we infer that "<S2>"? Yes, No, or Maybe?\\n' + Yes|Maybe|No
                      (MeZO's CB template: the same three-way entailment with the same words)
  QNLI                "Question: <question>\\nSentence: <sentence>\\nDoes the sentence answer the question?
                      Yes or No?\\n" + Yes|No   (questions end in "?", so no quoting them)
All text fields are stripped of surrounding whitespace (GLUE SST-2 sentences end in a space).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zotune.tasks.base import Example, Task, TaskError
from zotune.tasks.files import bad_label, existing, missing, read_csv, read_tsv, require

KSHOT_DIR = "k-shot-1k-test"
TEST_SEED = 42  # MeZO's generator caps tests at 1,000 rows with seed 42


@dataclass(frozen=True)
class KShotSpec:
    folder: str  # under k-shot-1k-test/
    style: str  # decoder/MLM template family: sentiment, trec, rte, nli3, qnli
    labels: tuple[str, ...]  # raw label values, in label-index order
    words: tuple[str, ...]  # label words, aligned with labels
    columns: tuple[str, ...] = ()  # TSV header names of the text fields; () = headerless CSV
    dev_name: str = "dev"
    test_name: str = "test"


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, KShotSpec] = {
    "kshot-sst-2": KShotSpec(
        "SST-2", "sentiment", ("0", "1"), ("terrible", "great"), ("sentence",)
    ),
    "kshot-sst-5": KShotSpec(
        "sst-5",
        "sentiment",
        ("0", "1", "2", "3", "4"),
        ("terrible", "bad", "okay", "good", "great"),
    ),
    "kshot-mr": KShotSpec("mr", "sentiment", ("0", "1"), ("terrible", "great")),
    "kshot-trec": KShotSpec(
        "trec",
        "trec",
        ("0", "1", "2", "3", "4", "5"),
        ("Description", "Entity", "Expression", "Human", "Location", "Number"),
    ),
    "kshot-snli": KShotSpec(
        "SNLI", "nli3", _NLI3, ("Yes", "Maybe", "No"), ("sentence1", "sentence2")
    ),
    "kshot-mnli": KShotSpec(
        "MNLI",
        "nli3",
        _NLI3,
        ("Yes", "Maybe", "No"),
        ("sentence1", "sentence2"),
        dev_name="dev_matched",
        test_name="test_matched",
    ),
    "kshot-rte": KShotSpec("RTE", "rte", _NLI2, ("Yes", "No"), ("sentence1", "sentence2")),
    "kshot-qnli": KShotSpec("QNLI", "qnli", _NLI2, ("Yes", "No"), ("question", "sentence")),
}


def read_kshot(path: Path, spec: KShotSpec) -> list[tuple[tuple[str, ...], int]]:
    """(text fields, label index) rows of one LM-BFF data file."""
    out = []
    if not spec.columns:
        for lineno, row in read_csv(path):
            if len(row) != 2:
                raise TaskError(
                    f"malformed line {lineno} in {path}: expected 2 comma-separated fields "
                    f"(label, sentence), got {len(row)}"
                )
            out.append(((row[1].strip(),), _index(row[0], spec, path, lineno)))
        return out
    rows = read_tsv(path)
    if not rows:
        raise TaskError(f"empty file {path}: expected a header line and data rows")
    header = rows[0][1]
    absent = [c for c in spec.columns if c not in header]
    if absent:
        raise TaskError(
            f"bad header in {path}: no column {', '.join(absent)} (has {', '.join(header)}); "
            "expected the LM-BFF/GLUE layout"
        )
    cols = [header.index(c) for c in spec.columns]
    need = max(cols) + 2  # the text columns plus a label after them
    for lineno, fields in rows[1:]:
        if len(fields) < need:
            raise TaskError(
                f"malformed line {lineno} in {path}: expected at least {need} tab-separated fields "
                f"({', '.join(spec.columns)} ... label), got {len(fields)}"
            )
        out.append((tuple(fields[c].strip() for c in cols), _index(fields[-1], spec, path, lineno)))
    return out


def _index(value: str, spec: KShotSpec, path: Path, lineno: int) -> int:
    value = value.strip()
    if value not in spec.labels:
        raise bad_label(value, path, lineno, list(spec.labels))
    return spec.labels.index(value)


def render_kshot(texts: tuple[str, ...], label: int, spec: KShotSpec) -> Example:
    """Decoder prompt + MLM prompt for one k-shot row (see the module docstring)."""
    s1 = texts[0]
    s2 = texts[1] if len(texts) > 1 else ""
    spaced = tuple(" " + w for w in spec.words)
    if spec.style == "sentiment":
        prompt, cands, mlm = f"{s1} It was", spaced, s1 + " It was {mask} ."
    elif spec.style == "trec":
        prompt, cands, mlm = f"Question: {s1}\nAnswer type:", spaced, "{mask} : " + s1
    else:
        mlm, cands = s1 + " ? {mask} , " + s2, spec.words
        if spec.style == "rte":
            prompt = f'{s1}\nDoes this mean that "{s2}" is true? Yes or No?\n'
        elif spec.style == "nli3":
            prompt = f'Suppose {s1} Can we infer that "{s2}"? Yes, No, or Maybe?\n'
        else:  # qnli: S1 is the question, S2 the candidate answer sentence
            prompt = f"Question: {s1}\nSentence: {s2}\nDoes the sentence answer the question? Yes or No?\n"
    return Example(
        prompt=prompt,
        candidates=cands,
        label=label,
        texts=texts,
        mlm_prompt=mlm,
        label_words=spec.words,
    )


def load(name: str, root: Path, num_test: int, k: int, kshot_seed: int) -> Task:
    """Load an LM-BFF k-shot task for one (k, seed) folder."""
    spec = TASKS[name]
    task_dir = root / KSHOT_DIR / spec.folder
    ext = "tsv" if spec.columns else "csv"
    if not task_dir.is_dir():
        raise missing(task_dir / f"{k}-{kshot_seed}" / f"train.{ext}")
    seed_dir = task_dir / f"{k}-{kshot_seed}"
    if not seed_dir.is_dir():
        have = sorted(p.name for p in task_dir.iterdir() if p.is_dir())
        raise TaskError(
            f"no k-shot split {seed_dir}: choose k and kshot_seed from {', '.join(have) or 'none'} (<k>-<seed>)"
        )
    train = read_kshot(require(seed_dir / f"train.{ext}"), spec)
    dev = read_kshot(require(seed_dir / f"{spec.dev_name}.{ext}"), spec)
    test_file = f"{spec.test_name}.{ext}"
    test_path = existing(seed_dir / test_file) or require(task_dir / test_file)
    test = read_kshot(test_path, spec)

    notes = []
    counts = Counter(y for _, y in train)
    short = [f"{spec.words[y]} {counts[y]}" for y in range(len(spec.labels)) if counts[y] != k]
    if short:
        notes.append(
            f"{name}: train does not have k={k} rows for every class ({', '.join(short)}): "
            "LM-BFF's generator writes fewer when a class runs out of rows"
        )
    if len(test) > num_test:
        keep = sorted(np.random.RandomState(TEST_SEED).permutation(len(test))[:num_test])
        notes.append(
            f"{name}: test capped to {num_test} of {len(test)} rows (num_test, seed {TEST_SEED})"
        )
        test = [test[i] for i in keep]
    return Task(
        name=name,
        kind="classification",
        metric="accuracy",
        train=[render_kshot(t, y, spec) for t, y in train],
        dev=[render_kshot(t, y, spec) for t, y in dev],
        test=[render_kshot(t, y, spec) for t, y in test],
        num_labels=len(spec.labels),
        notes=notes,
    )
