"""Command line: ``mimac train [--config FILE.yaml] [key=value ...]`` and ``mimac eval RUN_DIR``.

Examples::

    mimac train                                    # CRLC on digits, CPU, about a minute
    mimac train method=imc_swav                    # its tuned digits config (configs/)
    mimac train --config configs/crlc_fashion_mnist.yaml epochs=50 device=cuda
    mimac train resume=runs/crlc-digits-20250101-120000 [epochs=300]
    mimac eval runs/crlc-digits-20250101-120000 [data.split=test]
    mimac compare --dataset digits --seeds 0 1 2 [--methods crlc imc_swav] [--out DIR] [epochs=50]
    torchrun --standalone --nproc-per-node 8 -m mimac train batch_size=1024   # data-parallel
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _keys_help() -> str:
    """The keys ``mimac train`` accepts, with their defaults, the methods, the datasets and
    the tuned configs (read from the config dataclasses: no torch import)."""
    import dataclasses

    from mimac.config import (
        DATASET_NAMES,
        METHOD_NAMES,
        Config,
        default_config_dir,
        tuned_config_path,
    )

    top, sections = [], []
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            names = " ".join(f"{f.name}.{g.name}" for g in dataclasses.fields(value))
            sections.append(f"  {names}")
        else:
            top.append(f"{f.name}={value!r}" if f.name != "augment" else "augment.FIELD")
    tuned = sorted(p.stem for p in default_config_dir().glob("*.yaml"))
    lines = [
        "keys (key=value; values are YAML, e.g. optim.milestones=[50,70]):",
        "  " + "  ".join(top),
        *sections,
        f"methods (method=): {', '.join(METHOD_NAMES)}",
        f"datasets (data.name=): {', '.join(DATASET_NAMES)}; files under data.root or $MIMAC_DATA",
        f"tuned configs in {default_config_dir()}: {', '.join(tuned) or '(none found)'}",
        ("without --config, the tuned file of the chosen method and data.name is used "
        f"(e.g. {tuned_config_path('imc_swav', 'digits').name} for method=imc_swav); without "
        "one, the run says so and uses the papers' hyper-parameters"),
    ]
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="    ") for line in lines)


class _HelpWithKeys(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimac", description="Deep clustering with fused contrastive losses.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a clustering method (default: CRLC on digits)",
                       description="Train a run. Overrides are key=value with dotted sections, "
                                   "e.g. epochs=50 optim.lr=0.01 data.name=fashion_mnist.",
                       epilog=_keys_help(), formatter_class=_HelpWithKeys)
    t.add_argument("--config", help="YAML config file (default: configs/<method>_<data.name>.yaml)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (or resume=RUN_DIR)")
    t.add_argument("overrides", nargs="*", metavar="key=value", default=[])
    e = sub.add_parser("eval", help="recompute the metrics of a run from its checkpoint")
    e.add_argument("run_dir")
    e.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                   help="optional config changes for this evaluation only, e.g. data.split=test")
    c = sub.add_parser("compare", help="train several methods with the same seeds; one table + plot",
                       description="Train each method (configs/<method>_<dataset>.yaml) with every "
                                   "seed and write compare_<dataset>.md/.png/.json to --out. "
                                   "key=value overrides apply to every run.")
    c.add_argument("--dataset", default="digits")
    c.add_argument("--seeds", nargs="+", default=["0", "1", "2"], metavar="SEED")
    c.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="default: crlc imc_swav dec_contrastive")
    c.add_argument("--out", default=None, help="output folder (default runs/compare-<dataset>-<time>)")
    c.add_argument("--config-dir", default=None, help="folder of <method>_<dataset>.yaml (default configs/)")
    c.add_argument("--no-baseline", action="store_true", help="skip the raw-pixel k-means row")
    c.add_argument("overrides", nargs="*", metavar="key=value", default=[])
    return p


def _compare(args: argparse.Namespace) -> int:
    from mimac.compare import DEFAULT_METHODS, run_compare

    # key=value items typed after --seeds/--methods land in those lists: move them back.
    overrides = list(args.overrides)
    lists = {}
    for name in ("seeds", "methods"):
        items = getattr(args, name) or []
        overrides += [i for i in items if "=" in i]
        lists[name] = [i for i in items if "=" not in i]
    try:
        seeds = [int(s) for s in lists["seeds"]]
    except ValueError as exc:
        raise ValueError(f"--seeds takes integers, got {lists['seeds']}") from exc
    run_compare(args.dataset, seeds, lists["methods"] or DEFAULT_METHODS, args.out, overrides,
                args.config_dir, baseline=not args.no_baseline)
    return 0


def _train(args: argparse.Namespace) -> int:
    from mimac.config import check_resume_overrides, load_config, resolve_run_config

    overrides = []
    resume = args.resume
    for o in args.overrides:
        if o.startswith("resume="):
            resume = o.split("=", 1)[1]
        else:
            overrides.append(o)
    if resume:
        from mimac.outputs import CONFIG_FILE

        if args.config:
            raise ValueError("--config cannot be combined with resume: a run keeps its own config "
                             "(pass key=value overrides instead)")
        cfg_file = Path(resume) / CONFIG_FILE
        if not cfg_file.is_file():
            raise FileNotFoundError(f"cannot resume {resume!r}: no {CONFIG_FILE} there (is it a run folder?)")
        check_resume_overrides(overrides)
        cfg = load_config(cfg_file, overrides)
    else:
        cfg, source = resolve_run_config(args.config, overrides)  # checked before torch loads
        if _is_main_rank():
            print(source, file=sys.stderr if source.startswith("WARNING") else sys.stdout,
                  flush=True)
    from mimac.train import train

    train(cfg, resume=resume)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mimac.evaluate import evaluate_run

    evaluate_run(args.run_dir, args.overrides)
    return 0


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0") or "0") == 0


def _refuse_torchrun(command: str) -> None:
    """Only ``train`` is data-parallel; other commands under several ranks would race."""
    if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
        raise ValueError(f"`mimac {command}` runs in one process; launch it without torchrun "
                         "(only `mimac train` runs data-parallel)")


def _failure_types() -> tuple[type[BaseException], ...]:
    """Errors of a run that went wrong (exit 1, not a usage error). Imported only when an
    error is being reported, so that a config error is refused before torch is loaded."""
    from mimac.checkpoint import CheckpointError
    from mimac.divergence import DivergenceError

    return DivergenceError, CheckpointError  # DivergenceError: NonFiniteLossError too


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mimac`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    warnings.simplefilter("default", RuntimeWarning)
    try:
        commands = {"train": _train, "eval": _eval, "compare": _compare}
        if args.command != "train":
            _refuse_torchrun(args.command)
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mimac {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a run file or folder that cannot be written: name it and the cause
        from mimac.atomic import os_error_message  # no torch: cheap also on this path

        print(f"mimac {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished epoch is checkpointed; continue with "
              "`mimac train resume=RUN_DIR`", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _failure_types()):
            print(f"mimac {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        raise


if __name__ == "__main__":
    sys.exit(main())
