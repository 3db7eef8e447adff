"""Atomic, resumable output: kill -9 at several points, write faults, then --resume.

The reference for "identical" is an uninterrupted run of the same command; the
checks are on the files themselves (bytes), the tracker and leftovers.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

import synth
from helpers import STATED_SETTINGS, file_bytes, kill_when, run_cli, tree

SPEC = synth.ModelSpec(layers=8, hidden=512, ffn=1024, heads=8, groups=4, vocab=4000, files=3)
# the layouts and the args values are stated, so --quiet prints nothing but errors (an assumption would be printed)
FLAGS = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "4",
         "--num-attention-heads", "8", "--saver-transformer-impl", "local", "--quiet", "--max-memory", "400MB",
         "--fc1-layout", "interleaved", "--qkv-layout", "grouped", *STATED_SETTINGS]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    synth.write_checkpoint(str(d), SPEC)
    return str(d)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_cli(["convert", "--load-dir", source, "--save-dir", out, *FLAGS])
    return out


def _input_state(src):
    return {rel: (os.path.getsize(os.path.join(src, rel)), os.path.getmtime(os.path.join(src, rel))) for rel in tree(src)}


def _start(source, save, extra=()):
    return subprocess.Popen([sys.executable, "-m", "streamconv", "convert", "--load-dir", source,
                             "--save-dir", save, *FLAGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _done_records(save):
    """relpath -> completion record of every file the run has committed (its bookkeeping)."""
    d = os.path.join(save, ".streamconv", "done")
    out = {}
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        try:
            rec = json.load(open(os.path.join(d, n)))
            out[rec["file"]] = rec["record"]
        except (OSError, ValueError, KeyError):
            pass
    return out


def _done_count(save):
    return len(_done_records(save)) if os.path.isdir(os.path.join(save, ".streamconv")) else -1


def _any_temp(save):
    for d, _, files in os.walk(save):
        if any(f.endswith(".streamconv-partial") and f.startswith("model_optim_rng") for f in files):
            return True
    return False


@pytest.mark.parametrize("point", ["first_temp_file", "after_first_stage", "after_three_stages"])
def test_kill9_then_resume_gives_identical_output(point, source, reference, tmp_path):
    before = _input_state(source)
    save = str(tmp_path / "out")
    cond = {
        "first_temp_file": lambda: _any_temp(save),
        "after_first_stage": lambda: _done_count(save) >= 2,
        "after_three_stages": lambda: _done_count(save) >= 6,
    }[point]
    proc = _start(source, save)
    assert kill_when(proc, cond), "conversion finished before it could be killed"
    # killed: never looks complete
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
    # the same command without --resume refuses and says what to do
    p = run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS], check=False)
    assert p.returncode == 2 and "--resume" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS, "--resume"])
    assert file_bytes(save) == file_bytes(reference)
    assert _input_state(source) == before


def test_resume_with_different_flags_is_refused(source, tmp_path):
    save = str(tmp_path / "out")
    proc = _start(source, save)
    assert kill_when(proc, lambda: _done_count(save) >= 2)
    other = [f if f != "4" else "2" for f in FLAGS]  # PP 2 instead of 4
    p = run_cli(["convert", "--load-dir", source, "--save-dir", save, *other, "--resume"], check=False)
    assert p.returncode == 2
    assert "target_pipeline_parallel_size" in p.stderr and "--overwrite" in p.stderr


def test_damaged_finished_file_is_redone_on_resume(source, reference, tmp_path):
    save = str(tmp_path / "out")
    proc = _start(source, save)
    assert kill_when(proc, lambda: _done_count(save) >= 2)
    done = _done_records(save)
    victim = os.path.join(save, sorted(done)[0])
    with open(victim, "r+b") as f:  # flip one byte in the middle of the tensor data
        f.seek(os.path.getsize(victim) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    p = run_cli(["convert", "--load-dir", source, "--save-dir", save, *[f for f in FLAGS if f != "--quiet"], "--resume"])
    assert "damaged" in p.stderr or "rewriting" in p.stderr
    assert file_bytes(save) == file_bytes(reference)


def _limit_file_size(nbytes):
    def f():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return f


def test_file_size_limit_fails_cleanly_and_resume_finishes(source, reference, tmp_path):
    save = str(tmp_path / "out")
    limit = 3 * 2**20  # smaller than one rank file of stage 0
    p = subprocess.run([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir", save,
                        *FLAGS], capture_output=True, text=True, preexec_fn=_limit_file_size(limit))
    assert p.returncode == 3, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("streamconv: error:") and "file-size limit" in lines[0]
    assert "--resume" in lines[0] and "Traceback" not in p.stderr
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
    assert not _any_temp(save), "the failed temp file must be removed"
    run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS, "--resume"])
    assert file_bytes(save) == file_bytes(reference)


def test_success_leaves_only_megatron_layout(reference):
    files = tree(reference)
    assert "latest_checkpointed_iteration.txt" in files
    assert all(f == "latest_checkpointed_iteration.txt" or
               (f.startswith("iter_0000001/mp_rank_") and f.endswith("/model_optim_rng.pt")) for f in files), files
    assert len(files) == 1 + 2 * 4


def test_overwrite_keeps_foreign_files(source, reference, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "notes.txt").write_text("mine")
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(save), *FLAGS], check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert tree(str(save)) == ["notes.txt"]
    run_cli(["convert", "--load-dir", source, "--save-dir", str(save), *FLAGS, "--overwrite"])
    assert (save / "notes.txt").read_text() == "mine"
    got = file_bytes(str(save))
    got.pop("notes.txt")
    assert got == file_bytes(reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_130_cleanly_and_resume_finishes(sig, source, reference, tmp_path):
    save = str(tmp_path / "out")
    proc = _start(source, save)
    t0 = time.time()
    while not _any_temp(save):
        assert proc.poll() is None and time.time() - t0 < 120, "no temp file appeared"
        time.sleep(0.002)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [x for x in err.decode().splitlines() if x.strip()]
    assert lines[-1].startswith("streamconv: error: interrupted") and "--resume" in lines[-1]
    assert b"Traceback" not in err
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
    assert not _any_temp(save)
    run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS, "--resume"])
    assert file_bytes(save) == file_bytes(reference)


def test_killed_before_the_first_manifest_resumes(source, reference, tmp_path):
    """A kill while the run record is first being written leaves only its temp file."""
    save = tmp_path / "out"
    (save / ".streamconv" / "done").mkdir(parents=True)
    (save / ".streamconv" / "run.json.streamconv-partial").write_bytes(b'{"streamc')
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(save), *FLAGS], check=False)
    assert p.returncode == 2 and "--resume" in p.stderr
    run_cli(["convert", "--load-dir", source, "--save-dir", str(save), *FLAGS, "--resume"])
    assert file_bytes(str(save)) == file_bytes(reference)


def test_killed_between_tracker_and_manifest_removal(source, reference, tmp_path):
    """Tracker written, manifest not yet removed: rerun asks for --resume, which checks and tidies up."""
    import shutil
    import zipfile

    from streamconv.cli import build_parser, options_from_args
    from streamconv.engine.plan import build_plan

    save = str(tmp_path / "out")
    shutil.copytree(reference, save)
    argv = ["convert", "--load-dir", source, "--save-dir", save, *FLAGS]
    # the fingerprint does not depend on memory; floor=0 keeps this (busy) test process's RSS out of it
    plan = build_plan(options_from_args(build_parser().parse_args(argv)), floor=0)
    book = os.path.join(save, ".streamconv")
    os.makedirs(os.path.join(book, "done"))
    for i, rel in enumerate(tree(save)):
        if rel.endswith(".pt"):
            infos = zipfile.ZipFile(os.path.join(save, rel)).infolist()
            record = {"size": os.path.getsize(os.path.join(save, rel)),
                      "records": [[z.filename, z.file_size, z.CRC] for z in infos]}
            with open(os.path.join(book, "done", f"{i}.json"), "w") as f:
                json.dump({"file": rel, "record": record}, f)
    with open(os.path.join(book, "run.json"), "w") as f:
        json.dump({"streamconv": 2, "fingerprint": plan.fingerprint()}, f, default=str)
    p = run_cli(argv, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr
    p = run_cli([*argv, "--resume", "--json-summary", str(tmp_path / "s.json")])
    s = json.load(open(tmp_path / "s.json"))
    assert s["files_written"] == [] and len(s["files_kept"]) == 8
    assert file_bytes(save) == file_bytes(reference)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 60 MiB tmpfs to fill up (needs root, as on the CI machine); skipped elsewhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60M", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_fails_cleanly_and_resume_finishes(source, reference, small_tmpfs):
    """The disk fills up while the run writes (another process takes the space): exit 3, resumable."""
    save = str(small_tmpfs / "out")
    filler = small_tmpfs / "filler"
    proc = _start(source, save)
    t0 = time.time()
    while not _any_temp(save):  # the free-space check has passed: now someone else fills the disk
        assert proc.poll() is None and time.time() - t0 < 120, "no temp file appeared"
        time.sleep(0.002)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass
    out, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 3, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("streamconv: error:") and "disk is full" in lines[0]
    assert "--resume" in lines[0] and "Traceback" not in err
    assert not os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt"))
    assert not _any_temp(save)
    os.remove(filler)
    run_cli(["convert", "--load-dir", source, "--save-dir", save, *FLAGS, "--resume"])
    assert file_bytes(save) == file_bytes(reference)
