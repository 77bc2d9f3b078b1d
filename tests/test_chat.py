"""pecca.load(...).chat and Chat sessions on stories260K exported to GGUF, with a small
ChatML-like template: KV-cache reuse (forward positions counted), end-of-turn stops, stop
strings, interrupted replies, context overflow, and bad input."""
import pytest

import pecca
from chat_models import CHATML, stories_gguf
from pecca.chat import Chat
from pecca.chat_template import ChatTemplateError
from pecca.errors import ContextLengthError, InvalidArgumentError
from pecca.generate import CachedModel
from pecca.tokenizers import Llama2cTokenizer
from test_chat_template import ALTERNATING

GREEDY = dict(temperature=0, chat_template=CHATML)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return stories_gguf(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def m(path):
    return pecca.load(str(path), threads=2)


class FedCounter:
    """Counts the positions a model is fed (prefill and forward), by wrapping it in place."""

    def __init__(self, model, monkeypatch):
        self.n = 0
        forward, prefill = model.forward, model.prefill

        def count_forward(token, pos):
            self.n += 1
            return forward(token, pos)

        def count_prefill(tokens, pos0=0):
            tokens = list(tokens)
            if len(tokens) > 1:  # (one token goes through forward)
                self.n += len(tokens)
            return prefill(tokens, pos0)

        monkeypatch.setattr(model, "forward", count_forward)
        monkeypatch.setattr(model, "prefill", count_prefill)


def test_second_turn_feeds_only_the_new_tokens(m, monkeypatch):
    chat = m.chat_session(system="You tell stories.", max_tokens=20, **GREEDY)
    first = chat.send("Once upon a time")
    assert len(first) > 20 and chat.last_stats.generated_tokens == 20
    in_cache = len(m.model.cache_tokens)  # the first prompt and 19 replied tokens (the 20th never fed)
    assert in_cache == chat.last_stats.prompt_tokens + 19
    counter = FedCounter(m.model, monkeypatch)
    second = chat.send("Tell me more")
    s = chat.last_stats
    # all of the cache is reused (the reply re-renders to the same tokens); fed: the new prompt
    # tokens (end of turn, the user's message, the assistant header) and the reply
    assert s.cached_tokens == in_cache
    assert counter.n == (s.prompt_tokens - in_cache) + (s.generated_tokens - 1)
    assert counter.n < s.prompt_tokens / 2
    # the same reply as a model that computes the whole conversation from position 0
    fresh = pecca.load(str(m.loaded.path), threads=2)
    assert fresh.chat(chat.messages[:-1], max_tokens=20, **GREEDY) == second
    assert fresh.last_stats.cached_tokens == 0
    assert [x["role"] for x in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == first and chat.messages[4]["content"] == second


def test_chat_one_shot_and_stream(m):
    messages = [{"role": "user", "content": "Lily had a ball."}]
    text = m.chat(messages, max_tokens=15, **GREEDY)
    assert "".join(m.chat(messages, max_tokens=15, stream=True, **GREEDY)) == text
    assert m.last_stats.cached_tokens == m.last_stats.prompt_tokens - 1  # the same prompt again
    cut = m.chat(messages, max_tokens=15, stop=text[5:9], **GREEDY)
    assert cut == text[:5] and m.last_stats.stop_reason == "stop"


def test_reply_ends_at_end_of_turn_tokens(m, monkeypatch):
    messages = [{"role": "user", "content": "Lily had a ball."}]
    full = m.chat(messages, max_tokens=8, **GREEDY)
    ids = m.last_stats.token_ids
    k = next(i for i in range(2, 8) if ids[i] not in ids[:i])  # a token not said before
    monkeypatch.setattr(Llama2cTokenizer, "eot_ids", property(lambda self: frozenset({self.eos_id, ids[k]})))
    assert ids[k] in m.stop_ids
    text = m.chat(messages, max_tokens=8, **GREEDY)
    assert m.last_stats.token_ids == ids[:k] and m.last_stats.stop_reason == "eos"
    assert full.startswith(text) and len(text) < len(full)


def test_interrupted_reply_is_kept(m):
    chat = m.chat_session(max_tokens=30, **GREEDY)
    pieces = chat.send("Once upon a time", stream=True)
    said = next(pieces) + next(pieces)
    pieces.close()  # what Ctrl-C does in `pecca chat`
    assert chat.messages[-1] == {"role": "assistant", "content": said}
    s = chat.last_stats  # the cache holds the prompt and every reply token but the last (never fed)
    assert len(m.model.cache_tokens) == s.prompt_tokens + s.generated_tokens - 1 and s.generated_tokens >= 2
    assert chat.send("And then?")  # the conversation goes on
    assert [x["role"] for x in chat.messages] == ["user", "assistant", "user", "assistant"]
    never_read = chat.send("Unread", stream=True)  # a reply never asked for: that turn is dropped
    del never_read
    chat.send("Read")
    users = [x["content"] for x in chat.messages if x["role"] == "user"]
    assert users == ["Once upon a time", "And then?", "Read"]


def test_context_overflow_drops_the_oldest_turns(path):
    small = pecca.load(str(path), ctx=192)
    chat = small.chat_session(system="Stories.", max_tokens=30, **GREEDY)
    for i in range(5):
        assert chat.send(f"Turn {i}: tell me about Lily and Ben.")
        s = chat.last_stats
        assert s.prompt_tokens + 30 <= 192 and s.generated_tokens == 30  # room was left for the reply
    assert any("dropped the oldest turn" in n for n in chat.notices)
    assert chat.messages[0] == {"role": "system", "content": "Stories."}
    assert chat.messages[-2]["content"] == "Turn 4: tell me about Lily and Ben."
    assert 3 <= len(chat.messages) < 11 and chat.messages[1]["role"] == "user"
    # one message longer than the whole context: refused, the conversation unchanged
    before = list(chat.messages)
    with pytest.raises(ContextLengthError, match="context of 192"):
        chat.send("Lily " * 200)
    assert chat.messages == before
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Stories."}]


def test_cache_record_follows_every_call(m):
    mod = m.model
    assert isinstance(mod, CachedModel)
    mod.prefill([1, 400, 401], 0)
    assert mod.cache_tokens == [1, 400, 401]
    mod.forward(402, 3)
    assert mod.cache_tokens == [1, 400, 401, 402]
    mod.forward(7, 1)  # rewriting position 1 makes every later one stale
    assert mod.cache_tokens == [1, 7]
    mod.logits_all([1, 5, 6, 7], 0)
    assert mod.cache_tokens == [1, 5, 6, 7]
    mod.forward(9, 10)  # a gap: nothing known any more
    assert mod.cache_tokens == []
    m.generate("Lily", max_tokens=3, temperature=0)  # plain generation records too
    assert mod.cache_tokens[:2] == m.tokenizer.encode("Lily")[:2]


def test_bad_chat_input(m):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        m.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        m.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], chat_template=ALTERNATING)
    chat = Chat(m, chat_template=ALTERNATING, max_tokens=5, temperature=0)
    chat.send("a")
    chat.messages.append({"role": "assistant", "content": "x"})  # two replies in a row
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        chat.send("b")
    assert chat.messages[-1]["content"] == "x"  # the refused message was not kept
    for bad in (dict(temperature=-1), dict(min_p=3), dict(max_tokens=-2), dict(stop=[""])):
        with pytest.raises(InvalidArgumentError):
            m.chat_session(chat_template=CHATML, **bad)
    with pytest.raises(InvalidArgumentError, match="string"):
        m.chat_session(chat_template=CHATML).send(["not", "text"])
    with pytest.raises(InvalidArgumentError, match="role"):
        m.chat([{"content": "no role"}], chat_template=CHATML)
