"""What a run does with a save directory that is not empty (issue 8, items 2, 3, 4, 15).

* ``--overwrite`` over an earlier conversion of another TP/PP removes that
  conversion's rank files (recognised by content) and keeps everything else;
  ``convert --verify`` then passes, and when it does not, it lists every problem
  and exits 1.
* The same command twice: the second run finds the complete conversion and does
  nothing (exit 0); anything that differs (flags, a damaged byte, a newer input,
  a missing file) is refused naming ``--overwrite``.
* Free space is checked before writing (``--resume`` counts only what is left).
* ``plan`` says what ``convert`` would do with the directory.

Expectations are independent of streamconv: file trees, bytes, mtimes and inodes
read here; rank files made by real ``torch.save``; sizes from ``statvfs``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import OrderedDict

import pytest
import torch

import synth
from helpers import STATED_SETTINGS, contents, run_cli, tree

SPEC = synth.ModelSpec(layers=4, hidden=128, ffn=256, heads=8, groups=4, vocab=512)
BASE = ["--num-attention-heads", "8", "--fc1-layout", "interleaved", "--qkv-layout", "grouped", *STATED_SETTINGS,
        "--quiet"]
TP2 = [*BASE, "--target-tensor-parallel-size", "2"]
PP2 = [*BASE, "--target-pipeline-parallel-size", "2"]
TRACKER = "latest_checkpointed_iteration.txt"
NOTHING = "already holds a complete conversion of this input (verified by size/CRC); nothing to do"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("src"))
    synth.write_checkpoint(d, SPEC)
    return d


def convert(source, save, flags, *extra, check=True):
    return run_cli(["convert", "--load-dir", source, "--save-dir", str(save), *flags, *extra], check=check)


def state(root) -> dict:
    """relpath -> (bytes, mtime_ns, inode): what must not change when nothing is to be done."""
    out = {}
    for rel in tree(str(root)):
        p = os.path.join(root, rel)
        st = os.stat(p)
        out[rel] = (open(p, "rb").read(), st.st_mtime_ns, st.st_ino)
    return out


def one_error_line(p) -> str:
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("streamconv: error:"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    return lines[0]


def records(done) -> list:
    """Completion records written so far (a record being written is still a temp file)."""
    return [n for n in os.listdir(done) if n.endswith(".json")] if os.path.isdir(done) else []


def pp2_layout():
    return sorted([TRACKER, "iter_0000001/mp_rank_00_000/model_optim_rng.pt",
                   "iter_0000001/mp_rank_00_001/model_optim_rng.pt"])


# --------------------------------------------------------------------------- item 2: --overwrite


def test_overwrite_over_another_layout_removes_its_rank_files_and_verifies(source, tmp_path):
    save = tmp_path / "out"
    convert(source, save, TP2)
    assert "iter_0000001/mp_rank_01/model_optim_rng.pt" in tree(str(save))
    p = convert(source, save, PP2, "--overwrite", "--verify")  # --quiet: what was deleted is said all the same
    assert tree(str(save)) == pp2_layout()
    said = p.stdout + p.stderr
    assert "iter_0000001/mp_rank_00/model_optim_rng.pt" in said and "iter_0000001/mp_rank_01/model_optim_rng.pt" in said
    assert "removed" in said
    # the result is what a conversion into an empty directory gives
    fresh = tmp_path / "fresh"
    convert(source, fresh, PP2)
    assert {k: v[0] for k, v in state(save).items()} == {k: v[0] for k, v in state(fresh).items()}


def _torch_rank_file(path, with_optimizer: bool):
    """A rank file written by real torch.save: a converted model, or a training checkpoint."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sd = {"args": argparse.Namespace(tensor_model_parallel_size=4), "checkpoint_version": 3.0, "iteration": 1,
          "model": OrderedDict(w=torch.zeros(2, 2, dtype=torch.bfloat16))}
    if with_optimizer:
        sd["optimizer"] = {"state": {}}
        sd["iteration"] = 500
    torch.save(sd, path)


