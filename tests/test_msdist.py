"""Per-rank MindSpore checkpoints: strategy reading, the slicing rule, rank discovery, assembly.

Expectations are independent of streamconv:

* ``DIST_MANIFEST.json`` of each fixture case, written when the fixtures were made,
  lists every parameter's layout and which box each rank holds;
* ``expected/`` is MindSpore 2.10's own merge (``unified_safetensors``) of the
  same rank files: every full parameter reassembled here from the pieces, with
  a few lines of torch reading the rank files through the ``safetensors``
  library, must equal it byte for byte;
* the unit cases of the slicing rule are computed by hand in the comments;
* the synthetic variants (remove_redundancy, BF16) are derived from the real
  MindSpore-written rank files with the ``safetensors`` library and a strategy
  written here from the manifest.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import FIXTURES_ROOT
from safetensors import safe_open
from safetensors.torch import save_file

from streamconv.core.errors import InputError
from streamconv.sources.header import read_header
from streamconv.sources.msdist.assemble import assemble, open_distributed
from streamconv.sources.msdist.boxes import full_shape_from_piece, opt_shard, rank_box
from streamconv.sources.msdist.ranks import discover
from streamconv.sources.msdist.strategy import ParamLayout, load_strategy, read_strategy_file

DIST = os.path.join(FIXTURES_ROOT, "mindspore_dist")
CASES = ["tp4", "tp2_dp2_optshard", "tp2_pp2"]
OPT_PREFIXES = ("adam_m.", "adam_v.")


def manifest(case):
    with open(os.path.join(DIST, case, "DIST_MANIFEST.json")) as f:
        return json.load(f)


def merged_strategy(case):
    d = os.path.join(DIST, case, "merged_strategy")
    return os.path.join(d, os.listdir(d)[0])


def open_case(case, strategy):
    """The case via the training output dir (per-rank strategies) or checkpoint/ + merged strategy."""
    if strategy == "per_rank":
        return open_distributed(os.path.join(DIST, case, "output"))
    return open_distributed(os.path.join(DIST, case, "output", "checkpoint"), merged_strategy(case))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def reassemble(ft) -> torch.Tensor:
    """Fill the full tensor from its pieces, reading each with the safetensors library."""
    out, filled = None, None
    for p in ft.pieces:
        with safe_open(p.path, framework="pt") as f:
            t = f.get_tensor(p.name)
        if out is None:
            out = torch.empty(ft.shape, dtype=t.dtype)
            filled = torch.zeros(ft.shape, dtype=torch.int8)
        idx = tuple(slice(a, b) for a, b in p.box)
        out[idx] = t
        filled[idx] += 1
    assert bool((filled == 1).all()), f"{ft.name}: pieces do not cover every element exactly once"
    return out


def expected_weights(case, cast=None) -> dict:
    """MindSpore's merge of the case: every model weight (not optimizer states), by name."""
    d = os.path.join(DIST, case, "expected")
    with open(os.path.join(d, "param_name_map.json")) as f:
        wm = json.load(f)["weight_map"]
    out = {}
    for name, fname in wm.items():
        if name.startswith(OPT_PREFIXES):
            continue
        with safe_open(os.path.join(d, fname), framework="pt") as f:
            t = f.get_tensor(name)
        out[name] = t.to(cast) if cast is not None else t
    return out


def assert_equals_merge(ck, want: dict):
    assert sorted(ck.tensors) == sorted(want)
    for name, ft in ck.tensors.items():
        got = reassemble(ft)
        assert tuple(got.shape) == tuple(want[name].shape), name
        assert got.dtype == want[name].dtype, name
        assert torch.equal(as_bytes(got), as_bytes(want[name])), name


# ---------------------------------------------------------------- the shipped fixtures


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", ["per_rank", "merged"])
def test_strategy_fields_match_manifest(case, strategy):
    man = manifest(case)
    where = os.path.join(DIST, case, "output", "strategy") if strategy == "per_rank" else merged_strategy(case)
    strat = load_strategy(where)
    assert strat.stage_device_num == man["parallel"]["stage_device_num"]
    assert strat.world_size == man["parallel"]["device_num"]
    assert sorted(strat.names()) == sorted(man["layouts"])
    for name, m in man["layouts"].items():
        lay = strat.for_param(name)[m["stage"]]
        assert list(lay.dev_matrix) == m["dev_matrix"], name
        assert [a[0] if a else -1 for a in lay.tensor_map] == m["tensor_map"], name
        assert (lay.field, lay.opt_weight_shard_step, lay.opt_weight_shard_size) == (
            m["field"], m["opt_weight_shard_step"], m["opt_weight_shard_size"]), name
        assert lay.param_split_shape == () and lay.indices_offset == ()
        if lay.tensor_shape is not None:  # JSON records it; the protobuf form has no such field
            assert list(lay.tensor_shape) == m["tensor_shape"], name


