"""Tests for zotune.tasks: split sizes, exact template renderings, file formats and error messages.

Tests that call `real_data()` need ZOTUNE_DATA pointing at a folder laid out like
shared/data and skip otherwise; everything else runs on the shipped SST-2 sample and tiny files
written into tmp_path.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from zotune.tasks import Example, Task, TaskError, available_tasks, load_task
from zotune.tasks.files import package_data_dir
from zotune.tasks.sampling import Sizes, mezo_splits

# ---- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the package's own data dir."""
    monkeypatch.delenv("ZOTUNE_DATA", raising=False)


def real_data(*parts: str) -> Path:
    """The ZOTUNE_DATA folder, skipping the test when it (or the named file) is absent."""
    root = os.environ.get("ZOTUNE_DATA")
    if not root:
        pytest.skip("ZOTUNE_DATA is not set")
    path = Path(root, *parts)
    if not path.exists() and not Path(str(path) + ".gz").exists():
        pytest.skip(f"{path} is not there")
    return Path(root)


def everything(task: Task) -> list[Example]:
    return task.train + task.dev + task.test


def find(task: Task | list[Example], *texts: str) -> Example:
    """The one example (of any split of a task) whose prompt contains all of `texts`."""
    pool = everything(task) if isinstance(task, Task) else task
    hits = [e for e in pool if all(t in e.prompt for t in texts)]
    assert len(hits) == 1, f"{len(hits)} examples contain {texts!r}"
    return hits[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "TaskError messages are one line"
    return message


# ---- registry and shipped sample ----------------------------------------------------------------


def test_available_tasks() -> None:
    names = available_tasks()
    for name in [
        "sst2",
        "rte",
        "cb",
        "boolq",
        "wsc",
        "wic",
        "copa",
        "multirc",
        "record",
        "squad",
        "drop",
    ]:
        assert name in names
    for name in ["sst-2", "sst-5", "mr", "trec", "snli", "mnli", "rte", "qnli"]:
        assert f"kshot-{name}" in names
    assert len(names) == 19


def test_shipped_sst2_sample_is_small_and_balanced() -> None:
    folder = package_data_dir() / "sst2"
    sizes = {f: (folder / f).stat().st_size for f in ("train.tsv", "dev.tsv")}
    assert sum(sizes.values()) < 100_000
    for f, rows in (("train.tsv", 600), ("dev.tsv", 200)):
        lines = (folder / f).read_text(encoding="utf-8").splitlines()
        assert lines[0] == "sentence\tlabel"
        assert len(lines) == rows + 1
        assert Counter(line.rsplit("\t", 1)[1] for line in lines[1:]) == {
            "0": rows // 2,
            "1": rows // 2,
        }


def test_sst2_from_shipped_sample(no_env: None) -> None:
    task = load_task("sst2", num_train=400, num_dev=100, num_test=1000)
    assert (len(task.train), len(task.dev), len(task.test)) == (400, 100, 200)
    assert task.kind == "classification" and task.metric == "accuracy" and task.num_labels == 2
    assert any("sample shipped with zotune" in n for n in task.notes)
    assert {e.label for e in task.test} == {0, 1}
    # MeZO's shrinking rule on a train split smaller than num_train + num_dev: dev keeps num_dev.
    small = load_task("sst2")
    assert (len(small.train), len(small.dev)) == (100, 500)
    assert any("dev keeps 500" in n for n in small.notes)


def test_sst2_templates_render_exactly(no_env: None) -> None:
    # Line 2 of zotune/data/sst2/train.tsv: "i ca n't say it 's on par with the first one \t0".
    task = load_task("sst2", num_train=599, num_dev=1)
    e = find(task, "i ca n't say it 's on par with the first one")
    assert e == Example(
        prompt="i ca n't say it 's on par with the first one It was",
        candidates=(" terrible", " great"),
        label=0,
        texts=("i ca n't say it 's on par with the first one",),
        mlm_prompt="i ca n't say it 's on par with the first one It was {mask} .",
        label_words=("terrible", "great"),
    )
    empty = find(
        load_task("sst2", num_train=599, num_dev=1, template="empty"), "i ca n't say it 's on par"
    )
    assert empty.prompt == "i ca n't say it 's on par with the first one "
    assert empty.candidates == ("terrible", "great")


# ---- sampling -----------------------------------------------------------------------------------


def test_mezo_sampling_matches_numpy_permutation() -> None:
    train, val = list(range(5000)), list(range(10_000, 12_000))
    tr, dev, test, notes = mezo_splits("t", train, val, Sizes(1000, 500, 1000, seed=7))
    drawn = np.random.RandomState(7).permutation(5000)[:1500].tolist()
    assert tr == drawn[:1000] and dev == drawn[1000:]
    assert test == [10_000 + i for i in np.random.RandomState(7).permutation(2000)[:1000]]
    assert notes == []


def test_sampling_deterministic_and_disjoint(no_env: None) -> None:
    a = load_task("sst2", num_train=300, num_dev=100, num_test=50, seed=3)
    b = load_task("sst2", num_train=300, num_dev=100, num_test=50, seed=3)
    c = load_task("sst2", num_train=300, num_dev=100, num_test=50, seed=4)
    assert a.train == b.train and a.dev == b.dev and a.test == b.test
    assert [e.prompt for e in a.train] != [e.prompt for e in c.train]
    # Train and dev come from one split: no row is in both.
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.dev}


