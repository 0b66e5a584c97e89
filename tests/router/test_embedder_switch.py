"""Changing the embedder (`embedder.kind` or `path`) on a database with learned state: the policies start
again instead of loading models that expect other vectors, and feedback on queries the old embedder made is
recorded but teaches nothing. Real database, the real MiniLM and static embedders, fake backends."""

import pytest

from router.config import load_config
from router.embedding import Embedder
from router.service import RouterService, RoutingRequest
from tests.conftest import backend_table, write_config
from tests.fake_backend import FakeVLLM


@pytest.fixture
def fakes():
    servers = [FakeVLLM("cheap"), FakeVLLM("dear")]
    yield servers
    for server in servers:
        server.close()


def _request(i: int, policy: str | None = None) -> RoutingRequest:
    text = f"Question {i}: what is {i} times 7?"
    return RoutingRequest(query=text, prompt=text, model="auto", output_limit=16, body={}, policy=policy)


async def _route_and_reward(service: RouterService, start: int, count: int) -> None:
    for i in range(start, start + count):
        routed = await service.route(_request(i))
        await service.feedback(routed.decision_id, None, reward=1.0 if routed.record.chosen == "cheap" else 0.2)


def _learned(service: RouterService) -> int:
    return service.policies["vw"].stats()["internals"]["examples_learned"]


async def test_switching_the_embedder_restarts_learning_instead_of_crashing(tmp_path, sqlite_url, embedder, fakes):
    backends = backend_table("cheap", fakes[0].port, 0.1, 0.2) + backend_table("dear", fakes[1].port, 1.0, 2.0)
    config = load_config(write_config(tmp_path / "router.toml", sqlite_url, backends, health_interval_s=600), environ={})
    first = RouterService(config, embedder=embedder)
    await _route_and_reward(first, 0, 20)
    unrewarded = (await first.route(_request(99))).decision_id
    assert _learned(first) == 20
    await first.close()  # snapshots, marked with the embedder they were learned with

    static = Embedder(backend="static")  # distilled by `make setup`; here when it is not cached (minutes)
    second = RouterService(config, embedder=static)
    assert _learned(second) == 0, "MiniLM-era snapshots are not loaded into a 256-wide router"
    for name in second.policies:  # every policy decides on the new vectors (qlearning and gradient crashed here)
        assert (await second.route(_request(200, policy=name))).record.policy == name
    late = await second.feedback(unrewarded, None, reward=1.0)  # on a MiniLM query: recorded, teaches nothing
    assert not late.duplicate and _learned(second) == 0
    await _route_and_reward(second, 300, 5)
    assert _learned(second) == 5
    await second.close()

    third = RouterService(config, embedder=static)  # same embedder: its own snapshots come back
    assert _learned(third) == 5
    await third.close()
