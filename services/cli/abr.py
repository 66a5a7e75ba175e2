"""``reelbus abr simulate``: adaptive-bitrate algorithms replayed over a folder of throughput traces.

Every algorithm plays the same video (48 chunks of 4 s on the Pensieve ladder, 300-4300 kbit/s) once
over every trace file of the folder (``<seconds> <Mbit/s>`` lines, as the Pensieve/Comyco cooked traces;
see ``services/abr/simulator.py`` for the player model). The table gives, per algorithm, means over its
sessions (one per trace):

- QoE/session: the linear QoE summed over the session's chunks (bitrate in Mbit/s, minus 4.3 per second
  of rebuffering, minus bitrate changes in Mbit/s; start-up delay not counted);
- QoE/chunk: the session's QoE divided by its chunk count -- the scale of the Pensieve figures;
- bitrate (kbit/s), rebuffering ratio (rebuffering over rebuffering plus video time, %), bitrate
  switches per minute of video, start-up delay (s).

Nothing here touches the bus: it is pure computation over files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from services.abr.algorithms import ALGORITHMS, Algorithm, make_algorithm
from services.abr.simulator import PlayerConfig, Summary, TraceError, load_traces, run

DEFAULT_ALGORITHMS = "bba,bola,robustmpc"


def _algorithms(text: str) -> list[Algorithm]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no algorithm named")
    try:
        return [make_algorithm(n) for n in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _vbr(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("--vbr must be in [0, 1)")
    return value


def table(summaries: list[Summary]) -> list[str]:
    header = (
        "algorithm",
        "traces",
        "QoE/session",
        "QoE/chunk",
        "bitrate kbps",
        "rebuffer %",
        "switches/min",
        "startup s",
    )
    rows = [header] + [
        (
            s.algorithm,
            str(s.sessions),
            f"{s.qoe_per_session:.2f}",
            f"{s.qoe_per_chunk:.3f}",
            f"{s.bitrate_kbps:.0f}",
            f"{100 * s.rebuffer_ratio:.2f}",
            f"{s.switches_per_minute:.2f}",
            f"{s.startup_delay_s:.2f}",
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def as_json(
    summaries: list[Summary], directory: Path, files: int, config: PlayerConfig, seconds: float
) -> Any:
    return {
        "traces": str(directory),
        "trace_files": files,
        "chunks": config.chunks,
        "chunk_duration_s": config.chunk_duration_s,
        "ladder_kbps": list(config.ladder_kbps),
        "vbr": config.vbr,
        "seconds": round(seconds, 3),
        "algorithms": [
            {
                "algorithm": s.algorithm,
                "sessions": s.sessions,
                "qoe_per_session": s.qoe_per_session,
                "qoe_per_chunk": s.qoe_per_chunk,
                "bitrate_kbps": s.bitrate_kbps,
                "rebuffer_ratio": s.rebuffer_ratio,
                "switches_per_minute": s.switches_per_minute,
                "startup_delay_s": s.startup_delay_s,
                "per_trace": [
                    {
                        "trace": r.trace,
                        "qoe": r.total_qoe,
                        "qoe_per_chunk": r.qoe_per_chunk,
                        "bitrate_kbps": r.mean_bitrate_kbps,
                        "rebuffer_s": r.rebuffer_s,
                        "rebuffer_ratio": r.rebuffer_ratio,
                        "switches_per_minute": r.switches_per_minute,
                        "startup_delay_s": r.startup_delay_s,
                    }
                    for r in s.results
                ],
            }
            for s in summaries
        ],
    }


def cmd_simulate(args: argparse.Namespace) -> int:
    directory = Path(args.traces)
    config = PlayerConfig(chunks=args.chunks, vbr=args.vbr)
    started = time.perf_counter()
    try:
        traces = load_traces(directory)
    except (TraceError, OSError, UnicodeDecodeError) as exc:
        print(f"reelbus abr: {exc}", file=sys.stderr)
        return 1
    summaries = run(traces, args.algorithms, config)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps(as_json(summaries, directory, len(traces), config, seconds), indent=2))
        return 0
    for line in table(summaries):
        print(line)
    print(
        f"\n{len(traces)} trace files in {directory}, {config.chunks} chunks of {config.chunk_duration_s:g} s"
        f"{f', VBR ±{100 * config.vbr:g} %' if config.vbr else ''}; "
        f"{len(traces) * len(summaries)} sessions in {seconds:.1f} s"
    )
    print("means over sessions; QoE/chunk = session QoE / chunks (linear QoE, mu 4.3, start-up not counted)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("abr", help="adaptive-bitrate algorithms over throughput traces")
    commands = p.add_subparsers(dest="abr_command", required=True, metavar="COMMAND")
    s = commands.add_parser(
        "simulate",
        help="run ABR algorithms over every trace file of a folder and compare their QoE",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--traces", required=True, metavar="DIR", help="a folder of '<seconds> <Mbit/s>' trace files"
    )
    s.add_argument(
        "--algorithms",
        type=_algorithms,
        default=_algorithms(DEFAULT_ALGORITHMS),
        metavar="A,B,...",
        help=f"comma-separated, among {', '.join(ALGORITHMS)} (default {DEFAULT_ALGORITHMS})",
    )
    s.add_argument("--chunks", type=_positive_int, default=48, help="chunks in the video (default 48)")
    s.add_argument(
        "--vbr",
        type=_vbr,
        default=0.0,
        help="chunk sizes vary by up to this fraction, deterministically (default 0: CBR)",
    )
    s.add_argument("--json", action="store_true", help="print the result, per trace too, as JSON")
    s.set_defaults(func=cmd_simulate)
