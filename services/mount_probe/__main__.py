"""``python -m services.mount_probe``: settings, then the runtime."""

from services.bus.runtime import load_settings, serve
from services.mount_probe.app import build_spec, contracts_for
from services.mount_probe.settings import Settings


def main() -> None:
    settings = load_settings(Settings)
    serve(build_spec(settings), settings, contracts_for(settings))


if __name__ == "__main__":
    main()