def test_overwrite_keeps_what_it_cannot_recognise_and_verify_lists_every_problem(source, tmp_path):
    save = tmp_path / "out"
    convert(source, save, TP2)
    it = save / "iter_0000001"
    # a converted-model rank file written by torch.save itself: recognised, removed
    _torch_rank_file(str(it / "mp_rank_03" / "model_optim_rng.pt"), with_optimizer=False)
    # a training checkpoint and a file that is not torch at all, both named like rank files: kept
    _torch_rank_file(str(it / "mp_rank_04" / "model_optim_rng.pt"), with_optimizer=True)
    os.makedirs(it / "mp_rank_05")
    (it / "mp_rank_05" / "model_optim_rng.pt").write_bytes(b"not a zip at all")
    (save / "notes.txt").write_text("mine")
    (it / "README.md").write_text("hands off")
    kept = {rel: contents(save / rel) for rel in
            ["notes.txt", "iter_0000001/README.md", "iter_0000001/mp_rank_04/model_optim_rng.pt",
             "iter_0000001/mp_rank_05/model_optim_rng.pt"]}
    p = convert(source, save, PP2, "--overwrite", "--verify", check=False)
    assert p.returncode == 1, p.stdout + p.stderr  # verify found the two kept look-alikes: exit 1 as documented
    removed = [x for x in p.stderr.splitlines() if x.startswith("streamconv: --overwrite: removed")]
    assert any("mp_rank_03" in x for x in removed) and not any("mp_rank_04" in x or "mp_rank_05" in x for x in removed)
    rest = [x for x in p.stderr.splitlines() if x.strip() and x not in removed]  # --quiet: only the verdict besides
    assert len(rest) == 1 and rest[0].startswith("streamconv: error:") and "Traceback" not in p.stderr, p.stderr
    line = rest[0]
    assert "2 problems" in line and "bug" not in line
    mism = [x for x in p.stdout.splitlines() if x.startswith("MISMATCH")]
    assert len(mism) == 2 and any("mp_rank_04" in m for m in mism) and any("mp_rank_05" in m for m in mism), p.stdout
    for rel, data in kept.items():
        assert contents(save / rel) == data, f"--overwrite changed or deleted {rel}"
    assert sorted(tree(str(save))) == sorted(pp2_layout() + list(kept))


def test_overwrite_of_a_partial_run_of_another_layout(source, tmp_path):
    """An interrupted TP2 run (bookkeeping, one finished file) overwritten by PP2: no TP2 file survives."""
    save = tmp_path / "out"
    convert(source, save, TP2)
    os.remove(save / TRACKER)
    book = save / ".streamconv"
    (book / "done").mkdir(parents=True)
    (book / "run.json").write_text(json.dumps({"streamconv": 2, "fingerprint": {"options": {}, "input": []}}))
    convert(source, save, PP2, "--overwrite")
    assert tree(str(save)) == pp2_layout()


# --------------------------------------------------------------------------- item 3: the same command twice


def test_same_command_twice_does_nothing(source, tmp_path):
    save = tmp_path / "out"
    convert(source, save, PP2)
    before = state(save)
    summary = tmp_path / "s.json"
    p = convert(source, save, [f for f in PP2 if f != "--quiet"], "--json-summary", str(summary))
    assert p.returncode == 0 and NOTHING in p.stdout, p.stdout + p.stderr
    assert state(save) == before  # same bytes, same mtimes, same inodes: nothing rewritten
    s = json.load(open(summary))
    assert s["files_written"] == [] and sorted(s["files_kept"]) == [r for r in pp2_layout() if r != TRACKER]
    # --resume on a finished directory is the same answer, and --verify still verifies
    p = convert(source, save, [f for f in PP2 if f != "--quiet"], "--resume", "--verify")
    assert NOTHING in p.stdout and re.search(r"verify: .*: OK", p.stdout), p.stdout
    assert state(save) == before


