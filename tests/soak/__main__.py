"""``python -m tests.soak [--minutes N] [--relay shared|tasks] [--out DIR] [--idle N]`` (root): see tests/soak."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.soak import COLUMNS, soak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10, help="length of the run after setup (default 10)")
    p.add_argument("--relay", choices=("shared", "tasks"), default="shared", help="proxy.relay (default shared)")
    p.add_argument("--out", type=Path, default=Path("soak-out"), help="directory for soak.csv, soak.png, proxy.log")
    p.add_argument("--idle", type=int, default=2000, help="idle connections held throughout (default 2000)")
    args = p.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        p.error("--minutes must be in (0, 1440]")
    s, bad = soak(args.minutes, relay=args.relay, out=args.out, idle=args.idle)
    last = s.samples[-1] if s.samples else dict.fromkeys(COLUMNS, "-")
    print(
        f"\nsoak {args.minutes:g} min, relay {args.relay}: {last['accepted']} connections accepted, "
        f"{s.keepalive_reqs} keep-alive exchanges, {s.new_conns} new connections, {s.bulk_bytes >> 20} MiB bulk, "
        f"{s.reloads} reloads, {args.idle} held; CSV {args.out / 'soak.csv'}, plot {args.out / 'soak.png'}"
    )
    for line in bad:
        print("FAIL:", line)
    print("PASS" if not bad else "FAILED")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
