"""Shared test helpers: paths to ../shared, running the CLI, reading rank files independently.

Expectations never come from streamconv itself: rank files are read back with
plain ``torch.load`` and compared with the golden files written by the official
pipeline, or with layouts computed by hand in the tests.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.environ.get("STREAMCONV_SHARED", os.path.join(REPO, "..", "shared"))
GOLDEN = os.path.join(SHARED, "golden")
FIXTURES = os.path.join(SHARED, "fixtures", "mindspore")

needs_shared = pytest.mark.skipif(not os.path.isdir(GOLDEN), reason="../shared/golden not present")


def golden_cases():
    if not os.path.isdir(GOLDEN):
        return []
    return sorted(d for d in os.listdir(GOLDEN) if os.path.isfile(os.path.join(GOLDEN, d, "case.json")))


def official_argv(case: str, save_dir: str) -> list:
    """The case's official command line with the program name swapped for streamconv."""
    spec = json.load(open(os.path.join(GOLDEN, case, "case.json")))
    cmd = spec["official_command"].replace("<input>", os.path.join(GOLDEN, case, "input"))
    cmd = cmd.replace("<output>", save_dir).replace("<megatron>", "/nonexistent/megatron")
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "tools/checkpoint/convert.py"], argv[:2]
    return argv[2:]


def run_cli(argv: list, check: bool = True, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(env_extra or {})
    p = subprocess.run([sys.executable, "-m", "streamconv", *argv], capture_output=True, text=True, env=env, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"streamconv {argv} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def tree(root: str) -> list:
    """Every file under ``root`` as a sorted list of relative paths."""
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            out.append(os.path.relpath(os.path.join(d, f), root))
    return sorted(out)
