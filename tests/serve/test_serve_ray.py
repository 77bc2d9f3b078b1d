"""pecca.serve.ray: two replicas on Ray's local cluster behind Ray Serve's proxy, answering the
same OpenAI routes (each replica its own process: /health names its pid)."""
import socket
import time

import pytest

from serve_helpers import http

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'pecca[ray]'")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(files):
    from pecca.serve.ray import app_builder

    model, template = files
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_builder({"model": str(model), "num_replicas": "2", "num_cpus": "0.5", "parallel": "2",
                           "ctx_size": "256", "threads": "1", "chat_template": str(template)})
        serve.run(app, name="pecca", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_the_openai_routes(ray_url, llm):
    client = openai.OpenAI(base_url=ray_url + "/v1", api_key="x", max_retries=0, timeout=60)
    expected = llm.generate("Once upon a time", max_tokens=20, temperature=0)
    for _ in range(4):
        r = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=20, temperature=0)
        assert r.choices[0].text == expected
    chunks = client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=10, temperature=0, stream=True)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    pids, deadline = set(), time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:  # Ray's router spreads requests
        status, body = http(ray_url + "/health")
        assert status == 200 and body["slots"] == 2
        pids.add(body["pid"])
    assert len(pids) == 2
