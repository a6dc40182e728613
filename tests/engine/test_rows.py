"""Attached embeddings: only the rows a batch reads move, with the same losses and weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from zotune.engine import native as _native
from zotune.optim import build
from zotune.testing import bert_config, llama_config


def opt_config() -> OPTConfig:
    return OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)  # fmt: skip


def _train_tiny_bert(base, method: str, extra: dict, attach: bool, batches, labels):
    """Steps of `method` on a copy of `base`; returns losses, weights, whether each forward
    saw the unread embedding rows unperturbed, and what `attach` applied to."""
    model = copy.deepcopy(base)
    table = model.bert.embeddings.word_embeddings.weight
    opt = build(method, model.parameters(), lr=1e-3, eps=1e-3, **extra)
    e = model.bert.embeddings
    tables = [e.word_embeddings, e.position_embeddings, e.token_type_embeddings]
    names = opt.attach(model, tables) if attach else []
    seen, losses, before = [], [], table.detach().clone()

    def loss(ids):
        out = model(input_ids=ids).logits
        unread = torch.ones(table.shape[0], dtype=torch.bool)
        unread[ids.unique()] = False
        seen.append(torch.equal(table.detach()[unread], before[unread]))
        return torch.nn.functional.cross_entropy(out, labels)

    if method == "mezo-svrg":
        opt.full_closure = lambda: loss(batches[0])
    for ids in batches:
        before = table.detach().clone()
        losses.append(opt.step(lambda ids=ids: loss(ids)))
    return losses, [p.detach().clone() for p in model.parameters()], seen, names


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize(
    "method,extra",
    [
        ("mezo", {}),
        ("mezo", {"queries": 2}),
        ("zo-adam", {}),
        ("sparse-mezo", {"sparsity": 0.5}),
        ("r-mezo", {"sparsity": 0.5}),
        ("r-mezo", {"sparsity": 0.5, "queries": 2}),
        ("mezo-svrg", {"refresh": 2}),
        ("zo-sgd-cons", {}),
        ("lozo", {"interval": 2}),  # low-rank z: rows formed from the factors by the kernel
        ("lozo", {"interval": 2, "queries": 2}),  # (passes from one query's z to the next)
        ("lozo-m", {"interval": 2}),
        ("subzero", {"interval": 2, "rank": 3}),
    ],
)
def test_lazy_embedding_rows_change_no_loss_and_no_weight(method, extra):
    """`attach` perturbs only the rows a batch reads: same losses, same weights, bit for bit."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(bert_config(200, num_labels=2)).eval()
    batches = [torch.randint(0, 60 + 40 * k, (4, 12)) for k in range(4)]
    labels = torch.tensor([0, 1, 1, 0])
    loss_a, weights_a, seen_a, _ = _train_tiny_bert(base, method, extra, False, batches, labels)
    loss_b, weights_b, seen_b, names = _train_tiny_bert(base, method, extra, True, batches, labels)
    assert names == [
        "bert.embeddings.word_embeddings",
        "bert.embeddings.position_embeddings",
        "bert.embeddings.token_type_embeddings",
    ]
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    if method != "mezo-svrg":  # (its anchor passes hold other values in every row)
        assert not all(seen_a) and all(seen_b)  # eager perturbs unread rows, lazy does not


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
def test_lazy_rows_of_a_tied_table_keep_the_eager_mask():
    """A table whose threshold is tied (120 of 200 rows zero, sparsity 0.5): the rows a batch
    reads pick the same hashed share of the tied entries as a full pass."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(bert_config(200, num_labels=2)).eval()
    with torch.no_grad():
        base.bert.embeddings.word_embeddings.weight[:120] = 0.0
    batches = [torch.randint(0, 200, (4, 12)) for _ in range(3)]
    labels = torch.tensor([0, 1, 1, 0])
    extra = {"sparsity": 0.5}
    loss_a, weights_a, _, _ = _train_tiny_bert(base, "sparse-mezo", extra, False, batches, labels)
    loss_b, weights_b, _, names = _train_tiny_bert(
        base, "sparse-mezo", extra, True, batches, labels
    )
    assert "bert.embeddings.word_embeddings" in names
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
    assert 0 in build("sparse-mezo", base.parameters(), sparsity=0.5).space.mask.ties  # tied


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize("method", ["mezo", "r-mezo", "sparse-mezo"])
def test_lazy_rows_split_over_threads_change_nothing(method):
    """Batches that read over 128 rows are moved in one segment per thread."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(bert_config(200, num_labels=2)).eval()
    batches = [torch.randint(0, 200, (16, 24)) for _ in range(3)]
    labels = torch.randint(0, 2, (16,))
    extra = {"sparsity": 0.5} if method != "mezo" else {}
    loss_a, weights_a, _, _ = _train_tiny_bert(base, method, extra, False, batches, labels)
    loss_b, weights_b, _, _ = _train_tiny_bert(base, method, extra, True, batches, labels)
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))


