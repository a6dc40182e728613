"""Turn a batch of `Example`s into a scalar loss and predictions, for each model kind.

Causal LMs follow MeZO (`large_models/utils.py`): classification scores each candidate by the mean
log-probability of its tokens and applies cross-entropy over candidates; multiple choice and
generation train with LM cross-entropy on the gold continuation only. Masked LMs follow LM-BFF
(label-word logits at the mask). Classifiers use their head's logits.

The objective never switches grad mode for `loss` (first-order baselines backprop through it);
`predict` and `evaluate` run under `torch.no_grad()`. Logits are upcast to float32 before any
softmax. `forward_passes` counts model calls, one per call, including each decoding step.
"""

from __future__ import annotations

import collections
import inspect
import math
import re
import string
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from zotune.models import LoadedModel, ModelError
from zotune.tasks.base import KINDS, LOWER_IS_BETTER, Example

__all__ = ["Objective", "make_objective", "squad_f1", "exact_match", "normalize_answer"]

_CACHE_LIMIT = 200_000  # tokenized strings kept per objective; ZO re-reads each batch 2q times


# ----------------------------------------------------------------------------- metrics


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 after SQuAD normalization, max over the gold answers (0 if none)."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in answers))


# ----------------------------------------------------------------------------- base


class Objective:
    """Turns a batch of Examples into a scalar loss (no backward needed) and predictions."""

    def __init__(
        self,
        loaded: LoadedModel,
        task_kind: str,
        *,
        max_length: int = 256,
        max_new_tokens: int = 50,
        demos: Sequence[Example] = (),
        cache_demos: bool = False,
        metric: str | None = None,
    ) -> None:
        self.loaded = loaded
        self.task_kind = task_kind
        self.metric = metric
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.demos = tuple(demos)
        self.cache_demos = cache_demos
        self.forward_passes = 0
        self.forward_seconds = 0.0  # time spent inside the model calls counted above
        self.forward_tokens = 0  # tokens those calls read (padding excluded)
        # examples the training losses read (`counted`): a loss over B examples counts B, however
        # many sequences it forwards (one per candidate) or chunks it runs
        self.forward_rows = 0

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _call(self, **inputs: Any) -> Any:
        self.forward_passes += 1
        mask = inputs.get("attention_mask")
        self.forward_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        start = time.perf_counter()
        try:
            return self.model(**inputs)
        finally:
            self.forward_seconds += time.perf_counter() - start

    def counted(
        self, loss: Callable[[Sequence[Example]], torch.Tensor]
    ) -> Callable[[Sequence[Example]], torch.Tensor]:
        """`loss` (this objective's `loss` or `nondiff_loss`), adding each call's examples to
        `forward_rows`: the training loop's count of passes over a batch."""

        def counted_loss(batch: Sequence[Example]) -> torch.Tensor:
            self.forward_rows += len(batch)
            return loss(batch)

        return counted_loss

    def loss(self, batch: Sequence[Example]) -> torch.Tensor:
        """Mean loss of the batch: a 0-dim float32 tensor, differentiable when grad is enabled."""
        raise NotImplementedError

    def _predict(self, batch: Sequence[Example]) -> list:
        raise NotImplementedError

    def predict(self, batch: Sequence[Example]) -> list:
        """Candidate indices (classification, multiple choice) or generated strings."""
        if not batch:
            return []
        with torch.no_grad():
            return self._predict(batch)

    def _scores(self, batch: Sequence[Example], preds: list) -> list[float]:
        if self.task_kind == "generation":
            return [squad_f1(p, ex.answers) for p, ex in zip(preds, batch)]
        return [float(p == ex.label) for p, ex in zip(preds, batch)]

    def nondiff_loss(self, batch: Sequence[Example]) -> torch.Tensor:
        """-accuracy (classification, multiple choice) or -mean F1 (generation) of the batch."""
        scores = self._scores(batch, self.predict(batch))
        return torch.tensor(-sum(scores) / max(len(scores), 1), dtype=torch.float32)

    def evaluate(self, examples: Sequence[Example], batch_size: int = 16) -> dict[str, float]:
        """{"accuracy": ..} or {"f1": .., "em": ..}, each in [0, 1]; with metric "loss", the
        mean per-token loss of the targets and its perplexity, {"loss": .., "perplexity": ..}."""
        examples, batches = length_batches(examples, batch_size)
        return self.combine(examples, [self.evaluate_batch(b) for b in batches])

    def evaluate_batch(self, batch: Sequence[Example]) -> Any:
        """What evaluation computes per batch (a data-parallel run computes its batches on
        several ranks, then `combine`s them): predictions, or (target loss sum, tokens)."""
        if self.metric in LOWER_IS_BETTER:
            with torch.no_grad():
                summed, count = self.target_loss_sum(batch)
            return float(summed), count
        return self.predict(batch)

    def combine(self, examples: Sequence[Example], parts: list) -> dict[str, float]:
        """`evaluate`'s metrics from the `evaluate_batch` results of `examples`' batches."""
        if self.metric in LOWER_IS_BETTER:
            total, tokens = 0.0, 0
            for summed, count in parts:
                total, tokens = total + summed, tokens + count
            loss = total / max(tokens, 1)
            return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        return self.metrics(examples, [p for part in parts for p in part])

    def metrics(self, examples: Sequence[Example], preds: list) -> dict[str, float]:
        """The metrics of `examples` from their predictions, in order."""
        n = max(len(examples), 1)
        if self.task_kind == "generation":
            f1 = sum(squad_f1(p, ex.answers) for p, ex in zip(preds, examples)) / n
            em = sum(exact_match(p, ex.answers) for p, ex in zip(preds, examples)) / n
            return {"f1": f1, "em": em}
        return {"accuracy": sum(self._scores(examples, preds)) / n}

    def target_loss_sum(self, batch: Sequence[Example]) -> tuple[torch.Tensor, int]:
        """Summed LM loss of the batch's training targets and their token count (decoders)."""
        raise ModelError(f"{type(self).__name__} cannot score a task by its loss: use a decoder")

    @staticmethod
    def _labels(batch: Sequence[Example]) -> list[int]:
        for ex in batch:
            n = len(ex.candidates or ex.label_words)
            if ex.label < 0 or (n and ex.label >= n):
                raise ValueError(
                    f"example has no valid gold label ({ex.label}): {ex.prompt[:60]!r}"
                )
        return [ex.label for ex in batch]


