"""SuperGLUE tasks from the original JSONL files: `<task>/train.jsonl` (train) and `<task>/val.jsonl`.

Decoder templates are MeZO's (`large_models/templates.py`, methods.md 1.2); each candidate is the
text MeZO's `verbalize` appends to the output of `encode`:

  rte     '<premise>\\nDoes this mean that "<hypothesis>" is true? Yes or No?\\n' + Yes|No
          (empty: '<premise>\\n"<hypothesis>"\\n' + Yes|No)        entailment=0, not_entailment=1
  cb      'Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\\n' + Yes|No|Maybe
                                                 entailment=0, contradiction=1, neutral=2
  boolq   '<passage> <Question?>\\n' + Yes|No  (v3; question capitalised, "?" added if missing)
                                                 true=0 (Yes), false=1 (No), as MeZO's candidates
  wsc     '<text>\\nIn the previous sentence, does the pronoun "<span2 lower>" refer to <span1>?
           Yes or No?\\n' + No|Yes                false=0, true=1
  wic     'Does the word "<word>" have the same meaning in these two sentences? Yes, No?\\n<s1>\\n<s2>\\n'
          + No|Yes                               false=0, true=1
  multirc '<paragraph>\\nQuestion: <q>\\nI found this answer "<a>". Is that correct? Yes or No?\\n'
          + No|Yes, one example per answer option
  copa    '<premise without final ".">' + ' so ' (effect) | ' because ' (cause)  (empty: ' ')
          + choice1|choice2 with the first word lowercased unless it is "I"
  record  '<passage with "@highlight\\n" -> "- ">\\n-' + ' <query with @placeholder -> entity>',
          one candidate per distinct entity (order of first appearance); gold = first entity that
          is among the answers (queries with none are dropped, with a note)

Data details that keep the rendered text identical to MeZO's (which read the HF hub copies):
- BoolQ: MeZO used HF `boolq`, whose passages have no title; SuperGLUE's JSONL prefixes each
  passage with "<title> -- ", which is removed here. Rows in the original BoolQ format
  (`answer`, `title` fields) are read as they are.
- WSC: MeZO used HF `wsc.fixed`, which repairs spans that are not substrings of the text (wrong
  first-letter case, trailing ".", newline inside the span); the same repair is applied here.

Encoder fields (`texts`): rte/cb (premise, hypothesis); boolq (question, passage); wsc
(text, '<span2> refers to <span1>'); wic ('<word>: <s1>', '<word>: <s2>'); multirc
(paragraph, '<question> <answer>'). LM-BFF masked-LM prompts (methods.md 1.5) for rte and cb:
'<premise> ? {mask} , <hypothesis>' with their label words. copa and record are multiple choice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from zotune.tasks.base import Example, Task, TaskError
from zotune.tasks.files import bad_label, existing, get, get_str, missing, read_jsonl
from zotune.tasks.sampling import Sizes, mezo_splits

Record = dict


def _label(obj: dict, key: str, mapping: dict, path: Path, lineno: int) -> int:
    """Map a label value (string names match case-insensitively) to its index."""
    value = get(obj, key, path, lineno)
    lookup = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(lookup, str | int | float) or lookup not in mapping:
        raise bad_label(value, path, lineno, list(mapping))
    return mapping[lookup]


def _nli_mlm(s1: str, s2: str) -> str:
    return s1.strip() + " ? {mask} , " + s2.strip()


# ---- RTE ----------------------------------------------------------------------------------------

RTE_LABELS = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}


def read_rte(path: Path, notes: list[str]) -> list[Record]:
    return [
        {
            "premise": get_str(o, "premise", path, n),
            "hypothesis": get_str(o, "hypothesis", path, n),
            "label": _label(o, "label", RTE_LABELS, path, n),
        }
        for n, o in read_jsonl(path)
    ]


def render_rte(r: Record, template: str) -> Example:
    p, h = r["premise"], r["hypothesis"]
    if template == "empty":
        prompt = f'{p}\n"{h}"\n'
    else:
        prompt = f'{p}\nDoes this mean that "{h}" is true? Yes or No?\n'
    return Example(
        prompt=prompt,
        candidates=("Yes", "No"),
        label=r["label"],
        texts=(p, h),
        mlm_prompt=_nli_mlm(p, h),
        label_words=("Yes", "No"),
    )


# ---- CB -----------------------------------------------------------------------------------------

CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2, 0: 0, 1: 1, 2: 2}


def read_cb(path: Path, notes: list[str]) -> list[Record]:
    return [
        {
            "premise": get_str(o, "premise", path, n),
            "hypothesis": get_str(o, "hypothesis", path, n),
            "label": _label(o, "label", CB_LABELS, path, n),
        }
        for n, o in read_jsonl(path)
    ]


def render_cb(r: Record, template: str) -> Example:
    p, h = r["premise"], r["hypothesis"]
    words = ("Yes", "No", "Maybe")
    return Example(
        prompt=f'Suppose {p} Can we infer that "{h}"? Yes, No, or Maybe?\n',
        candidates=words,
        label=r["label"],
        texts=(p, h),
        mlm_prompt=_nli_mlm(p, h),
        label_words=words,
    )


# ---- BoolQ --------------------------------------------------------------------------------------

BOOL_LABELS = {True: 0, False: 1, "true": 0, "false": 1}  # gold index into ("Yes", "No")


def read_boolq(path: Path, notes: list[str]) -> list[Record]:
    out = []
    for n, o in read_jsonl(path):
        question = get_str(o, "question", path, n)
        passage = get_str(o, "passage", path, n)
        if not question.strip():
            raise TaskError(f"malformed line {n} in {path}: empty 'question'")
        if "title" not in o and " -- " in passage:
            passage = passage.split(" -- ", 1)[1]  # SuperGLUE's "<title> -- " prefix
        key = "label" if "label" in o else "answer"
        out.append(
            {
                "question": question,
                "passage": passage,
                "label": _label(o, key, BOOL_LABELS, path, n),
            }
        )
    return out


def render_boolq(r: Record, template: str) -> Example:
    q = r["question"] if r["question"].endswith("?") else r["question"] + "?"
    q = q[0].upper() + q[1:]
    return Example(
        prompt=f"{r['passage']} {q}\n",
        candidates=("Yes", "No"),
        label=r["label"],
        texts=(r["question"], r["passage"]),
    )


# ---- WSC ----------------------------------------------------------------------------------------

YES_LABELS = {False: 0, True: 1, "false": 0, "true": 1}  # gold index into ("No", "Yes")


def _fix_span(text: str, span: str, index: int) -> str:
    """HF `wsc.fixed`'s repair of a span that does not occur verbatim in the text."""
    if span in text:
        return span
    words = text.split()
    fixed = span
    if span and 0 <= index < len(words):
        first = words[index]
        fixed = (span[0].lower() if first[:1].islower() else span[0].upper()) + span[1:]
    fixed = fixed.rstrip(".").replace("\n", " ")
    return fixed if fixed in text else span


