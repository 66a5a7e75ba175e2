"""The ``reelbus`` command: bring the bus up and down, look at it, manage topics, read topics, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

from services.cli import infra

EXIT_USAGE = 2


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    layout = infra.Layout.from_env()
    result = asyncio.run(infra.up(layout, args.components, _progress))
    print(
        f"bus healthy in {result.seconds:.1f}s "
        f"(started: {', '.join(result.started) or 'none'}; "
        f"already running: {', '.join(result.reused) or 'none'})"
    )
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    layout = infra.Layout.from_env()
    for comp in infra.select(args.components, defaults_only=True):
        comp.install(layout, _progress)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    infra.down(infra.Layout.from_env(), args.components, _progress)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = asyncio.run(infra.status(infra.Layout.from_env(), args.components))
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        header = ("component", "address", "healthy", "pid", "memory MiB", "log file")
        table = [header] + [
            (
                r.name,
                r.url,
                "yes" if r.healthy else "NO",
                str(r.pid or "-"),
                f"{r.memory_kib / 1024:.0f}" if r.memory_kib else "-",
                r.log,
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        total = sum(r.memory_kib or 0 for r in rows)
        print(f"\nresident memory of everything started: {total / 1024:.0f} MiB")
    return 0 if all(r.healthy for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reelbus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="install what is missing and start the bus natively")
    p.add_argument("components", nargs="*", help="some of the components (default: all, services included)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("install", help="install (download, build) components without starting them")
    p.add_argument("components", nargs="*", help="some of the components (default: those `up` starts)")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("down", help="stop, by pid, what `up` started")
    p.add_argument("components", nargs="*")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="component, address, health, pid, memory, log file")
    p.add_argument("components", nargs="*")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    from services.cli import abr, bench, evaluate, replay, tail, topics

    topics.register(sub)
    tail.register(sub)
    bench.register(sub)
    abr.register(sub)
    evaluate.register(sub)
    replay.register(sub)

    from services.cli import actuator

    actuator.register(sub)

    from services.cli import load

    load.register(sub)

    from services.cli import dashboard

    dashboard.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except infra.InfraError as exc:
        print(f"reelbus: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
