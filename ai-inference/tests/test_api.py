"""The probes of the HTTP application, in process and without any infrastructure: liveness asks
no dependency, readiness is `/health`'s deep check. (test_pipeline.py follows them through a real
database outage.)"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from ai_inference.api import create_app
from ai_inference.config import load_settings
from ai_inference.metrics import Metrics
from ai_inference.state import ServiceState
from conftest import free_port

PARTITION = ("sensor-events", 0)

# Runs a coroutine function against the application and returns its result.
Serve = Callable[[Callable[[httpx.AsyncClient], Awaitable[Any]]], Any]


@pytest.fixture
def state() -> ServiceState:
    return ServiceState()


@pytest.fixture
def serve(state: ServiceState) -> Serve:
    """Runs `fn` against the application (its lifespan included) in one event loop."""
    # Nothing listens on this port: every database check fails at once (connection refused).
    settings = load_settings(
        {"CJ_AI_DATABASE_URL": f"postgres://u:p@127.0.0.1:{free_port()}/nowhere?sslmode=disable"}
    )
    app = create_app(settings, state, Metrics())

    def run(fn: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://ai") as c:
                    return await fn(c)

        return asyncio.run(main())

    return run


def test_livez_is_alive_while_the_dependencies_are_away(serve: Serve, state: ServiceState) -> None:
    async def probes(c: httpx.AsyncClient) -> list[httpx.Response]:
        # No database and no consumer yet: the deep check fails, liveness does not.
        out = [await c.get("/health"), await c.get("/livez")]
        state.assigned([PARTITION])
        state.block("database unavailable")
        out.append(await c.get("/livez"))
        return out

    health, live, live_blocked = serve(probes)
    assert health.status_code == 503
    for r in (live, live_blocked):
        assert r.status_code == 200
        assert r.json() == {"status": "alive"}
        assert r.headers["content-type"] == "application/json"


def test_readyz_is_the_health_check(serve: Serve, state: ServiceState) -> None:
    async def pairs(c: httpx.AsyncClient) -> list[tuple[httpx.Response, httpx.Response]]:
        out: list[tuple[httpx.Response, httpx.Response]] = []
        for setup in (lambda: None, lambda: state.assigned([PARTITION]), lambda: state.block("db down")):
            setup()
            out.append((await c.get("/health"), await c.get("/readyz")))
        return out

    for health, ready in serve(pairs):
        assert ready.status_code == health.status_code == 503
        assert ready.json() == health.json()
        assert ready.json()["status"] == "unhealthy"
        assert ready.json()["checks"]["database"]["status"] == "unhealthy"
    assert ready.json()["checks"]["consumer"]["blocked"] == "db down"


def test_probes_are_get_only(serve: Serve) -> None:
    async def posts(c: httpx.AsyncClient) -> list[int]:
        return [(await c.post(p)).status_code for p in ("/livez", "/readyz")]

    assert serve(posts) == [405, 405]
