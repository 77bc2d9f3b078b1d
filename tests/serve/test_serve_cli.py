"""`pecca serve` as a person starts it: a subprocess on 127.0.0.1, port 0 (the port it took is
in its first line, with the slots' KV-cache type), --api-key enforced on /v1 and not on /health,
Ctrl-C stops it."""
import re
import signal
import subprocess
import sys

import pytest

from serve_helpers import http

pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(files):
    model, template = files
    proc = subprocess.Popen([sys.executable, "-m", "pecca", "serve", str(model), "--port", "0", "--parallel", "2",
                             "--ctx-size", "256", "--threads", "1", "--api-key", "s3cret", "--chat-template",
                             str(template), "--model-name", "tiny", "--kv-type", "f16"], stderr=subprocess.PIPE,
                            text=True)
    line = proc.stderr.readline()
    m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1 \| 2 slots of 256 positions, f16 KV cache", line)
    if m is None:
        proc.kill()
        pytest.fail(f"unexpected first line: {line!r} {proc.stderr.read()[-2000:]}")
    yield proc, m.group(1)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_api_key(served):
    proc, url = served
    assert http(url + "/health")[0] == 200  # open, for load balancers
    status, body = http(url + "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                       temperature=0)
    assert r.usage.completion_tokens == 8


def test_ctrl_c_stops_it(served):
    proc, url = served
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0


def test_bad_option_is_one_line(files):
    run = subprocess.run([sys.executable, "-m", "pecca", "serve", str(files[0]), "--parallel", "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stderr.strip() == "error: --parallel must be >= 1, got 0"
