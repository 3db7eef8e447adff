"""What the user is told (issue 8, items 7, 9, 13, 14, 16).

* a MindSpore ``.ckpt`` (protobuf) input is named as such, with the conversion to run first;
* ``convert --verify`` says in one line what was compared and the verdict;
* ``--quiet`` hides progress and chatter, never an assumed layout;
* off a terminal, progress is plain lines, not carriage-return redraws;
* the cosmetics: singular/plural, no "0.00 GB/s", sizes in readable units, help text.

The ``.ckpt`` files are built with the ``protobuf`` runtime from MindSpore's
``checkpoint.proto`` schema (declared here), not by streamconv.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest

import synth
from helpers import REPO, STATED_SETTINGS, contents, run_cli

SPEC = synth.ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=2, vocab=256)
HEADS = ["--num-attention-heads", "4"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("src"))
    synth.write_checkpoint(d, SPEC)
    return d


def _one_error(p) -> str:
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("streamconv: error:"), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


# --------------------------------------------------------------------------- item 7: MindSpore .ckpt


def _checkpoint_class():
    """MindSpore's checkpoint.proto (proto2), as message classes of the protobuf runtime."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fp = descriptor_pb2.FileDescriptorProto(name="ms_checkpoint_test.proto", package="mstest", syntax="proto2")
    tp = fp.message_type.add(name="TensorProto")
    tp.field.add(name="dims", number=1, label=F.LABEL_REPEATED, type=F.TYPE_INT64)
    tp.field.add(name="tensor_type", number=2, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    tp.field.add(name="tensor_content", number=3, label=F.LABEL_REQUIRED, type=F.TYPE_BYTES)
    ck = fp.message_type.add(name="Checkpoint")
    val = ck.nested_type.add(name="Value")
    val.field.add(name="tag", number=1, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    val.field.add(name="tensor", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=".mstest.TensorProto")
    ck.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE,
                 type_name=".mstest.Checkpoint.Value")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mstest.Checkpoint"))


def _write_ckpt(path, tensors: dict) -> None:
    msg = _checkpoint_class()()
    for name, arr in tensors.items():
        v = msg.value.add()
        v.tag = name
        v.tensor.dims.extend(arr.shape)
        v.tensor.tensor_type = "Float32"
        v.tensor.tensor_content = arr.astype(np.float32).tobytes()
    with open(path, "wb") as f:
        f.write(msg.SerializeToString())


TENSORS = {"model.tok_embeddings.embedding_weight": np.ones((16, 8)),
           "model.layers.0.attention.wq.weight": np.ones((8, 8)), "model.norm_out.weight": np.ones(8)}


@pytest.mark.parametrize("how", ["file", "directory", "named-safetensors"])
def test_mindspore_ckpt_is_named_with_the_conversion_to_run(tmp_path, how):
    d = tmp_path / "ckpt"
    d.mkdir()
    name = "model.safetensors" if how == "named-safetensors" else "qwen_rank_0-1_1.ckpt"
    _write_ckpt(str(d / name), TENSORS)
    load = d if how == "directory" else d / name
    p = run_cli(["convert", "--load-dir", str(load), "--save-dir", str(tmp_path / "out"), *HEADS], check=False)
    line = _one_error(p)
    assert ".ckpt" in line and "ckpt_to_safetensors" in line and "truncated" not in line, line
    assert str(d if how == "directory" else d / name) in line
    assert not os.path.exists(tmp_path / "out")


def test_a_truncated_safetensors_file_is_still_called_truncated(tmp_path):
    d = tmp_path / "in"
    synth.write_checkpoint(str(d), SPEC)
    f = d / "model.safetensors"
    os.truncate(f, os.path.getsize(f) // 3)
    p = run_cli(["convert", "--load-dir", str(d), "--save-dir", str(tmp_path / "out"), *HEADS], check=False)
    line = _one_error(p)
    assert "truncated" in line and ".ckpt" not in line


# --------------------------------------------------------------------------- item 9: --verify says so


def test_convert_verify_prints_one_line_with_what_was_compared(source, tmp_path):
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(tmp_path / "out"), *HEADS,
                 "--target-tensor-parallel-size", "2", "--verify"])
    lines = [x for x in p.stdout.splitlines() if x.startswith("streamconv: verify")]
    assert len(lines) == 1, p.stdout
    assert "2 rank files" in lines[0] and "tensors" in lines[0] and "compared" in lines[0]
    assert lines[0].rstrip().endswith(": OK")


# --------------------------------------------------------------------------- item 13: --quiet keeps assumptions