def length_batches(
    examples: Sequence[Example], batch_size: int
) -> tuple[list[Example], list[list[Example]]]:
    """The examples ordered by length (stable) and cut into batches, each padded to a shorter
    longest than in data order: evaluation's metrics are over the whole set, so its order does
    not change them (a loss sums in another order: float rounding)."""
    examples = sorted(examples, key=Example.text_length)
    return examples, [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]


def _pad_candidates(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-example score vectors of different lengths, padding with -inf (probability 0)."""
    width = max(r.numel() for r in rows)
    out = [F.pad(r, (0, width - r.numel()), value=float("-inf")) for r in rows]
    return torch.stack(out)


# ----------------------------------------------------------------------------- causal LMs


class CausalObjective(Objective):
    """Decoder LMs: candidate scoring, LM cross-entropy on the gold continuation, greedy decoding."""

    fast_path: bool = True  # one forward over the prompts when every candidate is one token

    def __init__(self, loaded: LoadedModel, task_kind: str, **kwargs: Any) -> None:
        super().__init__(loaded, task_kind, **kwargs)
        tok = self.tokenizer
        self._ids: dict[str, tuple[int, ...]] = {}
        with_special = tok("a", add_special_tokens=True)["input_ids"]
        plain = tok("a", add_special_tokens=False)["input_ids"]
        # keep the tokenizer's leading specials (BOS) but never trailing ones (EOS/SEP): a
        # continuation is scored right after the prompt's last real token
        start = next(
            (i for i in range(len(with_special)) if with_special[i : i + len(plain)] == plain), 0
        )
        self._prefix = tuple(with_special[:start])
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else None
        self._base = base if base is not None else loaded.model
        params = inspect.signature(self._base.forward).parameters
        self._keep_logits = "logits_to_keep" in params
        # peft prompt tuning puts virtual tokens first and drops position_ids: left padding would
        # put pads between them and the text, so pad on the right there
        self._left = loaded.scheme != "prompt"
        self._positions = self._left and "position_ids" in params
        self._demo_text = "".join(d.prompt + self._gold_text(d) + "\n\n" for d in self.demos)
        self._demo_kv: tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._stop_ids: list[int] | None = None

    # ---- encoding

    def _gold_text(self, ex: Example) -> str:
        if self.task_kind == "generation":
            return ex.answers[0].rstrip("\n") if ex.answers else ""
        return ex.candidates[ex.label] if 0 <= ex.label < len(ex.candidates) else ""

    @staticmethod
    def _target(ex: Example) -> str:
        # MeZO trains SQuAD/DROP on " <answer>\n": the newline teaches the model where to stop
        if not ex.answers:
            raise ValueError(f"generation example has no answers: {ex.prompt[:60]!r}")
        return ex.answers[0] if ex.answers[0].endswith("\n") else ex.answers[0] + "\n"

    def _encode_many(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        todo = list(dict.fromkeys(t for t in texts if t not in self._ids))
        if todo:
            if len(self._ids) + len(todo) > _CACHE_LIMIT:
                self._ids.clear()
            enc = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
            for t, ids in zip(todo, enc):
                self._ids[t] = self._prefix + tuple(ids)
        return [self._ids[t] for t in texts]

    def _truncate(self, ids: Sequence[int], limit: int) -> list[int]:
        """Keep the last `limit` tokens, plus the leading BOS when the tokenizer adds one."""
        if len(ids) <= limit:
            return list(ids)
        p = len(self._prefix) if tuple(ids[: len(self._prefix)]) == self._prefix else 0
        p = min(p, limit - 1)
        return list(ids[:p]) + list(ids[len(ids) - (limit - p) :])

    def _context(self, ex: Example) -> str:
        return self._demo_text + ex.prompt

    def _continuations(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[int]]:
        """Token ids of context+continuation (truncated) and the continuation's token count.

        As MeZO's option_len: tokens(context+cont) minus tokens(context), so a merge across the
        boundary is scored as part of the continuation.
        """
        ctx = self._encode_many([c for c, _ in pairs])
        full = self._encode_many([c + x for c, x in pairs])
        seqs, counts = [], []
        for c_ids, f_ids in zip(ctx, full):
            n = max(1, len(f_ids) - len(c_ids))
            seq = self._truncate(f_ids, self.max_length)
            if len(seq) < 2:
                raise ValueError("nothing to condition on: the prompt is empty and adds no BOS")
            seqs.append(seq)
            counts.append(min(n, len(seq) - 1))  # the first token has no context to predict it
        return seqs, counts

    # ---- forward

    def _forward_tail(
        self, seqs: list[list[int]], tail: list[int]
    ) -> tuple[torch.Tensor, int, list[int], list[int]]:
        """Run the model once; return logits (float32 later) for the last positions and their offset.

        Returns (logits, first, starts, lengths): logits[:, j] is the prediction made at padded
        position first + j; row i's tokens start at starts[i]. Only positions from the first one
        that scores a token on are materialized when the model supports `logits_to_keep`.
        """
        lengths = [len(s) for s in seqs]
        past = self._shared_demos(seqs)
        if past is not None:  # run only what follows the cached demonstrations
            shift = len(past[0])
            seqs = [s[shift:] for s in seqs]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        starts = []
        shift = len(past[0]) if past is not None else 0
        for i, s in enumerate(seqs):
            a = width - len(s) if self._left else 0
            ids[i, a : a + len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, a : a + len(s)] = 1
            starts.append(a - shift)  # where the row's full sequence would start
        # the earliest logit needed: the one predicting the first scored token of some row
        first = min(a + n - k - 1 for a, n, k in zip(starts, lengths, tail))
        keep = width - first
        inputs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "use_cache": False,
        }
        if self._positions:
            # explicit positions make left padding exact for every architecture
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).add_(shift).to(self.device)
        if past is not None:
            from transformers import DynamicCache

            b = len(seqs)
            layers = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in past[1]]
            inputs["past_key_values"] = DynamicCache(layers)
            ones = torch.ones((b, shift), dtype=torch.long)
            inputs["attention_mask"] = torch.cat([ones, mask], 1).to(self.device)
        if self._keep_logits:
            inputs["logits_to_keep"] = keep
        logits = self._call(**inputs).logits
        # prompt tuning prepends virtual-token logits; the kept window is always the last `keep`
        return logits[:, logits.shape[1] - keep :], first, starts, lengths

    def _shared_demos(self, seqs: list[list[int]]) -> tuple | None:
        """The demonstrations' keys and values, computed once, when every sequence starts with
        them (ICL evaluation only: `cache_demos`, no PEFT, no gradient, left padding)."""
        if not (self.cache_demos and self.demos and self._positions) or torch.is_grad_enabled():
            return None
        if self.loaded.scheme != "full":
            return None
        if self._demo_kv is None:
            ids = self._encode_many([self._demo_text])[0]
            # the text's last tokens may merge with the prompt after it: cache the longest
            # prefix the sequences really start with
            n = len(ids)
            while n and tuple(seqs[0][:n]) != ids[:n]:
                n -= 1
            ids = ids[:n]
            if n < 2:
                return None
            self.forward_passes += 1
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
            cache = out.past_key_values
            self._demo_kv = (ids, [(layer.keys, layer.values) for layer in cache.layers])
        ids = self._demo_kv[0]
        if all(len(s) > len(ids) and tuple(s[: len(ids)]) == ids for s in seqs):
            return self._demo_kv
        return None

    def _tail_logprobs(
        self, seqs: list[list[int]], tail: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs (N, M) of each sequence's last tail[i] tokens, and the (N, M) validity mask."""
        logits, first, starts, lengths = self._forward_tail(seqs, tail)
        m = max(tail)
        pos = torch.zeros((len(seqs), m), dtype=torch.long)
        tgt = torch.zeros((len(seqs), m), dtype=torch.long)
        valid = torch.zeros((len(seqs), m), dtype=torch.bool)
        for i, (s, a, n, k) in enumerate(zip(seqs, starts, lengths, tail)):
            tok_pos = torch.arange(a + n - k, a + n)
            pos[i, :k] = tok_pos - 1 - first
            tgt[i, :k] = torch.tensor(s[n - k :], dtype=torch.long)
            valid[i, :k] = True
        dev = logits.device
        pos, tgt, valid = pos.to(dev), tgt.to(dev), valid.to(dev)
        # gather the needed rows first: never a full (N, T, V) float32 log-softmax
        picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float()
        lp = picked.gather(-1, tgt[..., None]).squeeze(-1) - picked.logsumexp(-1)
        return lp.masked_fill(~valid, 0.0), valid

    def _single_token_ids(self, batch: Sequence[Example]) -> list[list[int]] | None:
        """Each example's candidate token ids if every candidate is one token after the prompt."""
        pairs = [(self._context(ex), c) for ex in batch for c in ex.candidates]
        ctx = self._encode_many([c for c, _ in pairs])
        full = self._encode_many([c + x for c, x in pairs])
        ids = []
        for c_ids, f_ids in zip(ctx, full):
            if len(f_ids) != len(c_ids) + 1 or f_ids[:-1] != c_ids:
                return None
            ids.append(f_ids[-1])
        out, i = [], 0
        for ex in batch:
            out.append(ids[i : i + len(ex.candidates)])
            i += len(ex.candidates)
        return out

    def candidate_scores(self, batch: Sequence[Example]) -> torch.Tensor:
        """(B, C) mean log-prob of each candidate's tokens; -inf where an example has fewer."""
        if any(not ex.candidates for ex in batch):
            raise ValueError("candidate scoring needs examples with candidates")
        single = self._single_token_ids(batch) if self.fast_path else None
        if single is not None:
            # one forward over the prompts: the log-softmax at the last prompt position scores
            # every one-token candidate at once, exactly as B x C separate sequences would
            ctx = self._encode_many([self._context(ex) for ex in batch])
            seqs = [self._truncate(c, self.max_length - 1) for c in ctx]
            logits, first, starts, lengths = self._forward_tail(seqs, [0] * len(seqs))
            rows = []
            for i, (a, n, cand) in enumerate(zip(starts, lengths, single)):
                last = logits[i, a + n - 1 - first].float()
                rows.append(last[torch.tensor(cand, device=last.device)] - last.logsumexp(-1))
            return _pad_candidates(rows)
        pairs = [(self._context(ex), c) for ex in batch for c in ex.candidates]
        seqs, counts = self._continuations(pairs)
        lp, valid = self._tail_logprobs(seqs, counts)
        means = lp.sum(-1) / valid.sum(-1)
        rows, i = [], 0
        for ex in batch:
            rows.append(means[i : i + len(ex.candidates)])
            i += len(ex.candidates)
        return _pad_candidates(rows)

    def _lm_loss(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        # token-level mean over the batch, as HF's CE with -100 labels (MeZO's only_train_option)
        summed, count = self._lm_loss_sum(pairs)
        return summed / count

    def _lm_loss_sum(self, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, int]:
        seqs, counts = self._continuations(pairs)
        lp, valid = self._tail_logprobs(seqs, counts)
        return -lp.sum(), int(valid.sum())

    def _targets(self, batch: Sequence[Example]) -> list[tuple[str, str]]:
        """(context, continuation) pairs the LM loss is on: the gold choice, or the answer."""
        if self.task_kind == "multiple_choice":
            self._labels(batch)
            return [(self._context(ex), ex.candidates[ex.label]) for ex in batch]
        return [(self._context(ex), self._target(ex)) for ex in batch]

    def target_loss_sum(self, batch: Sequence[Example]) -> tuple[torch.Tensor, int]:
        if self.task_kind == "classification":
            raise ValueError("a classification task is scored by accuracy, not by its loss")
        return self._lm_loss_sum(self._targets(batch))

    def loss(self, batch: Sequence[Example]) -> torch.Tensor:
        if not batch:
            raise ValueError("empty batch")
        if self.task_kind == "classification":
            scores = self.candidate_scores(batch)
            labels = torch.tensor(self._labels(batch), device=scores.device)
            return F.cross_entropy(scores, labels)
        return self._lm_loss(self._targets(batch))

    def _predict(self, batch: Sequence[Example]) -> list:
        if self.task_kind != "generation":
            return self.candidate_scores(batch).argmax(-1).tolist()
        return self.generate(batch)

    # ---- generation

    def _newline_ids(self) -> list[int]:
        if self._stop_ids is None:
            tok = self.tokenizer
            pieces = tok.batch_decode([[i] for i in range(len(tok))])
            stop = {i for i, p in enumerate(pieces) if "\n" in p}
            eos = self.loaded.model.config.eos_token_id
            eos = eos if isinstance(eos, list) else [eos]
            stop.update(e for e in [*eos, tok.eos_token_id] if e is not None)
            self._stop_ids = sorted(stop)
        return self._stop_ids

    def generate(self, batch: Sequence[Example]) -> list[str]:
        """Greedy decoding up to max_new_tokens, stopped at the first newline or EOS."""
        from transformers import GenerationConfig

        ctx = self._encode_many([self._context(ex) for ex in batch])
        seqs = [self._truncate(c, self.max_length) for c in ctx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):  # generation always pads on the left
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self._newline_ids(),
            pad_token_id=self._pad_id,
        )

        def count(*_: Any) -> None:
            self.forward_passes += 1

        hook = self._base.register_forward_hook(count)  # one call per decoding step
        try:
            with warnings.catch_warnings():
                # generate() passes position_ids, which peft prompt tuning drops with a warning
                warnings.filterwarnings("ignore", message="Position ids are not supported")
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=config,
                )
        finally:
            hook.remove()
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [t.split("\n", 1)[0].strip() for t in texts]