@pytest.mark.parametrize("case", CASES)
def test_rule_boxes_match_manifest(case):
    man = manifest(case)
    strat = load_strategy(os.path.join(DIST, case, "output", "strategy"))
    ndev = man["parallel"]["stage_device_num"]
    for name, m in man["layouts"].items():
        lay = strat.for_param(name)[m["stage"]]
        for r, want in m["pieces"].items():
            r = int(r)
            assert man["parallel"]["rank_to_stage"][str(r)] == m["stage"]
            box = rank_box(lay, m["tensor_shape"], r - m["stage"] * ndev)
            assert [list(b) for b in box] == want, (name, r)
            piece = [b - a for a, b in box]
            assert list(full_shape_from_piece(lay, piece, r - m["stage"] * ndev)) == m["tensor_shape"], (name, r)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", ["per_rank", "merged"])
def test_assembly_matches_manifest_and_mindspore_merge(case, strategy):
    man = manifest(case)
    ck = open_case(case, strategy)
    assert (ck.ranks.epoch, ck.ranks.step) == (1, 2)
    assert ck.ranks.world_size == man["parallel"]["device_num"]
    assert ck.skipped == {"optimizer": 38, "step": len(man["no_layout"])}
    assert ck.no_layout == []
    for name, ft in ck.tensors.items():
        m = man["layouts"][name]
        assert list(ft.shape) == m["tensor_shape"] and ft.dtype == m["dtype"], name
        # one piece per distinct box, each taken from a rank that holds exactly that box
        assert sorted(p.box for p in ft.pieces) == sorted({tuple(map(tuple, b)) for b in m["pieces"].values()})
        for p in ft.pieces:
            assert [list(b) for b in p.box] == m["pieces"][str(p.rank)], (name, p.rank)
            assert p.path == os.path.join(DIST, case, man["ranks"][str(p.rank)]["file"])
            assert p.info.shape == p.shape
    assert_equals_merge(ck, expected_weights(case))


def test_pipeline_stage_ranks_are_local_to_their_stage():
    ck = open_case("tp2_pp2", "per_rank")
    # stage 1 holds layer 1 and the output layer on ranks 2, 3 (local ranks 0, 1)
    fc1 = ck.tensors["decoder.layers.1.mlp.linear_fc1.weight"]
    assert fc1.stages == (1,)
    assert [(p.rank, p.box) for p in fc1.pieces] == [(2, ((0, 32), (0, 32))), (3, ((32, 64), (0, 32)))]
    emb = ck.tensors["embedding.word_embeddings.weight"]
    assert emb.stages == (0,) and {p.rank for p in emb.pieces} == {0, 1}


# ---------------------------------------------------------------- the slicing rule, by hand


def lay(dev, tmap, **kw):
    return ParamLayout(name="w", stage=0, dev_matrix=tuple(dev), tensor_map=tuple(tuple(a) for a in tmap), **kw)


def test_several_device_axes_on_one_dim():
    # dev_matrix [2, 2, 2]: axis 0 = dev[2], axis 1 = dev[1], axis 2 = dev[0]; rank = 4*c0 + 2*c1 + c2.
    # dim 0 split by (axis 2, axis 0): slice = 2*c0 + c2 of 4 (4 rows each); dim 1 not split.
    L = lay([2, 2, 2], [(2, 0), ()])
    want = {0: (0, 4), 1: (4, 8), 2: (0, 4), 3: (4, 8), 4: (8, 12), 5: (12, 16), 6: (8, 12), 7: (12, 16)}
    for r, rows in want.items():
        assert rank_box(L, (16, 4), r) == (rows, (0, 4)), r
    assert full_shape_from_piece(L, (4, 4), 5) == (16, 4)
    # the other order, (axis 0, axis 2): slice = 2*c2 + c0
    L = lay([2, 2, 2], [(0, 2), ()])
    want = {0: (0, 4), 1: (8, 12), 2: (0, 4), 3: (8, 12), 4: (4, 8), 5: (12, 16), 6: (4, 8), 7: (12, 16)}
    for r, rows in want.items():
        assert rank_box(L, (16, 4), r)[0] == rows, r


