"""`equilibrate pairs`: preference pairs around a model's own answers (``data.pairs``).

    equilibrate pairs --model builtin:smollm2 --input bt.fdc.jsonl --output pairs/fdc.jsonl
    equilibrate pairs --model builtin:smollm2 --input bt.fdc.jsonl --as-harmful --output pairs/naive.jsonl \\
        --samples pairs/fdc.jsonl.samples.jsonl          # same prompts: reuse the samples, no new generation

Every prompt needs an FDC ``group`` (label the file with ``equilibrate categorize`` first). The
model's answers are sampled ``--num-samples`` times per prompt and appended to the samples file as
each batch finishes (flushed), keyed by the prompt text and the sampling settings; a second run
(after a kill, with other labels, or with ``--as-harmful``) samples only what is missing. The pairs
file is then written atomically from the samples.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from equilibrate_pl.data.loaders import PRESETS, DataError, DataSource, load_records
from equilibrate_pl.data.pairs import build_pairs, prompt_key
from equilibrate_pl.files import append_jsonl, atomic_write_jsonl, repair_jsonl_log

__all__ = ["main", "sample_settings", "read_samples"]


def sample_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a cached sample depends on: a sample drawn under other settings is not reused."""
    return {"model": args.model, "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


def read_samples(path: Path, settings: dict[str, Any]) -> dict[str, list[str]]:
    """``prompt_key -> samples`` of the rows of the samples file drawn under ``settings`` (a torn last
    line, from a killed run, is dropped from the file)."""
    return {row["key"]: row["samples"] for row in repair_jsonl_log(path) if row.get("settings") == settings}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="equilibrate pairs",
        description="Preference pairs from a model's own sampled answers: on harmful prompts the answer that fits "
                    "the FDC group is chosen over the model's compliant sample; on benign prompts the model's helpful "
                    "sample is chosen over an unwarranted refusal.")
    p.add_argument("--model", required=True, help="the policy whose answers are paired: builtin:smollm2, a hub id or a directory")
    p.add_argument("--input", required=True, help="prompts with a `group` column (jsonl, json, csv, parquet)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a known format (maps its columns)")
    p.add_argument("--output", required=True, help="pairs JSONL (written atomically)")
    p.add_argument("--samples", help="samples cache (default: <output>.samples.jsonl); shared between runs on the same prompts")
    p.add_argument("--as-harmful", action="store_true",
                   help="treat every prompt as harmful and prefer a plain refusal, whatever its group (unsorted safety data)")
    p.add_argument("--num-samples", type=int, default=2, help="answers sampled per prompt (the first non-refusal is used)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="sampling and response-bank seed")
    p.add_argument("--limit", type=int, help="the first N prompts only")
    p.add_argument("--refusal-method", default="rules", choices=("rules", "classifier", "hybrid"),
                   help="the refusal detector that decides which samples comply (docs/EVAL.md)")
    p.add_argument("--trust-remote-code", action="store_true")
    return p


def _sample_missing(args: argparse.Namespace, records: Sequence[dict[str, Any]], cache: Path,
                    have: dict[str, list[str]]) -> dict[str, list[str]]:
    """Sample every prompt not in ``have``, appending each batch to ``cache`` as it finishes."""
    todo: dict[str, Any] = {}
    for r in records:
        key = prompt_key(r["prompt"])
        if key not in have:
            todo.setdefault(key, r["prompt"])
    if not todo:
        return have
    from equilibrate_pl.eval.generation import generate
    from equilibrate_pl.models import load_causal_lm

    print(f"sampling {args.num_samples} answers for {len(todo)} prompts with {args.model} ({len(have)} cached)", flush=True)
    model, tokenizer = load_causal_lm(args.model, padding_side="left", trust_remote_code=args.trust_remote_code)
    settings = sample_settings(args)
    keys = list(todo)
    chunk = max(1, args.batch_size)
    for start in range(0, len(keys), chunk):
        part = keys[start : start + chunk]
        answers = [[] for _ in part]
        for k in range(args.num_samples):
            out = generate(model, tokenizer, [todo[key] for key in part], max_new_tokens=args.max_new_tokens,
                           batch_size=chunk, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed * 1_000_003 + start * 31 + k, progress=False)
            for a, text in zip(answers, out):
                a.append(text)
        rows = [{"key": key, "prompt": todo[key], "samples": a, "settings": settings} for key, a in zip(part, answers)]
        append_jsonl(cache, rows)
        have.update({key: a for key, a in zip(part, answers)})
        print(f"  {min(start + chunk, len(keys))}/{len(keys)} prompts sampled", flush=True)
    return have


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.num_samples < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--num-samples, --batch-size and --max-new-tokens must be >= 1")
    output = Path(args.output)
    if output.is_dir():
        print(f"equilibrate pairs: --output {output} is a directory; give a .jsonl file", file=sys.stderr)
        return 2
    cache = Path(args.samples) if args.samples else output.with_name(output.name + ".samples.jsonl")
    try:
        result = load_records(DataSource(args.input, preset=args.preset), kind="prompt", require_group=True)
    except (DataError, ValueError) as err:
        print(f"equilibrate pairs: {err}", file=sys.stderr)
        return 2
    records = result.records[: args.limit] if args.limit else result.records
    output.parent.mkdir(parents=True, exist_ok=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    samples = _sample_missing(args, records, cache, read_samples(cache, sample_settings(args)))

    from equilibrate_pl.eval.refusal import get_detector

    detector = get_detector(args.refusal_method)
    built = build_pairs(records, samples, detector.predict, seed=args.seed, as_harmful=args.as_harmful)
    n = atomic_write_jsonl(output, built.pairs)
    print(f"wrote {n} pairs to {output} (samples: {cache})")
    print(built.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
