"""``python -m services.anomaly_detector``: settings, then the stream runtime."""

from services.anomaly_detector.app import NAME, build_spec
from services.anomaly_detector.settings import Settings
from services.bus.runtime import load_settings
from services.bus.streams import serve_stream


def main() -> None:
    settings = load_settings(Settings)
    serve_stream(lambda: build_spec(settings), settings, NAME)


if __name__ == "__main__":
    main()