def read_wsc(path: Path, notes: list[str]) -> list[Record]:
    out = []
    for n, o in read_jsonl(path):
        text = get_str(o, "text", path, n)
        target = get(o, "target", path, n)
        if not isinstance(target, dict):
            raise TaskError(f"malformed line {n} in {path}: field 'target' should be an object")
        span1, span2 = (
            get_str(target, "span1_text", path, n),
            get_str(target, "span2_text", path, n),
        )
        i1, i2 = target.get("span1_index", -1), target.get("span2_index", -1)
        out.append(
            {
                "text": text,
                "span1": _fix_span(text, span1, i1 if isinstance(i1, int) else -1),
                "span2": _fix_span(text, span2, i2 if isinstance(i2, int) else -1),
                "label": _label(o, "label", YES_LABELS, path, n),
            }
        )
    return out


def render_wsc(r: Record, template: str) -> Example:
    text, span1, span2 = r["text"], r["span1"], r["span2"]
    return Example(
        prompt=f'{text}\nIn the previous sentence, does the pronoun "{span2.lower()}" refer to {span1}? Yes or No?\n',
        candidates=("No", "Yes"),
        label=r["label"],
        texts=(text, f"{span2} refers to {span1}"),
    )


# ---- WiC ----------------------------------------------------------------------------------------


def read_wic(path: Path, notes: list[str]) -> list[Record]:
    return [
        {
            "word": get_str(o, "word", path, n),
            "sentence1": get_str(o, "sentence1", path, n),
            "sentence2": get_str(o, "sentence2", path, n),
            "label": _label(o, "label", YES_LABELS, path, n),
        }
        for n, o in read_jsonl(path)
    ]


def render_wic(r: Record, template: str) -> Example:
    w, s1, s2 = r["word"], r["sentence1"], r["sentence2"]
    return Example(
        prompt=f'Does the word "{w}" have the same meaning in these two sentences? Yes, No?\n{s1}\n{s2}\n',
        candidates=("No", "Yes"),
        label=r["label"],
        texts=(f"{w}: {s1}", f"{w}: {s2}"),
    )


# ---- MultiRC ------------------------------------------------------------------------------------


def read_multirc(path: Path, notes: list[str]) -> list[Record]:
    """One record per answer option, in file order (as HF's `super_glue/multirc` flattens it)."""
    out = []
    for n, o in read_jsonl(path):
        passage = get(o, "passage", path, n)
        if not isinstance(passage, dict):
            raise TaskError(f"malformed line {n} in {path}: field 'passage' should be an object")
        paragraph = get_str(passage, "text", path, n)
        for q in get(passage, "questions", path, n):
            question = get_str(q, "question", path, n)
            for a in get(q, "answers", path, n):
                out.append(
                    {
                        "paragraph": paragraph,
                        "question": question,
                        "answer": get_str(a, "text", path, n),
                        "label": _label(a, "label", YES_LABELS, path, n),
                    }
                )
    return out


