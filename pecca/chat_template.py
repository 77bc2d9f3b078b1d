"""Chat templates: a model's Jinja `chat_template` turned into the text (and ids) of a
conversation, exactly as transformers' `apply_chat_template` renders it.

The environment is transformers' own: jinja2's ImmutableSandboxedEnvironment (templates come
with downloaded models: they must not reach Python), trim_blocks and lstrip_blocks,
the loopcontrols extension, a `{% generation %}` block that just renders its body, `tojson`
that keeps non-ASCII text and does not escape HTML, and the globals `raise_exception(msg)`
and `strftime_now(fmt)`. The variables are `messages`, `add_generation_prompt`, `tools`,
`documents`, and the tokenizer's special tokens as strings (`bos_token`, `eos_token`, ...).

Where the template comes from, first found wins: an explicit one (`--chat-template FILE`,
`chat_template=`), the GGUF file's `tokenizer.chat_template`, `chat_template.jinja` or
`tokenizer_config.json` beside the tokenizer file.
"""
import json
import os
from datetime import datetime
from functools import lru_cache
from typing import List, Optional, Tuple

from pecca.errors import ChatTemplateError, InvalidArgumentError  # noqa: F401 (re-exported)


def template_beside(path: str) -> Optional[Tuple[str, str]]:
    """(template, origin) from chat_template.jinja or tokenizer_config.json in the folder of
    `path` (a tokenizer or model file, or a folder), or None. chat_template.jinja wins, as in
    transformers, which writes the template there since 4.43."""
    d = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    jinja_file = os.path.join(d, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        return read_template_file(jinja_file), jinja_file
    config = os.path.join(d, "tokenizer_config.json")
    if os.path.isfile(config):
        try:
            t = _from_config(config)
        except ChatTemplateError:
            return None  # a config without a usable template is simply not a source
        return t, config
    return None


def read_template_file(path: str) -> str:
    """A template file: Jinja text, or a tokenizer_config.json holding `chat_template`."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path}: cannot read the chat template ({e})") from None
    if path.endswith(".json"):
        return _from_config(path, text)
    if not text.strip():
        raise ChatTemplateError(f"{path}: the chat template file is empty")
    return text


def _from_config(path: str, text: Optional[str] = None) -> str:
    """tokenizer_config.json's chat_template: a string, or the "default" of named templates."""
    try:
        if text is None:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        t = json.loads(text).get("chat_template")
    except (OSError, ValueError, AttributeError, RecursionError) as e:  # RecursionError: absurd nesting
        raise ChatTemplateError(f"{path}: not a tokenizer_config.json with a chat_template ({e})") from None
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if not isinstance(t, str) or not t:
        raise ChatTemplateError(f"{path}: has no chat_template")
    return t


def _too_large(operator, left, right) -> bool:
    """Whether `left ** right` or a repetition `left * right` would be huge."""
    if operator == "**":
        return isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
            and left.bit_length() * right > 1 << 16  # bits of the result (floats just overflow)
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > 1 << 20:
            return True
    return False


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The jinja2 Template for `source`, in transformers' environment (cached: a chat renders
    the same template every turn)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
        transformers; for inference it renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with `**` and `*` bounded too: a template from a model file
        cannot ask for a number or a string of gigabytes (the sandbox bounds range() itself)."""
        intercepted_binops = frozenset(["**", "*"])

        def call_binop(self, context, operator, left, right):
            if _too_large(operator, left, right):
                raise jinja2.sandbox.SecurityError(f"{operator!r} with these operands would be too large")
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def check_messages(messages) -> List[dict]:
    if not isinstance(messages, (list, tuple)):
        raise InvalidArgumentError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                   f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgumentError(f"messages[{i}] must be a dict with a string 'role', got {m!r}")
    return [dict(m) for m in messages]  # the template sees copies


class ChatTemplate:
    """A chat template with the special-token strings it is rendered with."""

    def __init__(self, source: str, special_tokens: Optional[dict] = None, origin: str = ""):
        import jinja2

        self.source, self.origin = source, origin or "chat template"
        self.special_tokens = dict(special_tokens or {})
        try:
            self.template = compile_template(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.origin}: not a valid Jinja template (line {e.lineno}: "
                                    f"{e.message})") from None

    @classmethod
    def for_tokenizer(cls, tokenizer, override: Optional[str] = None) -> "ChatTemplate":
        """The template to use with `tokenizer`: `override` (a file path, or Jinja source when
        it contains "{%" or "{{"), else the tokenizer's own; a clear error when there is none."""
        if override is not None:
            if "{{" in override or "{%" in override:
                source, origin = override, "chat_template argument"
            else:
                source, origin = read_template_file(str(override)), str(override)
        elif tokenizer.chat_template:
            source, origin = tokenizer.chat_template, tokenizer.chat_template_origin
        else:
            where = tokenizer.path or "the model"
            raise ChatTemplateError(
                f"{where}: no chat template (none in the GGUF file, no chat_template.jinja or "
                "tokenizer_config.json with one beside the tokenizer); pass one with "
                "--chat-template FILE / chat_template=")
        return cls(source, tokenizer.special_token_strings(), origin)

    def render(self, messages, add_generation_prompt: bool = True, tools=None, documents=None,
               **kwargs) -> str:
        """The conversation as text. Errors the template raises (raise_exception) become
        ChatTemplateError with the template's own message."""
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        messages = check_messages(messages)
        try:
            return self.template.render(messages=messages, tools=tools,
                                        documents=documents,
                                        add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: the chat template raised: {e.message or e}") from None
        except Exception as e:  # TypeError, ZeroDivisionError, RecursionError ... from the template's code
            raise ChatTemplateError(f"{self.origin}: the chat template failed on these messages "
                                    f"({type(e).__name__}: {str(e)[:200]})") from None


def chat_ids(tokenizer, text: str) -> List[int]:
    """Ids of a rendered conversation: special-token names in it are those tokens (the
    template writes "<|eot_id|>", "<s>" as text), and BOS is put in front when the tokenizer
    adds one and the template did not (llama.cpp's rule; transformers relies on the template)."""
    ids = tokenizer.encode(text, add_bos=False, parse_special=True)
    if tokenizer.add_bos_default and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id] + ids
    return ids
