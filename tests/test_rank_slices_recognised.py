"""Per-rank slices are recognised by content, not by file name (issue 8, item 6).

A one-device run's ``rank_0`` holds whole weights and converts; a tensor-parallel
slice renamed to ``model.safetensors`` must not pass for a smaller model when the
run's strategy lies beside it, nor a file MindSpore saved with
``remove_redundancy: True`` (a replicated weight kept by another rank is missing
from it). Each refusal is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

from helpers import FIXTURES_ROOT, run_cli

DIST = os.path.join(FIXTURES_ROOT, "mindspore_dist", "tp4", "output")
MOE = os.path.join(FIXTURES_ROOT, "mindformers_moe", "qwen3_moe")


def _rank0_file() -> str:
    d = os.path.join(DIST, "checkpoint", "rank_0")
    return os.path.join(d, next(n for n in os.listdir(d) if n.endswith(".safetensors")))


def _refused(argv, where, *words):
    p = run_cli(["plan", *argv], check=False)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("streamconv: error: "), p.stderr
    assert all(w in lines[0] for w in (where, *words)), lines[0]
    return lines[0]


def test_slice_renamed_beside_its_strategy_is_refused(tmp_path):
    d = tmp_path / "ckpt"
    (d / "strategy").mkdir(parents=True)
    shutil.copy(_rank0_file(), d / "model.safetensors")
    for n in os.listdir(os.path.join(DIST, "strategy")):
        shutil.copy(os.path.join(DIST, "strategy", n), d / "strategy" / n)
    for load in (str(d), str(d / "model.safetensors")):
        _refused(["--load-dir", load, "--save-dir", str(tmp_path / "out"), "--num-attention-heads", "4"],
                 load, "parallel strategy", "slices", "rank_N")
    assert not (tmp_path / "out").exists()


def test_remove_redundancy_save_alone_is_refused(tmp_path):
    """The same bytes with MindSpore's de-duplication flag set in the header metadata."""
    src = open(_rank0_file(), "rb").read()
    n = struct.unpack("<Q", src[:8])[0]
    header = json.loads(src[8:8 + n])
    header["__metadata__"]["remove_redundancy"] = "True"
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data offsets are relative to the data section: any header length works
    out = tmp_path / "model.safetensors"
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + src[8 + n:])
    _refused(["--load-dir", str(out), "--save-dir", str(tmp_path / "o"), "--num-attention-heads", "4"],
             str(out), "remove_redundancy", "rank_N")


def test_a_one_device_run_rank_0_converts(tmp_path):
    """mindformers' single-device output: rank_0/<name>_rank_0-1_1.safetensors with whole weights."""
    p = run_cli(["plan", "--load-dir", os.path.join(MOE, "legacy_ckpt", "rank_0"), "--save-dir",
                 str(tmp_path / "o"), "--model-config", os.path.join(MOE, "hf", "config.json")], check=False)
    assert p.returncode == 0, p.stderr
    assert "4 experts" in p.stdout


def test_slice_renamed_beside_the_models_config_json_is_refused(tmp_path):
    """No strategy, no metadata: the model's config.json beside it says 4 heads, the slice holds one head's columns."""
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(_rank0_file(), d / "model.safetensors")
    cfg = dict(json.load(open(os.path.join(os.path.dirname(DIST), "DIST_MANIFEST.json")))["model_config"])
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", rope_theta=1000000)
    json.dump(cfg, open(d / "config.json", "w"))
    _refused(["--load-dir", str(d), "--save-dir", str(tmp_path / "o")],
             "config.json num_attention_heads 4", "contradicts the checkpoint", "head count of 1")
    assert not (tmp_path / "o").exists()
