"""`pecca chat` through a pseudo-terminal (pexpect), as a person uses it.

- stories260K exported to GGUF, with a small ChatML-like template given by --chat-template:
  two turns (the second reuses the KV cache: its stats line shows few new prompt tokens),
  /reset, a turn after it, Ctrl-D.
- Ctrl-C during a reply needs a reply that lasts: stories260K writes thousands of tokens per
  second, so this uses a GGUF of random weights (86 MB of f16, more than the CPU caches hold:
  tens of tokens per second on two cores) whose classifier can only pick text pieces, so that
  a reply runs until -n. Ctrl-C stops it, the session goes on.
- SmolLM2-135M-Instruct, the 4-bit GPTQ directory of ../shared/models/gptq: a real instruct
  model with its own template; replies end at its end-of-turn token.
"""
import os
import re
import sys

import pytest

from chat_models import chatml_file, stories_gguf, talkative_gguf

pexpect = pytest.importorskip("pexpect")

STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s \| prompt: (\d+) new tokens of (\d+), [\d.]+ tok/s"
                   r"( \| interrupted)?\]")


def spawn(*args, timeout=60):
    env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")
    return pexpect.spawn(sys.executable, ["-m", "pecca", "chat", *map(str, args)], env=env, encoding="utf-8",
                         timeout=timeout, dimensions=(50, 200))


def stats(child):
    child.expect(STATS)
    m = child.match
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), bool(m.group(4))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_cli")
    return d, stories_gguf(d), chatml_file(d)


def test_two_turns_reset_and_ctrl_d(files):
    d, model, template = files
    child = spawn(model, "--chat-template", template, "--system", "You tell stories.", "-t", "0", "-n", "40",
                  "--threads", "2")
    child.expect("template: " + re.escape(str(template)))
    child.expect(">>> ")
    child.sendline("Once upon a time")
    n1, new1, total1, cut1 = stats(child)
    assert (n1, new1, cut1) == (40, total1, False)  # a fresh process: the whole prompt is fed
    reply1 = child.before.split("Once upon a time", 1)[1].strip()
    assert len(reply1) > 40
    child.expect(">>> ")
    child.sendline("Tell me more")
    n2, new2, total2, _ = stats(child)
    assert total2 > total1 + 40 and new2 < total2 - total1  # the first turn was not fed again
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    child.expect(">>> ")
    child.sendline("Once upon a time")
    n3, new3, total3, _ = stats(child)
    assert (total3, new3) == (total1, 1)  # the same first prompt: already in the cache
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_keeps_the_session(files):
    d, _, template = files
    model = talkative_gguf(d)
    child = spawn(model, "--chat-template", template, "-t", "0", "-n", "200", "--threads", "2", timeout=120)
    child.expect(">>> ")
    child.sendline("Hello")
    child.expect("Hello\r\n")
    child.expect(r"\S{3}")  # the reply has started
    child.sendintr()
    n1, new1, total1, interrupted = stats(child)
    assert interrupted and 0 < n1 < 200
    child.expect(">>> ")
    child.sendline("Go on")
    n2, new2, total2, interrupted2 = stats(child)
    assert not interrupted2 and n2 == 200
    assert total2 > total1 and new2 < total2 - total1 + 5  # the interrupted reply stayed in the cache
    child.expect(">>> ")
    child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_no_template_is_one_clear_line(files):
    _, model, _ = files
    child = spawn(model)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert "error: " in child.before and "--chat-template" in child.before and "Traceback" not in child.before


def smollm2(kind):
    from shared_data import shared_file, smollm2_gguf

    if kind == "gptq-directory":
        return shared_file("models", "gptq", "SmolLM2-135M-Instruct-gptq-4bit-g64-actorder")
    return smollm2_gguf()


@pytest.mark.parametrize("kind", ["gptq-directory", "q4_1-gguf"])
def test_smollm2_instruct(kind):
    """A real instruct model: SmolLM2-135M-Instruct, as its 4-bit GPTQ directory (with its own
    chat_template.jinja and tokenizer.json) and as llama.cpp's Q4_1 GGUF (template and
    vocabulary inside the file). Its reply ends at <|im_end|> (an end-of-turn token, not -n),
    and the second turn feeds only its new tokens."""
    # a plain system prompt: with the template's default one, the first token of the answer is
    # a near tie even in fp32 (tests/export/test_q4.py)
    child = spawn(smollm2(kind), "-t", "0", "-n", "48", "--threads", "2",
                  "--system", "You are a helpful assistant.", timeout=300)
    child.expect("template: ")
    child.expect(">>> ")
    child.sendline("What is the capital of France?")
    n1, new1, total1, _ = stats(child)
    reply = child.before.split("France?", 1)[1].strip()
    assert 0 < n1 < 48 and new1 == total1 and reply and "<|im_end|>" not in reply
    if kind == "q4_1-gguf":  # (the GPTQ quantization of this 135M model answers in riddles)
        assert "Paris" in reply, reply
    child.expect(">>> ")
    child.sendline("Name three primary colors.")
    n2, new2, total2, _ = stats(child)
    assert new2 < 20 < total2 - total1  # only the end of turn 1, the question and the header
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
