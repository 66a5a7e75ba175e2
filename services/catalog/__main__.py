"""``python -m services.catalog``: settings from ``CATALOG_*``, then the runtime."""

from __future__ import annotations

from services.bus.runtime import load_settings, serve
from services.catalog.app import build_spec
from services.catalog.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    serve(build_spec(settings), settings)


if __name__ == "__main__":
    main()
