"""The data model every task produces and every model objective consumes.

A task is three lists of `Example`s plus what kind of problem it is. Objectives (see
`zotune.objectives`) never look at a task's files, and tasks never look at a model: an example
carries the rendered decoder prompt, the candidate continuations, the raw text fields (for encoder
classification heads) and the LM-BFF template (for masked LMs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("classification", "multiple_choice", "generation")


# Metrics where lower is better (a completion task scored by its held-out loss); all others
# (accuracy, f1, em) are fractions where higher is better.
LOWER_IS_BETTER = ("loss", "perplexity")


def better(metric: str, new: float, old: float) -> bool:
    """Whether `new` beats `old` on `metric`."""
    return new < old if metric in LOWER_IS_BETTER else new > old


def show_value(metric: str, value: float) -> str:
    """A metric's value for people: a fraction as a percentage, a loss as a plain number."""
    return f"{value:.4g}" if metric in LOWER_IS_BETTER else f"{100 * value:.1f}%"


def show(metrics: dict[str, float]) -> str:
    """Metrics for people, e.g. "f1 61.2%, em 50.0%" or "loss 1.234, perplexity 3.435"."""
    return ", ".join(f"{k} {show_value(k, v)}" for k, v in metrics.items())


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

    def text_length(self) -> int:
        """Characters of its rendered text (every form, plus its longest candidate): a cheap
        proxy for the tokens a forward pass reads, to put examples of like length together."""
        return (
            len(self.prompt)
            + sum(map(len, self.texts))
            + len(self.mlm_prompt)
            + max(map(len, self.candidates), default=0)
            + len(self.answers[0] if self.answers else "")  # a generation task's target
        )


@dataclass
class Task:
    """A loaded task: its splits and how it is scored."""

    name: str
    kind: str  # one of KINDS
    metric: str  # "accuracy", "f1", "em" or "loss" (generation scored by its target's loss)
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    num_labels: int = 0  # classification only
    notes: list[str] = field(default_factory=list)  # deviations from the papers, said plainly
