"""``streamconv verify`` finds flipped bytes, missing and extra files, wrong layouts and args."""

from __future__ import annotations

import os
import shutil

import pytest

import synth
from helpers import run_cli
from streamconv.formats.torch.reader import RankFileReader

SPEC = synth.ModelSpec(layers=4, hidden=128, ffn=256, heads=8, groups=4, vocab=500, bias=True)
FLAGS = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
         "--num-attention-heads", "8", "--true-vocab-size", "500", "--quiet"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("src"))
    synth.write_checkpoint(src, SPEC)
    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_cli(["convert", "--load-dir", src, "--save-dir", out, *FLAGS, "--verify"])
    return src, out


def _copy(out, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(out, dst)
    return dst


def _verify_fails(src, dst) -> str:
    """Run verify on a damaged copy; it must exit 1. Returns its report."""
    p = run_cli(["verify", "--load-dir", src, "--save-dir", dst], check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    return p.stdout


def test_clean_output_verifies(converted):
    src, out = converted
    p = run_cli(["verify", "--load-dir", src, "--save-dir", out])
    assert "OK" in p.stdout


def test_flipped_byte_is_reported_by_file_and_key(converted, tmp_path):
    src, out = converted
    dst = _copy(out, tmp_path)
    rel = "iter_0000001/mp_rank_01_001/model_optim_rng.pt"
    path = os.path.join(dst, rel)
    r = RankFileReader(path)
    key = "decoder.layers.1.mlp.linear_fc2.weight"
    t = r.state["model"][key]
    off, size, _ = r.record(t.storage.key)
    with open(path, "r+b") as f:
        f.seek(off + 1000)
        b = f.read(1)
        f.seek(off + 1000)
        f.write(bytes([b[0] ^ 0x01]))
    report = _verify_fails(src, dst)
    mism = [line for line in report.splitlines() if line.startswith("MISMATCH")]
    assert len(mism) == 1 and rel in mism[0] and key in mism[0] and "element 500" in mism[0], report


def test_missing_rank_file_and_tracker(converted, tmp_path):
    src, out = converted
    dst = _copy(out, tmp_path)
    rel = "iter_0000001/mp_rank_00_000/model_optim_rng.pt"
    os.remove(os.path.join(dst, rel))
    os.remove(os.path.join(dst, "latest_checkpointed_iteration.txt"))
    report = _verify_fails(src, dst)
    assert f"MISMATCH {rel}: missing" in report
    assert "latest_checkpointed_iteration.txt: missing" in report


def test_truncated_rank_file(converted, tmp_path):
    src, out = converted
    dst = _copy(out, tmp_path)
    rel = "iter_0000001/mp_rank_00_001/model_optim_rng.pt"
    path = os.path.join(dst, rel)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    report = _verify_fails(src, dst)
    assert rel in report and "unreadable" in report


def test_wrong_layout_flag_is_detected(converted):
    src, out = converted
    p = run_cli(["verify", "--load-dir", src, "--save-dir", out, "--fc1-layout", "concat"], check=False)
    assert p.returncode == 1 and "linear_fc1.weight" in p.stdout


def test_leftover_and_unexpected_files(converted, tmp_path):
    src, out = converted
    dst = _copy(out, tmp_path)
    os.makedirs(os.path.join(dst, "iter_0000001", "mp_rank_02_000"))
    shutil.copy(os.path.join(dst, "iter_0000001/mp_rank_00_000/model_optim_rng.pt"),
                os.path.join(dst, "iter_0000001/mp_rank_02_000/model_optim_rng.pt"))
    open(os.path.join(dst, "iter_0000001/mp_rank_00_000/model_optim_rng.pt.streamconv-partial"), "wb").close()
    report = _verify_fails(src, dst)
    assert "mp_rank_02_000/model_optim_rng.pt: rank file not expected" in report
    assert "leftover temporary file" in report
