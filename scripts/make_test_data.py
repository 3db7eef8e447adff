#!/usr/bin/env python3
"""Derive tests/data/ from the workspace's shared data, so that a fresh clone runs every test.

The golden cases and MindSpore-written fixtures live in ``../shared`` beside the
project checkout, which a clone elsewhere does not have; without them the golden
comparisons and the tests on real MindSpore files would not run. This script
writes a small copy into the repository (``tests/data/``), which is committed:

``golden/<case>/``
    ``case.json`` and ``expected/layout.json`` and every ``meta.json``: copied
    unchanged. ``input/*.safetensors``: the official input with every F32
    tensor stored as BF16, exactly ``tensor.to(torch.bfloat16)`` (names,
    shapes, file split and header metadata unchanged; BF16 tensors copied).
    The official pipeline's output is ``fp32.to(bfloat16)`` followed by pure
    row/column rearrangement, so its expected bytes are also the exact
    conversion of this BF16 input. ``expected/<rank>/tensors.json``: instead of
    the expected tensors, per tensor the dtype, shape and sha256 of the
    official bytes, read straight from the official file (not via torch).
``fixtures/{mindspore,mindformers_moe,mindspore_dist,hf_pairs}/``
    copied byte for byte (MindSpore's own files, optimizer states and all:
    tests of the input readers need them as MindSpore wrote them).
``SOURCES.json``
    sha256 and size of every shared file used, so that a change in
    ``../shared`` is visible.

The result depends only on the shared files (sorted walks, fixed JSON layout),
so rerunning it gives the same bytes; ``tests/test_golden.py`` checks that the
committed copy is what this script makes whenever ``../shared`` is present.

    python scripts/make_test_data.py [--shared DIR] [--out DIR]

``--shared`` defaults to ``$STREAMCONV_SHARED`` or ``../shared`` beside the
repository; ``--out`` to ``tests/data``. The output directory is replaced as a
whole, and only if it is absent or was written by this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURE_SETS = ("mindspore", "mindformers_moe", "mindspore_dist", "hf_pairs")
SOURCES = "SOURCES.json"
README = """\
# Test data derived from the workspace's shared data

Written by `scripts/make_test_data.py` (see its docstring); do not edit by hand. Regenerate with
`python scripts/make_test_data.py` in a checkout that has `../shared` beside it.

* `golden/<case>/`: the official pipeline's golden cases (docs/FORMAT.md §4). `input/` holds the
  official input with F32 tensors stored as BF16 (exactly `tensor.to(torch.bfloat16)`);
  `expected/` holds the official `layout.json` and per rank file its `meta.json` and, in
  `tensors.json`, the dtype, shape and sha256 of every tensor the official pipeline wrote.
* `fixtures/`: files written by MindSpore / mindformers themselves, copied unchanged
  (see the README.md in each directory).
* `SOURCES.json`: size and sha256 of every shared file these were made from.
"""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors_raw(path: str) -> tuple:
    """(header dict, data bytes) of a safetensors file, parsed by hand: the official bytes as stored."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    return header, blob[8 + n:]


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def walk_files(root: str) -> list:
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files)]
    return out


def bf16_input(src: str, dst: str) -> None:
    """The official input file with every F32 tensor rounded to BF16 by torch (everything else as is)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    header, _ = read_safetensors_raw(src)
    metadata = header.get("__metadata__")
    tensors = {}
    with safe_open(src, "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dtype == torch.float32:
                t = t.to(torch.bfloat16)
            elif t.dtype != torch.bfloat16:
                raise SystemExit(f"{src}: {name} is {t.dtype}; expected F32 or BF16 golden inputs")
            tensors[name] = t.contiguous()
    save_file(tensors, dst, metadata=metadata)


def tensor_digests(expected_file: str, key_order: list) -> dict:
    """Per tensor of an official expected file: dtype, shape, sha256 of its bytes, in Megatron's key order."""
    header, data = read_safetensors_raw(expected_file)
    header.pop("__metadata__", None)
    unknown = set(header) - set(key_order)
    if unknown:
        raise SystemExit(f"{expected_file}: tensors not in meta.json's key order: {sorted(unknown)}")
    out = {}
    for key in key_order:
        if key in header:
            e = header[key]
            begin, end = e["data_offsets"]
            out[key] = {"dtype": e["dtype"], "shape": e["shape"], "sha256": hashlib.sha256(data[begin:end]).hexdigest()}
    return out


