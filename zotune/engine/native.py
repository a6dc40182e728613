"""An optional C kernel for the CPU hot loop, compiled on first use with the system C compiler.

It computes exactly what the torch code in `directions.py` computes (same hash, same table, plain
IEEE float32 multiplies and adds with contraction disabled), only in one pass instead of many:
the tests check the two agree bit for bit.

The source is package data, `zotune/engine/csrc/`: `zotune.c` (the kernel, hand-written) and two
headers generated from this module, `zotune_types.h` (the enums `Law`, `MaskKind`, `UpdateMode`
and the structs mirrored below by ctypes, with a table of their layouts) and `zotune_lanes.h`
(AVX2 lane tables). Regenerate them after editing either with

    python -m zotune.engine.native --write-header

(a test fails while they differ from `render_header()` / `render_lanes()`). At load the
kernel's layout table is checked field by field against the ctypes mirrors.

Environment:

- ZOTUNE_NATIVE: `auto` (default; `1` too) builds and loads the kernel, and when that fails
  warns once (`NativeKernelWarning`, with the compiler's errors and the command to reproduce
  them) and uses the torch code; `require` raises `NativeBuildError` instead; `off` (or `0`)
  never builds and uses the torch code.
- ZOTUNE_CACHE: the cache root (default ~/.cache/zotune); the library goes to its `native/`
  folder, named by a hash of the sources, the compiler and its version, the flags and the CPU's
  features. `off`: built into a temporary folder, removed at exit.
- ZOTUNE_NATIVE_SRC: a folder to build the kernel from instead of `csrc/` (to test a change).
- CC: the C compiler (default `cc`, else `gcc`).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import enum
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("zotune.c", "zotune_types.h", "zotune_lanes.h")  # what a build reads (its cache key)
KEEP_BUILDS = 8  # libraries kept in the cache folder: the newest, the others are removed

FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fno-math-errno",
    "-shared",
    "-fPIC",
]


class Law(enum.IntEnum):
    """The directions' distribution (zt_pass.law, zt_rows.law)."""

    GAUSSIAN = 0
    RADEMACHER = 1


class MaskKind(enum.IntEnum):
    """Which elements a perturbation moves (zt_pass.mask_kind, zt_rows.mask_kind). KEPT: the
    random mask again, read from the bits a record kept (the kernel picks it from RANDOM)."""

    NONE = 0
    MAGNITUDE = 1
    RANDOM = 2
    KEPT = 3


class UpdateMode(enum.IntEnum):
    """The update rule the kernel applies (zt_terms.mode); `Rule.kernel` returns one."""

    NONE = 0
    SGD = 1
    SIGN = 2
    MOMENTUM = 3
    ADAM = 4
    HESSIAN = 5
    WINDOW_ADAM = 6


# each enum's C prefix, in the header's order
ENUMS = ((Law, "ZT_LAW_"), (MaskKind, "ZT_MASK_"), (UpdateMode, "ZT_UPD_"))

_P, _I, _U, _D, _F = (
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_uint64,
    ctypes.c_double,
    ctypes.c_float,
)
_C_SCALARS = {_I: "int64_t", _U: "uint64_t", _D: "double", _F: "float"}


def _ctypes(fields: Sequence[tuple]) -> list[tuple]:
    """A mirror's `_fields_` from its C fields: (name, ctypes type, C type, comment)."""
    return [(name, kind) for name, kind, *_ in fields]


class Record(ctypes.Structure):
    """zt_rec: what keeps one perturbed unit invertible (memory the kernel owns)."""

    c_name = "zt_rec"
    c_doc = """What keeps a perturbed unit invertible, owned by the kernel from the move that
perturbs the unit to the move that restores it (Python only swaps whole tables: MeZO-SVRG's
anchor)."""
    c_fields = (
        (
            "bits",
            _P,
            "uint8_t *",
            "one bit per element: its theta is kept aside; NULL when none is",
        ),
        ("aside", _P, "float *", "those thetas in element order, + 8 floats of slack"),
        ("mask", _P, "uint8_t *", "the perturbation's mask as bits, or NULL"),
        ("mask_key", _U, "uint64_t", "the random mask's key, when mask is one (ZT_MASK_RANDOM)"),
        ("count", _I, "int64_t", "floats in aside"),
    )
    _fields_ = _ctypes(c_fields)