def test_single_split_is_drawn_disjointly() -> None:
    val = list(range(3270))  # BoolQ here: only the validation split exists
    tr, dev, test, notes = mezo_splits("boolq", None, val, Sizes(1000, 500, 1000, seed=0))
    assert (len(tr), len(dev), len(test)) == (1000, 500, 1000)
    assert len(set(tr) | set(dev) | set(test)) == 2500
    assert "missing" in notes[0] and "disjointly" in notes[0]
    tr, dev, test, notes = mezo_splits("x", None, list(range(30)), Sizes(1000, 500, 1000, seed=0))
    assert len(tr) + len(dev) + len(test) == 30 and len(set(tr) | set(dev) | set(test)) == 30
    assert len(notes) == 2


def test_tiny_train_split_keeps_a_training_set() -> None:
    tr, dev, _, notes = mezo_splits("cb", list(range(250)), [0], Sizes(1000, 500, 1000, seed=0))
    assert (len(tr), len(dev)) == (167, 83)
    assert "num_dev=100" in notes[0]


# ---- real data: split sizes and label sets (methods.md 1.1, data README) ------------------------

SIZES = {  # name: (files that must exist, load_task kwargs, (train, dev, test), labels)
    "sst2": ("sst2/train.tsv", {}, (1000, 500, 872), {0, 1}),
    "rte": ("rte/train.jsonl", {}, (1000, 500, 277), {0, 1}),
    "cb": ("cb/train.jsonl", {"num_dev": 100}, (150, 100, 56), {0, 1, 2}),
    "boolq": ("boolq/val.jsonl", {}, (1000, 500, 1000), {0, 1}),
    "wsc": ("wsc/train.jsonl", {}, (54, 500, 104), {0, 1}),
    "wic": ("wic/train.jsonl", {}, (1000, 500, 638), {0, 1}),
    "copa": ("copa/train.jsonl", {"num_dev": 100}, (300, 100, 100), {0, 1}),
    "multirc": ("multirc/train.jsonl", {}, (1000, 500, 1000), {0, 1}),
    "squad": ("squad/dev-v1.1.json", {}, (1000, 500, 1000), {-1}),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_real_split_sizes(name: str) -> None:
    file, kwargs, sizes, labels = SIZES[name]
    root = real_data(file)
    task = load_task(name, root, **kwargs)
    assert (len(task.train), len(task.dev), len(task.test)) == sizes
    for split in (task.train, task.dev, task.test):
        assert {e.label for e in split} == labels
    assert task.kind in ("classification", "multiple_choice", "generation")
    if task.kind == "classification":
        assert all(len(e.candidates) == task.num_labels for e in everything(task))
    if name == "boolq":  # drawn from val only: disjoint, and said so
        keys = [e.prompt for e in everything(task)]
        assert len(set(keys)) == len(keys)
        assert any("missing" in n for n in task.notes)


KSHOT_TESTS = {
    "sst-2": 872,
    "sst-5": 1000,
    "mr": 1000,
    "trec": 500,
    "snli": 1000,
    "mnli": 1000,
    "rte": 277,
    "qnli": 1000,
}


@pytest.mark.parametrize("short", list(KSHOT_TESTS))
def test_real_kshot_sizes(short: str) -> None:
    root = real_data("k-shot-1k-test")
    task = load_task(f"kshot-{short}", root)
    assert Counter(e.label for e in task.train) == {y: 16 for y in range(task.num_labels)}
    assert Counter(e.label for e in task.dev) == {y: 16 for y in range(task.num_labels)}
    assert len(task.test) == KSHOT_TESTS[short]
    assert {e.label for e in task.test} == set(range(task.num_labels))
    assert all(e.mlm_prompt.count("{mask}") == 1 for e in everything(task))
    assert all(len(e.label_words) == task.num_labels for e in everything(task))


def test_real_kshot_gzip_and_short_classes() -> None:
    root = real_data("k-shot-1k-test", "MNLI", "512-13", "train.tsv")
    mnli = load_task("kshot-mnli", root, k=512, kshot_seed=13, num_test=100)
    assert len(mnli.train) == 3 * 512 and len(mnli.test) == 100
    assert any("capped" in n for n in mnli.notes)
    trec = load_task("kshot-trec", root, k=512, kshot_seed=13)
    assert Counter(e.label for e in trec.train)[2] == 86
    assert any("Expression 86" in n for n in trec.notes)


# ---- real data: each template renders one real row exactly (methods.md 1.2, 1.5) ----------------


def test_real_rte_and_cb() -> None:
    root = real_data("rte", "val.jsonl")
    # rte/val.jsonl line 1 (not_entailment).
    premise = (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation."
    )
    e = find(load_task("rte", root), premise)
    assert e == Example(
        prompt=premise
        + '\nDoes this mean that "Christopher Reeve had an accident." is true? Yes or No?\n',
        candidates=("Yes", "No"),
        label=1,
        texts=(premise, "Christopher Reeve had an accident."),
        mlm_prompt=premise + " ? {mask} , Christopher Reeve had an accident.",
        label_words=("Yes", "No"),
    )
    empty = find(load_task("rte", root, template="empty"), premise)
    assert empty.prompt == premise + '\n"Christopher Reeve had an accident."\n'
    # cb/val.jsonl line 1 (contradiction -> "No").
    real_data("cb", "val.jsonl")
    e = find(load_task("cb", root, num_dev=100), "Valence the void-brain")
    assert e.prompt == (
        "Suppose Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his "
        "own portion of titanic anatomy to shaft? Did he think he was helping? Can we infer that "
        '"Valence was helping"? Yes, No, or Maybe?\n'
    )
    assert e.candidates == ("Yes", "No", "Maybe") and e.label == 1


def test_real_boolq_wsc_wic() -> None:
    root = real_data("boolq", "val.jsonl")
    # boolq/val.jsonl line 1: the SuperGLUE "Ethanol fuel -- " title prefix is removed (HF boolq).
    boolq = load_task("boolq", root, num_train=2000, num_dev=270, num_test=1000)  # all 3,270 rows
    e = find(boolq, "Does ethanol take more energy make that produces?")
    assert e.prompt.startswith("All biomass goes through at least some of these steps:")
    assert e.prompt.endswith(" Does ethanol take more energy make that produces?\n")
    assert e.candidates == ("Yes", "No") and e.label == 1  # label false -> "No"
    real_data("wsc", "val.jsonl")
    e = find(load_task("wsc", root), "Bernard , who had not", 'pronoun "him" refer to anyone?')
    assert e.prompt.endswith(
        "could take his claim away from him .\n"
        'In the previous sentence, does the pronoun "him" refer to anyone? Yes or No?\n'
    )
    assert e.candidates == ("No", "Yes") and e.label == 0
    real_data("wic", "val.jsonl")
    e = find(load_task("wic", root), "An emerging professional class.")
    assert e.prompt == (
        'Does the word "class" have the same meaning in these two sentences? Yes, No?\n'
        "An emerging professional class.\n"
        "Apologizing for losing your temper, even though you were badly provoked, showed real class.\n"
    )
    assert e.candidates == ("No", "Yes") and e.label == 0


def test_real_copa_multirc_squad() -> None:
    root = real_data("copa", "val.jsonl")
    task = load_task("copa", root, num_dev=100)
    assert task.kind == "multiple_choice"
    e = find(task, "The man turned on the faucet")  # copa/val.jsonl line 1, effect
    assert e.prompt == "The man turned on the faucet so "
    assert (
        e.candidates == ("the toilet filled with water.", "water flowed from the spout.")
        and e.label == 1
    )
    e = find(task, "I doubted the salesman's pitch")  # "I" stays capitalised
    assert e.candidates == ("I turned his offer down.", "he persuaded me to buy the product.")
    empty = find(
        load_task("copa", root, num_dev=100, template="empty"), "The man turned on the faucet"
    )
    assert empty.prompt == "The man turned on the faucet "
    real_data("multirc", "val.jsonl")
    multirc = load_task("multirc", root, num_test=10_000)
    e = find(multirc, 'I found this answer "Less the mass, less the force applied"')
    assert e.prompt.startswith("What causes a change in motion? The application of a force.")
    assert e.prompt.endswith(
        "\nQuestion: Would the mass of a baseball affect how much force you have to use to pick it up?\n"
        'I found this answer "Less the mass, less the force applied". Is that correct? Yes or No?\n'
    )
    assert e.candidates == ("No", "Yes") and e.label == 1
    assert len(multirc.test) == 4848  # one example per answer option
    real_data("squad", "dev-v1.1.json")
    squad = load_task("squad", root, num_test=20_000)
    e = find(squad, "Question: Which NFL team represented the AFC at Super Bowl 50?")
    assert e.prompt.startswith(
        "Title: Super_Bowl_50\nContext: Super Bowl 50 was an American football game"
    )
    assert e.prompt.endswith(
        "\nQuestion: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:"
    )
    assert e.answers == ("Denver Broncos",) * 3 and e.label == -1 and e.candidates == ()
    assert squad.kind == "generation" and squad.metric == "f1" and len(squad.test) == 10_570
    assert any("first-11-articles" in n for n in squad.notes)


def test_real_kshot_templates() -> None:
    root = real_data("k-shot-1k-test")
    e = find(load_task("kshot-trec", root), "What city is served by Tempelhol Airport ?")
    assert e.prompt == "Question: What city is served by Tempelhol Airport ?\nAnswer type:"
    assert e.candidates == (
        " Description",
        " Entity",
        " Expression",
        " Human",
        " Location",
        " Number",
    )
    assert e.label == 4 and e.mlm_prompt == "{mask} : What city is served by Tempelhol Airport ?"
    e = find(load_task("kshot-sst-5", root), "hardly a film that comes along every day .")
    assert e.prompt == "hardly a film that comes along every day . It was" and e.label == 3
    assert e.candidates == (" terrible", " bad", " okay", " good", " great")
    assert e.mlm_prompt == "hardly a film that comes along every day . It was {mask} ."
    e = find(load_task("kshot-mnli", root), "Suppose That's all right.")
    assert (
        e.prompt
        == "Suppose That's all right. Can we infer that \"That's fine.\"? Yes, No, or Maybe?\n"
    )
    assert e.candidates == ("Yes", "Maybe", "No") and e.label == 0
    assert e.mlm_prompt == "That's all right. ? {mask} , That's fine." and e.texts == (
        "That's all right.",
        "That's fine.",
    )
    e = find(load_task("kshot-snli", root), "A group of young boys in blue swimming suits")
    assert e.label == 2 and e.texts[1] == "The boys are playing in the grass."
    e = find(load_task("kshot-qnli", root), "In what year did Robert Louis Stevenson die?")
    assert e.prompt.startswith(
        "Question: In what year did Robert Louis Stevenson die?\nSentence: Mission work"
    )
    assert (
        e.prompt.endswith("\nDoes the sentence answer the question? Yes or No?\n") and e.label == 1
    )
    assert e.mlm_prompt.startswith(
        "In what year did Robert Louis Stevenson die? ? {mask} , Mission work"
    )
    e = find(load_task("kshot-rte", root), "In 2003, Yunus brought the microcredit revolution")
    assert e.prompt.endswith(
        '\nDoes this mean that "Yunus supported more than 50,000 Struggling Members." is true? Yes or No?\n'
    )
    assert e.label == 0 and e.label_words == ("Yes", "No")


# ---- formats without data here: ReCoRD, DROP, BoolQ train (tiny files in the original format) ---


def _record_row(idx: int, query: str, answer: str | None) -> dict:
    text = "The Eiffel Tower is in Paris.\n@highlight\nParis is in France"
    spans = [(text.index("France"), "France"), (text.index("Eiffel Tower"), "Eiffel Tower")]
    spans += [
        (text.index("Paris"), "Paris"),
        (text.rindex("Paris"), "Paris"),
    ]  # listed out of order
    # ReCoRD's `end` is inclusive.
    entities = [{"start": s, "end": s + len(w) - 1} for s, w in spans]
    answers = [{"start": 0, "end": 0, "text": answer}] if answer else []
    return {
        "source": "Daily mail",
        "passage": {"text": text, "entities": entities},
        "qas": [{"query": query, "answers": answers, "idx": idx}],
        "idx": idx,
    }


def test_record_original_format(tmp_path: Path) -> None:
    queries = ["@placeholder is the capital of France.", "The tower stands in @placeholder."]
    train = [_record_row(i, queries[i % 2], "Paris") for i in range(6)]
    train.append(_record_row(6, "@placeholder is big.", "Berlin"))  # answer is no entity
    write_jsonl(tmp_path / "record" / "train.jsonl", train)
    write_jsonl(tmp_path / "record" / "val.jsonl", [_record_row(9, queries[0], "Paris")])
    task = load_task("record", tmp_path, num_train=4, num_dev=2)
    assert (len(task.train), len(task.dev), len(task.test)) == (4, 2, 1)
    assert task.kind == "multiple_choice" and task.metric == "accuracy"
    assert any("dropped 1 queries" in n for n in task.notes)
    assert task.test[0] == Example(
        prompt="The Eiffel Tower is in Paris.\n- Paris is in France\n-",
        candidates=(
            " Eiffel Tower is the capital of France.",
            " Paris is the capital of France.",
            " France is the capital of France.",
        ),
        label=1,
        answers=("Paris",),
    )


def test_drop_original_format(tmp_path: Path) -> None:
    def qa(q: str, answer: dict, validated: list[dict] | None = None) -> dict:
        blank = {"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": []}
        out = {"question": q, "answer": {**blank, **answer}, "query_id": q}
        if validated is not None:
            out["validated_answers"] = [{**blank, **v} for v in validated]
        return out

    passage = (
        "The Bears scored 7 points in the first quarter on 9 March 2003, then Chaz Schilens ran."
    )
    train = {
        "nfl_1": {
            "passage": passage,
            "qa_pairs": [qa(f"How many points {i}?", {"number": "7"}) for i in range(4)],
            "wiki_url": "",
        }
    }
    dev = {
        "nfl_2": {
            "passage": passage,
            "qa_pairs": [
                qa(" When was it? ", {"date": {"day": "9", "month": "March", "year": "2003"}}),
                qa("Who ran?", {"spans": ["Chaz Schilens"]}, [{"spans": ["Schilens", "Chaz"]}]),
                qa("Nothing?", {}),
            ],
        }
    }
    write(tmp_path / "drop" / "drop_dataset_train.json", json.dumps(train))
    write(tmp_path / "drop" / "drop_dataset_dev.json", json.dumps(dev))
    task = load_task("drop", tmp_path, num_train=3, num_dev=1)
    assert (len(task.train), len(task.dev), len(task.test)) == (3, 1, 2)
    assert task.kind == "generation" and task.metric == "f1"
    assert all(e.answers == ("7",) for e in task.train + task.dev)
    when = find(task, "When was it?")
    assert when.prompt == f"Passage: {passage}\nQuestion: When was it?\nAnswer:"
    assert when.answers == ("9 March 2003",)
    assert find(task, "Who ran?").answers == ("Schilens", "Chaz")  # dev: validated answers
    assert any("dropped 1 questions" in n for n in task.notes)


def test_boolq_with_train_split(tmp_path: Path) -> None:
    def row(i: int, label: bool) -> dict:
        return {
            "question": f"is it true {i}",
            "passage": f"Some title -- Passage {i}.",
            "idx": i,
            "label": label,
        }

    write_jsonl(tmp_path / "boolq" / "train.jsonl", [row(i, i % 2 == 0) for i in range(20)])
    write_jsonl(tmp_path / "boolq" / "val.jsonl", [row(100 + i, i % 2 == 1) for i in range(5)])
    task = load_task("boolq", tmp_path, num_train=10, num_dev=5)
    assert (len(task.train), len(task.dev), len(task.test)) == (10, 5, 5)
    assert task.notes == []
    e = find(task, "Passage 100.")
    assert e.prompt == "Passage 100. Is it true 100?\n" and e.label == 1  # false -> "No"
    assert e.texts == ("is it true 100", "Passage 100.")
    # The original BoolQ format (title and answer fields) is read too.
    original = {"question": "is it so?", "title": "T", "passage": "A -- B.", "answer": True}
    write_jsonl(tmp_path / "b2" / "boolq" / "val.jsonl", [original] * 6)
    e = load_task("boolq", tmp_path / "b2", num_train=2, num_dev=1, num_test=1).test[0]
    assert e.prompt == "A -- B. Is it so?\n" and e.label == 0


def test_kshot_gzip_and_test_file_one_level_up(tmp_path: Path) -> None:
    folder = tmp_path / "k-shot-1k-test" / "SST-2"
    rows = "sentence\tlabel\nbad movie \t0\ngood movie \t1\n"
    write(folder / "16-42" / "train.tsv", rows)
    write(folder / "16-42" / "dev.tsv", rows)
    write(folder / "test.tsv", rows + "fine film \t1\n")
    (folder / "16-13").mkdir()
    for f in ("train.tsv", "dev.tsv"):
        with gzip.open(folder / "16-13" / f"{f}.gz", "wt", encoding="utf-8") as out:
            out.write(rows)
    task = load_task("kshot-sst-2", tmp_path, k=16, kshot_seed=13, num_test=2)
    assert [e.prompt for e in task.train] == ["bad movie It was", "good movie It was"]
    assert len(task.test) == 2 and any("capped" in n for n in task.notes)
    assert any(
        "does not have k=16 rows for every class (terrible 1, great 1)" in n for n in task.notes
    )
    with pytest.raises(TaskError) as excinfo:
        load_task("kshot-sst-2", tmp_path, k=8)
    assert "no k-shot split" in error(excinfo) and "16-13, 16-42" in error(excinfo)


# ---- users' own YAML tasks ----------------------------------------------------------------------


def test_custom_csv_with_header(tmp_path: Path) -> None:
    for split, n in (("train", 8), ("dev", 4), ("test", 4)):
        rows = "".join(f'"{split} row {i}, quoted",{i % 2}\n' for i in range(n))
        write(tmp_path / "data" / f"{split}.csv", "review,stars\n" + rows)
    spec = write(
        tmp_path / "movies.yaml",
        "name: movies\ntrain: data/train.csv\ndev: data/dev.csv\ntest: data/test.csv\n"
        'template: "Review: {review} It was"\nlabel_column: stars\n'
        "label_words: {0: terrible, 1: great}\n"
        'mlm_template: "{review} It was {mask} ."\n',
    )
    task = load_task(str(spec), num_train=6)
    assert task.name == "movies" and task.kind == "classification" and task.num_labels == 2
    assert (len(task.train), len(task.dev), len(task.test)) == (6, 4, 4)
    e = find(task, "test row 3, quoted")
    assert e == Example(
        prompt="Review: test row 3, quoted It was",
        candidates=(" terrible", " great"),
        label=1,
        texts=("test row 3, quoted",),
        mlm_prompt="test row 3, quoted It was {mask} .",
        label_words=("terrible", "great"),
    )


def test_custom_headerless_tsv_without_dev(tmp_path: Path) -> None:
    rows = "".join(
        f"premise {i}\thypothesis {i}\t{'entailment' if i % 2 else 'not_entailment'}\n"
        for i in range(12)
    )
    write(tmp_path / "train.tsv", rows)
    write(tmp_path / "test.tsv", "premise 100\thypothesis 100\tentailment\n")
    spec = write(
        tmp_path / "nli.yml",
        "train: train.tsv\ntest: test.tsv\ncolumns: [premise, hypothesis, label]\n"
        'template: "{premise}\\nQuestion: {hypothesis} Yes or No?\\n"\nlabel_column: label\n'
        "label_words:\n  entailment: Yes\n  not_entailment: No\n",
    )
    task = load_task(spec, num_train=8, num_dev=4)
    assert task.name == "nli" and (len(task.train), len(task.dev)) == (8, 4)
    assert any("no dev file" in n for n in task.notes)
    e = find(task, "premise 1\n")
    assert e.prompt == "premise 1\nQuestion: hypothesis 1 Yes or No?\n"
    assert e.candidates == ("Yes", "No") and e.label == 0  # template ends in a newline: no space
    assert e.texts == ("premise 1", "hypothesis 1") and e.mlm_prompt == "" and e.label_words == ()


def test_custom_jsonl(tmp_path: Path) -> None:
    rows = [{"q": f"question {i}", "ctx": f"context {i}", "answer": i % 2 == 0} for i in range(6)]
    for split in ("train", "dev", "test"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    spec = write(
        tmp_path / "qa.yaml",
        "train: train.jsonl\ndev: dev.jsonl\ntest: test.jsonl\n"
        'template: "{ctx} {{{q}}}"\nlabel_column: answer\n'
        'label_words: {true: "\\tyes", false: no}\ntext_columns: [q]\n',
    )
    e = find(load_task(str(spec)).test, "context 2")
    assert e.prompt == "context 2 {question 2}"  # {{ and }} are literal braces
    assert e.candidates == ("\tyes", " no") and e.label == 0 and e.texts == ("question 2",)


# ---- bad input: one-line TaskError that names the problem and the fix ---------------------------


def _custom(
    tmp_path: Path, yaml_text: str, data: str = "text,label\nnice,1\nbad,0\n", file: str = "d.csv"
) -> str:
    write(tmp_path / file, data)
    return str(write(tmp_path / "t.yaml", yaml_text))


GOOD = "train: d.csv\ntest: d.csv\ntemplate: '{text} It was'\nlabel_column: label\nlabel_words: {0: bad, 1: good}\n"


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda tmp: load_task("sst3"), "unknown task 'sst3': choose one of sst2, rte"),
        (lambda tmp: load_task("rte", tmp), "missing data files"),
        (lambda tmp: load_task("rte", tmp / "nope"), "does not exist"),
        (lambda tmp: load_task("sst2", tmp, num_train=0), "num_train must be an integer >= 1"),
        (lambda tmp: load_task("sst2", tmp, num_test=-1), "num_test must be an integer >= 1"),
        (lambda tmp: load_task("sst2", tmp, template="fancy"), "unknown template 'fancy'"),
        (lambda tmp: load_task("cb", tmp, template="empty"), "no 'empty' template"),
        (lambda tmp: load_task("kshot-mr", tmp), "missing data file"),
        (lambda tmp: load_task(str(tmp / "none.yaml")), "not found"),
        (
            lambda tmp: load_task(_custom(tmp, GOOD.replace("template:", "templat:"))),
            "unknown key 'templat'",
        ),
        (
            lambda tmp: load_task(_custom(tmp, GOOD.replace("label_column: label\n", ""))),
            "missing required key 'label_column'",
        ),
        (lambda tmp: load_task(_custom(tmp, GOOD + "  : [\n")), "cannot parse"),
        (lambda tmp: load_task(_custom(tmp, GOOD.replace("{text}", "{txt}"))), "no column 'txt'"),
        (lambda tmp: load_task(_custom(tmp, GOOD, "text,label\nnice,7\n")), "unknown label '7'"),
        (
            lambda tmp: load_task(_custom(tmp, GOOD, "text,label\nnice,1,extra\n")),
            "expected 2 comma-separated fields",
        ),
        (
            lambda tmp: load_task(_custom(tmp, GOOD.replace("d.csv", "d.xlsx"), file="d.xlsx")),
            "use .csv, .tsv, .jsonl, .json or .parquet",
        ),
        (
            lambda tmp: load_task(_custom(tmp, GOOD.replace("test: d.csv", "test: e.csv"))),
            "missing data file",
        ),
        (lambda tmp: load_task(_custom(tmp, GOOD + "mlm_template: 'no mask'\n")), "has no {mask}"),
        (
            lambda tmp: load_task(_custom(tmp, GOOD), template="empty"),
            "does not apply to a task file",
        ),
    ],
)
def test_bad_input(tmp_path: Path, setup, expected: str) -> None:
    with pytest.raises(TaskError) as excinfo:
        setup(tmp_path)
    assert expected in error(excinfo)


