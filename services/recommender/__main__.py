"""``python -m services.recommender``: settings, then the stream runtime."""

from services.bus.runtime import load_settings
from services.bus.streams import serve_stream
from services.recommender.app import build_spec
from services.recommender.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    serve_stream(lambda: build_spec(settings), settings, "recommender")


if __name__ == "__main__":
    main()
