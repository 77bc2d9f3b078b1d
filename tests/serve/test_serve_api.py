"""The OpenAI routes through the official `openai` client: completions and chat, streamed and
not, usage, stop strings, seeds, the same text as pecca's own generation, and every error."""
import pytest

from serve_helpers import http

openai = pytest.importorskip("openai")

MODEL = "stories260K"
HELLO = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Once upon a time"}]


def stream_text(stream, chat=True):
    """(text, finish_reason, usage) of a stream of chunks."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append((choice.delta.content if chat else choice.text) or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def test_health_and_models(bg, client):
    status, body = http(bg.url + "/health")
    assert status == 200 and body["status"] == "ok" and body["slots"] == 8 and body["ctx_size"] == 512
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "pecca"


def test_completion_equals_pecca_generate(client, llm):
    for prompt in ("Once upon a time", "Lily and Tom", ""):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
        assert r.choices[0].text == llm.generate(prompt, max_tokens=40, temperature=0)
        assert r.choices[0].finish_reason == llm.last_stats.stop_reason.replace("eos", "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
            llm.last_stats.prompt_tokens, llm.last_stats.generated_tokens)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_default_max_tokens_and_token_prompt(client, llm):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert (r.usage.completion_tokens, r.choices[0].finish_reason) == (16, "length")  # OpenAI's default
    ids = llm.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_completion_stream(client, llm):
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=50, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    text, finish, usage = stream_text(stream, chat=False)
    assert text == llm.generate("Once upon a time", max_tokens=50, temperature=0)
    assert finish in ("length", "stop") and usage.completion_tokens == llm.last_stats.generated_tokens


def test_chat_equals_pecca_chat(client, llm, files):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=60, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    expected = llm.chat(HELLO, chat_template=str(files[1]), max_tokens=60, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10


def test_chat_stream_matches_whole(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=60, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=60, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text, finish, usage = stream_text(chunks)
    assert (text, finish) == (whole.choices[0].message.content, whole.choices[0].finish_reason)
    assert usage == whole.usage


def test_chat_content_parts_and_max_completion_tokens(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Once upon "}, {"type": "text", "text": "a time"}]}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=20, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Once upon a time"}],
                                       max_tokens=20, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens <= 20


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=60, temperature=0)
    text = full.choices[0].text
    stop = text[20:26]  # a piece from the middle
    cut = text[:text.index(stop)]
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=60, temperature=0,
                                  stop=[stop, "never appears"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=60, temperature=0,
                                         stop=stop, stream=True)
    assert stream_text(streamed, chat=False)[:2] == (cut, "stop")


def test_seed_reproducible(client):
    def sample(seed):
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, temperature=1.0,
                                           top_p=0.9, seed=seed)
        return r.choices[0].message.content

    a, b, c = sample(1234), sample(1234), sample(99)
    assert a == b and a != c
    r = client.completions.create(model=MODEL, prompt="Lily", max_tokens=30, seed=7, temperature=0.8,
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    again = client.completions.create(model=MODEL, prompt="Lily", max_tokens=30, seed=7, temperature=0.8,
                                      extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.choices[0].text == again.choices[0].text


def test_unknown_fields_are_ignored(bg):
    status, body = http(bg.url + "/v1/completions", "POST",
                        {"model": MODEL, "prompt": "Lily", "max_tokens": 5, "temperature": 0,
                         "some_future_field": {"x": 1}, "user": "me", "presence_penalty": 0})
    assert status == 200 and body["usage"]["completion_tokens"] <= 5


# ---- errors -----------------------------------------------------------------------------

def error_of(exc_info):
    e = exc_info.value
    return e.status_code, e.body["code"] if isinstance(e.body, dict) else None


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 2}, "n"),
    ({"logprobs": 2}, "logprobs"),
    ({"stop": 5}, "stop"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"seed": 1.5}, "seed"),
    ({"stream": "yes"}, "stream"),
])
def test_bad_parameters_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Lily", **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


def test_bad_chat_requests_400(client):
    for messages in ([], [{"content": "no role"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=messages)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO,
                                       tools=[{"type": "function", "function": {"name": "f"}}])


def test_unknown_model_404(client, bg):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"
    status, body = http(bg.url + "/v1/nothing/here")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_prompt_longer_than_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Once upon a time " * 200, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded" and "512" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # refused before tokenizing: at once
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a b " * 500_000}])
    assert e.value.body["code"] == "context_length_exceeded" and "characters" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * 513)
    assert e.value.body["code"] == "context_length_exceeded"


def test_malformed_bodies_and_a_10_mb_prompt(bg, client):
    url = bg.url + "/v1/chat/completions"
    status, body = http(url, "POST", raw=b'{"model": "stories260K", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = http(url, "POST", raw=b"[1, 2, 3]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = http(bg.url + "/v1/completions", "POST", {"model": MODEL, "prompt": "x" * (10 << 20)})
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # the server keeps serving
    r = client.completions.create(model=MODEL, prompt="Lily", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5


def test_chat_without_a_template_400_completions_still_work(files):
    from pecca.serve import BackgroundServer, PeccaServer

    with BackgroundServer(PeccaServer.load(str(files[0]), threads=1, parallel=1, ctx_size=64)) as bg:
        status, body = http(bg.url + "/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "Hi"}]})
        assert status == 400 and "--chat-template" in body["error"]["message"]
        status, body = http(bg.url + "/v1/completions", "POST", {"prompt": "Lily", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