def test_bad_files(tmp_path: Path) -> None:
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood\t1\nno tab here\n")
    write(tmp_path / "sst2" / "dev.tsv", "sentence\tlabel\nfine\t2\n")
    with pytest.raises(TaskError) as excinfo:
        load_task("sst2", tmp_path)
    assert error(excinfo) == (
        f"malformed line 3 in {tmp_path / 'sst2' / 'train.tsv'}: expected 2 tab-separated fields "
        "(sentence, label), got 1"
    )
    write(tmp_path / "sst2" / "train.tsv", "sentence\tlabel\ngood\t1\n")
    with pytest.raises(TaskError) as excinfo:
        load_task("sst2", tmp_path)
    assert "unknown label '2' on line 2" in error(excinfo) and "expected one of '0', '1'" in error(
        excinfo
    )

    write(
        tmp_path / "rte" / "train.jsonl",
        '{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{"premise": \n',
    )
    with pytest.raises(TaskError) as excinfo:
        load_task("rte", tmp_path)
    assert "malformed line 2" in error(excinfo) and "not valid JSON" in error(excinfo)
    write(tmp_path / "rte" / "train.jsonl", '{"premise": "a", "label": "entailment"}\n')
    with pytest.raises(TaskError) as excinfo:
        load_task("rte", tmp_path)
    assert "missing field 'hypothesis'" in error(excinfo)
    write(
        tmp_path / "rte" / "train.jsonl", '{"premise": "a", "hypothesis": "b", "label": "maybe"}\n'
    )
    with pytest.raises(TaskError) as excinfo:
        load_task("rte", tmp_path)
    assert "unknown label 'maybe'" in error(excinfo) and "'entailment'" in error(excinfo)

    write(
        tmp_path / "squad" / "dev-v1.1.json",
        '{"data": [{"title": "x", "paragraphs": [{"qas": []}]}]}',
    )
    with pytest.raises(TaskError) as excinfo:
        load_task("squad", tmp_path)
    assert "malformed article 0" in error(excinfo)
    (tmp_path / "k-shot-1k-test" / "mr" / "16-42").mkdir(parents=True)
    (tmp_path / "k-shot-1k-test" / "mr" / "16-42" / "train.csv.gz").write_bytes(b"not gzip")
    with pytest.raises(TaskError) as excinfo:
        load_task("kshot-mr", tmp_path)
    assert "cannot read" in error(excinfo)