# ----------------------------------------------------------------------------- masked LMs


class MaskedObjective(Objective):
    """LM-BFF: cross-entropy over the label words' logits at the mask position."""

    def __init__(self, loaded: LoadedModel, task_kind: str, **kwargs: Any) -> None:
        super().__init__(loaded, task_kind, **kwargs)
        if task_kind != "classification":
            raise ModelError(
                f"a masked LM scores label words: it supports classification tasks, not {task_kind}"
            )
        if self.tokenizer.mask_token is None:
            raise ModelError(f"tokenizer of '{loaded.name}' has no mask token")
        self._enc: dict[str, tuple[list[int], int]] = {}
        self._words: dict[str, int] = {}

    def _word_id(self, word: str) -> int:
        # a leading space selects the in-sentence form for BPE vocabularies (RoBERTa's "Ġgreat");
        # WordPiece ignores it and lowercases via the tokenizer
        if word not in self._words:
            ids = self.tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"label word {word!r} has no tokens")
            self._words[word] = ids[0]
        return self._words[word]

    def _encode(self, ex: Example) -> tuple[list[int], int]:
        if not ex.mlm_prompt or "{mask}" not in ex.mlm_prompt or not ex.label_words:
            raise ValueError(
                "masked-LM objectives need examples with an mlm_prompt containing {mask} and label_words"
            )
        if ex.mlm_prompt not in self._enc:
            tok = self.tokenizer
            ids = tok(ex.mlm_prompt.replace("{mask}", tok.mask_token))["input_ids"]
            m = ids.index(tok.mask_token_id)
            if len(ids) > self.max_length:
                # drop text from the left, but never the mask nor the boundary specials
                body, keep = ids[1:-1], self.max_length - 2
                start = min(len(body) - keep, m - 1)
                ids = ids[:1] + body[start : start + keep] + ids[-1:]
                m = ids.index(tok.mask_token_id)
            if len(self._enc) > _CACHE_LIMIT:
                self._enc.clear()
            self._enc[ex.mlm_prompt] = (ids, m)
        return self._enc[ex.mlm_prompt]

    def label_word_logits(self, batch: Sequence[Example]) -> torch.Tensor:
        """(B, C) float32 logits of each example's label words at its mask."""
        enc = [self._encode(ex) for ex in batch]
        width = max(len(ids) for ids, _ in enc)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (s, _) in enumerate(enc):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        logits = self._call(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        ).logits
        logits = logits[:, logits.shape[1] - width :]  # drop prompt-tuning virtual positions
        rows = []
        for i, (ex, (_, m)) in enumerate(zip(batch, enc)):
            words = torch.tensor([self._word_id(w) for w in ex.label_words], device=logits.device)
            rows.append(logits[i, m, words].float())
        return _pad_candidates(rows)

    def loss(self, batch: Sequence[Example]) -> torch.Tensor:
        if not batch:
            raise ValueError("empty batch")
        logits = self.label_word_logits(batch)
        return F.cross_entropy(logits, torch.tensor(self._labels(batch), device=logits.device))

    def _predict(self, batch: Sequence[Example]) -> list:
        return self.label_word_logits(batch).argmax(-1).tolist()


