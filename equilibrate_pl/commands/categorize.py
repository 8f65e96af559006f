"""`equilibrate categorize` and `equilibrate synthesize-mhd`: FDC-label a data file, merge EHD+IHD prompts.

Examples::

    equilibrate categorize --input xstest_prompts.csv --preset xstest --method rules --output xstest.fdc.jsonl
    equilibrate categorize --input beavertails.json --text-field question_y --method labels \\
        --label-field category --output bt.jsonl
    equilibrate synthesize-mhd --input bt.jsonl --n 500 --seed 0 --output mhd.jsonl
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from typing import Any, Sequence

from equilibrate_pl.data.fdc import CATEGORIZER_METHODS, build_categorizer
from equilibrate_pl.data.fdc_mhd import synthesize_mhd, synthesize_mhd_llm
from equilibrate_pl.data.loaders import PRESETS, DataError, DataSource, load_records, write_jsonl
from equilibrate_pl.data.schema import GROUP_NAMES, Group

__all__ = ["main", "synthesize_main", "format_counts"]


def format_counts(counts: Counter, title: str = "group") -> str:
    """A plain-text table of rows per group (canonical order, then anything else) and their share."""
    total = sum(counts.values()) or 1
    keys = [g for g in GROUP_NAMES if g in counts] + sorted(str(k) for k in counts if k not in GROUP_NAMES)
    width = max([len(title), 5] + [len(str(k)) for k in keys])
    lines = [f"{title.ljust(width)}  {'rows':>7}  {'share':>6}"]
    lines += [f"{str(k).ljust(width)}  {counts[k]:>7}  {counts[k] / total:>6.1%}" for k in keys]
    lines.append(f"{'total'.ljust(width)}  {sum(counts.values()):>7}  {1:>6.1%}")
    return "\n".join(lines)


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="data file (jsonl, json, csv, parquet, save_to_disk dir)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a known format (maps its columns)")
    parser.add_argument("--text-field", default="prompt", help="column holding the prompt text (default: prompt)")
    parser.add_argument("--format", help="override the format inferred from the file name")
    parser.add_argument("--on-bad-row", choices=("raise", "skip"), default="raise",
                        help="a row with a missing or malformed field: 'raise' stops with one line naming the file, row "
                             "and field (default); 'skip' leaves it out and lists every skipped row by reason")
    parser.add_argument("--max-chars", type=int, default=20000, help="longest accepted text field")


def _load(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    columns = {args.text_field: "prompt"} if args.text_field != "prompt" else None
    result = load_records(DataSource(args.input, preset=args.preset, format=args.format, columns=columns),
                          on_bad_row=args.on_bad_row, max_chars=args.max_chars)
    return result.records, result.summary()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="equilibrate categorize", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Add an FDC `group` (EHD/IHD/MHD/general) to every row of a data file.",
        epilog="""methods:
  labels      use labels already in the file (--label-field; --label-map maps extra labels, e.g.
              'unsafe=EHD'); the FDC BeaverTails release's "No risk" and "OTHER" map to general
  rules       keyword rules: explicit risky terms -> EHD, intent cues -> IHD, both -> MHD, neither
              -> general; no model, instant, macro-F1 0.32 on the paper's labels (docs/FDC.md)
  classifier  a trained MiniLM classifier (--classifier-dir, a directory written by
              ClassifierCategorizer.save, or builtin:world for the built-in world's); macro-F1 0.49
  judge       an LLM as safety reviewer (--judge-model), the paper's method; unparseable verdicts
              fall back to --fallback (the rules, or a fixed group) and are counted""")
    _source_args(parser)
    parser.add_argument("--method", choices=CATEGORIZER_METHODS, required=True, help="how rows are sorted (below)")
    parser.add_argument("--output", required=True, help="output JSONL (written atomically)")
    parser.add_argument("--label-field", default="group", help="labels: the column holding the existing labels")
    parser.add_argument("--label-map", action="append", default=[], metavar="LABEL=GROUP", help="labels: extra label mapping (repeatable)")
    parser.add_argument("--classifier-dir", help="classifier: a directory written by ClassifierCategorizer.save")
    parser.add_argument("--judge-model", help="judge: hub id or directory of a causal LM")
    parser.add_argument("--judge-batch-size", type=int, default=8)
    parser.add_argument("--judge-max-new-tokens", type=int, default=256)
    parser.add_argument("--fallback", default="rules", help="judge: 'rules' or a group name for unparseable verdicts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    kwargs: dict[str, Any] = {}
    if args.method == "labels":
        mapping = {}
        for item in args.label_map:
            label, sep, group = item.partition("=")
            if not sep:
                parser.error(f"--label-map expects LABEL=GROUP, got {item!r}")
            mapping[label] = group
        kwargs = {"mapping": mapping, "field": args.label_field}
    elif args.method == "classifier":
        if not args.classifier_dir:
            parser.error("--method classifier needs --classifier-dir")
        kwargs = {"path": args.classifier_dir}
    elif args.method == "judge":
        if not args.judge_model:
            parser.error("--method judge needs --judge-model")
        kwargs = {"model_name_or_path": args.judge_model, "batch_size": args.judge_batch_size,
                  "max_new_tokens": args.judge_max_new_tokens, "fallback": args.fallback}

    try:
        records, summary = _load(args)
        categorizer = build_categorizer(args.method, **kwargs)
        labelled = categorizer.categorize_records(records)
        n = write_jsonl(labelled, args.output)
    except (DataError, ValueError) as err:
        print(f"equilibrate categorize: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the output path: a directory, no permission, ...
        print(f"equilibrate categorize: --output {args.output}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(summary)
    print(f"method: {args.method}; wrote {n} rows to {args.output}")
    print(format_counts(Counter(r["group"] for r in labelled)))
    if getattr(categorizer, "fallbacks", 0):
        print(f"fallbacks: {categorizer.fallbacks} rows labelled by the fallback ({args.fallback})")
    return 0


def synthesize_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="equilibrate synthesize-mhd", description="Merge EHD and IHD prompts of a labelled file into MHD prompts.")
    _source_args(parser)
    parser.add_argument("--n", type=int, required=True, help="MHD prompts to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", help="merge with this causal LM (hub id or directory) instead of templates")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        records, summary = _load(args)
    except (DataError, ValueError) as err:
        print(f"equilibrate synthesize-mhd: {err}", file=sys.stderr)
        return 1
    ehd = [r for r in records if r.get("group") == Group.EHD.value]
    ihd = [r for r in records if r.get("group") == Group.IHD.value]
    if not ehd or not ihd:
        print(f"equilibrate synthesize-mhd: {args.input} has {len(ehd)} EHD and {len(ihd)} IHD rows; need at least one of each "
              "(label the file with `equilibrate categorize` first)", file=sys.stderr)
        return 1
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from equilibrate_pl.data.fdc_judge import hf_generate_fn

        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=False).eval()
        generate = hf_generate_fn(model, AutoTokenizer.from_pretrained(args.model), max_new_tokens=128)
        out = synthesize_mhd_llm(ehd, ihd, args.n, args.seed, generate_fn=generate, batch_size=args.batch_size)
    else:
        out = synthesize_mhd(ehd, ihd, args.n, args.seed)
    write_jsonl(out, args.output)
    methods = Counter(r["meta"]["method"] for r in out)
    print(summary)
    print(f"wrote {len(out)} MHD prompts from {len(ehd)} EHD x {len(ihd)} IHD parents to {args.output} ({dict(methods)})")
    return 0
