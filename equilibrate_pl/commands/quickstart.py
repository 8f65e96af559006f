"""`equilibrate quickstart`: the whole pipeline on the built-in tiny default (offline, CPU)."""

from __future__ import annotations

import argparse
import logging
import os
import warnings


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="equilibrate quickstart", description=__doc__)
    parser.add_argument("--output", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=None,
                        help="subset of: naive-dpo naive-ppo fdc-adpo fdc-appo (default: all four)")
    parser.add_argument("--naive-scale", type=float, default=None, help="naive arms: x the FDC safety budget (default 10)")
    parser.add_argument("--reduced", action="store_true", help="a tiny smoke-test run (seconds, not minutes)")
    args = parser.parse_args(argv)

    # Offline by design: the tiny kit is built locally; nothing here needs the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")

    import torch

    # The tiny model's matmuls are too small to gain from intra-op threads; with 2 threads on a busy
    # 2-core machine steps ran 10-30x slower. OMP_NUM_THREADS, when set, wins.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from equilibrate_pl.quickstart import QuickstartSettings, run_quickstart

    kwargs = {"output_dir": args.output, "seed": args.seed, "reduced": args.reduced}
    if args.arms:
        kwargs["arms"] = tuple(args.arms)
    if args.naive_scale is not None:
        kwargs["naive_scale"] = args.naive_scale
    run_quickstart(QuickstartSettings(**kwargs))
    return 0