class Coeff(ctypes.Structure):
    """zt_coeff: one term c·z(seed) of an update's estimate."""

    c_name = "zt_coeff"
    c_doc = """One term c·z(seed) of an update's estimate g, its seed entered as derive_seed's state
after it (see zt_pass)."""
    c_fields = (
        ("s", _U, "uint64_t"),
        ("c", _D, "double"),
    )
    _fields_ = _ctypes(c_fields)


class Terms(ctypes.Structure):
    """zt_terms: an update's rule and coefficients, shared by units whose arguments agree."""

    c_name = "zt_terms"
    c_doc = """An update's terms, shared by the units whose rule arguments agree (typically a
param group's): the rule (mode, constants) and g = c_1·z(s_1) + ... + c_n·z(s_n), summed in that
order (rules.estimate's; the window-adam mode weighs each term by its place instead)."""
    c_fields = (
        ("mode", _I, "int64_t", "an UpdateMode (ZT_UPD_*)"),
        ("upd_lr", _D, "double"),
        ("has_decay", _I, "int64_t"),
        ("upd_decay", _D, "double"),
        ("h", _D * 7, "double", "the rule's constants"),
        ("coeffs", _P, "const zt_coeff *", "the n terms of g, in order"),
        ("ncoeffs", _I, "int64_t", "n (0 without an update)"),
    )
    _fields_ = _ctypes(c_fields)


class Factors(ctypes.Structure):
    """zt_factors: a low-rank z = L·Rᵀ of one matrix at one step seed (`directions.LowRank`)."""

    c_name = "zt_factors"
    c_doc = """A low-rank direction's factors for one matrix and step seed: z's element i·width + c
is L[i, 0]·Rt[0, c] + L[i, 1]·Rt[1, c] + ..., summed in that order (directions.outer_)."""
    c_fields = (
        ("key", _U, "uint64_t", "derive_seed(step seed, tensor key): the z it stands for"),
        ("left", _P, "const float *", "L, rows x rank, row-major"),
        ("right_t", _P, "const float *", "Rt, rank x width, row-major"),
        ("width", _I, "int64_t"),
        ("rank", _I, "int64_t"),
    )
    _fields_ = _ctypes(c_fields)


class Unit(ctypes.Structure):
    """zt_unit: one unit of a space, and the update terms and state a pass gives it."""

    c_name = "zt_unit"
    c_doc = """One unit (elements start .. start + n of a tensor), built once per space (with its
view of the space's H, when z is scaled by one); its terms and state buffers are set before
each pass that updates, and a low-rank direction's factors before each pass."""
    c_fields = (
        ("flat", _P, "float *"),
        ("n", _I, "int64_t"),
        ("start", _I, "int64_t"),
        ("key", _U, "uint64_t"),
        ("offsets", _I, "int64_t", "0: a row-lazy table's unit, at theta0 through every pass"),
        ("mask_h", _D, "double", "the magnitude mask's threshold"),
        ("mask_tie", _I, "int64_t", "its tie limit (MagnitudeMask.tie_limit; 2^32: all ties)"),
        ("terms", _P, "const zt_terms *"),
        ("m", _P, "float *"),
        ("v", _P, "float *"),
        ("hess", _P, "const float *", "z's per-element H (z/sqrt(H): HiZOO), or NULL"),
        ("factors", _P, "const zt_factors *", "a low-rank z's factors per seed, or NULL"),
        ("nfactors", _I, "int64_t", "how many (0: z is the pass's element-wise law)"),
    )
    _fields_ = _ctypes(c_fields)


class Pass(ctypes.Structure):
    """zt_pass: what every unit of a pass shares (seeds as derive_seed's state after them)."""

    c_name = "zt_pass"
    c_doc = """What a pass shares: the offsets' and the mask's seeds enter as the state of
derive_seed after their first part, s = splitmix64(0x5EED ^ seed), and each unit's key is mixed
in by the kernel."""
    c_fields = (
        ("law", _I, "int64_t", "a Law (ZT_LAW_*)"),
        ("cells", _P, "const float *", "the gaussian law's table"),
        ("has_cur", _I, "int64_t"),
        ("cur_s", _U, "uint64_t"),
        ("cur_scale", _D, "double"),
        ("update", _I, "int64_t"),
        ("has_tgt", _I, "int64_t"),
        ("tgt_s", _U, "uint64_t"),
        ("tgt_scale", _D, "double"),
        ("mask_kind", _I, "int64_t", "a MaskKind (ZT_MASK_*): NONE, MAGNITUDE or RANDOM"),
        ("mask_s", _U, "uint64_t"),
        ("mask_limit", _I, "int64_t"),
    )
    _fields_ = _ctypes(c_fields)


