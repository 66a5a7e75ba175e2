"""``reelbus topics plan|apply|list``: the cluster and the registry against ``topics/topics.yaml``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from services.bus.admin import Admin, Plan
from services.bus.contracts import Contracts
from services.bus.registry import RegistryClient
from services.cli.infra import Layout


def _admin(args: argparse.Namespace) -> Admin:
    layout = Layout.from_env()
    return Admin(
        args.bootstrap or layout.bootstrap_servers, RegistryClient(args.registry or layout.registry_url)
    )


def _print_plan(plan: Plan) -> None:
    for change in plan.changes:
        print(f"  + {change}")
    for refusal in plan.refusals:
        print(f"  ! refused: {refusal}")
    if plan.empty:
        print("  nothing to change: the cluster and the registry match the contract")


def cmd_plan(args: argparse.Namespace) -> int:
    contracts = Contracts.load()
    plan = _admin(args).plan(contracts, args.topic or None)
    _print_plan(plan)
    return 1 if plan.refusals else 0


def cmd_apply(args: argparse.Namespace) -> int:
    contracts = Contracts.load()
    print("applying topics/topics.yaml …", file=sys.stderr, flush=True)
    plan = _admin(args).apply(contracts, args.topic or None)
    _print_plan(plan)
    if plan.refusals:
        print("nothing was changed: fix the refused schemas first", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    contracts = Contracts.load()
    existing = _admin(args).existing_topics()
    rows = [("topic", "partitions", "exists", "producer", "consumers", "values")]
    for t in contracts.topics.values():
        for name in (t.name, t.dlq):
            have = existing.get(name)
            rows.append(
                (
                    name,
                    str(have if have is not None else t.partitions),
                    "yes" if have is not None else "no",
                    t.producer if name == t.name else "(dead letters)",
                    ",".join(t.consumers) if name == t.name else "reelbus dlq",
                    ",".join(v.rsplit(".", 1)[-1] for v in t.values) if name == t.name else "raw",
                )
            )
    undeclared = sorted(set(existing) - {n for t in contracts.topics.values() for n in (t.name, t.dlq)})
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if undeclared:
        print(f"\nnot in the contract: {', '.join(undeclared)}")
    return 0


def register(sub: Any) -> None:
    parser = sub.add_parser("topics", help="plan, apply or list the declared topics and schemas")
    tsub = parser.add_subparsers(dest="topics_command", required=True)
    for name, func, text in (
        ("plan", cmd_plan, "show what apply would change"),
        ("apply", cmd_apply, "create topics, alter configs, register schemas (idempotent)"),
        ("list", cmd_list, "declared topics and whether they exist"),
    ):
        p = tsub.add_parser(name, help=text)
        p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the native bus)")
        p.add_argument("--registry", help="schema registry Confluent API URL (default: the native bus)")
        if name != "list":
            p.add_argument("--topic", action="append", help="only this topic (repeatable)")
        p.set_defaults(func=func)
