"""`sprec-ray prepare|train|eval|export|serve|deploy --config FILE [section.key=value ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, load_config
from .data.records import DataError

log = logging.getLogger("sprec_ray")


def _config(args: argparse.Namespace) -> RunConfig:
    if getattr(args, "run", None):
        return load_config(Path(args.run) / "config.yaml", args.overrides)
    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Build the run's example shards (reused by `train` on the same config) and print the counts."""
    from .data.prepared import prepare_dataset
    from .runtime import init_ray

    cfg = _config(args)
    init_ray(cfg.ray_address, cfg.ray_num_cpus)
    out = Path(cfg.output_dir).resolve()
    data = prepare_dataset(cfg.data, out / "data" / "prepared", out / "scratch", seed=cfg.seed)
    print(json.dumps({"items": len(data.catalogue), **data.counts, "bad_rows": data.bad_rows,
                      "prepared": str(data.root), "files": data.source_hashes}, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from .selfplay import run_selfplay

    run_selfplay(_config(args), resume=args.resume)


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a finished run's final adapter (or --adapter) on its valid or test split, or on --data;
    writes a new <run>/evals/<UTC time>/, or only --out FILE, and never changes the run's files."""
    from .run_eval import evaluate_run
    from .selfplay import setup_logging

    setup_logging()
    metrics, path = evaluate_run(args.run, args.overrides, args.split, args.data, args.adapter, args.out)
    log.info("metrics: %s", path)
    print(json.dumps(metrics, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    """Copy a finished run's final adapter to --to with a manifest (base model hash, data hashes,
    config, steps, validation metrics), for `selfplay.init_adapter` or shipping."""
    from .export import export_run

    manifest = export_run(args.run, args.to)
    print(json.dumps({"exported": str(Path(args.to).resolve()), "validation": manifest["validation"]}, indent=2))


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve.app import serve_run

    serve_run(Path(args.run), args.overrides, block=True)


def cmd_deploy(args: argparse.Namespace) -> None:
    """Change the adapter of the service running --run's model, in place (docs/serving.md)."""
    from .serve.adapters import AdapterError
    from .serve.deploy import change_adapter

    try:
        state = change_adapter(args.run, args.overrides, adapter=args.adapter, round_id=args.round,
                               rollback=args.rollback)
    except AdapterError as err:
        print(f"sprec-ray deploy: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(state, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sprec-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, needs_run in (("prepare", cmd_prepare, False), ("train", cmd_train, False),
                                ("eval", cmd_eval, True), ("export", cmd_export, True), ("serve", cmd_serve, True),
                                ("deploy", cmd_deploy, True)):
        p = sub.add_parser(name)
        if needs_run:
            p.add_argument("--run", required=True, help="run directory written by `sprec-ray train`")
        else:
            p.add_argument("--config", default=None, help="YAML config (defaults apply when omitted)")
        if name != "export":
            p.add_argument("overrides", nargs="*", help="section.key=value, e.g. selfplay.rounds=3")
        if name == "export":
            p.add_argument("--to", required=True, help="folder for the adapter and its manifest.json")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="skip finished phases, continue the interrupted one")
        if name == "deploy":
            which = p.add_mutually_exclusive_group()
            which.add_argument("--adapter", default=None, help="a PEFT adapter directory for the served base model")
            which.add_argument("--round", type=int, default=None, help="the run's finished round N (its adapter)")
            which.add_argument("--rollback", action="store_true", help="back to the adapter served before this one")
        if name == "eval":
            p.add_argument("--adapter", default=None, help="evaluate this adapter instead of the run's final one")
            p.add_argument("--split", choices=("valid", "test"), default="valid", help="the run's split to evaluate on")
            p.add_argument("--data", default=None, help="evaluate on this SPRec or S-DPO JSON file instead (a directory: "
                                                        "its data.valid_file / data.test_file, by --split)")
            p.add_argument("--out", default=None, help="write the metrics JSON here (predictions beside it) and "
                                                       "nothing in the run")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError) as err:
        print(f"sprec-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
