"""Faust in this very process, under pytest's ``filterwarnings = error``: the recommender's app starts
(RocksDB table through rocksdict, its declared changelog, static membership), takes its partitions,
handles a viewing and stops, without a warning becoming an error."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.bus.streams import StreamService
from services.cli.infra import Layout
from services.recommender.app import build_spec
from services.recommender.settings import Settings
from tests.conftest import free_port, until
from tests.recommender.conftest import Feed, Topics, at

pytestmark = pytest.mark.infra


async def test_the_faust_app_runs_in_process_with_warnings_as_errors(
    bus_infra: Layout, topics: Topics, feed: Feed, tmp_path: Path
) -> None:
    settings = Settings(
        kafka_bootstrap_servers=bus_infra.bootstrap_servers,
        registry_url=bus_infra.registry_url,
        topic_prefix=topics.prefix,
        instance_id=f"in-process-{uuid.uuid4().hex[:6]}",
        data_dir=tmp_path / "data",
        http_port=free_port(),
        token_public_key_file=bus_infra.home / "keys" / "token-signing.pub.pem",
        refresh_interval_seconds=0.2,
    )
    spec = build_spec(settings)
    assert str(spec.app.conf.processing_guarantee) == "ProcessingGuarantee.AT_LEAST_ONCE"
    assert str(spec.app.conf.store) == "rocksdb:"
    assert spec.app.conf.consumer_group_instance_id == settings.instance_id
    assert spec.app.conf.topic_allow_declare is False
    service = StreamService(spec, settings)
    viewer = uuid.uuid4()
    await feed.profile(viewer)
    await feed.titles("w1")
    running = asyncio.create_task(service.run())
    try:
        await until(lambda: all(service.checks().values()) or None, "the app to be ready", 60)
        from services.bus.events import ProfileHistory

        assert spec.bus.stats.counts.get("dead_lettered") is None
        await feed.views(feed.view(viewer, "w1", at(0)))
        await until(lambda: spec.bus.stats.counts.get("lists_published"), "a list", 30)
        table: Any = spec.app.tables["profiles"]
        store = table.data
        assert type(store).__name__ == "Store" and store.use_rocksdict, "RocksDB through rocksdict"
        row = table.get(str(viewer))
        assert isinstance(row, ProfileHistory) and [v.title_id for v in row.views] == ["w1"]
    finally:
        service._shutting_down = True
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        if spec.app.started:
            await spec.app.stop()
