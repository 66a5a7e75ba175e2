"""``python -m services.history``: settings, then the runtime."""

from services.bus.runtime import load_settings, serve
from services.history.app import build_spec
from services.history.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    serve(build_spec(settings), settings)


if __name__ == "__main__":
    main()
