"""Export a run's model at a kept step for plain transformers / peft (`zotune export`).

Formats:
  peft         a PEFT adapter folder (LoRA, prefix or prompt runs): adapter_config.json,
               adapter_model.safetensors and the tokenizer; `PeftModel.from_pretrained(base, DIR)`
               over the base loaded with transformers gives the run's model.
  merged       a full Hugging Face model folder (config.json, model.safetensors, tokenizer):
               full-parameter runs as they are, LoRA runs merged into the weights.
  safetensors  the trainable tensors only, by parameter name (the --save-weights format).

The adapter's `base_model_name_or_path` names a base that loads offline: the local HF folder
the run's model came from (absolute path), or its hub id. A GGUF base (e.g. smollm2-135m) is not
loadable by transformers as a folder of weights, so its dequantized HF form is written into
DIR/base (config, safetensors, tokenizer) and the adapter points there: the export is
self-contained (the dequantization cache under ~/.cache/zotune may be cleared or disabled).

Everything is written into a temporary folder beside `out` and renamed into place; `out` must not
exist or be empty. Errors are `ConfigError`s with one-line messages.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .runs import Run, load_run_model, open_run
from .train import ConfigError

FORMATS = ("peft", "merged", "safetensors")
PROVENANCE = "zotune-export.json"
BASE_DIR = "base"  # where a GGUF base is written inside a peft export


def check_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty: choose another --out")
    return out


def write_dir_atomically(out: str | os.PathLike, fill) -> Any:
    """Let `fill(work)` write into a temporary folder beside `out`, then rename it into place."""
    out = check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = fill(work)
        check_out(out)  # nothing appeared there meanwhile
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return result


def _check_format(run: Run, fmt: str) -> None:
    scheme = run.config.peft
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format '{fmt}': choose {', '.join(FORMATS)}")
    if fmt == "peft" and scheme == "full":
        raise ConfigError(
            f"{run.path} is a full-parameter run: it has no adapter to export; use --format merged"
        )
    if fmt == "merged" and scheme in ("prefix", "prompt"):
        raise ConfigError(
            f"{run.path} is a {scheme}-tuning run: its virtual tokens are extra inputs and "
            "cannot be merged into the weights; use --format peft"
        )
    if fmt in ("peft", "merged") and run.config.method in ("linear-probe", "icl"):
        raise ConfigError(f"{run.path} is a {run.config.method} baseline: it trains no weights")


def base_reference(model: str) -> tuple[str, bool]:
    """(what to put in base_model_name_or_path, whether the base must be written beside the
    adapter because it is a GGUF file) for a run's --model."""
    from .models import BUILTIN_MODELS, _resolve

    src = _resolve(model, None)
    if src.gguf_file is not None:
        return src.path, True
    if model in BUILTIN_MODELS or os.path.isdir(os.path.expanduser(model)):
        return os.path.abspath(src.path), False
    return model, False  # a hub id: plain transformers finds it in the hub cache


def _trainable(model: Any) -> dict[str, Any]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> None:
    """save_pretrained, keeping the padding side zotune chose (left for decoders: scoring and
    generation append on the right), which transformers does not write by itself."""
    tokenizer.save_pretrained(str(directory))
    path = Path(directory) / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        config["padding_side"] = tokenizer.padding_side
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_peft(cfg: Any, loaded: Any, work: Path, final: Path) -> str:
    from .models import load_model

    reference, gguf = base_reference(cfg.model)
    if gguf:  # a clean (adapter-free) base, dequantized, written beside the adapter
        base = load_model(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
        base.model.save_pretrained(work / BASE_DIR)
        save_tokenizer(base.tokenizer, work / BASE_DIR)
        reference = str(final.resolve() / BASE_DIR)
    loaded.model.save_pretrained(str(work))
    config_path = work / "adapter_config.json"
    adapter = json.loads(config_path.read_text(encoding="utf-8"))
    adapter["base_model_name_or_path"] = reference
    config_path.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    save_tokenizer(loaded.tokenizer, work)
    return reference


def _save_merged(loaded: Any, work: Path) -> None:
    model = loaded.model
    if loaded.scheme == "lora":
        model = model.merge_and_unload()
    elif loaded.scheme != "full":  # checked before loading; a guard for API callers
        raise ConfigError(f"{loaded.scheme} tuning cannot be merged: use --format peft")
    model.save_pretrained(str(work))
    save_tokenizer(loaded.tokenizer, work)


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "merged",
    keep: str | int = "best",
) -> dict[str, Any]:
    """Write the run's model at `keep` (best, final or a step) to `out` in format `fmt`;
    returns what was written (format, step, base, files)."""
    from safetensors.torch import save_file

    run = open_run(run_dir)
    _check_format(run, fmt)
    out = check_out(out)
    step = run.step_for(keep)
    cfg, _task, loaded, _objective = load_run_model(run, step)
    info: dict[str, Any] = {
        "run": str(run.path.resolve()),
        "format": fmt,
        "step": step,
        "keep": keep,
        "model": cfg.model,
        "kind": loaded.kind,
        "method": cfg.method,
        "peft": cfg.peft,
    }

    def fill(work: Path) -> dict[str, Any]:
        if fmt == "safetensors":
            meta = {"step": str(step), "model": str(cfg.model), "peft": cfg.peft}
            save_file(_trainable(loaded.model), str(work / "weights.safetensors"), metadata=meta)
        elif fmt == "peft":
            info["base_model_name_or_path"] = _save_peft(cfg, loaded, work, out)
        else:
            _save_merged(loaded, work)
        (work / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        info["files"] = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
        return info

    return write_dir_atomically(out, fill)
