"""The `zotune` command: argument parsing only; the work is done by the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import Field, fields
from pathlib import Path
from types import UnionType
from typing import Any

from .bench import SUITES
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
    return TrainConfig.with_recipe(values)


def _pct(metrics: dict[str, float]) -> str:
    from .tasks.base import show

    return show(metrics) or "-"


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import launched_rank
    from .train import train

    if args.resume:
        cfg = _resumed_config(args)
    else:
        cfg = config_from_args(args, demo=args.demo)
    summary = train(cfg, quiet=args.quiet, resume=bool(args.resume))
    if launched_rank() != 0:  # under torchrun, rank 0 reports the run
        return 0
    metric = summary.get("metric") or next(iter(summary["dev"]), None)
    if metric:
        from .tasks.base import show_value

        before, after = (show_value(metric, summary[k][metric]) for k in ("zero_shot", "dev"))
        print(
            f"{summary['model']} on {summary['task']} with {summary['method']} ({summary['peft']}): "
            f"dev {metric} zero-shot {before} -> fine-tuned {after} (step {summary['best_step']}); "
            f"test zero-shot {_pct(summary['zero_shot_test'])} -> {_pct(summary['test'])}"
        )
    print(
        f"wrote {cfg.out} ({summary['forward_passes']} forward passes, {summary['wall_seconds']:.0f} s)"
    )
    return 0


def _resumed_config(args: argparse.Namespace) -> TrainConfig:
    """An interrupted run's own config; only --steps (to go further) and --quiet may change."""
    run = Path(args.resume)
    if not (run / "config.yaml").exists():
        raise ConfigError(f"{run} is not a zotune run directory (no config.yaml)")
    given = sorted(
        f.name
        for f in fields(TrainConfig)
        if f.name not in ("steps", "extra") and getattr(args, f.name, None) is not None
    )
    if given or args.set or args.config:
        flag = "--" + given[0].replace("_", "-") if given else "--set/--config"
        raise ConfigError(f"--resume continues a run as it was configured: drop {flag}")
    cfg = TrainConfig.from_dict(TrainConfig.from_yaml(run / "config.yaml"))
    cfg.out = str(run)
    if args.steps is not None:
        cfg.steps = args.steps
    return cfg


# where a model is loaded and computes (docs/hardware.md): settings of train, eval and bench
_PLACEMENT = ("device", "dtype", "device_map", "max_memory", "quantize")


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import icl_objective, load_for

    step = None
    overrides = {
        name: getattr(args, name)
        for name in (
            "model",
            "task",
            "gguf_file",
            "data_dir",
            "num_dev",
            "num_test",
            "seed",
            *_PLACEMENT,
        )
        if getattr(args, name, None) is not None
    }
    if args.run:
        from .runs import load_run_model, open_run

        run = open_run(args.run)
        step = run.step_for(args.keep)
        cfg, task, loaded, objective = load_run_model(run, step, overrides=overrides)
    else:
        cfg = TrainConfig.from_dict({"peft": args.peft or "full", **overrides})
        cfg.validate()
        task, loaded, objective = load_for(cfg)
    if args.demos:
        objective = icl_objective(cfg, task, loaded, args.demos)
    import torch

    result = {}
    with torch.no_grad():
        for split in args.split:
            result[split] = objective.evaluate(getattr(task, split), batch_size=cfg.eval_batch_size)
    head = {"model": cfg.model, "task": cfg.task, "run": args.run, "step": step}
    print(json.dumps({**head, "demos": args.demos, **result}))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .export import check_out, write_dir_atomically
    from .runs import TRAJECTORY, load_run_model, open_run

    run = open_run(args.run)
    if not run.replayable:
        raise ConfigError(
            f"{run.path} has no {TRAJECTORY} (only zeroth-order runs can be replayed): "
            "use `zotune export --format safetensors` for runs saved with --save-weights"
        )
    step = run.step_for(args.keep)
    out = check_out(args.out)
    cfg, _, loaded, _ = load_run_model(run, step)
    tensors = {
        n: p.detach().contiguous() for n, p in loaded.model.named_parameters() if p.requires_grad
    }
    meta = {"step": str(step)}
    write_dir_atomically(
        out, lambda work: save_file(tensors, str(work / "weights.safetensors"), metadata=meta)
    )
    print(f"replayed {step} steps onto {cfg.model}; wrote {out / 'weights.safetensors'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    info = export_run(args.run, args.out, args.format, args.keep)
    print(
        f"exported {args.run} at step {info['step']} ({args.keep}) as {info['format']}: "
        f"wrote {args.out} ({len(info['files'])} files)"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_suite

    results = run_suite(
        args.suite,
        args.out,
        data_dir=args.data_dir,
        dry_run=args.dry_run,
        report_only=args.report_only,
        device=args.device,
        restore_from=args.restore,
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
    from .optim.registry import describe

    rows = [("method", "forwards/step", "what it does"), *describe()]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, forwards, summary in rows:
        print(f"{name:<{widths[0]}}  {forwards:<{widths[1]}}  {summary}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import available_tasks

    print("\n".join(available_tasks()))
    return 0


_KEEP_HELP = "which step's model: best (best on dev, the default), final, or a step number"


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
    t.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run from its last checkpoint (--steps may extend it)",
    )
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
    for name in ("gguf_file", "data_dir", "num_dev", "num_test", "seed", *_PLACEMENT):
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
    e.add_argument("--keep", default="best", help=_KEEP_HELP)
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("replay", help="rebuild a run's weights from its trajectory alone")
    r.add_argument("run", help="a `zotune train` output directory")
    r.add_argument("--out", required=True, help="folder to write weights.safetensors into")
    r.add_argument("--keep", default="best", help=_KEEP_HELP)
    r.set_defaults(func=cmd_replay)
    x = sub.add_parser("export", help="write a run's model for plain transformers / peft")
    x.add_argument("run", help="a `zotune train` output directory")
    x.add_argument(
        "--format",
        required=True,
        metavar="FORMAT",
        help="peft (an adapter folder), merged (a full HF model folder) or safetensors "
        "(the trainable tensors by name)",
    )
    x.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    x.add_argument("--keep", default="best", help=_KEEP_HELP)
    x.set_defaults(func=cmd_export)
    b = sub.add_parser("bench", help="run a named benchmark suite, one process per run")
    b.add_argument("suite", help=", ".join(SUITES))
    b.add_argument("--out", default=None, help="results folder (default bench-out/SUITE)")
    b.add_argument("--data-dir")
    b.add_argument("--dry-run", action="store_true", help="list the runs without running them")
    b.add_argument(
        "--device",
        default=None,
        help="where every run computes: auto, cpu, cuda, cuda:N or mps (default: auto)",
    )
    b.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the runs finished so far, running nothing",
    )
    b.add_argument(
        "--restore",
        metavar="DIR",
        help="first take the finished runs a results folder from an earlier machine records "
        "(its results.jsonl, or results.csv) that --out lacks: they are not run again",
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
    sub.add_parser(
        "methods", help="list the optimizers: forward passes per step, one line each"
    ).set_defaults(func=cmd_methods)
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
    from .train import Interrupted

    try:
        return args.func(args)
    except Interrupted as e:
        print(f"zotune: {e}", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, TaskError, ModelError, OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"zotune: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