class RowMove(ctypes.Structure):
    """zt_rows: zt_move_rows's arguments (some rows of a row-lazy table, moved without update)."""

    c_name = "zt_rows"
    c_doc = """zt_move_rows's arguments: rows `rows` (nrows of them) of the [rows x width] tensor
flat, moved from the current offset to the target without an update; keys are the units' own
(derive_seed's, not states), flags, masks and kept-aside values are the rows' one after another;
with factors, z is the low-rank product (a row's z is L[row]·Rt)."""
    c_fields = (
        ("flat", _P, "float *"),
        ("width", _I, "int64_t", "a multiple of 8"),
        ("rows", _P, "const int64_t *"),
        ("nrows", _I, "int64_t"),
        ("law", _I, "int64_t", "a Law (ZT_LAW_*)"),
        ("cells", _P, "const float *"),
        ("has_cur", _I, "int64_t"),
        ("key_cur", _U, "uint64_t"),
        ("cur_scale", _F, "float"),
        ("bits_in", _P, "const uint8_t *"),
        ("aside_in", _P, "const float *"),
        ("has_tgt", _I, "int64_t"),
        ("key_tgt", _U, "uint64_t"),
        ("tgt_scale", _F, "float"),
        ("bits_out", _P, "uint8_t *"),
        ("aside_out", _P, "float *", "8 floats of slack"),
        ("mask_kind", _I, "int64_t", "a MaskKind (ZT_MASK_*)"),
        ("mask_h", _F, "float"),
        ("mask_in", _P, "const uint8_t *"),
        ("mask_out", _P, "uint8_t *"),
        ("mask_key", _U, "uint64_t"),
        ("mask_limit", _I, "int64_t"),
        ("factors", _P, "const zt_factors *", "a low-rank z's factors per key, or NULL"),
        ("nfactors", _I, "int64_t"),
    )
    _fields_ = _ctypes(c_fields)


MIRRORS = (
    Record,
    Coeff,
    Terms,
    Factors,
    Unit,
    Pass,
    RowMove,
)  # the header's order (pointees first)


def _comment(text: str) -> str:
    return "/* " + "\n   ".join(textwrap.wrap(" ".join(text.split()), 93)) + " */"


def _c_field(field: tuple) -> str:
    name, kind, c_type, *note = field
    length = getattr(kind, "_length_", None)
    scalar = kind._type_ if length else kind
    if c_type.endswith("*") != (scalar is _P) or (
        scalar is not _P and _C_SCALARS[scalar] != c_type
    ):
        raise TypeError(f"{name}: C type {c_type!r} does not match ctypes {kind.__name__}")
    space = "" if c_type.endswith("*") else " "
    decl = f"    {c_type}{space}{name}{f'[{length}]' if length else ''};"
    return f"{decl:<32}/* {note[0]} */" if note else decl


def render_header() -> str:
    """zotune_types.h: the enums and structs of this module in C, and ZT_LAYOUT, the table of
    their layouts that zt_layout returns (pairs: per struct its size and field count, then each
    field's offset and size), named by ZT_LAYOUT_NAMES (zt_layout_names)."""
    out = [
        "/* Generated from zotune/engine/native.py (its enums and ctypes mirrors): do not edit.",
        "   Regenerate with `python -m zotune.engine.native --write-header`. */",
        "#ifndef ZOTUNE_TYPES_H",
        "#define ZOTUNE_TYPES_H",
        "",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "",
    ]
    for kind, prefix in ENUMS:
        values = ", ".join(f"{prefix}{m.name} = {m.value}" for m in kind)
        out += [f"enum {{ {values} }};  /* {kind.__name__} */"]
    for mirror in MIRRORS:
        out += ["", _comment(mirror.c_doc), "typedef struct {"]
        out += [_c_field(f) for f in mirror.c_fields]
        out += [f"}} {mirror.c_name};"]
    out += ["", "#define ZT_FIELD(s, f) (int64_t)offsetof(s, f), (int64_t)sizeof(((s *)0)->f)"]
    out += ["#define ZT_LAYOUT { \\"]
    for mirror in MIRRORS:
        name = mirror.c_name
        out += [f"    (int64_t)sizeof({name}), {len(mirror.c_fields)}, \\"]
        out += [f"    ZT_FIELD({name}, {f[0]}), \\" for f in mirror.c_fields]
    out += [
        "}",
        "/* the names of ZT_LAYOUT's pairs, one word each */",
        "#define ZT_LAYOUT_NAMES \\",
    ]
    for mirror in MIRRORS:
        names = [mirror.c_name, *(f"{mirror.c_name}.{f[0]}" for f in mirror.c_fields)]
        out += [f'    "{" ".join(names)} " \\']
    out += ['    ""', "", "#endif", ""]
    return "\n".join(out)


