"""Continuous batching: a row's logits do not depend on the batch around it; the engine gives
what LLM.generate gives; 8 simultaneous streamed chats give the text each gives alone; a full
queue answers 503; clients that go away mid-stream leave no slot behind."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_helpers import http, wait_until

MODEL = "stories260K"
OPENINGS = ["Once upon a time", "Lily had a red ball", "Tom and his dog", "The sun was hot",
            "A little bird sang", "Sam found a box", "It was a rainy day", "The cat jumped"]


def chat_messages(i):
    return [{"role": "user", "content": OPENINGS[i]}]


@pytest.fixture(scope="module", params=["f32", "f16", "q8_0", "llama2c-q80"])
def any_precision(request, tmp_path_factory, files):
    """stories260K as f32 (the served file), f16 and q8_0 exports, and llama2.c's int8 file."""
    import pecca
    from export import export
    from shared_data import llama2c_model

    if request.param == "f32":
        return pecca.load(str(files[0]), threads=1)
    if request.param == "llama2c-q80":
        return pecca.load(str(llama2c_model("stories260K_q80_gs4.bin")), threads=1)
    out = tmp_path_factory.mktemp("precisions") / f"{request.param}.gguf"
    export(str(llama2c_model()), str(out), request.param, str(llama2c_model("tok512.bin")))
    return pecca.load(str(out), threads=1)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_rows_do_not_depend_on_the_batch(any_precision, kv_type):
    from pecca.model import Model
    from pecca.serve.batch import BatchDecoder, SlotPool

    c, w = any_precision.config, any_precision.model.weights
    pool = SlotPool(c, w, 6, 64, 1, kv_type)
    decoder = BatchDecoder(pool, 6)
    prompts = [[1, 403, 407, 261, 378], [1, 300], [1], [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 50], [1, 60, 70]]
    ref = Model(c, w, 1, 64, kv_type)
    assert pool.key_cache.dtype == ref.state.key_cache.dtype == (np.uint16 if kv_type == "f16" else np.float32)
    for slot, p in enumerate(prompts):  # prefill into a slot = Model.prefill, bit for bit
        assert np.array_equal(pool.prefill(slot, p, 0, len(p)), ref.prefill(p, 0))
    alone = decoder.step([(0, 99, 5)]).copy()
    together = decoder.step([(1, 50, 2), (0, 99, 5), (2, 7, 1), (3, 8, 9), (4, 9, 2)]).copy()
    assert np.array_equal(alone[0], together[1])
    ref.prefill(prompts[0], 0)
    single = ref.forward(99, 5)
    # the batch's GEMMs and Model.forward's matvecs sum in other orders; with an f16 cache a key
    # or value a last bit apart can round to neighbouring halves (1e-3 apart)
    assert np.allclose(single, alone[0], atol=1e-4 if kv_type == "f32" else 1e-3)
    assert single.argmax() == alone[0].argmax()
    if (decoder.multiple, decoder.minimum) == (1, 1):  # int8 throughout: not padded, exactly Model.forward
        assert np.array_equal(single, alone[0])


def replies_equal_llm_generate(engine, llm, prompts, n, temperature, seed):
    """Submit every prompt to the engine at once; each reply is what llm.generate gives alone."""
    from pecca.generate import GenerationOptions, prompt_tokens
    from pecca.serve.engine import Job

    jobs = []
    for prompt in prompts:
        opts = GenerationOptions(n, temperature, 0.9, 0, 0.0, 1.0, 64, seed, ())
        out, done = [], threading.Event()

        def sink(event, out=out, done=done):
            out.append(event)
            if event[0] != "text":
                done.set()

        jobs.append((prompt, out, done))
        engine.submit(Job(prompt_tokens(llm.tokenizer, prompt), opts.sampler(512), n, [], sink))
    for prompt, out, done in jobs:
        assert done.wait(30)
        text = "".join(e[1] for e in out if e[0] == "text")
        assert text == llm.generate(prompt, max_tokens=n, temperature=temperature, seed=seed)
        assert out[-1][2].completion_tokens == llm.last_stats.generated_tokens


def test_engine_equals_llm_generate_greedy_and_seeded(llm):
    from pecca.serve.engine import Engine

    engine = Engine(llm, parallel=4, ctx_size=512).start()
    try:
        for temperature, seed in ((0.0, None), (1.0, 42)):
            # 6 jobs on 4 slots: two wait, then join
            replies_equal_llm_generate(engine, llm, OPENINGS[:6], 80, temperature, seed)
    finally:
        engine.close()
    assert engine.status()["slots_busy"] == 0


def test_engine_with_an_f16_cache_equals_llm_generate(files):
    """The slots' caches take the LLM's KV type: replies equal pecca.load(kv_type="f16")'s."""
    import pecca
    from pecca.serve.engine import Engine

    llm = pecca.load(str(files[0]), threads=1, kv_type="f16")
    engine = Engine(llm, parallel=3, ctx_size=256).start()
    try:
        assert engine.pool.key_cache.dtype == np.uint16
        replies_equal_llm_generate(engine, llm, OPENINGS[:4], 60, 0.0, None)
    finally:
        engine.close()


def stream_chat(client, i, max_tokens=60):
    text = []
    for chunk in client.chat.completions.create(model=MODEL, messages=chat_messages(i), max_tokens=max_tokens,
                                                temperature=0, stream=True):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
    return "".join(text)


