"""Upload what runs could not write to their tracking store: `python -m echo.upload <folder>...`.

A run whose store refused its writes (a server gone, a full disk) keeps them in
`./echo-unsent/<run>/` (echo/tracking/outbox.py) and names that folder in its last line. This writes
each folder given (or each one inside a folder given, e.g. `echo-unsent`) into a store, then
removes it: by default the store of `MLFLOW_TRACKING_URI` if set, else the one the run was
meant for; `--to URI` names another. Exit status 0 if every folder was uploaded, else 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from echo.tracking.outbox import outboxes, read, reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echo.upload", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="an outbox folder, or a folder of them (e.g. echo-unsent)")
    parser.add_argument("--to", metavar="URI", help="the tracking store to write to")
    parser.add_argument("--keep", action="store_true", help="keep the folders after uploading them")
    args = parser.parse_args(argv)

    from echo.tracking.worker import upload

    found = [box for folder in args.folders for box in outboxes(folder)]
    if not found:
        print(f"echo: no kept runs in {' '.join(args.folders)}", file=sys.stderr)
        return 1
    failed = 0
    for box in found:
        uri = args.to or os.environ.get("MLFLOW_TRACKING_URI") or read(box)["run"]["uri"]
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