def make_golden(shared_golden: str, out_golden: str) -> None:
    for case in sorted(os.listdir(shared_golden)):
        src = os.path.join(shared_golden, case)
        if not os.path.isfile(os.path.join(src, "case.json")):
            continue
        dst = os.path.join(out_golden, case)
        os.makedirs(os.path.join(dst, "input"))
        shutil.copyfile(os.path.join(src, "case.json"), os.path.join(dst, "case.json"))
        for rel in walk_files(os.path.join(src, "input")):
            if not rel.endswith(".safetensors") or os.sep in rel:
                raise SystemExit(f"{src}/input/{rel}: unexpected file in a golden input")
            bf16_input(os.path.join(src, "input", rel), os.path.join(dst, "input", rel))
        exp_src, exp_dst = os.path.join(src, "expected"), os.path.join(dst, "expected")
        os.makedirs(exp_dst)
        shutil.copyfile(os.path.join(exp_src, "layout.json"), os.path.join(exp_dst, "layout.json"))
        layout = json.load(open(os.path.join(exp_src, "layout.json")))
        for rank_file in layout["files"]:
            rank = os.path.dirname(rank_file)
            os.makedirs(os.path.join(exp_dst, rank))
            shutil.copyfile(os.path.join(exp_src, rank, "meta.json"), os.path.join(exp_dst, rank, "meta.json"))
            meta = json.load(open(os.path.join(exp_src, rank, "meta.json")))
            digests = tensor_digests(os.path.join(exp_src, rank, "model.safetensors"), meta["model_keys_in_order"])
            write_json(os.path.join(exp_dst, rank, "tensors.json"), digests)


def make(shared: str, out: str) -> None:
    shared = os.path.abspath(shared)
    if not os.path.isdir(os.path.join(shared, "golden")):
        raise SystemExit(f"{shared}/golden not found: give --shared (or set STREAMCONV_SHARED)")
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, SOURCES)):
        raise SystemExit(f"{out} exists and was not written by this script (no {SOURCES}); remove it or choose --out")
    tmp = out + ".new"
    if os.path.exists(tmp):
        raise SystemExit(f"{tmp} exists (an earlier run stopped half way?); remove it first")
    os.makedirs(tmp)
    try:
        make_golden(os.path.join(shared, "golden"), os.path.join(tmp, "golden"))
        for name in FIXTURE_SETS:
            src = os.path.join(shared, "fixtures", name)
            for rel in walk_files(src):
                os.makedirs(os.path.dirname(os.path.join(tmp, "fixtures", name, rel)), exist_ok=True)
                shutil.copyfile(os.path.join(src, rel), os.path.join(tmp, "fixtures", name, rel))
        used = [os.path.join("golden", rel) for rel in walk_files(os.path.join(shared, "golden"))]
        used += [os.path.join("fixtures", n, rel) for n in FIXTURE_SETS for rel in walk_files(os.path.join(shared, "fixtures", n))]
        write_json(os.path.join(tmp, SOURCES), {rel: {"bytes": os.path.getsize(os.path.join(shared, rel)),
                                                      "sha256": sha256_file(os.path.join(shared, rel))}
                                                for rel in sorted(used)})
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(README)
    except BaseException:
        shutil.rmtree(tmp)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)  # verified above: this script's own earlier output
    os.rename(tmp, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default=os.environ.get("STREAMCONV_SHARED", os.path.join(REPO, "..", "shared")))
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data"))
    a = p.parse_args(argv)
    make(a.shared, a.out)
    total = sum(os.path.getsize(os.path.join(a.out, rel)) for rel in walk_files(a.out))
    print(f"wrote {a.out}: {len(walk_files(a.out))} files, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
