"""The data model every task produces and every model objective consumes.

A task is three lists of `Example`s plus what kind of problem it is. Objectives (see
`zotune.objectives`) never look at a task's files, and tasks never look at a model: an example
carries the rendered decoder prompt, the candidate continuations, the raw text fields (for encoder
classification heads) and the LM-BFF template (for masked LMs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("classification", "multiple_choice", "generation")


class TaskError(ValueError):
    """Bad task input (unknown name, missing file, malformed row); the message says what to fix."""


@dataclass(frozen=True)
class Example:
    """One rendered example.

    prompt:      decoder prompt; a candidate is appended to it verbatim (MeZO's `encode` + `verbalize`).
    candidates:  continuations to score (classification, multiple choice); () for generation.
    label:       index of the gold candidate; -1 for generation.
    answers:     gold answers for generation; answers[0] is the training target.
    texts:       raw input fields (1 or 2 segments) for encoder classification heads (no prompt).
    mlm_prompt:  LM-BFF template for masked LMs, with "{mask}" where the label word goes; "" if none.
    label_words: LM-BFF label words, aligned with the label index; () if none.
    """

    prompt: str
    candidates: tuple[str, ...] = ()
    label: int = -1
    answers: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    mlm_prompt: str = ""
    label_words: tuple[str, ...] = ()


@dataclass
class Task:
    """A loaded task: its splits and how it is scored."""

    name: str
    kind: str  # one of KINDS
    metric: str  # "accuracy" or "f1"
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    num_labels: int = 0  # classification only
    notes: list[str] = field(default_factory=list)  # deviations from the papers, said plainly
