"""`equilibrate eval`: generate with one or more models on a suite, judge, and write a report.

    equilibrate eval --model builtin:tiny --suite builtin --output runs/eval
    equilibrate eval --model sft=runs/sft/hf --model adpo=runs/adpo/hf --suite xstest \
        --judge http:http://localhost:8000 --judge-model meta-llama/Llama-Guard-3-1B \
        --judge-mode conversation --output runs/eval-xstest

Writes `results.jsonl`, `metrics.json`, `report.md` and PNG plots to `--output` (see
`equilibrate_pl.eval.report`); prints the metrics table. Every argument (each `--model`, the suite,
the judge, `--output`) is checked before the first generation; each model's rows and metrics are
on disk as soon as it finishes, and the same command run again after an interruption continues
where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="equilibrate eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", metavar="[NAME=]PATH_OR_ID",
                   help="model to evaluate (repeat for side-by-side): builtin:tiny, a hub id or a directory; "
                        "required except for pair suites")
    p.add_argument("--suite", default="builtin",
                   help="builtin | xstest[:PATH] | beavertails-fdc[:PATH] | a JSONL/JSON/CSV/Parquet file (default: builtin); "
                        "xstest-pairs[:DIR] scores --reward / --cost on preference pairs instead")
    p.add_argument("--judge", default="refusal",
                   help="refusal | reward:PATH | cost:PATH | llm:PATH | http:URL | llama-guard:URL | wildguard:URL (default: refusal)")
    p.add_argument("--refusal-method", default="rules", choices=("rules", "classifier", "hybrid"),
                   help="refusal detector for the refused / over-refusal rates (default: rules; docs/EVAL.md)")
    p.add_argument("--cost", metavar="PATH", help="pair suites: a cost model (lower is safer) to score")
    p.add_argument("--judge-model", help="served model name (http judge)")
    p.add_argument("--judge-mode", choices=("judge", "conversation"),
                   help="http judge: send the judge prompt (default) or the dialogue (Llama Guard)")
    p.add_argument("--judge-api-key-env", help="environment variable with the API key (http judge; default OPENAI_API_KEY)")
    p.add_argument("--judge-timeout", type=float, help="seconds for a whole request, reply included (http judge)")
    p.add_argument("--judge-retries", type=int, help="retries after a failed or malformed answer (http / llm judge)")
    p.add_argument("--judge-threshold", type=float, help="reward judge: safe iff score >= threshold (default 0)")
    p.add_argument("--reward", metavar="PATH", help="reward model scoring helpfulness on benign prompts")
    p.add_argument("--reference", metavar="NAME", help="model the win rate is measured against (default: the first)")
    p.add_argument("--limit", type=int, help="evaluate a seeded random subset of N prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="model dtype: float32 | bfloat16 | float16")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _model_specs(values: list[str]) -> dict[str, str]:
    specs: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = value, value
        if not name or not path:
            raise ValueError(f"--model {value!r}: expected PATH or NAME=PATH")
        if name in specs:
            raise ValueError(f"--model: the name {name!r} is used twice; name them NAME=PATH")
        specs[name] = path
    return specs


def check_model_path(path: str) -> None:
    """Raise ``ValueError`` (saying why, without the path) unless ``path`` can name a model: a built-in
    alias, a model or adapter directory, or a hub id (offline: one in the local Hugging Face cache).
    No weights are loaded."""
    from equilibrate_pl.models.loading import BUILTIN_SMOLLM2, BUILTIN_TINY

    if path.startswith("builtin:"):
        if path not in (BUILTIN_TINY, BUILTIN_SMOLLM2):
            raise ValueError(f"unknown built-in model; choose {BUILTIN_TINY!r} or {BUILTIN_SMOLLM2!r}")
        return
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError("a file, not a model directory")
        if not any((local / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError("holds no config.json or adapter_config.json (not a saved model; `equilibrate export` "
                             "writes one from a checkpoint)")
        return
    # `owner/name` or `name` may be a hub id; `runs/sft/hf` (./runs exists) or `./x` is a mistyped path.
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) or path.startswith(".") or Path(path.split("/")[0]).is_dir():
        raise ValueError("no such model directory")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ValueError("no such model directory, and not in the local Hugging Face cache (HF_HUB_OFFLINE is set)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from equilibrate_pl.eval.suites import PAIR_SUITES

    if args.suite.partition(":")[0] in PAIR_SUITES:
        from equilibrate_pl.eval.pairs import run_pair_suite

        return run_pair_suite(args.suite, reward=args.reward, cost=args.cost, output=args.output, batch_size=args.batch_size)
    try:
        if not args.model:
            raise ValueError("--model is required (except for pair suites)")
        specs = _model_specs(args.model)
        if args.reference is not None and args.reference not in specs:
            raise ValueError(f"--reference {args.reference!r} is not one of the models {list(specs)}")
        for name, path in specs.items():
            try:
                check_model_path(path)
            except ValueError as err:
                raise ValueError(f"--model {path if name == path else f'{name}={path}'}: {err}") from None
        if args.reward is not None:
            try:
                check_model_path(args.reward)
            except ValueError as err:
                raise ValueError(f"--reward {args.reward}: {err}") from None
        if Path(args.output).exists() and not Path(args.output).is_dir():
            raise ValueError(f"--output {args.output}: exists and is not a directory")
    except ValueError as err:
        print(f"equilibrate eval: {err}", file=sys.stderr)
        return 2

    from equilibrate_pl.eval.judges import build_judge, load_reward_scorer
    from equilibrate_pl.eval.report import OtherEvaluation, evaluate_models
    from equilibrate_pl.eval.suites import load_suite
    from equilibrate_pl.models import load_causal_lm

    try:
        suite = load_suite(args.suite, seed=args.seed).limit(args.limit, seed=args.seed)
        kind = args.judge.partition(":")[0]
        options: dict = {}
        if kind in ("http", "llama-guard", "wildguard"):
            options = {"model": args.judge_model, "mode": args.judge_mode, "api_key_env": args.judge_api_key_env,
                       "timeout": args.judge_timeout, "retries": args.judge_retries}
        elif kind == "llm":
            options = {"retries": args.judge_retries}
        elif kind == "refusal":  # the judge reads refusals with the same detector as the rates
            from equilibrate_pl.eval.refusal import get_detector

            options = {"detector": get_detector(args.refusal_method)}
        elif kind in ("reward", "cost"):
            options = {"threshold": args.judge_threshold}
        judge = build_judge(args.judge, **options)
    except (ValueError, FileNotFoundError) as err:
        print(f"equilibrate eval: {err}", file=sys.stderr)
        return 2
    print(suite.describe())
    helpfulness_fn = load_reward_scorer(args.reward) if args.reward else None
    loaders = {name: (lambda path=path: load_causal_lm(path, dtype=args.dtype, padding_side="left")) for name, path in specs.items()}
    run_info = {"models": specs, "reward": args.reward, "dtype": args.dtype, "limit": args.limit,
                "refusal_method": args.refusal_method}
    try:
        result = evaluate_models(
            loaders, suite, judge, helpfulness_fn=helpfulness_fn, reference=args.reference,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.sample, seed=args.seed,
            progress=not args.no_progress, output_dir=args.output, run_info=run_info, refusal_detector=args.refusal_method,
        )
    except OtherEvaluation as err:
        print(f"equilibrate eval: {err}", file=sys.stderr)
        return 2
    paths = result.write(args.output)
    print(result.table())
    print(f"judge failures {judge.failures}, fallbacks {judge.fallbacks}")
    print(f"report: {paths['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
