"""`equilibrate data`: the public datasets (XSTest, the FDC-labelled BeaverTails prompts, hh-rlhf,
PKU-SafeRLHF, BeaverTails): list them, find the local copy, download one for offline use.

    equilibrate data list                                  # each dataset, its origin, where it was found
    equilibrate data download xstest                       # into ~/.cache/equilibrate/data (or $EQUILIBRATE_CACHE/data)
    equilibrate data download beavertails-fdc --to ./data-copy   # then: export EQUILIBRATE_DATA=./data-copy
    equilibrate data path beavertails-fdc                  # the file the suites, tests and examples read

Looked in, in order: $EQUILIBRATE_DATA, the download folder, ../shared/data beside the repository.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from equilibrate_pl.data.catalog import DATASETS

    p = argparse.ArgumentParser(prog="equilibrate data", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="each dataset, its origin and license, and where it was found")
    d = sub.add_parser("download", help="fetch a dataset for offline use (needs network)")
    d.add_argument("name", choices=list(DATASETS))
    d.add_argument("--to", metavar="DIR", help="data folder to write <DIR>/<name>/ into (default: the download folder)")
    d.add_argument("--force", action="store_true", help="fetch again even if the files are there")
    w = sub.add_parser("path", help="print the local file a dataset is read from (exit 1 if there is none)")
    w.add_argument("name", choices=list(DATASETS))
    w.add_argument("--file", help="another file of the dataset (default: its main file)")
    return p


def main(argv: list[str] | None = None) -> int:
    from equilibrate_pl.data import catalog

    args = _parser().parse_args(argv)
    if args.command == "list":
        print("looked in: " + "; ".join(f"{where} {path}" for where, path in catalog.data_dirs()))
        for name, spec in catalog.DATASETS.items():
            found = catalog.locate(name)
            print(f"\n{name}: {spec.title}\n  origin:  {spec.origin}\n  license: {spec.license}\n"
                  f"  local:   {found if found else 'not found (equilibrate data download ' + name + ')'}")
        return 0
    if args.command == "path":
        found = catalog.locate(args.name, args.file)
        if found is None:
            print(f"equilibrate data: {args.name}/{args.file or catalog.DATASETS[args.name].files[0]} not found; "
                  f"get it with {catalog.how_to_get(args.name)}", file=sys.stderr)
            return 1
        print(found)
        return 0
    try:
        folder = catalog.download(args.name, args.to, force=args.force)
    except Exception as err:  # network / hub errors: one line, non-zero exit
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"equilibrate data: downloading {args.name} failed ({type(err).__name__}: {first})", file=sys.stderr)
        return 1
    print(f"{args.name}: {folder}")
    if args.to:
        print(f"  read it from there with: export EQUILIBRATE_DATA={folder.parent}")
    return 0
