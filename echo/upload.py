"""Upload what runs could not write to their tracking store: `python -m echo.upload <folder>...`.

Writes each folder kept in ./echo-unsent (docs/bad-input.md) into the store `--to URI` names, else
MLFLOW_TRACKING_URI's, then removes it. Never to the store a folder's run.json names (anyone could
have written it). Exit status 0 if every folder was uploaded, 2 without a store, else 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from echo.tracking.outbox import outboxes, reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echo.upload", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="an outbox folder, or a folder of them (e.g. echo-unsent)")
    parser.add_argument("--to", metavar="URI", help="the tracking store to write to (else MLFLOW_TRACKING_URI)")
    parser.add_argument("--keep", action="store_true", help="keep the folders after uploading them")
    args = parser.parse_args(argv)

    uri = args.to or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        print(
            "echo: upload: no store to write to: name one with --to <uri> (e.g. --to sqlite:///mlflow.db) "
            "or set MLFLOW_TRACKING_URI",
            file=sys.stderr,
        )
        return 2
    from echo.tracking.worker import upload

    found = [box for folder in args.folders for box in outboxes(folder)]
    if not found:
        print(f"echo: no kept runs in {' '.join(args.folders)}", file=sys.stderr)
        return 1
    print(f"uploading {len(found)} kept run{'s' if len(found) > 1 else ''} to {uri}")
    failed = 0
    for box in found:
        try:
            run_id = upload(str(box), uri)
        except Exception as error:
            print(f"echo: could not upload {box} to {uri} ({reason(error)}); it is kept", file=sys.stderr)
            failed += 1
            continue
        if not args.keep:
            shutil.rmtree(box)
        print(f"uploaded {box} to run {run_id} in {uri}" + ("" if args.keep else "; removed the folder"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
