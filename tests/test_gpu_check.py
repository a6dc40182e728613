"""benchmarks/gpu_check.py in its smallest form (a tiny model, two methods, four training
steps): on a CPU it runs every part it can and names why it skips the others."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_runs_and_prints_one_table(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("| part") :]
    for row in ("mezo: step / its forwards", "zo-adam: step / its forwards", "4 MeZO steps"):
        assert row in table
    if not torch.cuda.is_available():
        assert "| memory    | -" in table and "skipped" in table
    assert "| NO" not in table