def _flip_tensor_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("change", ["other_flags", "flipped_byte", "missing_file", "input_newer", "old_tracker"])
def test_not_the_same_conversion_is_refused_naming_overwrite(source, tmp_path, change):
    save = tmp_path / "out"
    src = source
    if change == "input_newer":
        src = str(tmp_path / "src")
        shutil.copytree(source, src)
    convert(src, save, PP2)
    flags = PP2
    if change == "other_flags":
        flags = TP2
    elif change == "flipped_byte":
        _flip_tensor_byte(save / "iter_0000001/mp_rank_00_001/model_optim_rng.pt")
    elif change == "missing_file":
        os.remove(save / "iter_0000001/mp_rank_00_001/model_optim_rng.pt")
    elif change == "input_newer":
        for rel in tree(src):  # the same bytes, written again after the output
            path = os.path.join(src, rel)
            later = time.time() + 5
            os.utime(path, (later, later))
    elif change == "old_tracker":
        (save / TRACKER).write_text("7")
    before = state(save)
    p = convert(src, save, flags, check=False)
    assert p.returncode == 2
    line = one_error_line(p)
    assert "--overwrite" in line and "nothing to do" not in line
    assert state(save) == before
    p = convert(src, save, flags, "--resume", check=False)
    assert p.returncode == 2 and "--overwrite" in one_error_line(p)