def render_lanes() -> str:
    """zotune_lanes.h: ZT_PACK and ZT_EXPAND, for each byte of flags 8 lane indices of 3 bits:
    ZT_PACK lists the flagged lanes in order (to left-pack them), ZT_EXPAND gives each flagged
    lane its rank among them (to spread packed values back)."""
    pack, expand = [], []
    for byte in range(256):
        lanes = [k for k in range(8) if byte >> k & 1]
        pack.append(sum(k << 3 * i for i, k in enumerate(lanes)))
        expand.append(sum(rank << 3 * k for rank, k in enumerate(lanes)))

    def array(name: str, values: list[int]) -> str:
        rows = (", ".join(f"0x{v:06x}" for v in values[i : i + 8]) for i in range(0, 256, 8))
        return f"static const uint32_t {name}[256] = {{\n    " + ",\n    ".join(rows) + "};\n"

    head = (
        "/* Generated from zotune/engine/native.py (render_lanes): do not edit. */\n"
        "#ifndef ZOTUNE_LANES_H\n#define ZOTUNE_LANES_H\n\n"
    )
    return head + array("ZT_PACK", pack) + array("ZT_EXPAND", expand) + "\n#endif\n"


GENERATED = {"zotune_types.h": render_header, "zotune_lanes.h": render_lanes}


def write_headers(folder: Path = CSRC) -> list[Path]:
    """Write the generated headers into `folder`; returns the files that changed."""
    changed = []
    for name, render in GENERATED.items():
        path, text = folder / name, render()
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


class NativeBuildError(RuntimeError):
    """The kernel could not be built, loaded or checked (raised under ZOTUNE_NATIVE=require)."""


class LayoutError(NativeBuildError):
    """A struct's layout in the kernel differs from its ctypes mirror's."""


class NativeKernelWarning(RuntimeWarning):
    """The kernel could not be built, loaded or checked: zotune uses the torch code."""


def expected_layout(mirrors: Sequence[type] | None = None) -> dict[str, tuple[int, int]]:
    """The layouts as the ctypes mirrors have them, as `kernel_layout` gives the kernel's."""
    layout = {}
    for mirror in MIRRORS if mirrors is None else mirrors:
        layout[mirror.c_name] = (ctypes.sizeof(mirror), len(mirror._fields_))
        for name, _ in mirror._fields_:
            field = getattr(mirror, name)
            layout[f"{mirror.c_name}.{name}"] = (field.offset, field.size)
    return layout


def kernel_layout(c: ctypes.CDLL) -> dict[str, tuple[int, int]]:
    """The layouts as the kernel was compiled with them (ZT_LAYOUT, named by ZT_LAYOUT_NAMES):
    "zt_unit" -> (sizeof, number of fields), "zt_unit.key" -> (offsetof, sizeof)."""
    names = c.zt_layout_names().decode().split()
    values = (ctypes.c_int64 * (2 * len(names)))()
    if c.zt_layout(values, len(values)) != len(values):
        raise LayoutError("the kernel's layout table and its names disagree")
    return {name: (values[2 * k], values[2 * k + 1]) for k, name in enumerate(names)}