# ----------------------------------------------------------------------------- classifiers


class ClassifierObjective(Objective):
    """A sequence-classification head over the raw text fields (1 or 2 segments)."""

    def __init__(self, loaded: LoadedModel, task_kind: str, **kwargs: Any) -> None:
        super().__init__(loaded, task_kind, **kwargs)
        if task_kind != "classification":
            raise ModelError(
                f"a classification head predicts labels: it supports classification tasks, not {task_kind}"
            )
        self._enc: dict[tuple[str, ...], dict[str, list[int]]] = {}

    def _encode(self, ex: Example) -> dict[str, list[int]]:
        texts = ex.texts or (ex.prompt,)
        if len(texts) > 2:
            raise ValueError(f"a classifier takes 1 or 2 text segments, got {len(texts)}")
        if texts not in self._enc:
            if len(self._enc) > _CACHE_LIMIT:
                self._enc.clear()
            enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
            self._enc[texts] = dict(enc)
        return self._enc[texts]

    def logits(self, batch: Sequence[Example]) -> torch.Tensor:
        """(B, num_labels) float32 logits of the classification head."""
        padded = self.tokenizer.pad([self._encode(ex) for ex in batch], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in padded.items()}
        return self._call(**inputs).logits.float()

    def loss(self, batch: Sequence[Example]) -> torch.Tensor:
        if not batch:
            raise ValueError("empty batch")
        logits = self.logits(batch)
        labels = [ex.label for ex in batch]
        if any(not 0 <= y < logits.shape[-1] for y in labels):
            raise ValueError(f"labels {labels} out of range for a {logits.shape[-1]}-way head")
        return F.cross_entropy(logits, torch.tensor(labels, device=logits.device))

    def _predict(self, batch: Sequence[Example]) -> list:
        return self.logits(batch).argmax(-1).tolist()