# --------------------------------------------------------------------------- item 4: free space


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (needs root, as on the CI machine); skipped elsewhere."""
    mounted = []

    def make(size: str):
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if p.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (not root?)")
        mounted.append(mnt)
        return mnt

    yield make
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def _planned_bytes(source, flags) -> int:
    p = run_cli(["plan", "--load-dir", source, "--save-dir", "/nonexistent/x", *flags])
    return sum(int(m) for m in re.findall(r"model_optim_rng\.pt\s+(\d+) bytes", p.stdout))


def _sizes_in(line: str) -> list:
    return re.findall(r"\d+(?:\.\d+)? (?:B|KiB|MiB|GiB)", line)


def test_not_enough_free_space_is_refused_before_writing(source, tmpfs):
    need = _planned_bytes(source, PP2)
    mnt = tmpfs(f"{max(need // 2, 64 * 1024)}")
    save = mnt / "out"
    p = convert(source, save, PP2, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    line = one_error_line(p)
    assert str(save) in line and "free" in line and len(_sizes_in(line)) >= 2, line
    assert not os.path.exists(save), "nothing may be written before the refusal"
    plan = run_cli(["plan", "--load-dir", source, "--save-dir", str(save), *PP2]).stdout
    assert "NOT enough" in plan


#: output of ~60 MiB, large against streamconv's 16 MiB free-space margin
LARGER = synth.ModelSpec(layers=4, hidden=768, ffn=2048, heads=12, groups=4, vocab=4096, dtype="BF16")


def test_resume_needs_space_only_for_what_is_left(tmpfs, tmp_path):
    """Space for the unfinished files only: --resume goes ahead where a fresh start would not fit."""
    source = str(tmp_path / "src")
    synth.write_checkpoint(source, LARGER)
    flags = ["--num-attention-heads", "12", "--fc1-layout", "interleaved", "--qkv-layout", "grouped", "--quiet",
             "--target-pipeline-parallel-size", "4"]
    total = _planned_bytes(source, flags)
    mnt = tmpfs("200M")
    save = mnt / "out"
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir",
                             str(save), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = save / ".streamconv" / "done"
    t0 = time.time()
    while len(records(done)) < 2:
        assert proc.poll() is None and time.time() - t0 < 120, "the run ended before two files were finished"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = 0
    for n in records(done):
        finished += os.path.getsize(save / json.load(open(done / n))["file"])
    for d, _, names in os.walk(save):  # what a killed run leaves half-written goes first
        for n in names:
            if n.endswith(".streamconv-partial"):
                os.remove(os.path.join(d, n))
    left = total - finished
    used = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(mnt) for n in ns)
    # room for what is left (+ streamconv's margin), not for the whole output
    size = used + left + 24 * 2**20
    assert size < used + total, "the test needs a size where the whole output would not fit"
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)
    p = convert(source, mnt / "other", flags, check=False)  # the whole output: does not fit
    assert p.returncode == 2 and "free" in one_error_line(p)
    p = convert(source, save, flags, check=False)
    assert p.returncode == 2 and "--resume" in one_error_line(p)
    p = convert(source, save, flags, "--resume", check=False)
    assert p.returncode == 0, p.stderr
    fresh = tmp_path / "fresh"
    convert(source, fresh, flags)
    assert {k: v[0] for k, v in state(save).items()} == {k: v[0] for k, v in state(fresh).items()}


# --------------------------------------------------------------------------- item 15: plan and the save dir


def _plan_save_lines(source, save, flags) -> str:
    p = run_cli(["plan", "--load-dir", source, "--save-dir", str(save), *flags])
    return "\n".join(x for x in p.stdout.splitlines() if x.startswith("save dir"))


def test_plan_says_what_convert_would_do(source, tmp_path):
    empty = tmp_path / "empty"
    said = _plan_save_lines(source, empty, PP2)
    assert "empty" in said and "convert writes 2 files" in said and "enough" in said
    assert not os.path.exists(empty)

    done = tmp_path / "done"
    convert(source, done, PP2)
    assert "nothing to do" in _plan_save_lines(source, done, PP2)
    said = _plan_save_lines(source, done, TP2)
    assert "would refuse" in said and "--overwrite" in said
    said = _plan_save_lines(source, done, [*TP2, "--overwrite"])
    assert "removing 2 files" in said and "mp_rank_00_000" in said and "mp_rank_00_001" in said

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    said = _plan_save_lines(source, foreign, PP2)
    assert "would refuse" in said and "not empty" in said


def test_plan_on_an_interrupted_run_says_how_many_files_resume_keeps(source, tmp_path):
    flags = [*BASE, "--target-pipeline-parallel-size", "4"]
    save = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir",
                             str(save), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = save / ".streamconv" / "done"
    t0 = time.time()
    while len(records(done)) < 2:
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = len(records(done))
    said = _plan_save_lines(source, save, flags)
    assert "would refuse" in said and f"--resume would keep {k} of 4 files" in said
    said = _plan_save_lines(source, save, [*flags, "--resume"])
    assert f"keeps {k} of 4 files and writes {4 - k}" in said


def test_another_checkpoint_with_the_same_names_and_sizes_is_not_this_conversion(tmp_path):
    """A fine-tune of the same model (same file names, sizes, flags) converted earlier is not 'nothing to do'."""
    base = str(tmp_path / "base")
    tuned = str(tmp_path / "tuned")
    synth.write_checkpoint(base, SPEC)
    synth.write_checkpoint(tuned, synth.ModelSpec(**{**SPEC.__dict__, "seed": SPEC.seed + 1}))
    assert tree(base) == tree(tuned)
    assert all(os.path.getsize(os.path.join(base, r)) == os.path.getsize(os.path.join(tuned, r)) for r in tree(base))
    save = tmp_path / "out"
    convert(tuned, save, PP2)
    old = time.time() - 3600  # the tuned checkpoint's files are older than the output: time cannot tell
    for r in tree(tuned):
        os.utime(os.path.join(tuned, r), (old, old))
    for r in tree(base):
        os.utime(os.path.join(base, r), (old, old))
    before = state(save)
    p = convert(base, save, PP2, check=False)  # the base model into the same directory
    assert p.returncode == 2 and "--overwrite" in one_error_line(p), p.stdout + p.stderr
    assert state(save) == before


# --------------------------------------------------------------------------- torch_dist output (items 2, 3)

DIST = ["--ckpt-format", "torch_dist"]
DIST_FILES = ["iter_0000001/.metadata", "iter_0000001/common.pt", "iter_0000001/metadata.json"]


def dist_layout(tp: int) -> list:
    """A dense model's torch_dist files at TP ``tp``, PP 1: one data file per TP rank (Megatron's names)."""
    return sorted([TRACKER, *DIST_FILES, *[f"iter_0000001/__{r}_0.distcp" for r in range(tp)]])


def test_torch_dist_same_command_twice_does_nothing(source, tmp_path):
    save = tmp_path / "out"
    convert(source, save, [*TP2, *DIST])
    assert tree(str(save)) == dist_layout(2)
    before = state(save)
    p = convert(source, save, [f for f in TP2 if f != "--quiet"] + DIST)
    assert p.returncode == 0 and NOTHING in p.stdout, p.stdout + p.stderr
    assert state(save) == before
    # a flipped byte inside a data file is another file: refused, nothing touched
    _flip_tensor_byte(save / "iter_0000001/__1_0.distcp")
    before = state(save)
    p = convert(source, save, [*TP2, *DIST], check=False)
    assert p.returncode == 2 and "--overwrite" in one_error_line(p)
    assert state(save) == before


def test_overwrite_torch_dist_with_torch_removes_every_torch_dist_file(source, tmp_path):
    save = tmp_path / "out"
    convert(source, save, [*TP2, *DIST])
    p = convert(source, save, PP2, "--overwrite", "--verify")  # --quiet: what was deleted is said all the same
    assert tree(str(save)) == pp2_layout()
    said = p.stdout + p.stderr
    assert "removed" in said and "__0_0.distcp" in said
    fresh = tmp_path / "fresh"
    convert(source, fresh, PP2)
    assert {k: v[0] for k, v in state(save).items()} == {k: v[0] for k, v in state(fresh).items()}


@pytest.mark.parametrize("old", ["torch_tp2", "torch_dist_tp2"])
def test_overwrite_into_torch_dist_leaves_only_the_new_checkpoint(source, tmp_path, old):
    save = tmp_path / "out"
    convert(source, save, [*TP2, *DIST] if old == "torch_dist_tp2" else TP2)
    convert(source, save, [*BASE, *DIST], "--overwrite", "--verify")
    assert tree(str(save)) == dist_layout(1)  # TP 1: __1_0.distcp (or the legacy rank dirs) removed
    fresh = tmp_path / "fresh"
    convert(source, fresh, [*BASE, *DIST])
    assert {k: v[0] for k, v in state(save).items()} == {k: v[0] for k, v in state(fresh).items()}


def test_overwrite_keeps_a_torch_dist_training_checkpoint(source, tmp_path):
    """A torch_dist checkpoint written by stock torch DCP with optimizer state is not a converted one: kept."""
    import torch.distributed.checkpoint as dcp

    save = tmp_path / "out"
    it = save / "iter_0000001"
    state_dict = {"decoder.layers.self_attention.linear_proj.weight": torch.zeros(4, 8, 8, dtype=torch.bfloat16),
                  "optimizer.state.exp_avg.decoder.layers.self_attention.linear_proj.weight": torch.zeros(4, 8, 8)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process": it is
        dcp.save(state_dict, checkpoint_id=str(it))
    torch.save({"args": argparse.Namespace(tensor_model_parallel_size=1), "checkpoint_version": 3.0,
                "iteration": 500, "optimizer": {"param_groups": []}}, str(it / "common.pt"))
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                   "common_backend": "torch", "common_backend_version": 1}))
    kept = {rel: contents(save / rel) for rel in tree(str(save))}
    assert sorted(kept) == sorted(["iter_0000001/__0_0.distcp", *DIST_FILES])
    p = convert(source, save, [f for f in PP2 if f != "--quiet"], "--overwrite")
    assert "keeps" in p.stdout + p.stderr and "__0_0.distcp" in p.stdout + p.stderr
    for rel, data in kept.items():
        assert contents(save / rel) == data, f"--overwrite changed or deleted {rel}"
    assert sorted(tree(str(save))) == sorted(pp2_layout() + list(kept))
