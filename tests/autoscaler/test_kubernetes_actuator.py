"""The Kubernetes actuator against a FAKE API server that replays recorded scale-subresource
exchanges (tests/autoscaler/recorded/k8s_deployment_scale.json): the request the official async
client sends (method, path, merge-patch content type, body, bearer token) is checked against the
recording, and the recorded response is played back. No cluster is involved; see the recording's
"about" for where it comes from."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio.client.exceptions import ApiException

from services.autoscaler.adapters.kubernetes import KubernetesActuator
from services.autoscaler.settings import Settings
from services.bus.events import LoadSample
from services.cli.infra import Layout
from tests.autoscaler.test_service import start_autoscaler
from tests.bus.test_bus import producer_for
from tests.conftest import SpawnService, TopicFactory, unique, until

RECORDED = Path(__file__).parent / "recorded" / "k8s_deployment_scale.json"
TOKEN = "fake-token-for-the-recorded-api"


@dataclass
class FakeScaleApi:
    """A fake kube-apiserver: only the recorded scale endpoints, checked and replayed."""

    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    interactions: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.received.append({"method": request.method, "path": request.path, "body": body})
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.mismatches.append(f"{request.method} {request.path}: no bearer token")
            return web.json_response({"kind": "Status", "code": 401, "reason": "Unauthorized"}, status=401)
        for item in self.interactions:
            want = item["request"]
            if (want["method"], want["path"]) != (request.method, request.path):
                continue
            if "content_type" in want and request.content_type != want["content_type"]:
                self.mismatches.append(f"{request.path}: content type {request.content_type}")
                return web.json_response({"kind": "Status", "code": 415}, status=415)
            if "body" in want and body != want["body"]:
                continue
            return web.json_response(item["response"]["body"], status=item["response"]["status"])
        self.mismatches.append(f"unrecorded request {request.method} {request.path} {body}")
        return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeScaleApi]:
    fake = FakeScaleApi(interactions=json.loads(RECORDED.read_text())["interactions"])
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "autoscaler", "user": {"token": TOKEN}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "autoscaler"}}],
                "current-context": "fake",
            }
        )
    )
    return path


async def test_scale_patches_the_deployment_scale_subresource(fake_api: FakeScaleApi, tmp_path: Path) -> None:
    actuator = await KubernetesActuator.connect("reelbus", kubeconfig(tmp_path / "kubeconfig", fake_api.url))
    try:
        await actuator.scale("history", 3)
        assert await actuator.replicas("history") == 3
        with pytest.raises(ApiException) as raised:
            await actuator.scale("nosuch", 2)
        assert raised.value.status == 404
    finally:
        await actuator.close()
    assert fake_api.mismatches == []
    assert fake_api.received[0] == {
        "method": "PATCH",
        "path": "/apis/apps/v1/namespaces/reelbus/deployments/history/scale",
        "body": {"spec": {"replicas": 3}},
    }


def test_the_actuator_setting_takes_none_or_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().actuator == "none"
    monkeypatch.setenv("AUTOSCALER_ACTUATOR", "kubernetes")
    assert Settings().actuator == "kubernetes"
    monkeypatch.setenv("AUTOSCALER_ACTUATOR", "helm")
    with pytest.raises(ValueError, match="actuator"):
        Settings()


async def test_the_service_scales_the_deployment_it_decided_for(
    bus_infra: Layout,
    spawn_service: SpawnService,
    make_topic: TopicFactory,
    fake_api: FakeScaleApi,
    tmp_path: Path,
) -> None:
    """End to end: load samples -> the autoscaler's decision -> a PATCH of the Deployment's scale."""
    _, contracts, topics = await start_autoscaler(
        spawn_service,
        make_topic,
        AUTOSCALER_LOAD_SAMPLE_INTERVAL_S="0",
        AUTOSCALER_CPU_TARGET="0.3",
        AUTOSCALER_ACTUATOR="kubernetes",
        AUTOSCALER_KUBE_NAMESPACE="reelbus",
        AUTOSCALER_KUBECONFIG=str(kubeconfig(tmp_path / "kubeconfig", fake_api.url)),
    )
    async with producer_for(bus_infra, contracts, topics["load"]) as producer:
        sample = LoadSample(
            service="history",
            instance=unique("history"),
            cpu_utilization=0.9,  # one replica at 0.9 against 0.3: ceil(3.0) = 3
            in_flight=0,
            request_rate=5.0,
            consumer_lag=0,
            window_ms=5000,
        )
        await producer.send(topics["load"].name, "history", sample)
        await until(lambda: fake_api.received, "a request to the fake API server")
    assert fake_api.received[0]["body"] == {"spec": {"replicas": 3}}
    assert fake_api.mismatches == []
