"""The `zotune` command: argument parsing only; the work is done by the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from dataclasses import Field, fields
from pathlib import Path
from types import UnionType
from typing import Any

from .settings import coerce, field_default, field_types, flag
from .train import ConfigError, TrainConfig


def _flag_help(f: Field) -> str:
    """A setting's help line: its text, then its default unless the text explains it."""
    text = f.metadata.get("help") or f.name.replace("_", " ")
    if "default:" not in text:
        default = field_default(f)
        if isinstance(default, bool) or default is None:
            shown = {True: "on", False: "off", None: "none"}[default]
        else:
            shown = ",".join(default) if isinstance(default, list) else default
        text += f" (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


def _add_setting_flag(p: argparse.ArgumentParser, f: Field, help: str | None = None) -> None:
    """The flag of one TrainConfig field. Values stay text here: TrainConfig.from_dict converts
    them to the field's type (one conversion for flags, --config files and the Python API)."""
    tp = field_types(TrainConfig)[f.name]
    inner = typing.get_args(tp)[0] if typing.get_origin(tp) in (typing.Union, UnionType) else tp
    if inner is bool:
        p.add_argument(
            flag(f.name),
            action=argparse.BooleanOptionalAction,
            default=None,
            help=help or _flag_help(f),
        )
        return
    metavar = {int: "N", float: "X"}.get(inner, f.name.upper())
    if typing.get_origin(inner) is list:
        metavar = "NAME[,NAME...]"
    p.add_argument(flag(f.name), default=None, metavar=metavar, help=help or _flag_help(f))


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        if f.name != "extra":
            _add_setting_flag(p, f)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method-specific hyperparameter, e.g. --set momentum=0.9 (repeatable; "
        "`zotune methods` lists the methods)",
    )


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def config_from_args(args: argparse.Namespace, demo: bool = False) -> TrainConfig:
    from .train import DEMO

    values: dict[str, Any] = dict(DEMO) if demo else {}
    values.update(TrainConfig.from_yaml(args.config) if args.config else {})
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "extra":
            values[f.name] = v
    extra = dict(coerce("extra", values.get("extra"), field_types(TrainConfig)["extra"]))
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        extra[key.strip().replace("-", "_")] = _parse_value(value)
    values["extra"] = extra
    return TrainConfig.from_dict(values)


def _pct(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}%" for k, v in metrics.items()) or "-"


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = config_from_args(args, demo=args.demo)
    summary = train(cfg, quiet=args.quiet)
    metric = next(iter(summary["dev"]), None)
    if metric:
        print(
            f"{summary['model']} on {summary['task']} with {summary['method']} ({summary['peft']}): "
            f"dev {metric} zero-shot {100 * summary['zero_shot'][metric]:.1f}% -> "
            f"fine-tuned {100 * summary['dev'][metric]:.1f}% (step {summary['best_step']}); "
            f"test zero-shot {_pct(summary['zero_shot_test'])} -> {_pct(summary['test'])}"
        )
    print(
        f"wrote {cfg.out} ({summary['forward_passes']} forward passes, {summary['wall_seconds']:.0f} s)"
    )
    return 0


def _load_run(run: str | os.PathLike) -> tuple[TrainConfig, Path]:
    run = Path(run)
    if not (run / "config.yaml").exists():
        raise ConfigError(
            f"{run} is not a zotune run directory (no config.yaml): pass the --out of a `zotune train`"
        )
    cfg = TrainConfig.from_dict(TrainConfig.from_yaml(run / "config.yaml"))
    if not (run / "trajectory.zot").exists():
        raise ConfigError(f"{run} has no trajectory.zot (only zeroth-order runs can be replayed)")
    return cfg, run / "trajectory.zot"


