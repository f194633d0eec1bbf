"""Session affinity across 2 model replicas: every turn of a session lands on one replica
(the x-ernie-replica response header), and different sessions spread over both."""

from __future__ import annotations

import httpx
import pytest

from ernie_cluster.distributed.process_group import free_port

pytestmark = pytest.mark.slow

APP = "ernie-affinity"


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_checkpoint):
    from ray import serve

    from ernie_cluster.serving.ray_serve.builder import build_app
    from ernie_cluster.serving.ray_serve.config import ServeAppConfig

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeAppConfig(
        model=str(tiny_checkpoint), served_model_name=["tiny"], dtype="float32", num_replicas=2
    )
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.delete(APP)
    serve.shutdown()


def turn(http, server, messages, headers=None, user=None):
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, "seed": 1}
    if user:
        body["user"] = user
    response = http.post(f"{server}/v1/chat/completions", json=body, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.headers["x-ernie-replica"], response.json()["choices"][0]["message"]


def test_session_turns_stay_on_one_replica(server):
    with httpx.Client(timeout=60) as http:
        messages = [{"role": "user", "content": "first question"}]
        replicas = []
        for i in range(10):
            replica, answer = turn(http, server, messages, {"x-session-id": "conversation-42"})
            replicas.append(replica)
            messages += [
                {"role": "assistant", "content": answer.get("content") or "ok"},
                {"role": "user", "content": f"follow-up {i}"},
            ]
        assert len(set(replicas)) == 1

        by_user = {
            turn(http, server, [{"role": "user", "content": f"q{i}"}], user="alice")[0]
            for i in range(5)
        }
        assert len(by_user) == 1

        spread = {
            turn(http, server, [{"role": "user", "content": "hi"}], {"x-session-id": f"s{i}"})[0]
            for i in range(16)
        }
        assert len(spread) == 2
