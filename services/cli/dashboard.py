"""``reelbus dashboard``: the live dashboard's address, with a fresh operator token in its fragment.

The page is public; the data it polls needs a token with the ``ops:read`` scope. This signs one with
the bus's token-signing key (``$REELBUS_HOME/keys/token-signing.pem``, written by ``reelbus up``) and
puts it after ``#token=``: a URL fragment is never sent to a server, so it stays out of access logs;
the page moves it into the tab's session storage and out of the address bar.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from services.bus.auth import TokenIssuer, load_private_key
from services.bus.runtime import default_keys_dir

SCOPE = "ops:read"


def dashboard_url(gateway: str, ttl_seconds: int) -> str:
    key_file = default_keys_dir() / "token-signing.pem"
    issuer = TokenIssuer(load_private_key(key_file), ttl_seconds=ttl_seconds)
    # A subject of its own per token: the gateway's per-account rate limit (300 a minute by default)
    # then counts each open page (about 60 polls a minute) on its own.
    token = issuer.issue(str(uuid.uuid4()), "reelbus-cli", "BROWSER", scopes=[SCOPE])
    return f"{gateway.rstrip('/')}/dashboard/#token={token}"


def run(args: argparse.Namespace) -> int:
    try:
        print(dashboard_url(args.gateway, int(args.hours * 3600)))
    except (OSError, ValueError) as exc:
        print(f"reelbus dashboard: cannot sign a token: {exc} (run `reelbus up` first)", file=sys.stderr)
        return 2
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="print the live dashboard's address with an operator token")
    p.add_argument("--gateway", default="http://localhost:8080", help="the gateway's base URL")
    p.add_argument("--hours", type=float, default=8.0, help="how long the token is valid (default 8)")
    p.set_defaults(func=run)
