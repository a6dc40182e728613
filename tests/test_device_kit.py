"""benchmarks/device_kit.py: the kit survives the trip in parts (checked against its manifest),
and a runs folder comes back within the device tool's limits, checkpoints only where they fit."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_kit.py"
spec = importlib.util.spec_from_file_location("device_kit", SCRIPT)
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_the_kit_travels_in_parts_and_unpacks_whole(tmp_path):
    data = tmp_path / "data"
    (data / "sst2").mkdir(parents=True)
    (data / "sst2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    parts = kit.pack(tmp_path / "kit", models=[], data_dir=data, tasks=["sst2"], part_bytes=200_000)
    assert len(parts) > 1 and all(p.stat().st_size <= 200_000 for p in parts)
    env = kit.unpack(tmp_path / "kit", tmp_path / "there")
    assert env == {
        "PYTHONPATH": str(tmp_path / "there/site"),
        "ZOTUNE_DATA": str(tmp_path / "there/data"),
    }
    assert tree(tmp_path / "there/site/gguf") == tree(kit._package_dir("gguf"))
    [info] = (tmp_path / "there/site").glob("gguf-*.dist-info")  # its version, for transformers
    assert (info / "METADATA").is_file()
    assert (tmp_path / "there/data/sst2/train.tsv").read_text().endswith("fine\t1\n")
    # a part the machine no longer has, or one that changed on the way, is named
    parts[1].write_bytes(parts[1].read_bytes()[:-1] + b"x")
    with pytest.raises(kit.KitError, match="part-01 does not match"):
        kit.unpack(tmp_path / "kit", tmp_path / "again")
    parts[1].unlink()
    with pytest.raises(kit.KitError, match="part-01 is missing: carry it"):
        kit.unpack(tmp_path / "kit", tmp_path / "again")
    with pytest.raises(kit.KitError, match="unknown model gpt-9"):
        kit.pack(tmp_path / "kit", models=["gpt-9"])


def test_runs_come_back_with_the_checkpoints_that_fit(tmp_path):
    there, here = tmp_path / "there", tmp_path / "here"  # bench --out folders: runs/<id>/
    for run, size in (("small", 1_000), ("big", 3_000_000)):
        for side, step in ((there, 9), (here, 1)):
            (side / "runs" / run / "checkpoint").mkdir(parents=True)
            (side / "runs" / run / "config.yaml").write_text("lr: 0.1\n")
            (side / "runs" / run / "metrics.jsonl").write_text(f'{{"step": {step}}}\n')
        weights = bytes(range(256)) * (size // 256)
        (there / "runs" / run / "checkpoint" / "weights").write_bytes(weights)
        (there / "runs" / run / "best.safetensors").write_bytes(weights)
        (here / "runs" / run / "checkpoint" / "weights").write_bytes(b"step 1")
        (here / "runs" / run / "best.safetensors").write_bytes(b"step 1")
    (there / "configs").mkdir()
    (there / "configs" / "small.yaml").write_text("lr: 0.1\n")
    back = kit.collect(there, tmp_path / "out", limit=2_500_000)
    assert back and all(p.stat().st_size <= kit.BACK_BYTES for p in back)
    assert kit.merge(tmp_path / "out", here) == ["runs/big", "runs/small"]
    assert tree(here / "runs/small") == tree(there / "runs/small")
    assert (here / "configs" / "small.yaml").is_file()
    # the big run's checkpoint and kept weights did not fit: its stale local ones (step 1) are
    # gone too, so the run starts again rather than resuming step 9's records from step 1
    assert sorted(tree(here / "runs/big")) == ["config.yaml", "metrics.jsonl"]
    assert (here / "runs/big/metrics.jsonl").read_text() == '{"step": 9}\n'