def test_opt_shard_with_step_and_partial_size():
    # dev [2, 2, 2], dim 1 split by axis 1 (dev[1], coordinate c1); axes dev[0], dev[2] repeat each slice.
    # Ranks holding slice c1=0: 0, 1, 4, 5. With opt size 2 MindSpore's groups are [0, 1] and [4, 5]
    # (step 1): ranks 0, 4 take rows [0, 4), ranks 1, 5 rows [4, 8).
    L = lay([2, 2, 2], [(), (1,)], opt_weight_shard_step=1, opt_weight_shard_size=2)
    want = {0: ((0, 4), (0, 2)), 1: ((4, 8), (0, 2)), 4: ((0, 4), (0, 2)), 5: ((4, 8), (0, 2)),
            2: ((0, 4), (2, 4)), 3: ((4, 8), (2, 4)), 6: ((0, 4), (2, 4)), 7: ((4, 8), (2, 4))}
    for r, box in want.items():
        assert rank_box(L, (8, 4), r) == box, r
    assert opt_shard(L, 5) == (1, 2)
    assert full_shape_from_piece(L, (4, 2), 7) == (8, 4)


def test_opt_shard_size_minus_one_uses_every_replica():
    # same layout, opt size -1: one group of the 4 ranks 0, 1, 4, 5 (MindSpore's step (5-0)//3 = 1),
    # 2 rows each in rank order.
    L = lay([2, 2, 2], [(), (1,)], opt_weight_shard_step=1, opt_weight_shard_size=-1)
    want = {0: (0, 2), 1: (2, 4), 4: (4, 6), 5: (6, 8), 2: (0, 2), 3: (2, 4), 6: (4, 6), 7: (6, 8)}
    for r, rows in want.items():
        assert rank_box(L, (8, 4), r)[0] == rows, r
    # dim 0 split by axis 0 (dev[1]) then opt-sharded over dev[0] (group [c1, 2 + c1], step 2)
    L = lay([2, 2], [(0,), ()], opt_weight_shard_step=2, opt_weight_shard_size=-1)
    want = {0: (0, 2), 2: (2, 4), 1: (4, 6), 3: (6, 8)}
    for r, rows in want.items():
        assert rank_box(L, (8, 4), r)[0] == rows, r


def test_opt_shard_step_that_contradicts_the_group_is_refused():
    L = lay([2, 2, 2], [(), (1,)], opt_weight_shard_step=4, opt_weight_shard_size=2)
    with pytest.raises(InputError, match=r"'w', rank 0 .*opt_weight_shard_step 4"):
        rank_box(L, (8, 4), 0)
    L = lay([2, 2, 2], [(), (1,)], opt_weight_shard_step=1, opt_weight_shard_size=3)
    with pytest.raises(InputError, match="does not divide"):
        rank_box(L, (8, 4), 0)


def test_no_opt_shard_when_step_or_size_is_zero():
    for step, size in ((0, 2), (1, 0)):
        L = lay([2, 2], [(0,), ()], opt_weight_shard_step=step, opt_weight_shard_size=size)
        assert rank_box(L, (8, 4), 2) == ((0, 4), (0, 4))


def test_uneven_dim0_split():
    # 3 devices split 10 rows as 4 + 3 + 3 (param_split_shape) at offsets 0, 4, 7
    L = lay([3], [(0,), ()], param_split_shape=(4, 3, 3), indices_offset=(0, 4, 7))
    assert [rank_box(L, (10, 4), r) for r in range(3)] == [((0, 4), (0, 4)), ((4, 7), (0, 4)), ((7, 10), (0, 4))]
    assert full_shape_from_piece(L, (3, 4), 2) == (10, 4)
    # with optimizer sharding on top over a second (replica) axis: each slice halves
    L = lay([2, 3], [(0,), ()], param_split_shape=(4, 2, 2), indices_offset=(0, 4, 6),
            opt_weight_shard_step=3, opt_weight_shard_size=2)
    assert rank_box(L, (8, 4), 0)[0] == (0, 2) and rank_box(L, (8, 4), 3)[0] == (2, 4)
    assert rank_box(L, (8, 4), 5)[0] == (7, 8)


def test_unsupported_layouts_are_refused():
    with pytest.raises(InputError, match="field-split"):
        rank_box(lay([2], [(0,)], field=3), (8,), 0)
    with pytest.raises(InputError, match="tensor_map has 1 entries but the tensor has 2"):
        rank_box(lay([2], [(0,)]), (8, 4), 0)
    with pytest.raises(InputError, match="cannot be split into 3 equal slices"):
        rank_box(lay([3], [(0,)]), (8,), 0)
    with pytest.raises(InputError, match="param_split_shape has 2 entries but dimension 0 is split 3"):
        rank_box(lay([3], [(0,)], param_split_shape=(4, 4), indices_offset=(0, 4)), (8,), 0)


