"""``python -m services.abr``: settings, then the runtime."""

from services.abr.app import build_spec
from services.abr.settings import Settings
from services.bus.runtime import load_settings, serve


def main() -> None:
    settings = load_settings(Settings)
    serve(build_spec(settings), settings)


if __name__ == "__main__":
    main()
