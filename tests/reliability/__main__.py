"""``python -m tests.reliability``: the fault matrix (``--cycles N`` of each fault), or a soak
(``--soak 1h --devices 200``); prints one table and exits 1 on any lost, spurious or wrong
session or a gateway that exited by itself."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from tests.reliability import matrix


def _seconds(text: str) -> float:
    from gateway.config import parse_duration

    return parse_duration(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    p.add_argument("--cycles", type=int, default=2, help="cycles of each fault (default 2)")
    p.add_argument(
        "--faults",
        default="all",
        help="comma-separated fault kinds, each optionally with its own cycle count (kill:1000),"
        " or all (" + ", ".join(matrix.FAULTS) + ")",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--speed", type=float, default=20.0, help="simulated time per real second")
    p.add_argument("--soak", type=_seconds, default=0.0, help="random faults for this long")
    p.add_argument("--devices", type=int, default=0, help="soak: simulated chargers")
    p.add_argument(
        "--stop-after",
        type=_seconds,
        help="start no further fault cycle after this long (the table shows what ran)",
    )
    p.add_argument("--workdir", type=Path, help="keep the run's files here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if args.cycles < 1:
        p.error("--cycles must be at least 1")
    cycles: dict[str, int] = {}
    if args.faults != "all":
        chosen = args.faults.split(",")
    elif args.soak:
        chosen = [f for f in matrix.FAULTS if f not in matrix.RESTARTING]
    else:
        chosen = list(matrix.FAULTS)
    for item in chosen:
        name, _, count = item.strip().partition(":")
        if name not in matrix.FAULTS:
            p.error(f"unknown fault {name!r} (expected {', '.join(matrix.FAULTS)})")
        if count and (not count.isdigit() or int(count) < 1):
            p.error(f"{item}: the cycle count must be a whole number >= 1")
        cycles[name] = int(count) if count else args.cycles
    names = list(cycles)
    skipped = []
    if "clock-jump" in names and not matrix.faketime_available():
        skipped.append("clock-jump (libfaketime is not installed)")
    if "disk-full" in names and not matrix.can_mount_tmpfs():
        skipped.append("disk-full (no tmpfs mount: not root)")
    names = [n for n in names if not any(s.startswith(n + " ") for s in skipped)]

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)

    from gateway.logs import configure_logging

    configure_logging("warning", json=False)
    # the cloud subscriber's client reports every broker kill the runner itself caused
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(
        matrix.run_matrix(
            names,
            cycles,
            seed=args.seed,
            workdir=args.workdir,
            speed=args.speed,
            soak_s=args.soak,
            soak_devices=args.devices,
            stop_after_s=args.stop_after,
            log=log,
        )
    )
    print(result.table())
    for s in skipped:
        print(f"skipped: {s}")
    if result.rss_kb:
        print(matrix.rss_summary(result.rss_kb))
    for problem in result.problems:
        print(f"PROBLEM: {problem}")
    if args.json is not None:
        matrix.dump(result, args.json)
    print("OK: nothing lost, duplicated beyond dedup, or wrong" if result.ok else "FAILED")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
