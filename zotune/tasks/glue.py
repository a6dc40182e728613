"""GLUE SST-2 from the GLUE TSV files `sst2/train.tsv` and `sst2/dev.tsv` (header `sentence\\tlabel`).

Templates (methods.md 1.2, 1.5):
  mezo   "<sentence> It was" + " terrible" / " great"      (MeZO; the sentence is stripped)
  empty  "<sentence> "       + "terrible" / "great"        (ZO-Bench `--template_ver 1`)
  MLM    "<sentence> It was {mask} ."  with terrible / great (LM-BFF)
Labels: 0 = negative (terrible), 1 = positive (great). Test = the GLUE dev set (872 rows).

The package ships a small sample in `zotune/data/sst2/` (the fallback data dir): 300 + 300 train
rows and 100 + 100 dev rows per label, drawn with `np.random.RandomState(0)` from the full GLUE
files, lines kept byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from zotune.tasks.base import Example, Task, TaskError
from zotune.tasks.files import bad_label, existing, missing, package_data_dir, read_tsv
from zotune.tasks.sampling import Sizes, mezo_splits

LABEL_WORDS = ("terrible", "great")


def read_sst2(path: Path) -> list[tuple[str, int]]:
    """(sentence, label) rows of a GLUE-style SST-2 TSV with a `sentence\\tlabel` header."""
    rows = read_tsv(path)
    if not rows or rows[0][1] != ["sentence", "label"]:
        got = "\\t".join(rows[0][1]) if rows else "an empty file"
        raise TaskError(f"bad header in {path}: expected 'sentence\\tlabel', got '{got}'")
    out = []
    for lineno, fields in rows[1:]:
        if len(fields) != 2:
            raise TaskError(
                f"malformed line {lineno} in {path}: expected 2 tab-separated fields "
                f"(sentence, label), got {len(fields)}"
            )
        sentence, label = fields
        if label.strip() not in ("0", "1"):
            raise bad_label(label, path, lineno, ["0", "1"])
        out.append((sentence, int(label)))
    return out


def render_sst2(sentence: str, label: int, template: str = "mezo") -> Example:
    """One SST-2 example; also used for the LM-BFF k-shot SST-2 and MR tasks."""
    text = sentence.strip()
    if template == "empty":
        prompt, candidates = f"{text} ", LABEL_WORDS
    else:
        prompt, candidates = f"{text} It was", tuple(" " + w for w in LABEL_WORDS)
    return Example(
        prompt=prompt,
        candidates=candidates,
        label=label,
        texts=(text,),
        mlm_prompt=text + " It was {mask} .",
        label_words=LABEL_WORDS,
    )


def load(name: str, root: Path, template: str, sizes: Sizes) -> Task:
    """Load GLUE SST-2 under `root/sst2/` with MeZO's sampling."""
    folder = root / "sst2"
    train_path, val_path = existing(folder / "train.tsv"), existing(folder / "dev.tsv")
    if train_path is None and val_path is None:
        raise missing(folder / "train.tsv", folder / "dev.tsv")
    train = read_sst2(train_path) if train_path else None
    val = read_sst2(val_path) if val_path else None
    tr, dev, test, notes = mezo_splits(
        name,
        train,
        val,
        sizes,
        train_file=str(folder / "train.tsv"),
        val_file=str(folder / "dev.tsv"),
    )
    if root.resolve() == package_data_dir():
        notes.insert(
            0,
            "sst2: using the small sample shipped with zotune (600 train / 200 dev rows of GLUE "
            "SST-2), not the full data; pass data_dir or set ZOTUNE_DATA for the real splits",
        )
    return Task(
        name=name,
        kind="classification",
        metric="accuracy",
        train=[render_sst2(s, y, template) for s, y in tr],
        dev=[render_sst2(s, y, template) for s, y in dev],
        test=[render_sst2(s, y, template) for s, y in test],
        num_labels=2,
        notes=notes,
    )
