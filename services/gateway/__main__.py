"""``python -m services.gateway``: settings, then the gateway on the runtime."""

from __future__ import annotations

from services.bus.runtime import load_settings, serve
from services.gateway.app import create_spec
from services.gateway.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    serve(create_spec(settings), settings)


if __name__ == "__main__":
    main()
