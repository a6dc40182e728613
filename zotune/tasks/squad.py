"""Generation tasks: SQuAD v1.1 and DROP, from their original JSON files (kind "generation", metric "f1").

Templates (MeZO, methods.md 1.2); MeZO trains on the prompt followed by " <answers[0]>\\n":
  squad  "Title: <title>\\nContext: <context>\\nQuestion: <question stripped>\\nAnswer:"
  drop   "Passage: <passage>\\nQuestion: <question stripped>\\nAnswer:"

Files:
  squad/train-v1.1*.json   train split (the official `train-v1.1.json` if present, else any file
                           named like it, e.g. a subset; a note says so)
  squad/dev-v1.1.json      evaluation split
  drop/drop_dataset_train.json, drop/drop_dataset_dev.json   original DROP format:
      {"<passage id>": {"passage": ..., "qa_pairs": [{"question", "answer", "validated_answers"}]}}

Answers, as HF's `squad` / `drop` (which MeZO read) give them: SQuAD keeps every reference answer in
file order. DROP takes `answer` in train and `validated_answers` in dev (falling back to `answer`
when a dev question has none); an answer contributes its number, else its date
("<day> <month> <year>", blanks left out), else each of its spans as a separate reference.
Questions without any answer are dropped, with a note.
"""

from __future__ import annotations

from pathlib import Path

from zotune.tasks.base import Example, Task, TaskError
from zotune.tasks.files import existing, missing, read_json
from zotune.tasks.sampling import Sizes, mezo_splits

Record = dict


def _malformed(path: Path, where: str, problem: str) -> TaskError:
    return TaskError(f"malformed {where} in {path}: {problem}")


# ---- SQuAD --------------------------------------------------------------------------------------


def read_squad(path: Path, notes: list[str]) -> list[Record]:
    """One record per question, in file order (article, paragraph, question)."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise TaskError(f"{path} is not a SQuAD file: expected a JSON object with a 'data' list")
    out, unanswered = [], 0
    for a, article in enumerate(doc["data"]):
        try:
            title = str(article.get("title", ""))
            for para in article["paragraphs"]:
                context = para["context"]
                for qa in para["qas"]:
                    answers = [ans["text"] for ans in qa.get("answers") or []]
                    if not answers:
                        unanswered += 1
                        continue
                    out.append(
                        {
                            "title": title,
                            "context": context,
                            "question": qa["question"],
                            "answers": answers,
                        }
                    )
        except (KeyError, TypeError, AttributeError) as e:
            raise _malformed(
                path, f"article {a}", f"missing or wrong field {e}; expected SQuAD v1.1 layout"
            ) from None
    if unanswered:
        notes.append(f"squad: dropped {unanswered} questions without answers in {path}")
    return out


def render_squad(r: Record) -> Example:
    return Example(
        prompt=f"Title: {r['title']}\nContext: {r['context']}\nQuestion: {r['question'].strip()}\nAnswer:",
        answers=tuple(r["answers"]),
    )


def _squad_train_file(folder: Path) -> Path | None:
    official = existing(folder / "train-v1.1.json")
    if official is not None:
        return official
    candidates = sorted(folder.glob("train-v1.1*.json")) + sorted(
        folder.glob("train-v1.1*.json.gz")
    )
    return candidates[0] if candidates else None


# ---- DROP ---------------------------------------------------------------------------------------


def _drop_answer(answer: dict) -> list[str]:
    if str(answer.get("number", "")).strip():
        return [str(answer["number"])]
    date = answer.get("date") or {}
    parts = [str(date.get(k, "")).strip() for k in ("day", "month", "year")]
    if any(parts):
        return [" ".join(p for p in parts if p)]
    return [s for s in answer.get("spans") or [] if s]


def read_drop(path: Path, notes: list[str], *, validated: bool) -> list[Record]:
    """One record per question, in file order; `validated` picks dev's validated answers."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise TaskError(f"{path} is not a DROP file: expected a JSON object of passages")
    out, unanswered = [], 0
    for pid, section in doc.items():
        try:
            passage = section["passage"]
            for qa in section["qa_pairs"]:
                chosen = qa.get("validated_answers") if validated else None
                chosen = chosen or [qa["answer"]]
                answers = [text for ans in chosen for text in _drop_answer(ans)]
                if not answers:
                    unanswered += 1
                    continue
                out.append({"passage": passage, "question": qa["question"], "answers": answers})
        except (KeyError, TypeError, AttributeError) as e:
            raise _malformed(
                path,
                f"passage {pid}",
                f"missing or wrong field {e}; expected the original DROP layout",
            ) from None
    if unanswered:
        notes.append(f"drop: dropped {unanswered} questions without answers in {path}")
    return out


def render_drop(r: Record) -> Example:
    return Example(
        prompt=f"Passage: {r['passage']}\nQuestion: {r['question'].strip()}\nAnswer:",
        answers=tuple(r["answers"]),
    )


# ---- loading ------------------------------------------------------------------------------------


def load(name: str, root: Path, template: str, sizes: Sizes) -> Task:
    """Load SQuAD or DROP under `root/<name>/` with MeZO's sampling."""
    folder = root / name
    notes: list[str] = []
    if name == "squad":
        train_path, val_path = _squad_train_file(folder), existing(folder / "dev-v1.1.json")
        train_file, val_file = train_path or folder / "train-v1.1.json", folder / "dev-v1.1.json"
        if train_path is not None and not train_path.name.startswith("train-v1.1.json"):
            notes.append(
                f"squad: train and dev are drawn from {train_path.name}, not the full official "
                "train-v1.1.json, so they cover only the articles in that file"
            )

        def read(path: Path, is_val: bool) -> list[Record]:
            return read_squad(path, notes)

        render = render_squad
    else:
        train_file, val_file = folder / "drop_dataset_train.json", folder / "drop_dataset_dev.json"
        train_path, val_path = existing(train_file), existing(val_file)

        def read(path: Path, is_val: bool) -> list[Record]:
            return read_drop(path, notes, validated=is_val)

        render = render_drop
    if train_path is None and val_path is None:
        raise missing(train_file, val_file)
    train = read(train_path, False) if train_path else None
    val = read(val_path, True) if val_path else None
    tr, dev, test, more = mezo_splits(
        name, train, val, sizes, train_file=str(train_file), val_file=str(val_file)
    )
    return Task(
        name=name,
        kind="generation",
        metric="f1",
        train=[render(r) for r in tr],
        dev=[render(r) for r in dev],
        test=[render(r) for r in test],
        notes=notes + more,
    )
