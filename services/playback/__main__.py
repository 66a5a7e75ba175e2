"""``python -m services.playback``: settings, the appliances file, then the runtime."""

from __future__ import annotations

import sys

from services.bus.runtime import EXIT_BAD_SETTING, load_settings, serve
from services.playback.app import build_spec
from services.playback.appliances import ApplianceConfigError, load_appliances
from services.playback.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    try:
        appliances = load_appliances(settings.appliances_file)
    except ApplianceConfigError as exc:
        print(f"setting PLAYBACK_APPLIANCES_FILE: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_SETTING) from None
    serve(build_spec(settings, appliances), settings)


if __name__ == "__main__":
    main()
