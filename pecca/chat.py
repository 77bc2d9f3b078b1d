"""Conversations with a model: `Chat` keeps the messages and the model's KV cache between turns.

Each turn renders the whole conversation with the chat template and tokenizes it; the part
that the KV cache already holds (the common prefix with what was fed before) is not fed again,
so a turn costs its new tokens only. A reply ends at the model's end-of-turn tokens
(tokenizer.eot_ids: <|eot_id|>, <|im_end|>, EOS ...), a stop string, max_tokens, or the end of
the context. When the conversation no longer fits the context (with room for a reply), the
oldest turns are dropped, the system prompt kept, and `notices` says so.
"""
from typing import Iterator, List, Optional, Union

from pecca.chat_template import ChatTemplate, chat_ids
from pecca.errors import ContextLengthError, InvalidArgumentError
from pecca.generate import GenerationOptions, GenerationStats

# llama.cpp's llama-cli sampling defaults (its conversation mode is what `pecca chat` imitates)
CHAT_DEFAULTS = dict(max_tokens=None, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05,
                     repetition_penalty=1.0, repeat_last_n=64)


def chat_options(**kwargs) -> GenerationOptions:
    """GenerationOptions with the chat defaults for what is not given (None = default, except
    for max_tokens and seed, where None means "no limit" and "random")."""
    values = dict(CHAT_DEFAULTS)
    for k, v in kwargs.items():
        if v is not None or k in ("max_tokens", "seed"):
            values[k] = v
    return GenerationOptions(**values)


class Chat:
    """A conversation. `send(text)` returns the reply (or with stream=True yields it in pieces)
    and keeps both messages; `reset()` starts again with the same system prompt.

    llm: a pecca.LLM. system: the system prompt, if any. chat_template: a template file or
    Jinja source (default: the model's own). The rest are generation options (max_tokens per
    reply, temperature, top_p, top_k, min_p, repetition_penalty, repeat_last_n, seed, stop).
    """

    def __init__(self, llm, system: Optional[str] = None, chat_template: Optional[str] = None,
                 **options):
        if system is not None and not isinstance(system, str):
            raise InvalidArgumentError(f"system must be a string, got {type(system).__name__}")
        self.llm = llm
        self.template = ChatTemplate.for_tokenizer(llm.tokenizer, chat_template)
        self.system = system
        self.options = chat_options(**options)
        self.sampler = self.options.sampler(llm.config.vocab_size)  # one RNG for the whole chat
        self.messages: List[dict] = []
        self.notices: List[str] = []  # what the chat had to do (dropped turns, a cut reply)
        self.last_stats: Optional[GenerationStats] = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, stream: bool = False) -> Union[str, Iterator[str]]:
        if not isinstance(text, str):
            raise InvalidArgumentError(f"a message must be a string, got {type(text).__name__}")
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()  # a turn whose reply was never asked for
        before, notices = list(self.messages), len(self.notices)
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self._fit()
        except Exception:  # a refused message leaves the conversation as it was
            self.messages, self.notices[notices:] = before, []
            raise
        self.last_stats = GenerationStats()
        pieces = self._reply(prompt, self.last_stats)
        return pieces if stream else "".join(pieces)

    def prompt_ids(self) -> List[int]:
        """The ids of the conversation so far, ready for the assistant's reply."""
        text = self.template.render(self.messages, add_generation_prompt=True)
        return chat_ids(self.llm.tokenizer, text)

    def _fit(self) -> List[int]:
        """The prompt, after dropping the oldest turns while it leaves no room for a reply."""
        seq_len = self.llm.model.seq_len
        room = max(1, min(self.options.token_limit(seq_len), seq_len // 4))
        while True:
            ids = self.prompt_ids()
            if len(ids) + room <= seq_len:
                return ids
            if not self._drop_oldest_turn():
                if len(ids) < seq_len:
                    return ids  # the last message alone: reply in what is left
                raise ContextLengthError(f"the message makes a prompt of {len(ids)} tokens, more than "
                                         f"the context of {seq_len}")
            self.notices.append(f"the conversation ({len(ids)} tokens) no longer fits the context of "
                                f"{seq_len}: dropped the oldest turn")

    def _drop_oldest_turn(self) -> bool:
        """Remove the first user message after the system prompt and the replies to it;
        never the last message. False when there is nothing left to drop."""
        first = next((i for i, m in enumerate(self.messages) if m["role"] != "system"), None)
        last = len(self.messages) - 1
        if first is None or first >= last:
            return False
        end = first + 1
        while end < last and self.messages[end]["role"] != "user":
            end += 1
        del self.messages[first:end]
        return True

    def _reply(self, prompt: List[int], stats: GenerationStats) -> Iterator[str]:
        out = []
        try:
            for piece in self.llm.reply_stream(prompt, self.sampler, self.options, stats):
                out.append(piece)
                yield piece
        finally:  # also on Ctrl-C or when the caller stops reading: keep what was said
            self.messages.append({"role": "assistant", "content": "".join(out)})
            if stats.stop_reason == "context":
                self.notices.append(f"the context of {self.llm.model.seq_len} positions is full: the "
                                    "reply was cut; the oldest turns go next time")