# ---------------------------------------------------------------- strategy forms


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload) -> bytes:
    if isinstance(payload, int):
        return _varint(num << 3) + _varint(payload)
    if isinstance(payload, str):
        payload = payload.encode()
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _dims(values) -> bytes:
    return b"".join(_field(1, v) for v in values)


def pb_layout_item(name, dev, tensor_maps, step=0, size=0, pss=(), ioff=()):
    """ParallelLayoutItem bytes, encoded by hand from node_strategy.proto's field numbers."""
    lay = _field(1, _dims(dev))
    for tm in tensor_maps:
        lay += _field(2, _dims(tm))
    lay += _field(3, _dims(pss)) + _field(4, _dims(ioff)) + _field(5, 0) + _field(6, step) + _field(7, size)
    return _field(3, _field(1, name) + _field(2, lay))


def pb_strategy(stage, items) -> bytes:
    strat_item = _field(2, _field(1, "Default/op") + _field(2, _field(1, stage) + _field(2, _dims([1, 1]))))
    return _field(1, 1) + strat_item + b"".join(items)


def test_protobuf_nested_tensor_map(tmp_path):
    # Layout API form: one TensorMap per tensor dim; a 1-D tensor gets an empty TensorMap appended
    p = tmp_path / "ckpt_strategy_rank_0.ckpt"
    p.write_bytes(pb_strategy(0, [
        pb_layout_item("w2d", [2, 2, 2], [[2, 0], [-1]]),
        pb_layout_item("w1d", [2, 2, 2], [[1, 0], []]),
        pb_layout_item("flat", [2, 2, 2], [[1, -1]], step=1, size=-1),
    ]))
    sf, layouts = read_strategy_file(str(p))
    assert sf.form == "protobuf" and not sf.merged and sf.rank == 0 and sf.stages == (0,)
    per = layouts[0]
    assert per["w2d"].tensor_map == ((2, 0), ())
    assert per["w1d"].tensor_map == ((1, 0),)
    assert per["flat"].tensor_map == ((1,), ())
    assert (per["flat"].opt_weight_shard_step, per["flat"].opt_weight_shard_size) == (1, -1)
    assert rank_box(per["w2d"], (16, 4), 5) == ((12, 16), (0, 4))


def test_json_nested_tensor_map_and_uneven_split(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"current_stage": 1, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": []}},
                             "parallel_layout_item": {"w": {
                                 "dev_matrix": [3], "tensor_map": [[0], -1], "tensor_shape": [10, 4], "field": 0,
                                 "opt_weight_shard_step": 0, "opt_weight_shard_size": 0,
                                 "param_split_shape": [4, 3, 3], "indices_offset": [0, 4, 7]}}}))
    _, layouts = read_strategy_file(str(p))
    w = layouts[0]["w"]
    assert w.tensor_map == ((0,), ()) and w.param_split_shape == (4, 3, 3) and w.tensor_shape == (10, 4)


def test_damaged_strategy_files_are_refused(tmp_path):
    bad = tmp_path / "s.ckpt"
    bad.write_bytes(b"\xff\xff\xff")
    with pytest.raises(InputError, match="s.ckpt: not a MindSpore strategy file"):
        read_strategy_file(str(bad))
    js = tmp_path / "s.json"
    js.write_text("{}")
    with pytest.raises(InputError, match="no 'parallel_layout_item'"):
        read_strategy_file(str(js))
    mixed = tmp_path / "m.ckpt"
    mixed.write_bytes(pb_strategy(0, [pb_layout_item("0-a", [2], [[0]]), pb_layout_item("b", [2], [[0]])]))
    with pytest.raises(InputError, match="mixes stage-prefixed names"):
        read_strategy_file(str(mixed))
    axis = tmp_path / "x.ckpt"
    axis.write_bytes(pb_strategy(0, [pb_layout_item("a", [2], [[1]])]))
    with pytest.raises(InputError, match="'a': tensor_map refers to device axis 1"):
        read_strategy_file(str(axis))


