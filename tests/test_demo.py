"""scripts/demo.py deletes nothing it did not create.

The demo is offered in the README for "your own checkpoint", so a user's output
path must get exactly the save-directory rules of ``streamconv convert``: a
directory holding someone's files is refused untouched, and so is the folder
holding the input. Only the demo's own output directory may be rewritten, so
that running the README's command twice works.

The demo runs as a subprocess, as a user runs it. For its default paths
(``<repo>/demo/...``) it runs from a copy of ``scripts/`` inside a temporary
directory, so that the real repository's ``demo/`` is never written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import synth
from helpers import REPO, tree

SPEC = synth.ModelSpec(layers=2, hidden=64, ffn=96, heads=4, groups=2, vocab=256)
FLAGS = ["--num-attention-heads", "4", "--num-query-groups", "2", "--quiet"]


def run_demo(args: list, root: str = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, os.path.join(root, "scripts", "demo.py"), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def snapshot(root: str) -> dict:
    """Every file under ``root`` (relative path -> sha256 of its bytes)."""
    return {rel: hashlib.sha256(open(os.path.join(root, rel), "rb").read()).hexdigest() for rel in tree(root)}


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    synth.write_checkpoint(str(d), SPEC)
    return d


def test_user_output_dir_with_foreign_files_is_refused_untouched(ckpt, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("x\n")
    (precious / "sub").mkdir()
    (precious / "sub" / "more.bin").write_bytes(b"\0\1\2")
    before, src = snapshot(str(precious)), snapshot(str(ckpt))
    p = run_demo([str(ckpt), str(precious), *FLAGS])
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    # convert's own one-line refusal, naming the directory
    assert "is not empty and holds no streamconv output" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert str(precious) in p.stderr
    assert "Traceback" not in p.stderr
    assert snapshot(str(precious)) == before
    assert sorted(os.listdir(precious)) == ["notes.txt", "sub"]
    assert snapshot(str(ckpt)) == src


@pytest.mark.parametrize("given", ["dir", "file"])
def test_output_equal_to_the_input_folder_is_refused_and_input_kept(ckpt, tmp_path, given):
    """OUT = the folder holding the input (given as the directory, or as its one file)."""
    (ckpt / "README.txt").write_text("the user's own note beside the checkpoint\n")
    before = snapshot(str(ckpt))
    load = str(ckpt) if given == "dir" else str(ckpt / "model.safetensors")
    assert os.path.isfile(ckpt / "model.safetensors")
    p = run_demo([load, str(ckpt), *FLAGS])
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "is inside --load-dir" in p.stderr, p.stderr
    assert snapshot(str(ckpt)) == before


def test_output_inside_the_input_folder_is_refused(ckpt, tmp_path):
    before = snapshot(str(ckpt))
    p = run_demo([str(ckpt), str(ckpt / "megatron"), *FLAGS])
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "is inside --load-dir" in p.stderr, p.stderr
    assert snapshot(str(ckpt)) == before
    assert not os.path.exists(ckpt / "megatron")


def _repo_copy(tmp_path) -> str:
    """A repository layout with the demo scripts, so that <root>/demo is a temporary directory."""
    root = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "scripts"), root / "scripts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return str(root)


def test_default_demo_runs_twice_and_keeps_foreign_files(tmp_path):
    """The README's command, twice: the second run rewrites the demo's own output and keeps the rest."""
    root = _repo_copy(tmp_path)
    out = os.path.join(root, "demo", "megatron")
    first = run_demo([], root=root)
    assert first.returncode == 0, (first.stdout, first.stderr)
    files = tree(out)
    assert "latest_checkpointed_iteration.txt" in files
    assert sorted(f for f in files if f.endswith(".pt")) == [
        f"iter_0000001/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt" for t in range(2) for p in range(2)]
    ckpt_before = snapshot(os.path.join(root, "demo", "ckpt"))
    with open(os.path.join(out, "my_notes.txt"), "w") as f:
        f.write("kept\n")
    second = run_demo([], root=root)
    assert second.returncode == 0, (second.stdout, second.stderr)
    assert tree(out) == sorted(files + ["my_notes.txt"])
    assert open(os.path.join(out, "my_notes.txt")).read() == "kept\n"
    assert snapshot(os.path.join(root, "demo", "ckpt")) == ckpt_before
    # the README's demo checkpoint is generated once and reused
    assert "generated the demo checkpoint" in first.stdout and "generated the demo checkpoint" not in second.stdout


def test_own_checkpoint_into_the_default_output_twice(ckpt, tmp_path):
    """PATH without OUT writes the demo's own output directory: rerunning works there too."""
    root = _repo_copy(tmp_path)
    for _ in range(2):
        p = run_demo([str(ckpt), *FLAGS], root=root)
        assert p.returncode == 0, (p.stdout, p.stderr)
    assert "latest_checkpointed_iteration.txt" in tree(os.path.join(root, "demo", "megatron"))