# ----------------------------------------------------------------------------- factory


def make_objective(
    loaded: LoadedModel,
    task_kind: str,
    *,
    max_length: int = 256,
    max_new_tokens: int = 50,
    demos: Sequence[Example] = (),
    cache_demos: bool = False,
    metric: str | None = None,
) -> Objective:
    """The objective for this model kind and task kind (demos: in-context examples, decoders
    only). `cache_demos` computes the demonstrations' keys and values once and reuses them for
    every prompt: for evaluation only (the cache would go stale once the weights change).
    `metric` "loss" makes `evaluate` report the targets' loss (a task's `metric`); otherwise it
    reports the kind's usual scores."""
    if task_kind not in KINDS:
        raise ValueError(f"unknown task kind '{task_kind}': use one of {', '.join(KINDS)}")
    if metric in LOWER_IS_BETTER and (task_kind == "classification" or loaded.kind != "causal"):
        raise ModelError(
            f"metric {metric} scores generation or multiple-choice targets with a decoder "
            f"(got a {loaded.kind} model on a {task_kind} task)"
        )
    if demos and loaded.kind != "causal":
        raise ModelError("in-context demonstrations need a causal (decoder) model")
    cls = {"causal": CausalObjective, "masked": MaskedObjective, "classifier": ClassifierObjective}[
        loaded.kind
    ]
    return cls(
        loaded,
        task_kind,
        max_length=max_length,
        max_new_tokens=max_new_tokens,
        demos=demos,
        cache_demos=cache_demos,
        metric=metric,
    )
