"""``python -m services.billing``: settings, then the service on the runtime."""

from __future__ import annotations

from services.billing.app import create_spec
from services.billing.settings import Settings
from services.bus.runtime import load_settings, serve


def main() -> None:
    settings = load_settings(Settings)
    serve(create_spec(settings), settings)


if __name__ == "__main__":
    main()
