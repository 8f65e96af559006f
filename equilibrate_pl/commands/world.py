"""`equilibrate world`: write the built-in safety world to JSONL files (or just describe it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from equilibrate_pl.data.world import DEFAULT_NOISE_FRACTION, MAX_NOISE_FRACTION, SIZES, build_world


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="equilibrate world",
        description="Generate the built-in synthetic safety world (see docs/WORLD.md). Writes "
        "prompts/sft/preference/safety_pool JSONL files per split when --output is given, and "
        "prints the counts per group.",
    )
    p.add_argument("--output", "-o", default=None, help="directory for the JSONL files (omit to only print counts)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="world size (default: default)")
    p.add_argument(
        "--noise-fraction", type=float, default=DEFAULT_NOISE_FRACTION,
        help=f"share of mislabelled benign look-alikes in safety_pool_*.jsonl, 0..{MAX_NOISE_FRACTION} "
        f"(default: {DEFAULT_NOISE_FRACTION})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        print(f"equilibrate world: --output {args.output}: exists and is not a directory (the world is several files)",
              file=sys.stderr)
        return 2
    try:
        world = build_world(seed=args.seed, size=args.size, noise_fraction=args.noise_fraction)
    except ValueError as err:
        print(f"equilibrate world: {err}", file=sys.stderr)
        return 2
    print(world.describe())
    if args.output is not None:
        try:
            written = world.to_files(args.output)
        except OSError as err:
            print(f"equilibrate world: --output {args.output}: {err.strerror or err}", file=sys.stderr)
            return 2
        for name, path in written.items():
            n_rows = sum(1 for _ in path.open(encoding="utf-8"))
            print(f"wrote {n_rows:>6} rows  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
