"""An async site whose taking of its parent's next task fails (the model's download cut short, a full disk refusing
the model) takes that task again, backing off: skipped, it stayed on the version before, and its async parent,
waiting for the site's updates, never sent another task; taken again every ``retry_seconds``, it downloaded the
model from its parent every 2 s for as long as its disk stayed full."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from aggregator.models import ModelStore
from appliance.client import AggregatorClient, AggregatorUnavailable
from tests.aggregator_harness import Harness, async_city_and_site, run, wait_until

DEVICES = 2
RETRY_SECONDS = 0.05


@asynccontextmanager
async def city_and_site(tmp_path: Path) -> AsyncIterator[tuple[Harness, Harness]]:
    """An async city (a version per update) and an async site following it, the site's devices' updates forwarded
    and the city's version 1 published from them."""
    async with async_city_and_site(tmp_path, city_buffer=1, devices=DEVICES, retry_seconds=RETRY_SECONDS) as (
            city, site, _):
        await wait_until(lambda: city.engine.version == 1, what="the city's version 1")
        yield city, site


def failing(times: int, exc: Callable[[], Exception], real: Callable, only: Callable[..., bool] = lambda *a: True):
    """``real``, raising ``exc()`` the first ``times`` calls for which ``only`` holds."""
    left = [times]

    def call(*args: object, **kwargs: object) -> object:
        if left[0] and only(*args):
            left[0] -= 1
            raise exc()
        return real(*args, **kwargs)

    return call


async def on_version_1(site: Harness) -> None:
    await wait_until(lambda: site.engine.version == 1 and site.engine.current is not None
                     and site.engine.current.model_version == 1, what="the site's round on the city's version 1")


def test_a_parent_task_whose_model_download_was_cut_short_is_taken_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = AggregatorClient.model_release

    async def cut_short_once(client: AggregatorClient, *args: object, **kwargs: object) -> object:
        if not cut:
            cut.append(True)
            raise AggregatorUnavailable("connection reset by peer")
        return await real(client, *args, **kwargs)

    cut: list[bool] = []
    monkeypatch.setattr(AggregatorClient, "model_release", cut_short_once)

    async def go() -> None:
        async with city_and_site(tmp_path) as (city, site):
            await on_version_1(site)
            assert cut == [True]
            np.testing.assert_array_equal(site.engine.params, city.engine.params)

    run(go())


def test_a_parent_task_a_full_disk_refuses_is_taken_again_backing_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site_models = tmp_path / "site"
    monkeypatch.setattr(ModelStore, "write", failing(
        3, lambda: OSError(errno.ENOSPC, "No space left on device"), ModelStore.write,
        only=lambda store, version, *args: version == 1 and store.directory.is_relative_to(site_models)))
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args: object) -> object:
        task = asyncio.current_task()
        if task is not None and task.get_name() == "upstream":
            waits.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def go() -> None:
        async with city_and_site(tmp_path) as (city, site):
            await on_version_1(site)
            np.testing.assert_array_equal(site.engine.params, city.engine.params)
        assert waits == [RETRY_SECONDS, 2 * RETRY_SECONDS, 4 * RETRY_SECONDS], waits

    run(go())
