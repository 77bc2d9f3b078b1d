"""Chat templates (pecca.chat_template) against transformers' apply_chat_template:
../shared/reference/tokenizers/llama3_chat.jsonl (6 Llama 3 conversations, rendered text and
ids), and SmolLM2's ChatML prompts as llama.cpp tokenized them (reference/gguf/greedy64.jsonl).
The same Llama 3 conversations from a GGUF file's tokenizer.chat_template are checked in
tests/export/test_export_llama3_vocab.py (which builds that file)."""
import json

import pytest

import pecca
from pecca.chat_template import ChatTemplate, ChatTemplateError, chat_ids, read_template_file, template_beside
from pecca.errors import InvalidArgumentError
from shared_data import llama2c_model, shared_file

pytest.importorskip("jinja2")

# Mistral-Instruct's form: BOS, [INST] turns, and a check that the roles alternate
ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def chat_refs():
    path = shared_file("reference", "tokenizers", "llama3_chat.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_llama3_chats(tok):
    t = ChatTemplate.for_tokenizer(tok)
    refs = chat_refs()
    assert len(refs) == 6
    for r in refs:
        text = t.render(r["messages"], add_generation_prompt=r["add_generation_prompt"])
        assert text == r["rendered"], r["name"]
        assert chat_ids(tok, text) == r["ids"], r["name"]


def test_llama3_chats_from_tokenizer_config():
    tok = pecca.Tokenizer.from_file(shared_file("models", "tokenizers", "llama3", "tokenizer.json"))
    assert tok.chat_template_origin.endswith("tokenizer_config.json")
    check_llama3_chats(tok)


@pytest.fixture(scope="module")
def smollm2_dir():
    return shared_file("models", "gptq", "SmolLM2-135M-Instruct-gptq-4bit-g64-actorder")


def smollm2_chats():
    path = shared_file("reference", "gguf", "greedy64.jsonl")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["name"].startswith("chat_"):
            question = r["prompt_text"].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            out.append((r, [{"role": "user", "content": question}]))
    assert len(out) == 2
    return out


def test_smollm2_chatml_from_hf_folder(smollm2_dir):
    """SmolLM2's template (chat_template.jinja beside tokenizer.json) adds its default system
    prompt; llama.cpp's ids of the rendered prompt (no BOS added: add_bos_token is false)."""
    tok = pecca.Tokenizer.from_file(smollm2_dir / "tokenizer.json")
    assert tok.chat_template_origin.endswith("chat_template.jinja") and not tok.add_bos
    t = ChatTemplate.for_tokenizer(tok)
    for r, messages in smollm2_chats():
        text = t.render(messages)
        assert text == r["prompt_text"]
        assert chat_ids(tok, text) == r["prompt_ids"]
    assert {0, 2} <= tok.eot_ids  # <|endoftext|>, <|im_end|>


def test_smollm2_chatml_from_llama_cpp_gguf():
    from pecca.hub import cache_dir

    path = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} not found (../shared/models/gguf/fetch-smollm2.sh puts it there)")
    tok = pecca.Tokenizer.from_file(path)
    assert "tokenizer.chat_template" in tok.chat_template_origin
    t = ChatTemplate.for_tokenizer(tok)
    for r, messages in smollm2_chats():
        assert chat_ids(tok, t.render(messages)) == r["prompt_ids"]


def test_template_sources(tmp_path, smollm2_dir):
    # a folder with tokenizer_config.json only; chat_template.jinja wins over it
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A{{ messages[0].content }}"}))
    assert template_beside(str(tmp_path / "tokenizer.json")) == ("A{{ messages[0].content }}",
                                                                 str(tmp_path / "tokenizer_config.json"))
    (tmp_path / "chat_template.jinja").write_text("B")
    assert template_beside(str(tmp_path))[0] == "B"
    # named templates in tokenizer_config.json: the "default" one
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "T"},
                                                   {"name": "default", "template": "D"}]}))
    assert read_template_file(str(named)) == "D"
    # an explicit file overrides the tokenizer's own
    tok = pecca.Tokenizer.from_file(smollm2_dir / "tokenizer.json")
    t = ChatTemplate.for_tokenizer(tok, str(tmp_path / "chat_template.jinja"))
    assert t.render([{"role": "user", "content": "x"}]) == "B"


def test_no_template_is_a_clear_error():
    tok = pecca.Tokenizer.from_file(llama2c_model("tok512.bin"))
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template.*--chat-template"):
        ChatTemplate.for_tokenizer(tok)


def test_template_that_raises_shows_its_message():
    t = ChatTemplate(ALTERNATING, {"bos_token": "<s>", "eos_token": "</s>"}, "mistral.jinja")
    ok = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
          {"role": "user", "content": "Bye"}]
    assert t.render(ok) == "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]"
    with pytest.raises(ChatTemplateError, match="mistral.jinja: the chat template raised: Conversation "
                       r"roles must alternate user/assistant/user/assistant/\.\.\."):
        t.render([{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}])
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([{"role": "assistant", "content": "I speak first"}])


def test_bad_templates_and_messages():
    with pytest.raises(ChatTemplateError, match=r"not a valid Jinja template \(line 1"):
        ChatTemplate("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ChatTemplateError, match="raised"):  # the sandbox refuses Python internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])
    t = ChatTemplate("{{ messages[0].content }}")
    for bad in ("hi", [{"content": "no role"}], ["hi"]):
        with pytest.raises(InvalidArgumentError, match="role"):
            t.render(bad)


def test_transformers_environment():
    """tojson keeps non-ASCII and HTML characters, strftime_now, loop controls, {% generation %},
    trim_blocks / lstrip_blocks, and extra variables."""
    t = ChatTemplate("{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n"
                     "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}"
                     "{{ strftime_now('%Y') | length }}{{ bos_token }}{{ extra }}", {"bos_token": "<s>"})
    text = t.render([{"role": "user", "content": "é<b>"}, {"role": "user", "content": "2"}], extra="!")
    assert text == '{"role": "user", "content": "é<b>"}4<s>!'