def test_strategy_directory_refusals(tmp_path):
    src = os.path.join(DIST, "tp2_pp2", "output", "strategy")
    # only stage 1's files: stage 0 missing
    d = tmp_path / "only1"
    d.mkdir()
    shutil.copy(os.path.join(src, "ckpt_strategy_rank_2.ckpt"), d)
    with pytest.raises(InputError, match="no layouts for pipeline stage 0"):
        load_strategy(str(d))
    # only stage 0's files: MindSpore's merge then silently writes stage 0's parameters only;
    # here the rank files of stage 1 have no place in a 2-rank strategy
    d = tmp_path / "only0"
    d.mkdir()
    shutil.copy(os.path.join(src, "ckpt_strategy_rank_0.ckpt"), d)
    with pytest.raises(InputError, match="rank 2 and above have files but the strategy lays parameters out over 2"):
        open_distributed(os.path.join(DIST, "tp2_pp2", "output", "checkpoint"), str(d))
    # a stage-1 strategy under a stage-0 rank's name
    d = tmp_path / "swapped"
    d.mkdir()
    shutil.copy(os.path.join(src, "ckpt_strategy_rank_0.ckpt"), d / "ckpt_strategy_rank_0.ckpt")
    shutil.copy(os.path.join(src, "ckpt_strategy_rank_2.ckpt"), d / "ckpt_strategy_rank_1.ckpt")
    with pytest.raises(InputError, match="ckpt_strategy_rank_1.ckpt: holds stage 1 but rank 1 is in stage 0"):
        load_strategy(str(d))
    # two files of one stage that disagree
    d = copy_tree(os.path.join(DIST, "tp4", "output", "strategy"), tmp_path / "conflict")
    js = json.loads((d / "ckpt_strategy_rank_3.json").read_text())
    js["parallel_layout_item"]["decoder.layers.0.mlp.linear_fc2.weight"]["tensor_map"] = [0, 1]
    (d / "ckpt_strategy_rank_3.json").write_text(json.dumps(js))
    with pytest.raises(InputError, match="'decoder.layers.0.mlp.linear_fc2.weight' \\(stage 0\\).*different layouts"):
        load_strategy(str(d))


# ---------------------------------------------------------------- rank discovery


def copy_tree(src, dst):
    """copytree, then make the copy writable (the shared fixtures are read-only)."""
    shutil.copytree(src, dst)
    for root, dirs, files in os.walk(dst):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return dst


def copy_case(case, tmp_path, name="run"):
    return copy_tree(os.path.join(DIST, case, "output"), tmp_path / name)


def test_discovery_forms(tmp_path):
    out = os.path.join(DIST, "tp4", "output")
    rs = discover(out)
    assert rs.checkpoint_dir == os.path.join(out, "checkpoint") and rs.strategy_path == os.path.join(out, "strategy")
    assert sorted(rs.files) == [0, 1, 2, 3] and (rs.epoch, rs.step) == (1, 2)
    assert rs.files[2].path == os.path.join(out, "checkpoint", "rank_2", "qwen3_rank_2-1_2.safetensors")
    headers = {r: read_header(f.path) for r, f in rs.files.items()}  # the caller may pass headers it has read
    ck = assemble(rs, load_strategy(rs.strategy_path), headers)
    assert ck.headers is headers and len(ck.tensors) == 19
    with pytest.raises(InputError, match="give --src-strategy-path"):
        discover(os.path.join(out, "checkpoint"))
    # all rank files side by side in one directory
    flat = tmp_path / "flat"
    flat.mkdir()
    for r in range(4):
        shutil.copy(os.path.join(out, "checkpoint", f"rank_{r}", f"qwen3_rank_{r}-1_2.safetensors"), flat)
    ck = open_distributed(str(flat), os.path.join(out, "strategy"))
    assert sorted(ck.ranks.files) == [0, 1, 2, 3] and len(ck.tensors) == 19


def test_newest_complete_step_and_step_choice(tmp_path):
    run = copy_case("tp4", tmp_path)
    ck = run / "checkpoint"
    for r in range(4):  # an older step 1 in every rank, a newer step 3 in ranks 0..2 only
        src = ck / f"rank_{r}" / f"qwen3_rank_{r}-1_2.safetensors"
        shutil.copy(src, ck / f"rank_{r}" / f"qwen3_rank_{r}-1_1.safetensors")
        if r < 3:
            shutil.copy(src, ck / f"rank_{r}" / f"qwen3_rank_{r}-1_3.safetensors")
    assert discover(str(run)).step == 2
    rs = discover(str(run), step=1)
    assert rs.step == 1 and rs.files[3].path.endswith("qwen3_rank_3-1_1.safetensors")
    with pytest.raises(InputError, match="rank 3 has no checkpoint of step 3"):
        discover(str(run), step=3)


