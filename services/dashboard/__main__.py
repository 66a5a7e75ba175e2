"""``python -m services.dashboard``: settings, then the runtime."""

from services.bus.runtime import load_settings, serve
from services.dashboard.app import build_spec
from services.dashboard.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    serve(build_spec(settings), settings)


if __name__ == "__main__":
    main()