def test_quiet_still_states_assumed_layouts(source, tmp_path):
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(tmp_path / "a"), *HEADS, "--quiet"])
    assumed = [x for x in p.stderr.splitlines() if "ASSUMED" in x]
    # the two layouts, and the values Megatron takes from args that neither the weights nor a model config
    # gave (main's model/settings.py): rope base, sequence length, positions, and Megatron's own defaults
    assert any("fc1 layout" in x for x in assumed) and any("qkv layout" in x for x in assumed)
    for name in ("rotary_base=10000", "seq_length=2048", "max_position_embeddings=2048", "norm_epsilon"):
        assert sum(name in x for x in assumed) == 1, (name, p.stderr)
    assert len(assumed) == 6, p.stderr
    assert all(x.startswith("streamconv: ASSUMED") for x in p.stderr.splitlines() if x.strip()), p.stderr
    assert p.stdout == ""
    # a value given with its flag is no longer an assumption: only what is still assumed is printed
    stated = ["--fc1-layout", "interleaved", "--qkv-layout", "grouped",
              *[f for f in STATED_SETTINGS if f not in ("--norm-epsilon", "1e-5")]]
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(tmp_path / "b"), *HEADS, "--quiet", *stated])
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamconv: ASSUMED") and "norm_epsilon" in lines[0], p.stderr
    assert p.stdout == ""
    # and the stated values give the same bytes as the assumed ones
    for rel in ("iter_0000001/mp_rank_00/model_optim_rng.pt",):
        assert contents(tmp_path / "a" / rel) == contents(tmp_path / "b" / rel), rel
    # nothing assumed at all: --quiet is silent
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(tmp_path / "c"), *HEADS, "--quiet",
                 "--fc1-layout", "interleaved", "--qkv-layout", "grouped", *STATED_SETTINGS])
    assert p.stderr == "" and p.stdout == ""


# --------------------------------------------------------------------------- item 14: progress off a terminal


def test_progress_off_a_terminal_is_plain_lines(source, tmp_path):
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(tmp_path / "out"), *HEADS,
                 "--target-pipeline-parallel-size", "2"])
    assert "\r" not in p.stderr and "\x1b" not in p.stderr
    assert re.search(r"^streamconv: stage 0: writing 1 file", p.stderr, re.M)
    assert re.search(r"^streamconv: stage 1: writing 1 file", p.stderr, re.M)
    pct = [int(m) for m in re.findall(r"^streamconv: (\d+)% ", p.stderr, re.M)]
    assert pct and pct == sorted(pct) and pct[-1] == 100 and len(pct) <= 11, p.stderr


def test_progress_on_a_terminal_is_a_bar(source, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a width
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "streamconv", "convert", "--load-dir", source, "--save-dir",
                        str(tmp_path / "out"), *HEADS], stderr=slave, stdout=subprocess.PIPE, env=env, timeout=300)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0 and "\r" in err and "%|" in err, err


# --------------------------------------------------------------------------- item 16: cosmetics


def test_summary_wording_on_a_tiny_run(source, tmp_path):
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(tmp_path / "out"), *HEADS, "--verify"])
    assert "wrote 1 rank file " in p.stdout and "rank files" not in p.stdout.split("verify")[0], p.stdout
    assert "0.00 GB/s" not in p.stdout and "0.0 MiB" not in p.stdout
    assert re.search(r"\(\d+(\.\d+)? (KiB|MiB)\) compared", p.stdout), p.stdout
    v = run_cli(["verify", "--load-dir", source, "--save-dir", str(tmp_path / "out")])
    assert "0.0 MiB" not in v.stdout and "1 rank file " in v.stdout and ": OK" in v.stdout


def test_position_embedding_choices_match_what_is_accepted(source, tmp_path):
    h = run_cli(["convert", "--help"]).stdout
    assert "{rope,none}" in h and "{rope,none,learned_absolute}" not in h
    p = run_cli(["convert", "--load-dir", source, "--save-dir", str(tmp_path / "out"), *HEADS,
                 "--position-embedding-type", "learned_absolute"], check=False)
    line = _one_error(p)
    assert "--position-embedding-type" in line and "rope" in line
    run_cli(["convert", "--load-dir", source, "--save-dir", str(tmp_path / "out"), *HEADS,
             "--position-embedding-type", "none", "--quiet"])


def test_plan_help_offers_no_convert_only_flags():
    h = run_cli(["plan", "--help"]).stdout
    options = set(re.findall(r"^\s+(--[a-z-]+)", h, re.M))
    assert not options & {"--overwrite", "--resume", "--verify", "--quiet", "--json-summary"}, options
    assert "--save-dir" in options and "--max-memory" in options


def test_every_flag_has_help_text():
    sys.path.insert(0, REPO)
    from streamconv.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.option_strings[0]) for name, sp in sub.choices.items() for a in sp._actions
               if a.option_strings and not a.help]
    assert not missing, missing
