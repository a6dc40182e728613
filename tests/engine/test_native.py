"""The C kernel's packaging: generated headers, layout checks, the loader's modes and cache."""

from __future__ import annotations

import ctypes
import platform
import shutil
import socket
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from zotune.engine import native
from zotune.optim import build

needs_cc = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The kernel not loaded yet (restored afterwards), cached under tmp_path."""
    monkeypatch.setattr(native, "_lib", False)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ZOTUNE_NATIVE_SRC", raising=False)
    return tmp_path


def broken_source(folder: Path) -> Path:
    """A copy of csrc/ whose kernel does not compile."""
    shutil.copytree(native.CSRC, folder)
    src = folder / "zotune.c"
    src.write_text(src.read_text() + "\nint zt_broken(void) { return 1 +; }\n")
    return folder


def train(steps: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.ParameterList([nn.Parameter(torch.randn(3 * 1024 + 21) * 0.02)])
    opt = build("zo-adam", model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
    for _ in range(steps):
        opt.step(lambda: sum((p**2).sum() for p in model.parameters()))
    return [p.detach().clone() for p in model]


def test_the_headers_are_what_native_py_generates():
    """Run `python -m zotune.engine.native --write-header` after editing the enums or mirrors."""
    assert (native.CSRC / "zotune_types.h").read_text() == native.render_header()
    assert (native.CSRC / "zotune_lanes.h").read_text() == native.render_lanes()
    header = native.render_header()
    assert "enum { ZT_UPD_NONE = 0, ZT_UPD_SGD = 1, ZT_UPD_SIGN = 2" in header
    assert "ZT_MASK_KEPT = 3" in header and "ZT_LAW_RADEMACHER = 1" in header
    for mirror in native.MIRRORS:
        assert f"}} {mirror.c_name};" in header


def test_write_headers_only_rewrites_what_changed(tmp_path):
    assert sorted(p.name for p in native.write_headers(tmp_path)) == [
        "zotune_lanes.h",
        "zotune_types.h",
    ]
    assert native.write_headers(tmp_path) == []


def test_the_enums():
    assert [(m.name, m.value) for m in native.Law] == [("GAUSSIAN", 0), ("RADEMACHER", 1)]
    assert [(m.name, m.value) for m in native.MaskKind] == [
        ("NONE", 0),
        ("MAGNITUDE", 1),
        ("RANDOM", 2),
        ("KEPT", 3),
    ]
    modes = ["NONE", "SGD", "SIGN", "MOMENTUM", "ADAM", "HESSIAN", "WINDOW_ADAM"]
    assert [m.name for m in native.UpdateMode] == modes
    assert [m.value for m in native.UpdateMode] == [0, 1, 2, 3, 4, 5, 6]


def test_a_moved_field_is_reported_by_name():
    lib = native.lib()
    layout = native.kernel_layout(lib) if lib else native.expected_layout()
    native.check_layout(layout)  # the real mirrors agree

    fields = [f for f in native.Unit._fields_ if f[0] != "mask_h"]
    fields.insert(3, ("mask_h", ctypes.c_double))  # before key

    class Moved(ctypes.Structure):
        c_name = "zt_unit"
        _fields_ = fields

    mirrors = [Moved if m is native.Unit else m for m in native.MIRRORS]
    with pytest.raises(
        native.LayoutError, match=r"zt_unit\.mask_h: offset 40, size 8 in the kernel"
    ):
        native.check_layout(layout, mirrors)

    class Narrow(ctypes.Structure):  # a field's type changed (so the struct's size too)
        c_name = "zt_rec"
        _fields_ = [(n, ctypes.c_int32 if n == "count" else t) for n, t in native.Record._fields_]

    mirrors = [Narrow if m is native.Record else m for m in native.MIRRORS]
    with pytest.raises(native.LayoutError, match=r"zt_rec\.count: .* size 8 in the kernel"):
        native.check_layout(layout, mirrors)

    class Short(ctypes.Structure):  # a field dropped
        c_name = "zt_pass"
        _fields_ = native.Pass._fields_[:-1]

    mirrors = [Short if m is native.Pass else m for m in native.MIRRORS]
    with pytest.raises(
        native.LayoutError, match=r"zt_pass\.mask_limit is not in its ctypes mirror"
    ):
        native.check_layout(layout, mirrors)


@needs_cc
def test_a_broken_kernel_warns_once_under_auto_and_raises_under_require(fresh, monkeypatch):
    src = broken_source(fresh / "src")
    monkeypatch.setenv("ZOTUNE_NATIVE_SRC", str(src))
    monkeypatch.setenv("ZOTUNE_NATIVE", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.lib() is None
        assert native.lib() is None  # decided once: no second build, no second warning
        trained = train()  # the torch code
    kernel_warnings = [w for w in caught if issubclass(w.category, native.NativeKernelWarning)]
    assert len(kernel_warnings) == 1, [str(w.message) for w in caught]
    message = str(kernel_warnings[0].message)
    assert "error" in message  # the compiler's output
    assert f"{src / 'zotune.c'}" in message and "-ffp-contract=off" in message  # the command
    assert not (fresh / "cache" / "native").exists() or not list(
        (fresh / "cache" / "native").glob("*.so")
    )

    monkeypatch.setenv("ZOTUNE_NATIVE", "off")
    assert all(torch.equal(a, b) for a, b in zip(trained, train()))

    monkeypatch.setenv("ZOTUNE_NATIVE", "require")
    with pytest.raises(native.NativeBuildError, match="zotune.c"):
        native.lib()  # after auto's failure, too
    monkeypatch.setattr(native, "_lib", False)
    with pytest.raises(RuntimeError, match="Compiler output"):
        native.lib()


def test_no_compiler_warns_under_auto_and_raises_under_require(fresh, monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setenv("ZOTUNE_NATIVE", "1")  # the old spelling of auto
    with pytest.warns(native.NativeKernelWarning, match="no C compiler"):
        assert native.lib() is None
    monkeypatch.setattr(native, "_lib", False)
    monkeypatch.setenv("ZOTUNE_NATIVE", "require")
    with pytest.raises(native.NativeBuildError, match="no C compiler"):
        native.lib()


@needs_cc
def test_a_layout_mismatch_at_load_is_not_swallowed(fresh, monkeypatch):
    monkeypatch.delenv("ZOTUNE_CACHE")  # (the usual build: the check fails, not the compiler)
    fields = [f for f in native.Unit._fields_ if f[0] != "mask_h"] + [("mask_h", ctypes.c_double)]

    class Moved(ctypes.Structure):
        c_name = "zt_unit"
        _fields_ = fields

    monkeypatch.setattr(
        native, "MIRRORS", [Moved if m is native.Unit else m for m in native.MIRRORS]
    )
    monkeypatch.setenv("ZOTUNE_NATIVE", "auto")
    with pytest.warns(native.NativeKernelWarning, match=r"zt_unit\.mask_h: offset 40"):
        assert native.lib() is None
    monkeypatch.setattr(native, "_lib", False)
    monkeypatch.setenv("ZOTUNE_NATIVE", "require")
    with pytest.raises(native.NativeBuildError, match="zt_unit"):
        native.lib()


@needs_cc
def test_an_unusable_cache_folder(fresh, monkeypatch):
    (fresh / "a-file").write_text("")
    monkeypatch.setenv("ZOTUNE_CACHE", str(fresh / "a-file"))
    monkeypatch.setenv("ZOTUNE_NATIVE", "require")
    with pytest.raises(native.NativeBuildError, match="could not be built"):
        native.lib()


def test_a_compiler_that_does_not_run(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    monkeypatch.setenv("ZOTUNE_NATIVE", "require")
    with pytest.raises(native.NativeBuildError, match="could not run") as error:
        native.lib()
    assert "no-such-cc" in str(error.value) and "To reproduce" in str(error.value)


def test_off_never_builds(fresh, monkeypatch):
    monkeypatch.setattr(native, "load", lambda: pytest.fail("built under ZOTUNE_NATIVE=off"))
    for value in ("off", "0", "OFF"):
        monkeypatch.setenv("ZOTUNE_NATIVE", value)
        assert native.lib() is None
    monkeypatch.setenv("ZOTUNE_NATIVE", "sometimes")
    with pytest.raises(ValueError, match="auto, require or off"):
        native.lib()


@needs_cc
def test_zotune_cache_off_builds_in_a_temporary_folder(fresh, monkeypatch):
    work = fresh / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("ZOTUNE_CACHE", "off")
    monkeypatch.setenv("ZOTUNE_NATIVE", "require")
    assert native.cache_dir() is None
    lib = native.lib()
    assert list(work.iterdir()) == []  # not ./off/native
    where = Path(lib._name).resolve()
    assert where.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert not where.is_relative_to(work.resolve())


@needs_cc
def test_a_build_is_cached_and_reused(fresh, monkeypatch):
    monkeypatch.setenv("ZOTUNE_NATIVE", "require")
    first = native.lib()
    builds = list((fresh / "cache" / "native").glob("zotune_*.so"))
    assert [Path(first._name)] == builds
    assert not [p for p in builds[0].parent.iterdir() if p.name.startswith(".build-")]
    monkeypatch.setattr(native, "_lib", False)

    def run(*args, **kwargs):
        pytest.fail(f"ran {args} again")

    monkeypatch.setattr(native.subprocess, "run", run)  # (the compiler's version is known)
    assert native.lib()._name == first._name


def test_the_cache_key_ignores_the_host_name(monkeypatch, tmp_path):
    key = native.cache_key()
    for host in ("build-host-1", "other-machine"):
        monkeypatch.setattr(platform, "node", lambda h=host: h)
        monkeypatch.setattr(socket, "gethostname", lambda h=host: h)
        assert native.cache_key() == key
        assert host not in key
    # what it does depend on: the sources, the flags
    src = shutil.copytree(native.CSRC, tmp_path / "src")
    assert native.cache_key(src) == key
    (src / "zotune.c").write_text((src / "zotune.c").read_text() + "\n/* changed */\n")
    assert native.cache_key(src) != key
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-DZT_EXTRA"])
    assert native.cache_key() != key


def test_the_csrc_files_are_package_data():
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"engine/csrc/*"' in text
    assert all((native.CSRC / name).is_file() for name in native.SOURCES)


@pytest.mark.skipif(
    native.lib() is None or platform.machine() not in ("x86_64", "AMD64"),
    reason="needs the kernel, built here for x86-64",
)
def test_the_kernel_built_without_avx2_agrees_with_the_torch_path(tmp_path, monkeypatch):
    """CPUs without AVX2 (ARM, older x86) run the kernel's plain C loops: build it so here and
    check every fused path against the torch code (updates alone included: their draw buffer
    must hold a whole chunk when no vector loop went first)."""
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    # (not inlined, with stack canaries: a buffer overrun aborts instead of passing unseen)
    flags = [*native.FLAGS, "-mno-avx2", "-fno-inline", "-fstack-protector-all"]
    monkeypatch.setattr(native, "FLAGS", flags)
    monkeypatch.setattr(native, "_lib", False)
    assert native.lib() is not None
    torch.manual_seed(0)
    weights = [torch.randn(3 * 1024 + 21) * 0.02, torch.randn(13, 7)]
    for method, extra in [
        ("mezo", {}),
        ("zo-sgd-mmt", {}),
        ("zo-sgd-sign", {}),
        ("zo-adam", {}),
        ("sparse-mezo", {"sparsity": 0.7}),
        ("r-mezo", {"sparsity": 0.7}),
    ]:
        runs = []
        for mode in ("1", "0"):
            monkeypatch.setenv("ZOTUNE_NATIVE", mode)
            model = nn.ParameterList([nn.Parameter(w.clone()) for w in weights])
            opt = build(method, model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, **extra)
            for _ in range(2):
                opt.step(lambda m=model: sum((p**2).sum() for p in m.parameters()))
            record = {"lr": [1e-2], "wd": [0.1]}
            opt.space.transition(None, None, opt.update_for([(99, 0.5)], record))
            runs.append([p.detach().clone() for p in model])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), method


@pytest.mark.skipif(
    native.compiler() is None or native.mode() == "off",
    reason="no C compiler, or the kernel turned off",
)
def test_the_c_kernel_compiles_where_a_compiler_exists():
    """Every kernel test skips without the library: a source that fails to compile must fail."""
    assert native.lib() is not None
