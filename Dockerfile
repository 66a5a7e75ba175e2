# syntax=docker/dockerfile:1
# One image for every Python service of reelbus (and the `reelbus` CLI): the service is chosen by the
# command, `python -m services.<name>` (see compose.yaml and deploy/k8s/base). Build: docker build -t reelbus .

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libev-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml ./
RUN mkdir -p services && touch services/__init__.py \
 && pip install --upgrade pip \
 && pip install . \
 && pip uninstall -y reelbus
COPY services ./services
COPY schemas ./schemas
COPY topics ./topics
# Editable, so that REPO_ROOT (services/cli/infra.py) is /app and `reelbus topics apply` finds
# topics/ and schemas/.
RUN pip install --no-deps -e .

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libev4 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/reelbus --create-home reelbus \
 && mkdir -p /var/lib/reelbus/keys && chown -R reelbus /var/lib/reelbus
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    REELBUS_HOME=/var/lib/reelbus
WORKDIR /app
USER 10001
# Every service serves /livez and /readyz (services/bus/runtime.py); the command names the service.
STOPSIGNAL SIGTERM
CMD ["reelbus", "--help"]
