import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="the long fuzz run: PECCA_FUZZ_N (default 1500) mutated files per reader, random seeds")


def pytest_configure(config):
    import os

    if config.getoption("--fuzz-long"):
        os.environ.setdefault("PECCA_FUZZ_N", "1500")
