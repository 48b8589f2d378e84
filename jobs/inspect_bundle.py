"""Inspect a bundle: format, root hash, model, thresholds, counts, largest groups, checks, y_N lookups.

    python jobs/inspect_bundle.py BUNDLE
    python jobs/inspect_bundle.py BUNDLE --verify                 # also read every file's sha256
    python jobs/inspect_bundle.py BUNDLE --key 000010003          # y_N of the row with that key
    python jobs/inspect_bundle.py BUNDLE --caption "a photo of a cat" --json
    python jobs/inspect_bundle.py --config pipeline.yaml          # the bundle of bundle.out

Reads the manifest, a few parquet columns and, for --key/--caption, the memory-mapped index and
the G_dup table; starts no Ray, takes no lock and writes nothing. Prints a readable report, or with
--json one JSON line. Exit code 0; 1 when the bundle fails its checks (without --verify: the file
list, sizes and root hash; with it: every sha256 too); 2 for bad input (not a bundle, another
format version, a --key the bundle does not have).
"""

import argparse
import json
import logging
import sys

from _bootstrap import ROOT  # noqa: F401 (puts the checkout on sys.path, applies the offline defaults)

from pipeline.bundle.inspect import EXIT_BAD_INPUT, TOP_GROUPS, exit_code, inspect_bundle, render
from pipeline.bundle.layout import BundleError
from pipeline.core.config import load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", nargs="?", help="bundle folder (default: bundle.out of --config)")
    parser.add_argument("--config", help="YAML config file: inspects the bundle its bundle.out names")
    parser.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads all)")
    parser.add_argument("--key", help="sample key: report y_N of its row")
    parser.add_argument("--caption", help="caption: report the rows with that caption (normalised) and y_N")
    parser.add_argument("--top", type=int, default=TOP_GROUPS, help="largest groups listed per kind")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = args.bundle
    if path is None and args.config:
        try:
            path = load_config(args.config).bundle.out or None
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    if path is None:
        parser.error("give a BUNDLE folder (or --config FILE with bundle.out)")
    try:
        info = inspect_bundle(path, verify=args.verify, key=args.key, caption=args.caption, top=args.top)
    except BundleError as exc:  # not a bundle, or another format version
        if args.json:
            print(json.dumps({"job": "inspect_bundle", "bundle": path, "error": str(exc)}), flush=True)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(info, sort_keys=True, default=str) if args.json else render(info), flush=True)
    return exit_code(info)


if __name__ == "__main__":
    sys.exit(main())
