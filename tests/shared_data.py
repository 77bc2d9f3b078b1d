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
