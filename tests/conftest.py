import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run slow tests (multi-GB files, real Megatron)")


def pytest_collection_modifyitems(config, items):
    import pytest

    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
