"""``python -m services.autoscaler``: settings, then the runtime."""

from services.autoscaler.app import build_spec
from services.autoscaler.settings import Settings
from services.bus.runtime import load_settings, serve


def main() -> None:
    settings = load_settings(Settings)
    serve(build_spec(settings), settings)


if __name__ == "__main__":
    main()