def render_multirc(r: Record, template: str) -> Example:
    p, q, a = r["paragraph"], r["question"], r["answer"]
    return Example(
        prompt=f'{p}\nQuestion: {q}\nI found this answer "{a}". Is that correct? Yes or No?\n',
        candidates=("No", "Yes"),
        label=r["label"],
        texts=(p, f"{q} {a}"),
    )


# ---- COPA ---------------------------------------------------------------------------------------


def read_copa(path: Path, notes: list[str]) -> list[Record]:
    out = []
    for n, o in read_jsonl(path):
        question = get_str(o, "question", path, n)
        if question not in ("cause", "effect"):
            raise TaskError(
                f"malformed line {n} in {path}: field 'question' is {question!r}, expected 'cause' or 'effect'"
            )
        out.append(
            {
                "premise": get_str(o, "premise", path, n),
                "choice1": get_str(o, "choice1", path, n),
                "choice2": get_str(o, "choice2", path, n),
                "question": question,
                "label": _label(o, "label", {0: 0, 1: 1}, path, n),
            }
        )
    return out


def _copa_choice(choice: str) -> str:
    """MeZO's "correct" capitalisation: lowercase the first word unless it is "I"."""
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def render_copa(r: Record, template: str) -> Example:
    premise = r["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    if template == "empty":
        conjunction = " "
    else:
        conjunction = " so " if r["question"] == "effect" else " because "
    return Example(
        prompt=premise + conjunction,
        candidates=(_copa_choice(r["choice1"]), _copa_choice(r["choice2"])),
        label=r["label"],
    )


# ---- ReCoRD -------------------------------------------------------------------------------------


def read_record(path: Path, notes: list[str]) -> list[Record]:
    """One record per query; entities are the distinct entity strings of the passage."""
    out, dropped = [], 0
    for n, o in read_jsonl(path):
        passage = get(o, "passage", path, n)
        if not isinstance(passage, dict):
            raise TaskError(f"malformed line {n} in {path}: field 'passage' should be an object")
        text = get_str(passage, "text", path, n)
        try:
            spans = sorted((e["start"], e["end"]) for e in get(passage, "entities", path, n))
        except (KeyError, TypeError):
            raise TaskError(
                f"malformed line {n} in {path}: each passage entity needs integer 'start' and 'end'"
            ) from None
        # `end` is inclusive in ReCoRD's files.
        entities = list(dict.fromkeys(text[s : e + 1] for s, e in spans))
        for qa in get(o, "qas", path, n):
            query = get_str(qa, "query", path, n)
            answers = list(
                dict.fromkeys(get_str(a, "text", path, n) for a in qa.get("answers") or [])
            )
            gold = next((i for i, e in enumerate(entities) if e in answers), -1)
            if gold < 0:
                dropped += 1
                continue
            out.append(
                {
                    "passage": text,
                    "query": query,
                    "entities": entities,
                    "answers": answers,
                    "label": gold,
                }
            )
    if dropped:
        notes.append(
            f"record: dropped {dropped} queries in {path} whose answers match no passage entity"
        )
    return out


def render_record(r: Record, template: str) -> Example:
    passage = r["passage"].replace("@highlight\n", "- ")
    return Example(
        prompt=f"{passage}\n-",
        candidates=tuple(" " + r["query"].replace("@placeholder", e) for e in r["entities"]),
        label=r["label"],
        answers=tuple(r["answers"]),
    )


# ---- loading ------------------------------------------------------------------------------------

Reader = Callable[[Path, list[str]], list[Record]]
Renderer = Callable[[Record, str], Example]

# name -> (reader, renderer, kind, num_labels)
TASKS: dict[str, tuple[Reader, Renderer, str, int]] = {
    "rte": (read_rte, render_rte, "classification", 2),
    "cb": (read_cb, render_cb, "classification", 3),
    "boolq": (read_boolq, render_boolq, "classification", 2),
    "wsc": (read_wsc, render_wsc, "classification", 2),
    "wic": (read_wic, render_wic, "classification", 2),
    "copa": (read_copa, render_copa, "multiple_choice", 0),
    "multirc": (read_multirc, render_multirc, "classification", 2),
    "record": (read_record, render_record, "multiple_choice", 0),
}
EMPTY_TEMPLATES = ("rte", "copa")


def load(name: str, root: Path, template: str, sizes: Sizes) -> Task:
    """Load a SuperGLUE task under `root/<name>/` with MeZO's sampling."""
    read, render, kind, num_labels = TASKS[name]
    folder = root / name
    train_file, val_file = folder / "train.jsonl", folder / "val.jsonl"
    train_path, val_path = existing(train_file), existing(val_file)
    if train_path is None and val_path is None:
        raise missing(train_file, val_file)
    notes: list[str] = []
    train = read(train_path, notes) if train_path else None
    val = read(val_path, notes) if val_path else None
    tr, dev, test, more = mezo_splits(
        name, train, val, sizes, train_file=str(train_file), val_file=str(val_file)
    )
    return Task(
        name=name,
        kind=kind,
        metric="accuracy",
        train=[render(r, template) for r in tr],
        dev=[render(r, template) for r in dev],
        test=[render(r, template) for r in test],
        num_labels=num_labels,
        notes=notes + more,
    )
