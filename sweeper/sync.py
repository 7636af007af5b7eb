"""`python -m sweeper.sync [FOLDER ...]`: send the tracking writes a store did not get.

Trials journal every tracking write in their own folder first (sweeper/outbox.py). When the
store was away longer than `tracking.retry_window`, the rest waits there; this command sends it,
in order, to the store each outbox was written for. Default folders: `multirun/` and `outputs/`
under the current directory. A sweep started from the same directory does the same first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweeper import outbox


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeper.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="folders to search (default: multirun outputs)")
    parser.add_argument("--window", type=float, default=300.0,
                        help="seconds to keep retrying while the store does not answer (default 300)")
    args = parser.parse_args(argv)
    folders = args.folders or [Path("multirun"), Path("outputs")]
    missing = [f for f in args.folders if not f.is_dir()]
    if missing:
        print(f"error: no such folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    pending = outbox.pending_outboxes(folders)
    if not pending:
        print(f"nothing to send: every outbox under {', '.join(map(str, folders))} is sent")
        return 0
    left_total = 0
    for folder in pending:
        box = outbox.open_existing(folder, args.window)
        if not box.lock():
            print(f"{folder}: skipped, a running trial is sending it")
            continue
        before = box.unsent
        left = box.send(block=True)
        box.release()
        left_total += left
        print(f"{folder}: sent {before - left} of {before} write(s) to {box.uri}" + (f", {left} left" if left else ""))
    return 1 if left_total else 0


if __name__ == "__main__":
    sys.exit(main())
