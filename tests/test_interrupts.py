"""Ctrl-C, however many times, and what the interrupt message counts (issue 8, items 10, 11).

Any number of SIGINT/SIGTERM in quick succession: one error line, exit 130, no
traceback (not even from torch's atexit handlers), no temporary file, no tracker;
``--resume`` then finishes with the bytes of an uninterrupted run. The message's
count of finished rank files is the number of completion records on disk, which
is what ``--resume`` keeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import synth
from helpers import file_bytes, run_cli

SPEC = synth.ModelSpec(layers=8, hidden=512, ffn=1024, heads=8, groups=4, vocab=4000, files=2)
FLAGS = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "4", "--num-attention-heads", "8",
         "--max-memory", "400MB", "--fc1-layout", "interleaved", "--qkv-layout", "grouped"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("src"))
    synth.write_checkpoint(d, SPEC)
    return d


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_cli(["convert", "--load-dir", source, "--save-dir", out, *FLAGS, "--quiet"])
    return file_bytes(out)


def _temps(save):
    return [n for d, _, ns in os.walk(save) for n in ns if n.endswith(".streamconv-partial")]


def _records(save):
    d = os.path.join(save, ".streamconv", "done")
    return [n for n in os.listdir(d) if n.endswith(".json")] if os.path.isdir(d) else []


def _start(source, save):
    return subprocess.Popen([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir",
                             save, *FLAGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(proc, condition):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None and time.time() - t0 < 120, "the run ended first"
        time.sleep(0.0005)


def _interrupted_cleanly(proc, save) -> str:
    out, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, f"exit {proc.returncode}\n{err}"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    errors = [x for x in err.splitlines() if x.startswith("streamconv: error:")]
    assert len(errors) == 1 and "interrupted" in errors[0] and "--resume" in errors[0], err
    assert err.rstrip().splitlines()[-1] == errors[0], "the error must be the last line"
    assert not _temps(save), "temporary files left behind"
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
    return errors[0]


@pytest.mark.parametrize("signals", [
    [signal.SIGINT, signal.SIGINT],
    [signal.SIGINT, signal.SIGINT, signal.SIGINT],
    [signal.SIGINT] * 6,
    [signal.SIGTERM, signal.SIGINT, signal.SIGTERM],
], ids=["twice", "three-times", "six-times", "term-int-term"])
def test_repeated_interrupts_end_once_and_resume(signals, source, reference, tmp_path):
    save = str(tmp_path / "out")
    proc = _start(source, save)
    _wait(proc, lambda: bool(_temps(save)))
    for s in signals:
        proc.send_signal(s)
        time.sleep(0.01)
    _interrupted_cleanly(proc, save)
    run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS, "--resume", "--quiet"])
    assert file_bytes(save) == reference


def test_interrupts_during_the_shutdown_itself(source, reference, tmp_path):
    """A burst of signals spread over the whole shutdown (cleanup, exit, atexit handlers)."""
    save = str(tmp_path / "out")
    proc = _start(source, save)
    _wait(proc, lambda: bool(_temps(save)))
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 10:
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            break
        time.sleep(0.002)
    _interrupted_cleanly(proc, save)
    run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS, "--resume", "--quiet"])
    assert file_bytes(save) == reference


def test_interrupt_message_counts_the_finished_files_resume_keeps(source, reference, tmp_path):
    save = str(tmp_path / "out")
    proc = _start(source, save)
    _wait(proc, lambda: len(_records(save)) >= 3)
    proc.send_signal(signal.SIGINT)
    line = _interrupted_cleanly(proc, save)
    m = re.search(r"(\d+) of (\d+) rank files are finished", line)
    assert m, line
    k, n = int(m.group(1)), int(m.group(2))
    assert n == 8 and k == len(_records(save)) and k >= 3, (line, _records(save))
    summary = tmp_path / "s.json"
    run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS, "--resume", "--quiet",
             "--json-summary", str(summary)])
    s = json.load(open(summary))
    assert len(s["files_kept"]) == k and len(s["files_written"]) == n - k
    assert file_bytes(save) == reference
