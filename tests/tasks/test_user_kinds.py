"""Users' own tasks of every kind, from files and from `datasets` sources, and their errors.

Data are tiny files written into tmp_path (CSV, JSONL, JSON, Parquet, `save_to_disk` folders);
training runs use the tiny Llama fixture for two steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from zotune.cli import main  # noqa: E402
from zotune.tasks import TaskError, load_task  # noqa: E402
from zotune.train import TrainConfig, train  # noqa: E402

# ---- data ---------------------------------------------------------------------------------------

PAIRS = [(f"say {w}", w.upper()) for w in ("cat", "dog", "sun", "sea", "red", "old", "big", "hot")]
COMPLETION_ROWS = [{"prompt": f"Instruction: {p}\nResponse:", "completion": c} for p, c in PAIRS]
MC_ROWS = [
    {
        "premise": f"premise {i}",
        "options": [f"first {i}", f"second {i}", f"third {i}"],
        "gold": i % 3,
    }
    for i in range(8)
]
QA_ROWS = [
    {
        "context": f"The {w} is number {i}.",
        "question": f"Which number is the {w}?",
        "answers": {"text": [str(i), f"number {i}"], "answer_start": [0, 0]},
    }
    for i, w in enumerate(("cat", "dog", "sun", "sea", "car", "hat", "pen", "cup"))
]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def saved(path: Path, rows: list[dict], splits: tuple[str, ...] = ("train", "test")) -> Path:
    ds = datasets.Dataset.from_list(rows)
    datasets.DatasetDict({s: ds for s in splits}).save_to_disk(str(path))
    return path


# ---- loading each kind --------------------------------------------------------------------------


def test_completion_from_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"q": p, "a": c} for p, c in PAIRS])
    spec = write(
        tmp_path / "sft.yaml",
        "kind: completion\ntrain: train.jsonl\ntest: train.jsonl\n"
        'template: "Q: {q}\\nA:"\ncompletion_column: a\n',
    )
    task = load_task(str(spec), num_train=4, num_dev=2)
    assert (task.kind, task.metric, len(task.train), len(task.dev)) == ("generation", "loss", 4, 2)
    e = next(e for e in task.test if "say cat" in e.prompt)
    assert e.prompt == "Q: say cat\nA:" and e.answers == (" CAT",)  # one space after "A:"


def test_multiple_choice_from_jsonl_list_and_csv_columns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    spec = write(
        tmp_path / "mc.yaml",
        "kind: multiple-choice\ntrain: mc.jsonl\ntest: mc.jsonl\n"
        'template: "{premise} so"\nchoices: options\nlabel_column: gold\n',
    )
    task = load_task(str(spec), num_train=4, num_dev=2)
    e = next(e for e in task.test if e.prompt == "premise 4 so")
    assert (task.kind, task.metric) == ("multiple_choice", "accuracy")
    assert e.candidates == (" first 4", " second 4", " third 4") and e.label == 1

    write(tmp_path / "mc.csv", "premise,a,b,gold\nit rained,wet,dry,0\nsun,dark,bright,1\n")
    spec = write(
        tmp_path / "mc2.yaml",
        "kind: multiple-choice\ntrain: mc.csv\ntest: mc.csv\n"
        'template: "{premise}\\n"\nchoices: [a, b]\nlabel_column: gold\n',
    )
    e = next(e for e in load_task(str(spec)).test if e.prompt == "sun\n")
    assert e.candidates == ("dark", "bright") and e.label == 1  # template ends in a newline


def test_qa_from_parquet_with_squad_answers(tmp_path: Path) -> None:
    datasets.Dataset.from_list(QA_ROWS).to_parquet(str(tmp_path / "qa.parquet"))
    spec = write(
        tmp_path / "qa.yaml",
        "kind: qa\ntrain: qa.parquet\ntest: qa.parquet\nmetric: em\n"
        'template: "{context}\\nQuestion: {question}\\nAnswer:"\nanswers_column: answers\n',
    )
    task = load_task(str(spec), num_train=4, num_dev=2)
    e = next(e for e in task.test if e.prompt.startswith("The sun"))
    assert (task.kind, task.metric) == ("generation", "em")
    assert e.answers == (" 2", " number 2")


def test_saved_dataset_folder_as_the_task(tmp_path: Path) -> None:
    folder = saved(tmp_path / "sft", COMPLETION_ROWS, ("train", "validation", "test"))
    task = load_task(str(folder), num_train=8)
    assert (task.name, task.kind, task.metric) == ("sft", "generation", "loss")
    assert (len(task.train), len(task.dev), len(task.test)) == (8, 8, 8)
    assert task.train[0].prompt.startswith("Instruction: say")

    # a single Dataset (no splits): train, dev and test are drawn from it, disjointly
    datasets.Dataset.from_list(QA_ROWS).save_to_disk(str(tmp_path / "qa"))
    task = load_task(str(tmp_path / "qa"), num_train=4, num_dev=2, num_test=2)
    assert (task.kind, task.metric) == ("generation", "f1")
    assert task.test[0].prompt.endswith("\nAnswer:")
    prompts = [e.prompt for e in task.train + task.dev + task.test]
    assert len(prompts) == len(set(prompts)) == 8
    assert any("drawn, disjointly" in n for n in task.notes)


def test_jsonl_file_as_the_task(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "pairs.jsonl", COMPLETION_ROWS)
    task = load_task(str(file), num_train=4, num_dev=2, num_test=2)
    assert task.name == "pairs" and task.kind == "generation"
    assert task.train[0].answers[0].startswith(" ")


def test_yaml_dataset_key_with_split_mapping(tmp_path: Path) -> None:
    rows = [{"text": f"text {i}", "label": i % 2} for i in range(8)]
    saved(tmp_path / "data" / "clf", rows, ("fit", "holdout"))
    spec = write(
        tmp_path / "clf.yaml",
        "dataset: data/clf\nsplits: {train: fit, test: holdout}\n"
        "template: '{text} It was'\nlabel_column: label\nlabel_words: {0: bad, 1: good}\n",
    )
    task = load_task(str(spec), num_train=6, num_dev=2)
    assert (task.kind, len(task.train), len(task.dev), len(task.test)) == (
        "classification",
        6,
        2,
        8,
    )
    assert task.test[0].candidates == (" bad", " good")


def test_dataset_objects_with_a_spec(tmp_path: Path) -> None:
    data = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(MC_ROWS), "test": datasets.Dataset.from_list(MC_ROWS)}
    )
    spec = {"kind": "multiple-choice", "template": "{premise}", "choices": "options"}
    task = load_task(data, spec={**spec, "label_column": "gold"}, num_train=4, num_dev=2)
    assert task.kind == "multiple_choice" and len(task.test) == 8
    task = load_task(
        data["train"], spec={**spec, "label_column": "gold"}, num_train=4, num_dev=2, num_test=2
    )
    assert len(task.test) == 2


def test_hub_name_calls_load_dataset_with_its_config(tmp_path, monkeypatch) -> None:
    calls = []

    def fake(name, config=None, **kwargs):
        calls.append((name, config))
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_list(COMPLETION_ROWS) for s in ("train", "validation")}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    spec = write(
        tmp_path / "hub.yaml",
        "kind: completion\ndataset: someone/instructions\ndataset_config: small\n"
        "template: '{prompt}'\ncompletion_column: completion\n",
    )
    task = load_task(str(spec), num_train=4, num_dev=2)
    assert calls == [("someone/instructions", "small")]
    assert len(task.test) == 8  # no test split: test is "validation", dev drawn from train
    assert any("no test split" in n for n in task.notes)


# ---- malformed input: one line that says what to fix --------------------------------------------

COMPLETION = "kind: completion\ntrain: d.jsonl\ntest: d.jsonl\ntemplate: '{prompt}'\ncompletion_column: completion\n"
MC = "kind: multiple-choice\ntrain: d.jsonl\ntest: d.jsonl\ntemplate: '{premise}'\nchoices: options\nlabel_column: gold\n"
QA = "kind: qa\ntrain: d.jsonl\ntest: d.jsonl\ntemplate: '{question}'\nanswers_column: answers\n"


@pytest.mark.parametrize(
    ("yaml_text", "rows", "expected"),
    [
        (
            COMPLETION.replace("column: completion", "column: output"),
            COMPLETION_ROWS,
            "no column 'output' on line 1",
        ),
        (
            COMPLETION,
            [{"prompt": "p", "completion": "  "}],
            "empty completion in 'completion' on line 1",
        ),
        (
            COMPLETION + "metric: em\n",
            [{"prompt": "p", "completion": "a\nb"}],
            "spans several lines",
        ),
        (COMPLETION + "metric: accuracy\n", COMPLETION_ROWS, "unknown metric 'accuracy'"),
        (
            COMPLETION + "label_words: {0: a}\n",
            COMPLETION_ROWS,
            "does not apply to kind completion",
        ),
        (
            COMPLETION.replace("completion\n", "ranking\n", 1),
            COMPLETION_ROWS,
            "unknown kind 'ranking'",
        ),
        (MC, [{"premise": "p", "options": "a b", "gold": 0}], "should be a list, got str"),
        (MC, [{"premise": "p", "options": ["a", "b"], "gold": 2}], "out of range for 2 choices"),
        (MC, [{"premise": "p", "options": ["a", "b"], "gold": "b"}], "0-based index"),
        (MC, [{"premise": "p", "options": ["a"], "gold": 0}], "give at least 2"),
        (MC.replace("choices: options\n", ""), MC_ROWS, "missing required key 'choices'"),
        (QA, [{"question": "q", "answers": []}], "no answer in 'answers' on line 1"),
        (QA, [{"question": "q", "answers": 3}], "should be a string, a list of strings"),
        (COMPLETION + "dataset: x\n", COMPLETION_ROWS, "names both a dataset and a 'train' file"),
        (COMPLETION + "splits: {train: a}\n", COMPLETION_ROWS, "needs a `dataset:` key"),
    ],
)
def test_malformed(tmp_path: Path, yaml_text: str, rows: list[dict], expected: str) -> None:
    write_jsonl(tmp_path / "d.jsonl", rows)
    write(tmp_path / "t.yaml", yaml_text)
    with pytest.raises(TaskError) as excinfo:
        load_task(str(tmp_path / "t.yaml"))
    assert expected in error(excinfo)


def test_malformed_dataset_sources(tmp_path: Path, monkeypatch) -> None:
    saved(tmp_path / "clf", [{"text": "a", "label": 0}])
    with pytest.raises(TaskError) as excinfo:
        load_task(str(tmp_path / "clf"))
    assert "cannot tell the task kind" in error(excinfo) and "dataset: " in error(excinfo)

    (tmp_path / "plain").mkdir()
    with pytest.raises(TaskError) as excinfo:
        load_task(str(tmp_path / "plain"))
    assert "not a saved dataset" in error(excinfo)

    saved(tmp_path / "sft", COMPLETION_ROWS, ("train", "test"))
    write(
        tmp_path / "s.yaml",
        "kind: completion\ndataset: sft\nsplits: {train: training}\ntemplate: '{prompt}'\n"
        "completion_column: completion\n",
    )
    with pytest.raises(TaskError) as excinfo:
        load_task(str(tmp_path / "s.yaml"))
    assert "has no split 'training' (for train): it has train, test" in error(excinfo)

    write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(TaskError) as excinfo:
        load_task(str(tmp_path / "bad.parquet"))
    assert "cannot read" in error(excinfo)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    write(
        tmp_path / "hub.yaml",
        "kind: completion\ndataset: someone/data\ntemplate: '{prompt}'\ncompletion_column: completion\n",
    )
    with pytest.raises(TaskError) as excinfo:
        load_task(str(tmp_path / "hub.yaml"))
    assert "cannot load dataset 'someone/data'" in error(excinfo) and "reach the hub" in error(
        excinfo
    )


# ---- training and evaluating each kind ----------------------------------------------------------

ARGS = [
    "--steps", "2", "--eval-every", "2", "--batch-size", "2", "--peft", "full", "--lr", "1e-3",
    "--eps", "1e-2", "--num-train", "4", "--num-dev", "2", "--num-test", "2",
    "--eval-batch-size", "4", "--max-length", "64", "--quiet",
]  # fmt: skip


def cli_train(model: str, task: str, out: Path) -> dict:
    assert main(["train", "--model", model, "--task", task, "--out", str(out), *ARGS]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("metric", ["loss", "em"])
def test_completion_trains_and_evaluates(tiny_model_dir, tmp_path, metric) -> None:
    write_jsonl(tmp_path / "d.jsonl", COMPLETION_ROWS)
    spec = write(tmp_path / "t.yaml", COMPLETION + f"metric: {metric}\n")
    summary = cli_train(tiny_model_dir, str(spec), tmp_path / "run")
    assert summary["status"] == "completed" and summary["metric"] == metric
    keys = {"loss", "perplexity"} if metric == "loss" else {"f1", "em"}
    assert set(summary["dev"]) == keys and set(summary["test"]) == keys
    if metric == "loss":  # the best dev step is the lowest loss
        rows = [
            json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        losses = [summary["zero_shot"]["loss"], *(r["dev"]["loss"] for r in rows if "dev" in r)]
        assert summary["dev"]["loss"] == min(losses) > 0


@pytest.mark.parametrize(
    ("rows", "yaml_text", "metric"),
    [
        (
            [{"text": f"text {i}", "label": i % 2} for i in range(8)],
            "dataset: data\ntemplate: '{text} It was'\nlabel_column: label\n"
            "label_words: {0: bad, 1: good}\n",
            "accuracy",
        ),
        (
            MC_ROWS,
            "kind: multiple-choice\ndataset: data\ntemplate: '{premise} so'\nchoices: options\n"
            "label_column: gold\n",
            "accuracy",
        ),
        (QA_ROWS, None, "f1"),  # the saved folder itself is the task: its columns say qa
    ],
    ids=["classification", "multiple-choice", "qa"],
)
def test_other_kinds_train_from_saved_datasets(tiny_model_dir, tmp_path, rows, yaml_text, metric):
    folder = saved(tmp_path / "data", rows)
    task = str(write(tmp_path / "t.yaml", yaml_text)) if yaml_text else str(folder)
    summary = cli_train(tiny_model_dir, task, tmp_path / "run")
    assert summary["metric"] == metric and 0 <= summary["test"][metric] <= 1
    assert metric in summary["dev"] and summary["forward_passes"] == 4


def test_train_accepts_a_task_from_a_dataset_object(tiny_model_dir, tmp_path) -> None:
    data = datasets.Dataset.from_list(COMPLETION_ROWS)
    task = load_task(data, num_train=4, num_dev=2, num_test=2)
    cfg = TrainConfig(
        model=tiny_model_dir, steps=2, eval_every=2, batch_size=2, lr=1e-3, eps=1e-2,
        eval_batch_size=4, max_length=64, out=str(tmp_path / "run"),
    )  # fmt: skip
    summary = train(cfg, quiet=True, task=task)
    assert summary["task"] == "dataset" and summary["metric"] == "loss"
    assert summary["forward_passes"] == 4