def cmd_eval(args: argparse.Namespace) -> int:
    from .optim import replay
    from .train import icl_objective, load_for

    if args.run:
        cfg, traj = _load_run(args.run)
    else:
        cfg, traj = TrainConfig(peft="full"), None
    for name in ("model", "task", "gguf_file", "data_dir", "num_dev", "num_test", "seed"):
        if getattr(args, name, None) is not None:
            setattr(cfg, name, getattr(args, name))
    if traj is None and args.peft:
        cfg.peft = args.peft
    cfg.validate()
    task, loaded, objective = load_for(cfg)
    if traj is not None:
        replay(loaded.model, traj)
    if args.demos:
        objective = icl_objective(cfg, task, loaded, args.demos)
    import torch

    result = {}
    with torch.no_grad():
        for split in args.split:
            result[split] = objective.evaluate(getattr(task, split), batch_size=cfg.eval_batch_size)
    print(
        json.dumps(
            {"model": cfg.model, "task": cfg.task, "run": args.run, "demos": args.demos, **result}
        )
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .optim import replay
    from .train import load_for, write_atomically

    cfg, traj = _load_run(args.run)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty: choose another --out")
    _, loaded, _ = load_for(cfg)
    steps = replay(loaded.model, traj)
    tensors = {
        n: p.detach().contiguous() for n, p in loaded.model.named_parameters() if p.requires_grad
    }
    write_atomically(out, lambda work: save_file(tensors, str(work / "weights.safetensors")))
    print(f"replayed {steps} steps onto {cfg.model}; wrote {out / 'weights.safetensors'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_suite

    results = run_suite(
        args.suite,
        args.out,
        data_dir=args.data_dir,
        dry_run=args.dry_run,
        report_only=args.report_only,
    )
    failed = [r for r in results if "error" in r]
    if not args.dry_run:
        print(f"wrote {args.out}: {len(results) - len(failed)} runs, {len(failed)} failed")
    return 1 if failed else 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_runs

    path = plot_runs(args.runs, args.out)
    print(f"wrote {path} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from . import optim

    print("\n".join(optim.available()))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import available_tasks

    print("\n".join(available_tasks()))
    return 0


def _demo_line() -> str:
    from .train import DEMO

    return " ".join(f"{flag(k)} {v}" for k, v in DEMO.items())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zotune", description="Zeroth-order fine-tuning of language models."
    )
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser(
        "train",
        help="fine-tune a model (no arguments: the built-in demo)",
        description="Fine-tune a model. With no settings (only --out and --quiet) it runs the "
        f"built-in demo job: {_demo_line()}.",
    )
    t.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file of settings (flags override it)"
    )
    t.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a base model, or a fine-tuned run with --run")
    settings = {f.name: f for f in fields(TrainConfig)}
    _add_setting_flag(e, settings["model"])
    _add_setting_flag(e, settings["task"])
    e.add_argument(
        "--run", help="a `zotune train` output directory (its settings are the defaults)"
    )
    _add_setting_flag(e, settings["peft"], help="scheme to wrap the base model in (default: full)")
    for name in ("gguf_file", "data_dir", "num_dev", "num_test", "seed"):
        _add_setting_flag(e, settings[name])
    e.add_argument(
        "--demos",
        type=int,
        default=0,
        help="in-context demonstrations per example (ICL) (default: 0)",
    )
    e.add_argument(
        "--split",
        nargs="+",
        default=["dev", "test"],
        choices=["train", "dev", "test"],
        help="splits to evaluate (default: dev test)",
    )
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("replay", help="rebuild a run's weights from its trajectory alone")
    r.add_argument("run", help="a `zotune train` output directory")
    r.add_argument("--out", required=True, help="folder to write weights.safetensors into")
    r.set_defaults(func=cmd_replay)
    b = sub.add_parser("bench", help="run a named benchmark suite, one process per run")
    b.add_argument("suite", help="smoke, memory, zo-bench, mezo-svrg, sparse-mezo or superglue")
    b.add_argument("--out", default=None, help="results folder (default bench-out/SUITE)")
    b.add_argument("--data-dir")
    b.add_argument("--dry-run", action="store_true", help="list the runs without running them")
    b.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the runs finished so far, running nothing",
    )
    b.set_defaults(func=cmd_bench)
    pl = sub.add_parser(
        "plot", help="plot runs: dev metric vs forward passes, training loss vs step"
    )
    pl.add_argument("runs", nargs="+", metavar="RUN", help="`zotune train` output directories")
    pl.add_argument(
        "--out", required=True, metavar="FILE.png", help="image to write (.png, .pdf, .svg)"
    )
    pl.set_defaults(func=cmd_plot)
    sub.add_parser("methods", help="list the optimizers").set_defaults(func=cmd_methods)
    sub.add_parser("tasks", help="list the built-in tasks").set_defaults(func=cmd_tasks)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `zotune train` with no settings (only --quiet / --out) runs the built-in default job.
    demo = argv[:1] == ["train"] and {a.split("=")[0] for a in argv if a.startswith("--")} <= {
        "--quiet",
        "--out",
    }
    if not argv:  # bare `zotune`: say what there is; `zotune train` runs the demo job
        parser().print_help()
        return 0
    args = parser().parse_args(argv)
    args.demo = demo
    if args.command == "bench" and args.out is None:
        args.out = f"bench-out/{args.suite}"
    if args.command is None:
        parser().print_help()
        return 2
    from .models import ModelError
    from .tasks import TaskError

    try:
        return args.func(args)
    except (ConfigError, TaskError, ModelError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"zotune: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
