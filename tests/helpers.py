"""Shared test helpers: paths to the test data, running the CLI, reading rank files independently.

The test data ships in ``tests/data`` (made by ``scripts/make_test_data.py``), so a
clone anywhere runs every test; ``../shared`` adds the golden cases' original F32
inputs and full expected tensors when it is present.

Expectations never come from streamconv itself: rank files are read back with
plain ``torch.load`` and compared with the golden files written by the official
pipeline, or with layouts computed by hand in the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Shipped with the repository (made from ../shared by scripts/make_test_data.py): every clone has it.
DATA = os.path.join(HERE, "data")
GOLDEN = os.path.join(DATA, "golden")  # BF16 inputs, expected tensors as sha256 (tensors.json)
FIXTURES_ROOT = os.path.join(DATA, "fixtures")  # mindspore, mindformers_moe, mindspore_dist, hf_pairs
FIXTURES = os.path.join(FIXTURES_ROOT, "mindspore")

# The workspace's shared data, when present beside the checkout (or named by STREAMCONV_SHARED):
# the golden cases then also run from their original F32 inputs against the full expected tensors.
SHARED = os.environ.get("STREAMCONV_SHARED", os.path.join(REPO, "..", "shared"))
SHARED_GOLDEN = os.path.join(SHARED, "golden")
HAVE_SHARED = os.path.isdir(SHARED_GOLDEN)

#: a synthetic dense model's values that neither the weights nor a model config give, stated with their flags
#: (the defaults the run would assume): with them and the layouts given, --quiet has nothing to say, so a test
#: can expect stderr to be exactly its one error line
STATED_SETTINGS = ["--rotary-base", "10000", "--seq-length", "2048", "--max-position-embeddings", "2048",
                   "--norm-epsilon", "1e-5"]

# Only for data that tests/data does not hold (a clone without ../shared reports such tests as skipped);
# for the golden cases and fixtures use GOLDEN / FIXTURES_ROOT above, which are always there.
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason="../shared/golden not present")


def golden_cases(root: str = GOLDEN) -> list:
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "case.json")))


def official_argv(case: str, save_dir: str, root: str = GOLDEN) -> list:
    """The case's official command line with the program name swapped for streamconv."""
    spec = json.load(open(os.path.join(root, case, "case.json")))
    cmd = spec["official_command"].replace("<input>", os.path.join(root, case, "input"))
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


class Contents:
    """A file's bytes: compared exactly, printed short (size and sha256 prefix).

    Tests compare files through this, never as two raw ``bytes``: on CI (pytest sees ``CI=true``) a failing
    ``==`` between bytes objects is explained with a difflib diff of every byte, quadratic in their length, so
    one differing rank file held the CI run for hours instead of failing it.
    """

    __slots__ = ("data",)
    __hash__ = None

    def __init__(self, data: bytes):
        self.data = data

    def __eq__(self, other) -> bool:
        return isinstance(other, Contents) and self.data == other.data

    def __repr__(self) -> str:
        return f"<{len(self.data)} bytes, sha256 {hashlib.sha256(self.data).hexdigest()[:16]}>"


def contents(path) -> Contents:
    """The bytes of the file at ``path``, to compare with ``==`` (see ``Contents``)."""
    with open(path, "rb") as f:
        return Contents(f.read())


def file_bytes(root: str) -> dict:
    """relpath -> contents of every file under ``root`` (outputs are compared byte for byte)."""
    return {rel: contents(os.path.join(root, rel)) for rel in tree(root)}


def kill_when(proc, condition, timeout: float = 120) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds: True; False if it finished first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("condition never met")


# `python -m streamconv ARGV...` once per ARGV inside one interpreter (runpy executes the package's __main__
# exactly as `-m` does), so importing torch (~3 s) is paid once per batch.
_BATCH = r"""
import contextlib, io, json, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["streamconv", *argv]
    buf, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_module("streamconv", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:
            code, _ = 1, buf.write(repr(e))
    results.append([code, buf.getvalue()])
print(json.dumps(results))
"""


def run_cli_batches(jobs: dict) -> dict:
    """name -> argv: run them all in two interpreters (two cores); name -> (exit code, combined output)."""
    names = list(jobs)
    batches = [b for b in (names[0::2], names[1::2]) if b]
    procs = [subprocess.Popen([sys.executable, "-c", _BATCH, json.dumps([jobs[n] for n in b])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in batches]
    out = {}
    for b, p in zip(batches, procs):
        stdout, stderr = p.communicate()
        assert p.returncode == 0, f"conversion driver failed:\n{stdout}\n{stderr}"
        for n, (code, text) in zip(b, json.loads(stdout.strip().splitlines()[-1])):
            out[n] = (code, text)
    return out