def check_layout(layout: dict[str, tuple[int, int]], mirrors: Sequence[type] | None = None) -> None:
    """Raise LayoutError naming every struct and field whose size or offset in `layout` (the
    kernel's, `kernel_layout`) differs from its ctypes mirror's (`MIRRORS` by default), or that
    only one side has."""
    problems = []
    for mirror in MIRRORS if mirrors is None else mirrors:
        struct, ours = mirror.c_name, mirror.__name__
        if struct not in layout:
            problems.append(f"{struct} (mirrored by {ours}) is not in the kernel")
            continue
        fields = [name for name, _ in mirror._fields_]
        for name in fields:
            field, there = getattr(mirror, name), layout.get(f"{struct}.{name}")
            if there is None:
                problems.append(f"{struct}.{name} is not in the kernel")
            elif there != (field.offset, field.size):
                problems.append(
                    f"{struct}.{name}: offset {there[0]}, size {there[1]} in the kernel, but "
                    f"offset {field.offset}, size {field.size} in its ctypes mirror {ours}"
                )
        extra = [k for k in layout if k.startswith(f"{struct}.") and k.split(".")[1] not in fields]
        problems += [f"{k} is not in its ctypes mirror {ours}" for k in extra]
        if layout[struct][0] != ctypes.sizeof(mirror):
            problems.append(
                f"{struct}: {layout[struct][0]} bytes in the kernel, {ctypes.sizeof(mirror)} in {ours}"
            )
    if problems:
        raise LayoutError("struct layouts differ: " + "; ".join(problems))


# ---- building and loading --------------------------------------------------------------------

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet
_failure: str | None = None  # why the last try gave None


def mode() -> str:
    """ZOTUNE_NATIVE as `auto`, `require` or `off`."""
    value = os.environ.get("ZOTUNE_NATIVE", "auto").strip().lower() or "auto"
    value = {"1": "auto", "0": "off"}.get(value, value)
    if value not in ("auto", "require", "off"):
        raise ValueError(f"ZOTUNE_NATIVE={value!r}: expected auto, require or off")
    return value


def source_dir() -> Path:
    return Path(os.environ.get("ZOTUNE_NATIVE_SRC") or CSRC)