@pytest.mark.skipif(_native.lib() is None, reason="attached rows need the C kernel")
def test_attach_defaults_to_the_input_embedding_and_skips_overridden_lookups():
    bert = BertForSequenceClassification(bert_config(64, num_labels=2))
    opt = build("mezo", bert.parameters(), lr=1e-3)
    assert opt.attach(bert) == ["bert.embeddings.word_embeddings"]
    opt = build("mezo", (opt_model := OPTForCausalLM(opt_config())).parameters(), lr=1e-3)
    positions = opt_model.model.decoder.embed_positions  # looks up positions + 2, not its input
    assert opt.attach(opt_model, [positions, opt_model.get_input_embeddings()]) == []  # tied


@pytest.mark.skipif(_native.lib() is None, reason="attached rows need the C kernel")
def test_attach_hook_reads_ids_passed_by_keyword():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 1)

        def forward(self, ids):
            return self.out(self.emb(input=ids).mean(1)).square().mean()

    torch.manual_seed(0)
    base, ids = Bag(), torch.randint(0, 20, (4, 6))
    runs = []
    for attach in (False, True):
        model = copy.deepcopy(base)
        opt = build("mezo", model.parameters(), lr=1e-2, eps=1e-3)
        if attach:
            assert opt.attach(model, [model.emb]) == ["emb"]
        losses = [opt.step(lambda m=model: m(ids)) for _ in range(3)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()], opt.regenerations))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    # regenerations count z drawn over the weights: 3 full passes a step without attach; with
    # it, the table's 800 weights are drawn once (the update), and the rows the forwards read
    # three times (to +εz before the first, straight to -εz after it, back after the second)
    n_other, rows_read = 17, ids.unique().numel() * 16
    assert runs[0][2] == 9
    assert runs[1][2] == pytest.approx(3 * (3 * n_other + 800 + 3 * rows_read) / (n_other + 800))


@pytest.mark.skipif(_native.lib() is None, reason="attached rows need the C kernel")
def test_attached_rows_follow_ids_changed_in_place_between_forwards():
    """The second forward of a step skips the row lookup only for the very same ids, unchanged:
    a batch tensor rewritten in place between the two forwards has its new rows moved."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(60, 16), nn.Linear(16, 1)
    ids = torch.randint(0, 20, (4, 6))
    runs = []
    for attach in (False, True):
        model = nn.ModuleDict({"emb": copy.deepcopy(emb), "head": copy.deepcopy(head)})
        opt = build("mezo", model.parameters(), lr=1e-2, eps=1e-3)
        if attach:
            assert opt.attach(model, [model["emb"]]) == ["emb"]
        batch = ids.clone()

        def loss(model=model, batch=batch):
            out = model["head"](model["emb"](batch).mean(1)).square().mean()
            batch.add_(7)  # the next call reads other rows, from the same tensor
            return out

        losses = [opt.step(loss) for _ in range(3)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.skipif(_native.lib() is None, reason="attached rows need the C kernel")
def test_attach_skips_tied_and_untrained_embeddings():
    tied = LlamaForCausalLM(llama_config(64, tie_word_embeddings=True))
    assert build("mezo", tied.parameters(), lr=1e-3).attach(tied) == []
    untied = LlamaForCausalLM(llama_config(64, tie_word_embeddings=False))
    opt = build("mezo", untied.parameters(), lr=1e-3)
    assert opt.attach(untied) == opt.attach(untied) == ["model.embed_tokens"]
    assert len(opt._row_hooks) == 1  # attaching twice hooks once
    frozen = [p for n, p in untied.named_parameters() if "embed" not in n]
    assert build("mezo", frozen, lr=1e-3).attach(untied) == []


@pytest.mark.skipif(_native.lib() is None, reason="no C compiler")
@pytest.mark.parametrize(
    "method,extra", [("mezo", {}), ("zo-adam", {}), ("r-mezo", {"sparsity": 0.5})]
)
def test_torch_openmp_team_and_thread_pool_move_the_same_bits(method, extra, monkeypatch):
    """The kernel's threads run on torch's OpenMP team where torch uses libgomp
    (`native.team`), else on a thread pool: the same passes and row moves, bit for bit."""
    torch.manual_seed(0)
    base = BertForSequenceClassification(bert_config(400, num_labels=2)).eval()
    batches = [torch.randint(0, 400, (8, 40)) for _ in range(3)]  # > 128 rows: segments
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    runs = []
    for team in (_native.team(), None):
        monkeypatch.setattr(_native, "_team", team)
        runs.append(_train_tiny_bert(base, method, extra, True, batches, labels)[:2])
    (loss_a, weights_a), (loss_b, weights_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b))
