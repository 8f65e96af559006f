"""`equilibrate quickstart`: the whole pipeline on the built-in tiny default (offline, CPU).

Runs the recipes in configs/quickstart/ (sft, rm, cost, then one per arm) through the same code as
`equilibrate <stage> fit --config ...`, then evaluates every model. Edit a recipe to change a run;
`--override` changes one without editing it:

    equilibrate quickstart --override 'naive-dpo: --data.naive_scale 5' --override '*: --trainer.max_steps 20'
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import warnings


def _override(text: str) -> tuple[str, list[str]]:
    name, sep, options = text.partition(":")
    if not sep or not name.strip() or not options.strip():
        raise argparse.ArgumentTypeError(f"expected 'RECIPE: --key value ...' (RECIPE: sft, rm, cost, an arm or *), got {text!r}")
    return name.strip(), shlex.split(options)


def main(argv: list[str]) -> int:
    from equilibrate_pl.quickstart import ARMS

    parser = argparse.ArgumentParser(prog="equilibrate quickstart", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    parser.add_argument("--seed", type=int, default=0, help="added to every seed of every recipe (default 0)")
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), metavar="ARM",
                        help=f"subset of: {' '.join(ARMS)} (default: all)")
    parser.add_argument("--override", action="append", type=_override, default=[], metavar="'RECIPE: OPTIONS'",
                        help="command-line options for one recipe (sft, rm, cost, an arm) or '*' for all; repeatable")
    parser.add_argument("--reduced", action="store_true", help="a tiny smoke-test run (seconds, not minutes)")
    args = parser.parse_args(argv)

    # Offline by design: the tiny kit is built locally; nothing here needs the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="lightning")

    import torch
    import transformers

    # Tiny models load and save in milliseconds: per-file progress bars would only bury the stage lines.
    transformers.utils.logging.disable_progress_bar()

    # The tiny model's matmuls are too small to gain from intra-op threads; with 2 threads on a busy
    # 2-core machine steps ran 10-30x slower. OMP_NUM_THREADS, when set, wins.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from equilibrate_pl.quickstart import QuickstartSettings, run_quickstart

    import lightning.pytorch  # noqa: F401 - sets its loggers to INFO on import; lowered just below

    # The GPU/TPU/seed/"fit stopped" lines of every stage are noise between the quickstart's own lines.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    overrides: dict[str, list[str]] = {}
    for name, options in args.override:
        overrides.setdefault(name, []).extend(options)
    try:
        settings = QuickstartSettings(output_dir=args.output, seed=args.seed, reduced=args.reduced, overrides=overrides,
                                      **({"arms": tuple(args.arms)} if args.arms else {}))
    except ValueError as err:
        parser.error(str(err))
    run_quickstart(settings)
    return 0