def test_missing_rank_and_mixed_steps_are_refused(tmp_path):
    run = copy_case("tp4", tmp_path, "hole")
    shutil.rmtree(run / "checkpoint" / "rank_1")
    with pytest.raises(InputError, match="rank 1 is missing"):
        discover(str(run))
    run = copy_case("tp4", tmp_path, "tail")
    shutil.rmtree(run / "checkpoint" / "rank_3")
    with pytest.raises(InputError, match="rank 3 is missing"):
        open_distributed(str(run))
    run = copy_case("tp4", tmp_path, "mixed")
    r2 = run / "checkpoint" / "rank_2"
    os.rename(r2 / "qwen3_rank_2-1_2.safetensors", r2 / "qwen3_rank_2-1_4.safetensors")
    with pytest.raises(InputError, match=r"rank 2 has no checkpoint of epoch 1 step 2 \(it has epoch 1 step 4\)"):
        discover(str(run))
    with pytest.raises(InputError, match="rank 2 has no checkpoint of step 2"):
        discover(str(run), step=2)
    run = copy_case("tp4", tmp_path, "wrongdir")
    os.rename(run / "checkpoint" / "rank_2" / "qwen3_rank_2-1_2.safetensors",
              run / "checkpoint" / "rank_2" / "qwen3_rank_3-1_2.safetensors")
    with pytest.raises(InputError, match="a rank 3 file inside rank_2/"):
        discover(str(run))


# ---------------------------------------------------------------- assembly refusals


