"""An input file that shrinks, is rewritten or is replaced during a run, or between a run and its resume
(issue 8, item 5).

The run is frozen (SIGSTOP) while it writes its first file, the input is changed,
and the run continues (SIGCONT): so the change lands mid-run every time. Expected:
one error line naming the file, a non-zero exit that is not a signal (no "Bus
error"), no traceback, no tracker and no temporary file left, the run's
bookkeeping kept; and ``--resume`` refuses an input that changed, naming the file
and what changed (size, modification time or inode).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import synth
from helpers import STATED_SETTINGS, run_cli, tree

SPEC = synth.ModelSpec(layers=4, hidden=256, ffn=512, heads=8, groups=4, vocab=2048, files=2)
FLAGS = ["--num-attention-heads", "8", "--target-pipeline-parallel-size", "2", "--fc1-layout", "interleaved",
         "--qkv-layout", "grouped", *STATED_SETTINGS, "--quiet"]


@pytest.fixture
def source(tmp_path):
    d = str(tmp_path / "src")
    synth.write_checkpoint(d, SPEC)
    return d


def _weights(src) -> list:
    return sorted(os.path.join(src, r) for r in tree(src) if r.endswith(".safetensors"))


def _temps(save) -> list:
    return [os.path.join(d, n) for d, _, ns in os.walk(save) for n in ns if n.endswith(".streamconv-partial")
            and not d.endswith(".streamconv")]


def _run_changing_input(source, save, change):
    """Start a conversion, freeze it once it writes, apply ``change()``, let it go on; return (code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir",
                             str(save), *FLAGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while not _temps(save):
        assert proc.poll() is None and time.time() - t0 < 120, "the run ended before it started writing"
        time.sleep(0.0005)
    proc.send_signal(signal.SIGSTOP)
    try:
        change()
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


def _check_failed_cleanly(code, err, save, path):
    assert code not in (0, None) and code > 0, f"exit {code} (a negative code is a signal, e.g. SIGBUS)\n{err}"
    assert "Traceback" not in err and "Bus error" not in err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("streamconv: error:") and path in lines[0], err
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
    assert not _temps(save), "temporary files left behind"
    assert os.path.isfile(os.path.join(save, ".streamconv", "run.json")), "the run's bookkeeping must stay"
    return lines[0]


def _truncate_all(paths):
    for p in paths:
        os.truncate(p, 4096)


def test_input_truncated_while_being_read(source, tmp_path):
    save = tmp_path / "out"
    paths = _weights(source)
    code, err = _run_changing_input(source, save, lambda: _truncate_all(paths))
    line = _check_failed_cleanly(code, err, save, paths[0] if paths[0] in err else paths[1])
    assert "--resume" in line or "--overwrite" in line
    # the input is still short: --resume refuses it (as truncated), naming the file
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(save), *FLAGS, "--resume"], check=False)
    assert p.returncode == 2 and "truncated" in p.stderr and any(x in p.stderr for x in paths), p.stderr


def test_input_replaced_while_being_read(source, tmp_path):
    """A new file renamed over the input: the run's open descriptor still reads the old one; it must not finish."""
    save = tmp_path / "out"
    paths = _weights(source)
    victim = paths[-1]

    def replace():
        shutil.copy2(victim, victim + ".new")  # same bytes, same times: only the inode differs
        os.replace(victim + ".new", victim)

    code, err = _run_changing_input(source, save, replace)
    line = _check_failed_cleanly(code, err, save, victim)
    assert "inode" in line and "--overwrite" in line


def test_input_rewritten_in_place_while_being_read(source, tmp_path):
    save = tmp_path / "out"
    victim = _weights(source)[-1]

    def rewrite():
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) - 16)
            f.write(b"\x00" * 16)

    code, err = _run_changing_input(source, save, rewrite)
    _check_failed_cleanly(code, err, save, victim)


def _killed_run(source, save):
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir",
                             str(save), *FLAGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = os.path.join(save, ".streamconv", "done")
    t0 = time.time()
    while not (os.path.isdir(done) and any(n.endswith(".json") for n in os.listdir(done))):
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("change", ["touched", "replaced_by_identical_copy"])
def test_resume_refuses_an_input_changed_since_the_interrupted_run(source, tmp_path, change):
    save = tmp_path / "out"
    _killed_run(source, save)
    victim = _weights(source)[0]
    if change == "touched":
        later = time.time() + 10
        os.utime(victim, (later, later))
        what = "modification time"
    else:  # the same bytes and times in a new file: only the inode tells
        shutil.copy2(victim, victim + ".new")
        os.replace(victim + ".new", victim)
        what = "inode"
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(save), *FLAGS, "--resume"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert victim in p.stderr and what in p.stderr and "--overwrite" in p.stderr, p.stderr


def test_input_changed_between_planning_and_reading(source, tmp_path):
    """The stream checks each file's identity when it opens it (in-process: the gap is too short to hit otherwise)."""
    from streamconv import ConvertOptions
    from streamconv.core.errors import InputError
    from streamconv.engine.plan import build_plan
    from streamconv.engine.stream import Streamer

    plan = build_plan(ConvertOptions(load_dir=source, save_dir=str(tmp_path / "out"), num_attention_heads=8))
    victim = _weights(source)[0]
    later = time.time() + 10
    os.utime(victim, (later, later))

    class Sink:
        def begin(self, e): pass
        def write(self, d): pass
        def end(self, e): pass

    s = Streamer(plan.block_bytes, expect=plan.input_identity())
    with pytest.raises(InputError, match="modification time") as e:
        try:
            for g in plan.groups:
                s.run_group(g, {i: Sink() for i in range(len(g.files))})
        finally:
            s.close(cancel=True)
    assert victim in str(e.value)
