#!/usr/bin/env python3
"""Write a synthetic per-rank MindSpore training output (TP slices + JSON strategy), in bounded memory.

The same model as :mod:`synth` (same names, shapes and values for a given
:class:`synth.ModelSpec`), cut into ``tp`` tensor-parallel slices the way a
mindformers training run under semi-auto parallel saves them (FORMAT.md §8)::

    OUT/checkpoint/rank_R/<prefix>_rank_R-1_1.safetensors
    OUT/strategy/ckpt_strategy_rank_R.json

* column-parallel weights (word embeddings, ``linear_qkv``, ``linear_fc1``,
  ``output_layer``, their biases; legacy ``wq/wk/wv/w1/w3``) are split on dim 0;
* row-parallel weights (``linear_proj``, ``linear_fc2``; legacy ``wo/w2``) on dim 1;
* norms and row-parallel biases are replicated: every rank holds all of them.

The strategy says so with ``dev_matrix [tp]`` and ``tensor_map`` ``[0, -1]`` /
``[-1, 0]`` / ``[-1]`` (MindSpore's JSON form, one file per rank). Every rank
file is written at once: each block of full-tensor rows is generated once and
its slices go to their files, so a 15 GB model needs a few tens of MB of RAM.
Concatenating the slices gives exactly :func:`synth.write_checkpoint`'s tensors,
which is what the tests compare against.

    python scripts/synth_dist.py OUT_DIR --tp 8 --preset llama70b --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from dataclasses import asdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import synth  # noqa: E402

ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight", "attention.wo.weight", "feed_forward.w2.weight")
COLUMN_PARALLEL = ("word_embeddings.weight", "linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight",
                   "linear_fc1.bias", "output_layer.weight", "tok_embeddings.embedding_weight", "lm_head.weight",
                   "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wq.bias",
                   "attention.wk.bias", "attention.wv.bias", "feed_forward.w1.weight", "feed_forward.w3.weight",
                   "feed_forward.w1.bias", "feed_forward.w3.bias")
PREFIX = "llama"
SPEC_FILE = "synth_dist_spec.json"


def split_dim(name: str, ndim: int):
    """The dimension a tensor is split on across TP ranks, or None (replicated)."""
    if name.endswith(ROW_PARALLEL):
        return 1
    if name.endswith(COLUMN_PARALLEL):
        return 0
    return None


def tensor_map(dim, ndim: int) -> list:
    return [0 if d == dim else -1 for d in range(ndim)]


def slice_shape(shape: tuple, dim, tp: int, name: str) -> tuple:
    if dim is None:
        return tuple(shape)
    if shape[dim] % tp:
        raise SystemExit(f"{name}: dimension {dim} of {list(shape)} does not split into {tp} slices")
    out = list(shape)
    out[dim] //= tp
    return tuple(out)


def rank_file(out_dir: str, r: int) -> str:
    return os.path.join(out_dir, "checkpoint", f"rank_{r}", f"{PREFIX}_rank_{r}-1_1.safetensors")


def write_strategy(out_dir: str, s: synth.ModelSpec, tp: int) -> None:
    items = {}
    for name, shape in synth.stored_tensors(s).items():
        dim = split_dim(name, len(shape))
        items[name] = {"dev_matrix": [tp], "tensor_map": tensor_map(dim, len(shape)), "tensor_shape": list(shape),
                       "field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}
    os.makedirs(os.path.join(out_dir, "strategy"), exist_ok=True)
    for r in range(tp):
        doc = {"current_stage": 0, "parallel_strategy_item": {"default": {"stage": 0, "parallel_strategy": [[1]]}},
               "parallel_layout_item": items}
        with open(os.path.join(out_dir, "strategy", f"ckpt_strategy_rank_{r}.json"), "w") as f:
            json.dump(doc, f, indent=1)


def write_distributed(out_dir: str, s: synth.ModelSpec, tp: int, quiet: bool = True) -> list:
    """Write the rank files and strategy of ``s`` cut into ``tp`` slices; return the rank file paths."""
    tensors = synth.stored_tensors(s)
    # MindSpore orders a file's entries by element size (larger first), then by name
    entries = sorted(((n, sh, synth.stored_dtype(s, n)) for n, sh in tensors.items()),
                     key=lambda e: (-synth.DTYPE_SIZE[e[2]], e[0]))
    header, off = {}, 0
    for name, shape, dt in entries:
        piece = slice_shape(shape, split_dim(name, len(shape)), tp, name)
        nb = int(np.prod(piece)) * synth.DTYPE_SIZE[dt]
        header[name] = {"dtype": dt, "shape": list(piece), "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = {"format": "ms"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    paths = [rank_file(out_dir, r) for r in range(tp)]
    files = []
    try:
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            f = open(p + ".tmp", "wb")
            files.append(f)
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
        for name, shape, dt in entries:
            _write_slices(files, s, name, shape, dt, split_dim(name, len(shape)), tp)
    finally:
        for f in files:
            f.close()
    for p in paths:
        os.replace(p + ".tmp", p)
        if not quiet:
            print(f"wrote {p} ({os.path.getsize(p) / 2**30:.2f} GiB)", file=sys.stderr)
    write_strategy(out_dir, s, tp)
    with open(os.path.join(out_dir, SPEC_FILE), "w") as f:
        json.dump({"spec": asdict(s), "tp": tp}, f, indent=1)
    return paths


def _write_slices(files: list, s: synth.ModelSpec, name: str, shape: tuple, dtype: str, dim, tp: int) -> None:
    rows = shape[0]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    per = max(1, synth.CHUNK_ELEMS // cols)
    if dim == 0:  # each rank's rows are one run of the full tensor's rows
        share = rows // tp
        for r, f in enumerate(files):
            for a in range(r * share, (r + 1) * share, per):
                b = min((r + 1) * share, a + per)
                f.write(synth._encode(synth._stored_value_rows(s, name, shape, a, b).reshape(-1), dtype))
        return
    for a in range(0, rows, per):
        b = min(rows, a + per)
        vals = synth._stored_value_rows(s, name, shape, a, b)
        if dim is None:
            data = synth._encode(vals.reshape(-1), dtype)
            for f in files:
                f.write(data)
        else:  # dim 1 of a 2-D tensor: each rank's band of columns
            width = cols // tp
            for r, f in enumerate(files):
                f.write(synth._encode(np.ascontiguousarray(vals[:, r * width:(r + 1) * width]).reshape(-1), dtype))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--preset", choices=sorted(synth.PRESETS), default=None)
    for fld in ("layers", "hidden", "ffn", "heads", "groups", "vocab", "seed"):
        p.add_argument(f"--{fld}", type=int)
    p.add_argument("--dtype", choices=["F32", "BF16", "F16"])
    a = p.parse_args(argv)
    s = synth.ModelSpec(**asdict(synth.PRESETS[a.preset])) if a.preset else synth.ModelSpec()
    for fld in ("layers", "hidden", "ffn", "heads", "groups", "vocab", "seed", "dtype"):
        v = getattr(a, fld)
        if v is not None:
            setattr(s, fld, v)
    paths = write_distributed(a.out_dir, s, a.tp, quiet=False)
    total = sum(os.path.getsize(x) for x in paths)
    print(f"synthetic per-rank output: {a.out_dir} ({len(paths)} rank files, {total / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
