"""Issue 11: per-rank MindSpore training output converts with no merge step, byte for byte as its merge.

The expectation is never streamconv's own reading of the rank files:

* each fixture case ships ``expected/``, MindSpore 2.10's own merge
  (``unified_safetensors``) of its rank files: converting the per-rank output
  must give exactly the files that converting ``expected/`` with the same flags
  gives, for every output format streamconv writes (``formats.FORMATS``);
* variants built from the real rank files with the ``safetensors`` library
  (remove_redundancy, BF16, a parameter owned by two stages) are compared with
  the same merge (cast to BF16 by torch for the BF16 variants);
* ``scripts/synth_dist.py`` cuts the synthetic model of ``scripts/synth.py`` into
  TP slices: converting them under a small ``--max-memory`` (blocks that end
  inside slices, blocks that span several) must give the files the whole model
  gives, with the peak RSS the kernel reports within the budget;
* :class:`CompositeTensor` reads of N-D boxes are compared with numpy slicing of
  the full array the slices were cut from;
* refusals run through the CLI with the checks of ``tests/test_refusals.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest
import torch
from helpers import FIXTURES_ROOT, run_cli, tree
from safetensors.torch import save_file
from test_msdist import (build_shared_embedding, build_variant, copy_tree, edit_json_strategy, expected_weights,
                         rank_file, rewrite_rank_file)
from test_refusals import refuse, ws  # noqa: F401 - ws is a fixture

import synth
import synth_dist
from streamconv import ConvertOptions, build_plan, convert
from streamconv.engine import memory
from streamconv.formats import FORMATS
from streamconv.sources.header import read_header
from streamconv.sources.mapped import SourceFiles
from streamconv.sources.msdist.composite import CompositeTensor, Slice

DIST = os.path.join(FIXTURES_ROOT, "mindspore_dist")
CASES = ["tp4", "tp2_dp2_optshard", "tp2_pp2"]
#: every output format streamconv writes.
#: TODO(torch_dist): when these tests were written, formats.FORMATS held only "torch" and the CLI had no
#: --ckpt-format; registering torch_dist there (and the flag) makes every test parametrised on OUT_FORMATS run
#: it too (library: ConvertOptions.ckpt_format, CLI: --ckpt-format torch_dist) - check they pass then.
OUT_FORMATS = sorted(FORMATS)
#: (TP, PP) of the output; the fixture model has 4 query groups, 2 layers, vocab 32
TARGETS = [(1, 1), (2, 2), (4, 1)]


def files_of(root) -> dict:
    return {rel: open(os.path.join(root, rel), "rb").read() for rel in tree(root)}


def assert_same_files(got, want):
    a, b = files_of(got), files_of(want)
    assert "latest_checkpointed_iteration.txt" in b and len(b) > 1
    assert sorted(a) == sorted(b)
    for rel in b:
        assert a[rel] == b[rel], f"{rel} differs"


def lib_convert(load, save, tp, pp, fmt, **kw) -> dict:
    o = ConvertOptions(load_dir=str(load), save_dir=str(save), target_tensor_parallel_size=tp,
                       target_pipeline_parallel_size=pp, ckpt_format=fmt, quiet=True, **kw)
    return convert(o)


def fmt_flags(fmt) -> list:
    return [] if fmt == "torch" else ["--ckpt-format", fmt]


@pytest.fixture(scope="module")
def merged_reference(tmp_path_factory):
    """Conversion of a merged checkpoint (MindSpore's merge, or a cast of it), cached per flags."""
    cache = {}

    def get(load, tp, pp, fmt):
        key = (str(load), tp, pp, fmt)
        if key not in cache:
            out = tmp_path_factory.mktemp("ref") / "out"
            lib_convert(load, out, tp, pp, fmt)
            cache[key] = out
        return cache[key]

    return get


def merged_bf16(case, root) -> str:
    """MindSpore's merge of ``case`` with every weight cast to BF16 by torch, as one safetensors file."""
    d = root / f"{case}_merged_bf16"
    if not d.exists():
        d.mkdir()
        save_file(expected_weights(case, cast=torch.bfloat16), str(d / "model.safetensors"), metadata={"format": "ms"})
    return str(d)


# ---------------------------------------------------------------- the fixtures against MindSpore's merge


@pytest.mark.parametrize("fmt", OUT_FORMATS)
@pytest.mark.parametrize("tp,pp", TARGETS)
@pytest.mark.parametrize("case", CASES)
def test_per_rank_output_converts_like_mindspore_merge(case, tp, pp, fmt, tmp_path, merged_reference):
    out = tmp_path / "out"
    s = lib_convert(os.path.join(DIST, case, "output"), out, tp, pp, fmt)
    assert_same_files(out, merged_reference(os.path.join(DIST, case, "expected"), tp, pp, fmt))
    assert any("skipped 38 optimizer-state tensors" in n for n in s["notes"])


@pytest.mark.parametrize("fmt", OUT_FORMATS)
@pytest.mark.parametrize("case", CASES)
def test_checkpoint_dir_with_merged_strategy_file(case, fmt, tmp_path, merged_reference):
    """--load-dir checkpoint/ + --src-strategy-path <merged strategy> (JSON for tp4, protobuf otherwise), via the CLI."""
    d = os.path.join(DIST, case, "merged_strategy")
    strategy = os.path.join(d, os.listdir(d)[0])
    out = tmp_path / "out"
    run_cli(["convert", "--load-dir", os.path.join(DIST, case, "output", "checkpoint"), "--save-dir", str(out),
             "--src-strategy-path", strategy, "--step", "2", "--target-tensor-parallel-size", "2",
             "--target-pipeline-parallel-size", "2", "--quiet", *fmt_flags(fmt)])
    assert_same_files(out, merged_reference(os.path.join(DIST, case, "expected"), 2, 2, fmt))


@pytest.mark.parametrize("fmt", OUT_FORMATS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_remove_redundancy_variant(dtype, fmt, tmp_path, merged_reference):
    run = build_variant("tp2_dp2_optshard", tmp_path, replicas=2, dtype=dtype, remove_redundancy=True)
    merged = os.path.join(DIST, "tp2_dp2_optshard", "expected") if dtype is None else merged_bf16(
        "tp2_dp2_optshard", tmp_path)
    for tp, pp in [(2, 2), (4, 1)]:
        out = tmp_path / f"out{tp}{pp}"
        lib_convert(run, out, tp, pp, fmt)
        assert_same_files(out, merged_reference(merged, tp, pp, fmt))


@pytest.mark.parametrize("fmt", OUT_FORMATS)
def test_bf16_variant_with_protobuf_strategy(fmt, tmp_path, merged_reference):
    run = build_variant("tp2_dp2_optshard", tmp_path, dtype=torch.bfloat16)
    shutil.rmtree(run / "strategy")  # the case's real protobuf strategy reads the BF16 rank files the same way
    shutil.copytree(os.path.join(DIST, "tp2_dp2_optshard", "output", "strategy"), run / "strategy")
    merged = merged_bf16("tp2_dp2_optshard", tmp_path)
    for tp, pp in [(1, 1), (2, 2)]:
        out = tmp_path / f"out{tp}{pp}"
        lib_convert(run, out, tp, pp, fmt)
        assert_same_files(out, merged_reference(merged, tp, pp, fmt))


@pytest.mark.parametrize("remove_redundancy", [False, True])
def test_parameter_owned_by_two_stages(remove_redundancy, tmp_path, merged_reference):
    run = build_shared_embedding(tmp_path, remove_redundancy)
    out = tmp_path / "out"
    lib_convert(run, out, 2, 2, "torch")
    assert_same_files(out, merged_reference(os.path.join(DIST, "tp2_pp2", "expected"), 2, 2, "torch"))


def test_step_choice(tmp_path, merged_reference):
    """An older step 1 with other values in every rank: the newest complete step is read unless --step says."""
    run = copy_tree(os.path.join(DIST, "tp4", "output"), tmp_path / "run")
    for r in range(4):
        src = rank_file(run, r)
        older = src.parent / src.name.replace("-1_2.", "-1_1.")
        shutil.copy(src, older)
        rewrite_rank_file(older, lambda t: {k: v * 2 for k, v in t.items() if v.is_floating_point()})
    ref = merged_reference(os.path.join(DIST, "tp4", "expected"), 2, 1, "torch")
    for step, same in ((None, True), (2, True), (1, False)):
        out = tmp_path / f"out{step}"
        lib_convert(run, out, 2, 1, "torch", step=step)
        assert (files_of(out) == files_of(ref)) is same, step
    p = run_cli(["plan", "--load-dir", str(run), "--save-dir", str(tmp_path / "p"), "--step", "1"])
    assert "epoch 1 step 1 (--step 1)" in p.stdout


def test_verify_reads_the_rank_files(tmp_path, merged_reference):
    """verify of MindSpore's merge, converted, against the per-rank output: they are the same checkpoint."""
    ref = merged_reference(os.path.join(DIST, "tp2_pp2", "expected"), 2, 2, "torch")
    p = run_cli(["verify", "--load-dir", os.path.join(DIST, "tp2_pp2", "output"), "--save-dir", str(ref)])
    assert p.stdout.strip().endswith("OK")


# ---------------------------------------------------------------- MoE and MLA models as per-rank output

MOE = os.path.join(FIXTURES_ROOT, "mindformers_moe")
#: tensor_map choices cycled over the tensors: both dims split, dim 0 by the inner axis, dim 1 by the outer axis
GRID_MAPS = ([1, 0], [0, -1], [-1, 1])


def _grid_box(shape, tmap, r):
    """FORMAT.md §8 for dev_matrix [2, 2], by hand: axis 0 (from the right) is r % 2, axis 1 is r // 2."""
    coord = {0: r % 2, 1: r // 2}
    return [(0, n) if m == -1 else (coord[m] * n // 2, (coord[m] + 1) * n // 2) for m, n in zip(tmap, shape)]


def cut_on_grid(src: str, run) -> None:
    """MindSpore-written whole weights cut over a 2 x 2 device grid, every tensor on its own tensor_map."""
    from safetensors import safe_open

    with safe_open(src, framework="pt") as f:
        full = {k: f.get_tensor(k) for k in f.keys()}
    items = {}
    for i, (name, t) in enumerate(sorted(full.items())):
        tmap = [-1] * t.dim()
        if t.dim() == 2:
            want = GRID_MAPS[i % 3]
            tmap = [m if m == -1 or t.shape[d] % 2 == 0 else -1 for d, m in enumerate(want)]
        elif t.dim() == 1 and t.shape[0] % 2 == 0 and i % 2:
            tmap = [1]
        items[name] = {"dev_matrix": [2, 2], "tensor_map": tmap, "tensor_shape": list(t.shape), "field": 0,
                       "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
    os.makedirs(run / "strategy")
    (run / "strategy" / "ckpt_strategy_rank_0.json").write_text(json.dumps(
        {"parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[1]]}}, "parallel_layout_item": items}))
    for r in range(4):
        part = {n: t[tuple(slice(a, b) for a, b in _grid_box(t.shape, items[n]["tensor_map"], r))].contiguous()
                for n, t in full.items()}
        os.makedirs(run / "checkpoint" / f"rank_{r}")
        save_file(part, str(run / "checkpoint" / f"rank_{r}" / f"mf_rank_{r}-1_1.safetensors"), metadata={"format": "ms"})


@pytest.mark.parametrize("model,flags", [
    ("qwen3_moe/mf_qwen3_moe_model.safetensors", ["--target-tensor-parallel-size", "2",
                                                   "--target-expert-parallel-size", "2"]),
    ("qwen3_moe/mf_qwen3_moe_model.safetensors", ["--target-expert-parallel-size", "4",
                                                   "--target-pipeline-parallel-size", "2"]),
    ("deepseek_v3/mf_deepseek_v3_model.safetensors", ["--target-tensor-parallel-size", "2"]),
])
def test_moe_and_mla_models_from_rank_slices(model, flags, tmp_path):
    """Stacked (transposed) experts, router buffers with a layout, MLA projections: cut into slices, read back."""
    src = os.path.join(MOE, model)
    run = tmp_path / "run"
    cut_on_grid(src, run)
    out, ref = tmp_path / "out", tmp_path / "ref"
    run_cli(["convert", "--load-dir", str(run), "--save-dir", str(out), "--quiet", *flags])
    run_cli(["convert", "--load-dir", src, "--save-dir", str(ref), "--quiet", *flags])
    assert_same_files(out, ref)


# ---------------------------------------------------------------- blocks inside and across slices, memory


SYNTH = synth.ModelSpec(layers=2, hidden=512, ffn=2048, heads=8, groups=8, vocab=24000)
SYNTH_FLAGS = ["--num-attention-heads", "8", "--target-tensor-parallel-size", "2",
               "--target-pipeline-parallel-size", "2"]
_STATED = re.compile(r"smallest budget that works is (\d+)MiB")


def test_small_budget_blocks_inside_and_across_slices_peak_within_budget(tmp_path):
    dist, whole = tmp_path / "dist", tmp_path / "whole"
    synth_dist.write_distributed(str(dist), SYNTH, 8)
    synth.write_checkpoint(str(whole), SYNTH)
    # the smallest budget that works, as streamconv states it, plus room for the floor's jitter
    p = run_cli(["plan", "--load-dir", str(dist), "--save-dir", str(tmp_path / "o"), *SYNTH_FLAGS,
                 "--max-memory", "1MiB"], check=False)
    m = _STATED.search(p.stderr)
    assert p.returncode == 2 and m, p.stderr
    # (the stated figure already includes 8 MiB for the floor's jitter; 6 MiB more spread over the four output
    # buffers gives blocks of about 3.5 MiB: inside the embedding's slices, across fc1's)
    budget = (int(m.group(1)) + 6) * 2**20
    out, ref = tmp_path / "out", tmp_path / "ref"
    summary = tmp_path / "s.json"
    run_cli(["convert", "--load-dir", str(dist), "--save-dir", str(out), *SYNTH_FLAGS, "--max-memory", str(budget),
             "--quiet", "--json-summary", str(summary)])
    s = json.load(open(summary))
    row = SYNTH.hidden * 4
    # the embedding's TP-8 slices are 3000 rows: blocks end inside them; linear_fc1 (interleaved, read with a
    # row step of 2) has 512-row slices: its blocks span several; linear_fc2 (split on dim 1) always does
    assert s["block_bytes"] // row < 3000 and s["block_bytes"] // (2 * row) > 512, s["block_bytes"]
    assert s["peak_rss_bytes"] <= budget, (s["peak_rss_bytes"], budget)
    run_cli(["convert", "--load-dir", str(whole), "--save-dir", str(ref), *SYNTH_FLAGS, "--quiet"])
    assert_same_files(out, ref)


def test_assembly_buffer_is_in_the_memory_model():
    per_rank = build_plan(ConvertOptions(load_dir=os.path.join(DIST, "tp4", "output")), floor=100 * 2**20)
    merged = build_plan(ConvertOptions(load_dir=os.path.join(DIST, "tp4", "expected")), floor=100 * 2**20)
    # each read (at most one staging buffer: a read chunk or the largest row) is assembled into a buffer of
    # its own, so per-rank input needs one more staging-sized buffer than the merged file
    for plan, staging_buffers in ((per_rank, 2), (merged, 1)):
        max_row = max(t.nbytes // max(t.shape[0] if t.shape else 1, 1) for t in plan.source.tensors.values())
        staging = max(memory.READ_CHUNK, max_row)
        assert plan.predicted_peak == (plan.floor + memory.MARGIN + staging_buffers * staging
                                       + memory.OUTPUT_BUFFERS * plan.block_bytes)


# ---------------------------------------------------------------- CompositeTensor reads against numpy


def _write_packed(path: str, part: np.ndarray, dtype: str) -> None:
    """A safetensors file packed as MindSpore packs: a 3-byte entry first, so the slice's data is unaligned."""
    data = part.tobytes()
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "w": {"dtype": dtype, "shape": list(part.shape), "data_offsets": [3, 3 + len(data)]},
              "__metadata__": {"format": "ms"}}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)  # header padded to 8 bytes; the 3-byte entry then misaligns the slice
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"\x01\x02\x03" + data)


def _cut(tmp_path, full: np.ndarray, boxes: list) -> CompositeTensor:
    """Write each box of ``full`` as one 'rank file'; the composite over them."""
    dtype = {np.float32: "F32", np.float16: "F16"}[full.dtype.type]
    slices = []
    for r, box in enumerate(boxes):
        path = str(tmp_path / f"r{r}.safetensors")
        _write_packed(path, np.ascontiguousarray(full[tuple(slice(a, b) for a, b in box)]), dtype)
        info = read_header(path).tensors["w"]
        assert info.start % info.itemsize  # unaligned, as MindSpore's packing leaves it
        slices.append(Slice(r, path, info, tuple(box), full.shape))
    return CompositeTensor("w", "w", str(tmp_path), full.shape, dtype, tuple(sorted(slices, key=lambda s: s.box)))


def _grid(shape, cuts):
    """Every box of the grid whose dim-d boundaries are cuts[d]."""
    axes = [list(zip(c[:-1], c[1:])) for c in [[0, *cuts[d], shape[d]] for d in range(len(shape))]]
    out = [()]
    for ax in axes:
        out = [b + (iv,) for b in out for iv in ax]
    return out


@pytest.mark.parametrize("shape,cuts,dtype", [
    ((12, 10), [[5], [4, 7]], np.float32),  # 2-D: rows and column bands
    ((9, 6, 4), [[4], [2], [1, 3]], np.float32),  # 3-D: trailing boxes are not one run of columns
    ((8, 3, 8), [[], [1], []], np.float16),  # 3-D split on dim 1 only: each box is one run of columns
    ((10,), [[3, 7]], np.float32),  # 1-D
])
def test_composite_reads_equal_numpy(tmp_path, shape, cuts, dtype):
    full = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape).astype(dtype)
    t = _cut(tmp_path, full, _grid(shape, cuts))
    rows = shape[0]
    cols = int(np.prod(shape[1:]))
    mat = full.reshape(rows, cols)
    files = SourceFiles()
    rng = np.random.default_rng(0)
    requests = [(0, rows, 1, 0, cols)] + [
        tuple(int(x) for x in (a, b, st, c0, c1))
        for a, b, st, c0, c1 in ((*sorted(rng.integers(0, rows + 1, 2)), rng.integers(1, 4),
                                  *sorted(rng.integers(0, cols + 1, 2))) for _ in range(200))
    ]
    staging = np.empty(1 << 16, dtype=np.uint8)
    for a, b, st, c0, c1 in requests:
        got = t.read(files, a, b, st, c0, c1, staging)
        assert got.dtype == mat.dtype and got.shape == mat[a:b:st, c0:c1].shape, (a, b, st, c0, c1)
        assert np.array_equal(got, mat[a:b:st, c0:c1]), (a, b, st, c0, c1)
    files.close()


def test_composite_spans_and_one_slice_views(tmp_path):
    full = np.arange(12 * 10, dtype=np.float32).reshape(12, 10)
    t = _cut(tmp_path, full, _grid((12, 10), [[5], [4]]))
    # rows 3..7 touch all four slices: rows 3..4 of the top two, rows 0..1 of the bottom two
    want = []
    for s in t.slices:
        lo, hi = max(3, s.box[0][0]), min(7, s.box[0][1])
        width = (s.box[1][1] - s.box[1][0]) * 4
        want.append((s.path, s.info.start + (lo - s.box[0][0]) * width, s.info.start + (hi - s.box[0][0]) * width))
    assert t.spans(3, 7) == want
    assert [p for p, _, _ in t.spans(0, 5)] == [str(tmp_path / "r0.safetensors"), str(tmp_path / "r1.safetensors")]
    # the stream ends a block at the slice edge (row 5), so each block is one slice's rows
    assert (t.block_end(3, 9), t.block_end(5, 9), t.block_end(0, 5), t.block_end(6, 12)) == (5, 9, 5, 12)
    files = SourceFiles()
    view = t.read(files, 1, 4, 1, 5, 9)  # inside the slice of rows 0..5, columns 4..10
    assert np.array_equal(view, full[1:4, 5:9]) and not view.flags.owndata
    assert files._scratch is None  # no assembly was needed
    del view
    files.close()


# ---------------------------------------------------------------- plan and the resume fingerprint


def test_plan_reports_ranks_strategy_step_and_bytes(tmp_path):
    case = os.path.join(DIST, "tp2_pp2", "output")
    p = run_cli(["plan", "--load-dir", case, "--save-dir", str(tmp_path / "o"), "--target-tensor-parallel-size", "2"])
    text = p.stdout
    for r in range(4):
        rel = f"rank_{r}/qwen3_rank_{r}-1_2.safetensors"
        assert os.path.isfile(os.path.join(case, "checkpoint", rel))
        assert f"rank {r}: {rel}" in text
    assert "epoch 1 step 2 (the newest step every rank saved)" in text
    strat = sorted(os.listdir(os.path.join(case, "strategy")))
    assert f"{len(strat)} file(s), protobuf, one per rank; pipeline stages [0, 1], 2 devices per stage" in text
    assert all(n in text for n in strat)
    assert re.search(r"^read +\S+ \S+ +write", text, re.M)


def test_fingerprint_lists_every_rank_file_and_the_strategy(tmp_path):
    run = build_variant("tp2_dp2_optshard", tmp_path, replicas=2, remove_redundancy=True)
    plan = build_plan(ConvertOptions(load_dir=str(run)), floor=100 * 2**20)
    on_disk = sorted(os.path.abspath(os.path.join(d, f)) for d, _, fs in os.walk(run) for f in fs
                     if f.endswith((".safetensors", ".json")))
    assert len(on_disk) == 8 + 1  # every rank's file and the strategy
    assert sorted(p for p, *_ in plan.fingerprint()["input"]) == on_disk


def test_resume_refuses_a_changed_rank_file(tmp_path):
    run = copy_tree(os.path.join(DIST, "tp4", "output"), tmp_path / "run")
    save = tmp_path / "out"
    argv = ["convert", "--load-dir", str(run), "--save-dir", str(save), "--target-tensor-parallel-size", "2",
            "--quiet"]
    plan = build_plan(ConvertOptions(load_dir=str(run), save_dir=str(save), target_tensor_parallel_size=2), floor=0)
    os.makedirs(save / ".streamconv" / "done")
    with open(save / ".streamconv" / "run.json", "w") as f:  # an interrupted run of this plan, nothing done yet
        json.dump({"streamconv": 2, "fingerprint": plan.fingerprint()}, f, default=str)
    st = os.stat(rank_file(run, 3))
    os.utime(rank_file(run, 3), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    p = run_cli([*argv, "--resume"], check=False)
    # the refusal names the rank file and what changed in it
    assert p.returncode == 2 and "input changed" in p.stderr and "modification time" in p.stderr, p.stderr
    assert os.path.basename(rank_file(run, 3)) in p.stderr, p.stderr
    os.utime(rank_file(run, 3), ns=(st.st_atime_ns, st.st_mtime_ns))
    run_cli([*argv, "--resume"])
    assert (save / "latest_checkpointed_iteration.txt").is_file()


# ---------------------------------------------------------------- refusals through the CLI


def _case_copy(ws, case="tp4"):
    return copy_tree(os.path.join(DIST, case, "output"), ws.inp)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_refuse_missing_rank_file(ws, what):
    run = _case_copy(ws)
    if what == "file":
        os.remove(rank_file(run, 2))
        refuse(ws, ["--load-dir", run, "--save-dir", ws.save], names=["rank_2"], watch=[run])
    else:
        shutil.rmtree(run / "checkpoint" / "rank_3")
        refuse(ws, ["--load-dir", run, "--save-dir", ws.save], names=["rank 3"], watch=[run])


def test_refuse_strategy_that_does_not_match_a_rank(ws):
    run = _case_copy(ws)
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    rewrite_rank_file(rank_file(run, 2), lambda t: {name: t[name][:, :6].contiguous()})
    refuse(ws, ["--load-dir", run, "--save-dir", ws.save], names=[name, "rank 2"], watch=[run])


@pytest.mark.parametrize("offsets,ranks", [([0, 6, 16, 24], ["rank 0", "rank 1"]), ([0, 8, 16, 25], [])])
def test_refuse_overlapping_or_missing_slices(ws, offsets, ranks):
    run = _case_copy(ws)
    name = "embedding.word_embeddings.weight"

    def edit(items):
        items[name].update(param_split_shape=[8, 8, 8, 8], indices_offset=offsets)
        del items[name]["tensor_shape"]

    edit_json_strategy(run, edit)
    refuse(ws, ["--load-dir", run, "--save-dir", ws.save], names=[name, *ranks], watch=[run])


def test_refuse_unsupported_layout(ws):
    run = _case_copy(ws)
    name = "output_layer.weight"
    edit_json_strategy(run, lambda items: items[name].update(field=2))
    refuse(ws, ["--load-dir", run, "--save-dir", ws.save], names=[name, "rank 0", "field"], watch=[run])


def test_refuse_slice_kept_by_no_rank(ws):
    name = "decoder.layers.1.self_attention.linear_proj.weight"
    run = build_variant("tp2_dp2_optshard", ws.root / "v", replicas=2, remove_redundancy=True, drop_everywhere=(name,))
    refuse(ws, ["--load-dir", run, "--save-dir", ws.save], names=[name], watch=[run])


def test_refuse_missing_strategy_and_one_rank_alone(ws):
    run = _case_copy(ws)
    ckpt = run / "checkpoint"
    refuse(ws, ["--load-dir", ckpt, "--save-dir", ws.save], names=["--src-strategy-path"], watch=[run])
    refuse(ws, ["--load-dir", ckpt / "rank_0", "--save-dir", ws.save], names=["rank_0"], watch=[run])
    refuse(ws, ["--load-dir", rank_file(run, 1), "--save-dir", ws.save], names=["rank_1"], watch=[run])
    refuse(ws, ["--load-dir", run, "--save-dir", ws.save, "--src-strategy-path", run / "nowhere"],
           names=["nowhere"], watch=[run])


def test_refuse_step_not_saved_and_flags_on_merged_input(ws):
    run = _case_copy(ws)
    refuse(ws, ["--load-dir", run, "--save-dir", ws.save, "--step", "7"], names=["rank 0", "step 7"], watch=[run])
    merged = os.path.join(DIST, "tp4", "expected")
    refuse(ws, ["--load-dir", merged, "--save-dir", ws.save, "--src-strategy-path", run / "strategy"],
           names=["--src-strategy-path"], watch=[run])
    refuse(ws, ["--load-dir", merged, "--save-dir", ws.save, "--step", "2"], names=["--step"], watch=[run])
