"""Servers for the serve tests: stories260K exported to GGUF (its own tok512 vocabulary in the
file) with a small ChatML template, served on 127.0.0.1 at an ephemeral port by uvicorn in a
background thread, and the official `openai` client pointed at it."""
import pytest

from chat_models import chatml_file, stories_gguf  # noqa: E402

CTX = 512  # stories260K's whole context


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    return stories_gguf(d), chatml_file(d)


def start_server(files, **kwargs):
    for extra in ("starlette", "uvicorn"):  # pip install "pecca[server]"
        pytest.importorskip(extra)
    from pecca.serve import BackgroundServer, PeccaServer

    model, template = files
    server = PeccaServer.load(str(model), threads=1, chat_template=str(template), **kwargs)
    return BackgroundServer(server).start()


@pytest.fixture(scope="session")
def bg(files):
    """The main server: 8 slots, the model's whole context."""
    bg = start_server(files, parallel=8, ctx_size=CTX)
    yield bg
    bg.stop()


@pytest.fixture(scope="session")
def client(bg):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def llm(files):
    """The same model in-process, for pecca's own single-sequence generation."""
    import pecca

    return pecca.load(str(files[0]), threads=1)