def rewrite_rank_file(path, change=None, drop=(), metadata=None):
    """Rewrite a rank file through the safetensors library, changing/dropping entries."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    if change:
        tensors.update(change(tensors))
    os.remove(path)
    save_file(tensors, str(path), metadata=metadata if metadata is not None else meta)


def rank_file(run, r):
    d = run / "checkpoint" / f"rank_{r}"
    return d / next(e for e in os.listdir(d) if e.endswith(".safetensors"))


def test_shape_mismatch_is_refused(tmp_path):
    run = copy_case("tp4", tmp_path)
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    rewrite_rank_file(rank_file(run, 2), lambda t: {name: t[name][:, :6].contiguous()})
    with pytest.raises(InputError, match=rf"'{name}', rank 2 .*shape \[32, 6\] but the strategy gives this rank a \[32, 8\]"):
        open_distributed(str(run))


def test_dtype_mismatch_is_refused(tmp_path):
    run = copy_case("tp4", tmp_path)
    name = "output_layer.weight"
    rewrite_rank_file(rank_file(run, 1), lambda t: {name: t[name].to(torch.bfloat16)})
    with pytest.raises(InputError, match=f"'{name}': rank 1 stores BF16 but rank 0 stores F32"):
        open_distributed(str(run))


def test_missing_tensor_without_remove_redundancy_is_refused(tmp_path):
    run = copy_case("tp4", tmp_path)
    name = "decoder.final_layernorm.weight"  # replicated: ranks 0..3 each hold all of it
    rewrite_rank_file(rank_file(run, 3), drop=(name,))
    with pytest.raises(InputError, match=f"'{name}': rank 3's file .* lacks it .*not saved with remove_redundancy"):
        open_distributed(str(run))


def edit_json_strategy(run, edit):
    for e in os.listdir(run / "strategy"):
        p = run / "strategy" / e
        js = json.loads(p.read_text())
        edit(js["parallel_layout_item"])
        p.write_text(json.dumps(js))


@pytest.mark.parametrize("offsets,message", [
    ([0, 6, 16, 24], r"the pieces of rank 0 \(\[0, 8\]\) and rank 1 \(\[6, 14\]\) overlap in dimension 0"),
    ([0, 8, 16, 25], r"no rank holds \[24, 25\) of dimension 0"),
])
def test_overlap_and_gap_are_refused(tmp_path, offsets, message):
    run = copy_case("tp4", tmp_path)
    name = "embedding.word_embeddings.weight"  # vocab-parallel: 4 x 8 rows

    def edit(items):
        items[name]["param_split_shape"] = [8, 8, 8, 8]
        items[name]["indices_offset"] = offsets
        del items[name]["tensor_shape"]

    edit_json_strategy(run, edit)
    with pytest.raises(InputError, match=f"'{name}': " + message):
        open_distributed(str(run))


def test_weight_without_layout_and_layout_without_weight_are_refused(tmp_path):
    run = copy_case("tp4", tmp_path, "nolayout")
    edit_json_strategy(run, lambda items: items.pop("decoder.layers.0.input_layernorm.weight"))
    with pytest.raises(InputError, match="'decoder.layers.0.input_layernorm.weight' is in rank 0's file .* no layout"):
        open_distributed(str(run))
    run = copy_case("tp4", tmp_path, "extra")
    edit_json_strategy(run, lambda items: items.update({"decoder.layers.7.input_layernorm.weight": dict(
        items["decoder.layers.0.input_layernorm.weight"])}))
    with pytest.raises(InputError, match="'decoder.layers.7.input_layernorm.weight' has a layout .* in none of the rank"):
        open_distributed(str(run))


def test_recorded_full_shape_must_match_the_pieces(tmp_path):
    # a strategy claiming fc1 is not split at all: rank 0's [16, 32] piece would be the whole tensor,
    # but the JSON form records the full shape [64, 32]
    run = copy_case("tp4", tmp_path)
    edit_json_strategy(run, lambda items: items["decoder.layers.0.mlp.linear_fc1.weight"].update(tensor_map=[-1, 0]))
    with pytest.raises(InputError, match=r"implies full shape \[16, 32\] but the strategy .* records \[64, 32\]"):
        open_distributed(str(run))


# ---------------------------------------------------------------- synthetic variants of real rank files


def build_variant(case, tmp_path, replicas=1, dtype=None, remove_redundancy=False, drop_everywhere=()):
    """``replicas`` copies of the case's ranks behind an outer replica axis of the device matrix.

    Rank ``g`` holds the bytes of the case's rank ``g % n``: prepending a replica axis to every
    dev_matrix leaves tensor_map (counted from the right) and each slice's rank distances (the
    optimizer-shard step) unchanged, and with the optimizer-shard size fixed at the case's
    group size (-1 resolved) every copy holds the same box as its original. With
    remove_redundancy, each laid-out entry is kept in one copy only, alternating by name.
    """
    man = manifest(case)
    n = man["parallel"]["device_num"]
    run = tmp_path / f"{case}_x{replicas}_{dtype}_{remove_redundancy}"
    (run / "strategy").mkdir(parents=True)
    items = {}
    for name, m in man["layouts"].items():
        dev = ([replicas] if replicas > 1 else []) + m["dev_matrix"]
        size = m["opt_weight_shard_size"]
        if size == -1:
            split = 1
            for a in m["tensor_map"]:
                split *= m["dev_matrix"][len(m["dev_matrix"]) - 1 - a] if a != -1 else 1
            size = n // split
        items[name] = {"dev_matrix": dev, "tensor_map": m["tensor_map"], "tensor_shape": m["tensor_shape"],
                       "field": m["field"], "opt_weight_shard_step": m["opt_weight_shard_step"],
                       "opt_weight_shard_size": size}
    (run / "strategy" / "ckpt_strategy_rank_0.json").write_text(json.dumps(
        {"current_stage": 1, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[1]]}},
         "parallel_layout_item": items}))
    laid_out = sorted(man["layouts"])
    for g in range(n * replicas):
        src = os.path.join(DIST, case, man["ranks"][str(g % n)]["file"])
        with safe_open(src, framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in tensors.items()}
        if remove_redundancy:
            meta["remove_redundancy"] = "True"
            for i, k in enumerate(laid_out):
                if i % replicas != g // n or k in drop_everywhere:
                    tensors.pop(k, None)
        d = run / "checkpoint" / f"rank_{g}"
        d.mkdir(parents=True)
        save_file(tensors, str(d / f"qwen3_rank_{g}-1_2.safetensors"), metadata=meta)
    return run


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_remove_redundancy_variant_reassembles_to_mindspore_merge(tmp_path, dtype):
    run = build_variant("tp2_dp2_optshard", tmp_path, replicas=2, dtype=dtype, remove_redundancy=True)
    ck = open_distributed(str(run))
    assert ck.ranks.world_size == 8
    ranks_used = {p.rank for t in ck.tensors.values() for p in t.pieces}
    assert ranks_used & {0, 1, 2, 3} and ranks_used & {4, 5, 6, 7}  # pieces found in both copies
    assert_equals_merge(ck, expected_weights("tp2_dp2_optshard", cast=dtype))


def test_bf16_variant_reassembles_to_mindspore_merge(tmp_path):
    run = build_variant("tp2_dp2_optshard", tmp_path, dtype=torch.bfloat16)
    ck = open_distributed(str(run))
    assert {t.dtype for t in ck.tensors.values()} == {"BF16"}
    assert_equals_merge(ck, expected_weights("tp2_dp2_optshard", cast=torch.bfloat16))
    # the real protobuf strategy of the case reads the BF16 rank files the same way
    shutil.rmtree(run / "strategy")
    shutil.copytree(os.path.join(DIST, "tp2_dp2_optshard", "output", "strategy"), run / "strategy")
    ck2 = open_distributed(str(run))
    assert {n: [(p.rank, p.box) for p in t.pieces] for n, t in ck2.tensors.items()} == {
        n: [(p.rank, p.box) for p in t.pieces] for n, t in ck.tensors.items()}


def test_remove_redundancy_piece_kept_nowhere_is_refused(tmp_path):
    name = "decoder.layers.1.self_attention.linear_proj.weight"
    run = build_variant("tp2_dp2_optshard", tmp_path, replicas=2, remove_redundancy=True, drop_everywhere=(name,))
    with pytest.raises(InputError, match=f"'{name}' has a layout in the strategy but is in none of the rank files"):
        open_distributed(str(run))
    # dropped from one rank's copy only (and its replica): the box is nowhere
    run = build_variant("tp2_dp2_optshard", tmp_path / "b", replicas=2, remove_redundancy=True)
    kept_in = 0 if sorted(manifest("tp2_dp2_optshard")["layouts"]).index(name) % 2 == 0 else 1
    rewrite_rank_file(rank_file(run, 4 * kept_in + 1), drop=(name,))
    with pytest.raises(InputError, match=rf"'{name}': no rank file holds its piece .*rank 1 "):
        open_distributed(str(run))


def build_shared_embedding(tmp_path, remove_redundancy=False):
    """tp2_pp2 with the embedding also owned by stage 1 (as a shared embedding is).

    Stage 1's strategy gets the embedding with stage 0's layout (from the manifest) and ranks 2, 3
    get copies of ranks 0, 1's embedding slices. With remove_redundancy, rank 0 keeps no copy.
    """
    man = manifest("tp2_pp2")
    emb = "embedding.word_embeddings.weight"
    run = tmp_path / f"shared_{remove_redundancy}"
    (run / "strategy").mkdir(parents=True)
    for stage, rank in ((0, 0), (1, 2)):
        items = {n: {k: m[k] for k in ("dev_matrix", "tensor_map", "tensor_shape", "field", "opt_weight_shard_step",
                                       "opt_weight_shard_size")}
                 for n, m in man["layouts"].items() if m["stage"] == stage or n == emb}
        (run / "strategy" / f"ckpt_strategy_rank_{rank}.json").write_text(json.dumps(
            {"current_stage": 1, "parallel_strategy_item": {"op": {"stage": stage, "parallel_strategy": [[1]]}},
             "parallel_layout_item": items}))
    slices = {}
    for g in range(4):
        with safe_open(os.path.join(DIST, "tp2_pp2", man["ranks"][str(g)]["file"]), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if g < 2:
            slices[g] = tensors[emb]
            if remove_redundancy and g == 0:
                del tensors[emb]
        else:
            tensors[emb] = slices[g - 2]
        if remove_redundancy:
            meta["remove_redundancy"] = "True"
        d = run / "checkpoint" / f"rank_{g}"
        d.mkdir(parents=True)
        save_file(tensors, str(d / f"qwen3_rank_{g}-1_2.safetensors"), metadata=meta)
    return run


@pytest.mark.parametrize("remove_redundancy", [False, True])
def test_parameter_in_two_pipeline_stages(tmp_path, remove_redundancy):
    run = build_shared_embedding(tmp_path, remove_redundancy)
    strat = load_strategy(str(run / "strategy"))
    assert sorted(strat.for_param("embedding.word_embeddings.weight")) == [0, 1]
    ck = open_distributed(str(run))
    emb = ck.tensors["embedding.word_embeddings.weight"]
    assert emb.stages == (0, 1)
    # stage 0's ranks supply it; rank 0's slice comes from its stage-1 replica (rank 2) when rank 0 kept none
    assert [p.rank for p in emb.pieces] == ([2, 1] if remove_redundancy else [0, 1])
    assert_equals_merge(ck, expected_weights("tp2_pp2"))


def test_merged_strategy_names_carry_their_stage(tmp_path):
    p = tmp_path / "src_strategy.ckpt"
    p.write_bytes(pb_strategy(1, [
        pb_layout_item("1-output_layer.weight", [1, 2, 1], [[1, 0]]),
        pb_layout_item("1-embedding.word_embeddings.weight", [1, 2, 1], [[1, 0]]),
        pb_layout_item("0-embedding.word_embeddings.weight", [1, 2, 1], [[1, 0]]),
    ]))
    strat = load_strategy(str(p))
    sf = strat.files[0]
    assert sf.merged and sf.rank is None and sf.stages == (0, 1)
    assert strat.stages == [0, 1] and strat.world_size == 4
    assert sorted(strat.for_param("embedding.word_embeddings.weight")) == [0, 1]
    assert list(strat.for_param("output_layer.weight")) == [1]
    assert strat.names() == ["embedding.word_embeddings.weight", "output_layer.weight"]
