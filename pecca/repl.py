"""The interactive loop of `pecca chat`: read a line, stream the reply, repeat.

Ctrl-C during a reply stops it and keeps the conversation (the reply so far stays in it);
Ctrl-C at the prompt clears the line; Ctrl-D or /exit quits; /reset starts again. Replies go
to stdout; tok/s per reply, notices and errors to stderr.
"""
import sys

from pecca.errors import PeccaError

PROMPT = ">>> "
HELP = "/reset: start again   /exit or Ctrl-D: quit   Ctrl-C: stop the reply"


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_repl(session, inp=input, out=sys.stdout) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    llm = session.llm
    _err(f"pecca chat: {llm.loaded.path}, context {llm.model.seq_len} | template: "
         f"{session.template.origin}\n{HELP}")
    while True:
        try:
            line = inp(PROMPT)
        except EOFError:  # Ctrl-D
            out.write("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
            out.write("\n")
            continue
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return
        if command == "/reset":
            session.reset()
            _err("(conversation cleared)")
            continue
        if command in ("/help", "/?"):
            _err(HELP)
            continue
        turn(session, line, out)


def turn(session, line: str, out) -> None:
    """One message and its streamed reply."""
    interrupted, pieces = False, None
    try:
        pieces = session.send(line, stream=True)
        show_notices(session)
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        interrupted = True
        if pieces is not None:
            pieces.close()  # ends generation now; the chat keeps the reply so far
    except PeccaError as e:  # e.g. the template refuses the conversation: say so, keep going
        _err(f"error: {e}")
        return
    out.write("\n")
    out.flush()
    s = session.last_stats
    if s is not None:
        new = s.prompt_tokens - s.cached_tokens
        _err(f"[{s.generated_tokens} tokens, {s.decode_tok_s:.1f} tok/s | prompt: {new} new tokens of "
             f"{s.prompt_tokens}, {s.prefill_tok_s:.1f} tok/s{' | interrupted' if interrupted else ''}]")
    show_notices(session)


def show_notices(session) -> None:
    for n in session.notices:
        _err(f"({n})")
    session.notices.clear()