def compiler() -> list[str] | None:
    """The C compiler's command: $CC, else cc, else gcc; None when there is none."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    cc = shutil.which("cc") or shutil.which("gcc")
    return [cc] if cc else None


@functools.cache
def _compiler_version(command: tuple[str, ...]) -> str:
    """The first line of `cc --version` (empty when it says nothing)."""
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (done.stdout or done.stderr).strip().partition("\n")[0]


@functools.cache
def _cpu_features() -> str:
    """A hash of the CPU's feature flags (what -march=native compiles for), else the machine."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return hashlib.sha256(line.encode()).hexdigest()[:16]
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def cache_key(folder: Path | None = None, cc: Sequence[str] | None = None) -> str:
    """What names a build: the sources' contents, the compiler and its version, the flags and
    the CPU's features (not the host: machines sharing a home folder share their builds)."""
    folder, cc = folder or source_dir(), cc or compiler() or []
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    for part in (shlex.join(cc), _compiler_version(tuple(cc)), shlex.join(FLAGS), _cpu_features()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def cache_dir() -> Path | None:
    """Where built kernels are kept; None when ZOTUNE_CACHE=off (built in a temporary folder)."""
    root = os.environ.get("ZOTUNE_CACHE", "")
    if root.strip().lower() == "off":
        return None
    return Path(root or Path.home() / ".cache" / "zotune") / "native"


def build_command(cc: Sequence[str], folder: Path, out: Path | str) -> list[str]:
    return [*cc, *FLAGS, str(folder / "zotune.c"), "-o", str(out)]


def _temporary_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="zotune-native-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)  # (loaded: unlinking is fine)
    return path


def _build(cc: list[str], folder: Path) -> Path:
    """The kernel's library, built unless the cache has it."""
    where = cache_dir()
    if where is None:
        where = _temporary_dir()
    lib = where / f"zotune_{cache_key(folder, cc)}.so"
    if lib.exists():
        return lib
    where.mkdir(parents=True, exist_ok=True)
    # built beside its final place (one file system) and moved there in one step: concurrent
    # first uses never load a partial file
    with tempfile.TemporaryDirectory(dir=where, prefix=".build-") as tmp:
        out = Path(tmp) / "zotune.so"
        command = build_command(cc, folder, out)
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            raise NativeBuildError(_explain(f"the compiler could not run ({e})", cc, folder)) from e
        if done.returncode != 0:
            raise NativeBuildError(
                _explain(f"the compiler failed (exit {done.returncode})", cc, folder, done.stderr)
            )
        os.replace(out, lib)
    _prune(where, lib)
    return lib


def _prune(where: Path, keep: Path) -> None:
    """Remove all but the KEEP_BUILDS newest libraries of the cache folder (a process that
    loaded one keeps it; one that needs it again builds it again)."""
    try:
        builds = sorted(where.glob("zotune_*.so"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in builds[KEEP_BUILDS:]:
            if old != keep:
                old.unlink(missing_ok=True)
    except OSError:
        pass


def _explain(reason: str, cc: Sequence[str], folder: Path, stderr: str = "") -> str:
    text = f"zotune's C kernel is unavailable: {reason}."
    lines = stderr.strip().splitlines()
    if lines:
        more = f"\n  ... ({len(lines) - 20} more lines)" if len(lines) > 20 else ""
        text += "\nCompiler output:\n  " + "\n  ".join(lines[:20]) + more
    text += "\nTo reproduce: " + shlex.join(build_command(cc, folder, "zotune.so"))
    text += "\nzotune uses the torch code instead (same results, slower) under ZOTUNE_NATIVE=auto; "
    text += "set ZOTUNE_NATIVE=off to skip the kernel, or =require to make this an error."
    return text


def _bind(c: ctypes.CDLL) -> None:
    # pointers travel as plain addresses (tensor.data_ptr()): no ctypes object per argument
    f32, i64, u64, u8 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    c.zt_fill_normal.argtypes = [f32, i64, u64, i64, f32]
    c.zt_fill_sign.argtypes = [f32, i64, u64, i64]
    c.zt_outer.argtypes = [f32, i64, i64, f32, f32, i64, i64]
    c.zt_outer.restype = None
    c.zt_magnitude_band.argtypes = [f32, i64, ctypes.c_float, ctypes.c_float, f32, i64, u8]
    c.zt_magnitude_band.restype = None
    c.zt_encode.argtypes = [f32, f32, ctypes.c_float, f32, u8, f32, i64]
    c.zt_encode.restype = i64
    c.zt_decode.argtypes = [f32, f32, ctypes.c_float, f32, u8, f32, i64]
    c.zt_decode.restype = i64
    c.zt_move_rows.argtypes = [u8]
    c.zt_move_rows.restype = i64
    c.zt_run.argtypes = [u8, u8, u8, u8, i64, u8, u8]
    c.zt_run.restype = None
    c.zt_run_team.argtypes = [u8, i64, u8, u8, u8, u8, i64, u8, u8]
    c.zt_run_team.restype = None
    c.zt_rows_team.argtypes = [u8, i64, u8, u8, i64]
    c.zt_rows_team.restype = None
    c.zt_clear.argtypes = [u8, i64]
    c.zt_clear.restype = None
    c.zt_store.argtypes = [u8, u8, u8, i64, u8, u64, i64]
    c.zt_store.restype = i64
    c.zt_layout.argtypes = [u8, i64]
    c.zt_layout.restype = i64
    c.zt_layout_names.argtypes = []
    c.zt_layout_names.restype = ctypes.c_char_p


def load() -> ctypes.CDLL:
    """Build (unless cached), load and check the kernel; NativeBuildError says why not."""
    folder, cc = source_dir(), compiler()
    if not cc:
        raise NativeBuildError(
            "zotune's C kernel is unavailable: no C compiler (set CC, or install cc or gcc). "
            "zotune uses the torch code instead (same results, slower) under ZOTUNE_NATIVE=auto; "
            "set ZOTUNE_NATIVE=off to skip the kernel."
        )
    missing = [name for name in SOURCES if not (folder / name).is_file()]
    if missing:
        raise NativeBuildError(f"zotune's C kernel is unavailable: {folder} lacks {missing}")
    try:
        path = _build(cc, folder)
    except OSError as e:  # the cache folder or the sources (a compiler's failure is explained)
        raise NativeBuildError(_explain(f"it could not be built ({e})", cc, folder)) from e
    try:
        c = ctypes.CDLL(str(path))
        _bind(c)
        check_layout(kernel_layout(c))
    except (OSError, AttributeError, NativeBuildError) as e:
        raise NativeBuildError(_explain(f"{path} does not load or check: {e}", cc, folder)) from e
    return c


def lib() -> ctypes.CDLL | None:
    """The compiled kernel, or None: ZOTUNE_NATIVE=off, or (auto) it could not be built, which
    warns once. Under ZOTUNE_NATIVE=require that raises NativeBuildError instead."""
    global _lib, _failure
    how = mode()
    if how == "off":
        return None
    if _lib is False:
        try:
            _lib, _failure = load(), None
        except NativeBuildError as e:
            _lib, _failure = None, str(e)
            if how == "require":
                raise
            warnings.warn(_failure, NativeKernelWarning, stacklevel=2)
    if _lib is None and how == "require":
        raise NativeBuildError(_failure or "zotune's C kernel is unavailable")
    return _lib or None


PAD = 8  # floats of slack after kept-aside values: the kernel moves them 8 at a time


class Records:
    """One Record per unit of a space. The torch path reads and writes them as tensors (`take`,
    `store`); the table frees whatever it still holds when dropped (a space dropped while
    perturbed must not leak what it kept aside)."""

    def __init__(self, n: int):
        self.table = (Record * n)()

    def empty(self) -> bool:
        return not any(r.bits or r.aside or r.mask for r in self.table)

    def empty_at(self, k: int) -> bool:
        r = self.table[k]
        return not (r.bits or r.aside or r.mask)

    def take(self, k: int, n: int) -> tuple:
        """Record k as (inexact bits, kept-aside values with PAD slack, mask bits) tensors, each
        None when absent; the kernel's copy is freed."""
        r, nb = self.table[k], (n + 7) // 8

        def copy(address: int | None, size: int, dtype: torch.dtype) -> torch.Tensor | None:
            if not address:
                return None
            out = torch.empty(size, dtype=dtype)
            ctypes.memmove(out.data_ptr(), address, size * out.element_size())
            return out

        kept = (
            copy(r.bits, nb, torch.uint8),
            copy(r.aside, r.count + PAD, torch.float32),
            copy(r.mask, nb, torch.uint8),
        )
        _lib.zt_clear(ctypes.byref(r), 1)
        return kept

    def store(self, k: int, n: int, kept: tuple, mask_key: int) -> None:
        """Keep a torch-path record (as `take` returns them) as record k."""
        bits, aside, mask = kept
        count = 0 if aside is None else aside.numel() - PAD
        done = _lib.zt_store(
            ctypes.byref(self.table[k]), bptr(bits), bptr(aside), count, bptr(mask), mask_key,
            (n + 7) // 8,
        )  # fmt: skip
        if done < 0:
            raise MemoryError("out of memory while moving the weights: they are left perturbed")

    def __del__(self) -> None:
        if _lib:
            _lib.zt_clear(self.table, len(self.table))


_team: int | None | bool = False  # False: not looked up yet


def team() -> int | None:
    """The address of GOMP_parallel in the libgomp torch runs its ops on, or None (torch not on
    OpenMP, another OpenMP runtime, no /proc/self/maps). `zt_run_team` and `zt_rows_team` run
    the kernel's threads as the calling thread's OpenMP team through it: after each parallel
    torch op the team's workers spin a while, and a thread of zotune's own would compete with
    them for a core (unless OMP_WAIT_POLICY=PASSIVE was set before torch was loaded)."""
    global _team
    if _team is False:
        _team = None
        try:
            if "OpenMP" in torch.__config__.parallel_info():
                with open("/proc/self/maps") as maps:
                    paths = {line.split()[-1] for line in maps if "/libgomp" in line}
                here = os.path.join(os.path.dirname(torch.__file__), "lib")
                for path in sorted(paths, key=lambda p: not p.startswith(here)):  # torch's first
                    gomp = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # (as loaded)
                    _team = ctypes.cast(gomp.GOMP_parallel, ctypes.c_void_p).value
                    break
        except (OSError, AttributeError):
            _team = None
    return _team or None


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def bptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def take(src: torch.Tensor, n: int) -> torch.Tensor:
    """A new float32 CPU tensor holding src[:n], copied by memmove: a torch copy of this size
    would start an OpenMP team from a worker thread, which on a busy machine waits for cores
    (measured: 6 ms for 300 KB instead of 0.05)."""
    out = torch.empty(n, dtype=torch.float32)
    ctypes.memmove(out.data_ptr(), src.data_ptr(), n * 4)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zotune.engine.native", description="zotune's C kernel: headers, build."
    )
    parser.add_argument(
        "--write-header", action="store_true", help="regenerate csrc/'s generated headers"
    )
    parser.add_argument("--build", action="store_true", help="build and check the kernel")
    args = parser.parse_args(argv)
    if args.write_header:
        for path in write_headers():
            print(f"wrote {path}")
    if args.build:
        c = load()
        print(f"built and checked: {c._name}")
    if not (args.write_header or args.build):
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
