"""``python -m tests.autoscaler.autoscaler_process``: the autoscaler on private copies of its topics.

``AUTOSCALER_TEST_TOPICS`` lists them as ``<name>=<declared topic it copies>:<partitions>[:<consumer>]``,
comma separated; the service then runs exactly as ``python -m services.autoscaler`` does, with the copies
declared besides the topics file's.
"""

from __future__ import annotations

import os
from dataclasses import replace

from services.autoscaler.app import build_spec
from services.autoscaler.settings import Settings
from services.bus.contracts import Contracts
from services.bus.runtime import load_settings, serve


def contracts_with_copies(spec: str) -> Contracts:
    base = Contracts.load()
    copies = []
    for item in filter(None, spec.split(",")):
        name, rest = item.split("=", 1)
        like, partitions, *consumer = rest.split(":")
        copy = replace(base.topic(like), name=name, partitions=int(partitions))
        if consumer:  # the copy's only consumer (a function-style service of the test)
            copy = replace(copy, consumers=(consumer[0],))
        copies.append(copy)
    return base.with_topics(copies)


def main() -> None:
    settings = load_settings(Settings)
    contracts = contracts_with_copies(os.environ.get("AUTOSCALER_TEST_TOPICS", ""))
    serve(build_spec(settings, contracts), settings, contracts)


if __name__ == "__main__":
    main()
