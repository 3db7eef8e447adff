"""Every golden case, run with the official command line (program name swapped), must
reproduce the official pipeline's output: layout, tracker, keys in order, tensor bytes,
``_extra_state`` values, top-level scalars and the 61 load-path ``args`` fields.

Two sources of the same cases (see scripts/make_test_data.py):

* ``tests/data/golden`` (always; ids ``repo-*``): the official inputs stored as BF16
  (``fp32.to(bfloat16)``, which is also the first thing the official pipeline does
  to them), expected tensors as dtype, shape and sha256 of the official bytes;
* ``../shared/golden`` when present (ids ``shared-*``): the original F32 inputs
  against the full expected tensors.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import (DATA, GOLDEN, HAVE_SHARED, SHARED, SHARED_GOLDEN, contents, golden_cases, official_argv,
                     run_cli, tree)

CASES = [pytest.param(GOLDEN, c, id=f"repo-{c}") for c in golden_cases(GOLDEN)]
if HAVE_SHARED:
    CASES += [pytest.param(SHARED_GOLDEN, c, id=f"shared-{c}") for c in golden_cases(SHARED_GOLDEN)]


def _extra_state_repr(v) -> str:
    if v is None:
        return "None"
    assert isinstance(v, torch.Tensor) and v.dtype == torch.uint8
    return f"uint8[{v.numel()}] {v.tolist()}"


def _expected(rank_dir: str) -> dict:
    """key -> (dtype name, shape, check(tensor) -> bool) for every tensor the official pipeline wrote."""
    digests = os.path.join(rank_dir, "tensors.json")
    if os.path.isfile(digests):
        def same_bytes(want):
            return lambda got: hashlib.sha256(_raw(got)).hexdigest() == want
        return {k: (e["dtype"], tuple(e["shape"]), same_bytes(e["sha256"])) for k, e in json.load(open(digests)).items()}
    names = {torch.bfloat16: "BF16"}
    return {k: (names.get(v.dtype, str(v.dtype)), tuple(v.shape), lambda got, v=v: torch.equal(got.view(torch.int16), v.view(torch.int16)))
            for k, v in load_file(os.path.join(rank_dir, "model.safetensors")).items()}


def _raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes as stored (row-major, little-endian), as in the official safetensors file."""
    return t.contiguous().flatten().view(torch.int16).numpy().tobytes()


def test_shipped_golden_cases_are_present():
    """tests/data ships every golden case (a clone without ../shared must still run them)."""
    cases = golden_cases(GOLDEN)
    assert cases == ["a_doc__argfix", "b_tp4", "c_pp4", "d_vocab_pad", "f_layernorm_gelu"], cases
    if HAVE_SHARED:
        assert cases == golden_cases(SHARED_GOLDEN)


@pytest.mark.parametrize("root,case", CASES)
def test_golden_case(root, case, tmp_path):
    save = str(tmp_path / "out")
    argv = official_argv(case, save, root)
    if "--fc1-layout" not in argv:
        argv += ["--fc1-layout", "concat"]  # golden inputs store fc1 as [gate; up] (docs/FORMAT.md §4)
    run_cli(argv)
    exp_root = os.path.join(root, case, "expected")
    layout = json.load(open(os.path.join(exp_root, "layout.json")))
    assert tree(save) == sorted(layout["files"] + ["latest_checkpointed_iteration.txt"])
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt"), "rb").read() == layout["tracker"].encode()
    for rel in layout["files"]:
        rank_dir = os.path.join(exp_root, os.path.dirname(rel))
        meta = json.load(open(os.path.join(rank_dir, "meta.json")))
        expected = _expected(rank_dir)
        sd = torch.load(os.path.join(save, rel), map_location="cpu", weights_only=False)
        assert set(sd) == set(meta["top_level_keys"]) - {"rerun_state_machine"}, rel
        for k, v in meta["top_level"].items():
            assert sd[k] == v and type(sd[k]) is type(v), (rel, k)
        model = sd["model"]
        assert list(model) == meta["model_keys_in_order"], rel
        for k, want in meta["extra_state_keys"].items():
            assert _extra_state_repr(model[k]) == want, (rel, k)
        tensors = {k: v for k, v in model.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        assert set(tensors) == set(expected), rel
        for k, (dtype, shape, same) in expected.items():
            got = tensors[k]
            assert got.dtype == torch.bfloat16 and dtype == "BF16", (rel, k, got.dtype, dtype)
            assert tuple(got.shape) == shape, (rel, k, got.shape, shape)
            assert same(got), (rel, k)
        args = vars(sd["args"])
        for k, want in meta["args"].items():
            if want == "<absent>":
                assert k not in args, (rel, k)
            else:
                assert k in args, (rel, k)
                assert args[k] == want and type(args[k]) is type(want), (rel, k, args[k], want)


if HAVE_SHARED:  # defined only then: a clone without ../shared has nothing to compare with (and no skip to report)

    def test_shipped_data_is_what_make_test_data_writes(tmp_path):
        """tests/data is exactly scripts/make_test_data.py's output for the current ../shared."""
        import make_test_data

        out = str(tmp_path / "data")
        make_test_data.make(SHARED, out)
        # megatron_truth/ is not derived from ../shared: real Megatron's dumps (scripts/megatron_truth.py)
        shipped = [rel for rel in tree(DATA) if not rel.startswith("megatron_truth/")]
        assert tree(out) == shipped
        for rel in shipped:
            assert contents(os.path.join(out, rel)) == contents(os.path.join(DATA, rel)), rel