def test_8_simultaneous_streamed_chats_equal_one_at_a_time(bg, client, llm, files):
    alone = [stream_chat(client, i) for i in range(8)]
    # one at a time, the server says what pecca's own single-sequence generation says
    assert alone == [llm.chat(chat_messages(i), chat_template=str(files[1]), max_tokens=60, temperature=0)
                     for i in range(8)]
    engine = bg.server.engine
    steps = engine.status()["steps"]
    with ThreadPoolExecutor(8) as pool:
        with engine.pause():  # all 8 wait, then start in the same step
            futures = [pool.submit(stream_chat, client, i) for i in range(8)]
            wait_until(lambda: engine.status()["waiting"] == 8, what="8 queued requests")
        together = [f.result(timeout=60) for f in futures]
    assert together == alone
    assert engine.status()["steps"] - steps <= 61 + 8  # decoded together: ~60 steps, not 8 x 60
    assert len(set(alone)) == 8


def test_full_queue_answers_503(files):
    from conftest import start_server

    openai = pytest.importorskip("openai")
    bg = start_server(files, parallel=1, ctx_size=128, max_queue=1)
    try:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0)
        engine = bg.server.engine
        with ThreadPoolExecutor(2) as pool:
            with engine.pause():
                first = [pool.submit(client.completions.create, model=MODEL, prompt="Lily", max_tokens=8,
                                     temperature=0) for _ in range(2)]
                wait_until(lambda: engine.status()["in_flight"] == 2, what="two requests in")
                with pytest.raises(openai.InternalServerError) as e:
                    client.completions.create(model=MODEL, prompt="Lily", max_tokens=8)
                assert e.value.status_code == 503 and e.value.body["code"] == "server_busy"
            assert [f.result(timeout=30).usage.completion_tokens for f in first] == [8, 8]
        assert http(bg.url + "/health")[1]["in_flight"] == 0
    finally:
        bg.stop()


@pytest.fixture
def slow_engine(bg, monkeypatch):
    """The main server's engine, 10 ms a step: a reply of 100 tokens lasts a second."""
    engine = bg.server.engine
    step = engine.decoder.step

    def slow(rows):
        time.sleep(0.01)
        return step(rows)

    monkeypatch.setattr(engine.decoder, "step", slow)
    return engine


def test_disconnect_mid_stream_frees_the_slots(client, slow_engine):
    engine = slow_engine
    before = engine.status()
    streams = [client.chat.completions.create(model=MODEL, messages=chat_messages(i), max_tokens=100,
                                              temperature=0, stream=True) for i in range(4)]
    for s in streams:
        chunks = iter(s)
        for _ in range(4):  # the role chunk and a few tokens: the job is decoding
            next(chunks)
    assert engine.status()["slots_busy"] == 4
    for s in streams:
        s.close()
    wait_until(lambda: engine.status()["in_flight"] == 0, 10, "the slots to be freed")
    after = engine.status()
    assert after["cancelled"] - before["cancelled"] == 4 and after["slots_busy"] == 0
    # the slots serve again
    assert stream_chat(client, 0, max_tokens=10)


def test_disconnect_while_waiting_and_without_stream(bg, client, slow_engine):
    import socket

    engine = slow_engine
    before = engine.status()
    with engine.pause():  # a streamed request that never gets a slot before its client leaves
        s = client.chat.completions.create(model=MODEL, messages=chat_messages(1), max_tokens=100, stream=True)
        next(iter(s))
        s.close()
        wait_until(lambda: all(j.cancelled for j in engine.waiting), what="the cancel")
    # a request without streaming whose client hangs up
    host, port = bg.url.split("//")[1].split(":")
    body = b'{"model": "stories260K", "prompt": "Lily", "max_tokens": 300, "temperature": 0}'
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: engine.status()["slots_busy"] == 1, what="the job to start")
    wait_until(lambda: engine.status()["in_flight"] == 0, 10, "the slots to be freed")
    assert engine.status()["cancelled"] - before["cancelled"] == 2


def test_padding_for_speed_keeps_the_bits(any_precision):
    """Rows added only for speed (exact int8 kernels, 4-token tiles) change no row's logits."""
    from pecca.serve.batch import BatchDecoder, SlotPool, padded

    c, w = any_precision.config, any_precision.model.weights
    pool = SlotPool(c, w, 3, 64, 1)
    decoder = BatchDecoder(pool, 3)
    for slot in range(3):
        pool.prefill(slot, [1, 300 + slot], 0, 2)
    rows = [(0, 7, 2), (1, 8, 2), (2, 9, 2)]
    decoder.rows_layers = [padded(b, decoder.multiple, decoder.minimum) for b in range(4)]
    decoder.rows_output = list(decoder.rows_layers)
    plain = decoder.step(rows[:2]).copy()
    for slot in range(3):  # the same positions again, from the same caches
        pool.prefill(slot, [1, 300 + slot], 0, 2)
    decoder.rows_layers = [padded(b, 4, decoder.minimum) for b in range(4)]
    decoder.rows_output = list(decoder.rows_layers)
    padded_rows = decoder.step(rows[:2]).copy()
    if (decoder.multiple, decoder.minimum) == (1, 1):
        assert np.array_equal(plain, padded_rows)
    else:  # float kernels: only their own padding is exact; 4 more rows must at least be close
        assert np.allclose(plain, padded_rows, atol=1e-4)
