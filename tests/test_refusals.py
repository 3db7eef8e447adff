"""Issue 4, "Bad input gets a clear refusal": every refusal, run through the CLI.

Each refusal runs ``python -m streamconv`` as a subprocess (through
:func:`refuse`) and asserts, independently of streamconv's code:

* exit status 2;
* stderr is exactly one line, starting with ``streamconv: error:``, that names
  the offending file / tensor / flag / path (the names are checked, not the
  wording);
* no traceback anywhere in the output;
* the save directory does not exist afterwards, or is unchanged (same files,
  bytes, sizes and mtimes) when it existed before;
* the input files are byte-for-byte unchanged (hashed before and after), nothing
  was added next to them, and the working directory stays empty;
* refusals of damaged/lying headers run under a 3 GiB address-space limit, so an
  allocation sized from a claimed (never present) size fails loudly.

The accepted cases at the end check that the refusals are specific: MindSpore's
own training fixtures (optimizer states, step entries) convert and report how many
entries were skipped, ``--overwrite`` keeps files streamconv did not write, and the
stated ``--max-memory`` floor is a budget that works.

Expectations never come from streamconv: inputs are written here (or by
``scripts/synth.py``) and outputs are read back with ``torch.load``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import stat
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import FIXTURES, contents
from synth import ModelSpec, stored_tensors, write_checkpoint

ERR = "streamconv: error:"
TRACKER = "latest_checkpointed_iteration.txt"
#: address-space ceiling for refusal runs: far above what parsing tiny headers needs
#: (the interpreter with torch maps ~0.7 GB), far below any size a lying header claims
REFUSAL_ADDRESS_SPACE = 3 * 2**30
CLI_TIMEOUT = 120
DTYPE_SIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1}

# the flags every tiny synthetic model below needs: shapes alone cannot tell the head count
BASE_FLAGS = ["--num-attention-heads", "4", "--num-query-groups", "2"]
FIXTURE_FLAGS = ["--num-attention-heads", "4", "--num-query-groups", "2"]


# --------------------------------------------------------------------------- running


def _limit_address_space():  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (REFUSAL_ADDRESS_SPACE, REFUSAL_ADDRESS_SPACE))


def cli(argv, cwd, *, limit_memory=False, timeout=CLI_TIMEOUT) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("STREAMCONV_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "streamconv", *[str(a) for a in argv]],
        cwd=str(cwd), capture_output=True, text=True, env=env, timeout=timeout,
        preexec_fn=_limit_address_space if limit_memory else None,
    )


def snapshot(*roots) -> dict:
    """Every entry under ``roots``: files by sha256, size, mtime and mode; dirs; symlinks by target."""
    out = {}
    for root in roots:
        root = str(root)
        if not os.path.lexists(root):
            out[root] = "absent"
            continue
        if os.path.islink(root) or not os.path.isdir(root):
            out[root] = _entry(root)
            continue
        for d, dirs, files in os.walk(root):
            out[d] = ("dir", os.lstat(d).st_mode)
            for name in dirs + files:
                p = os.path.join(d, name)
                if os.path.islink(p) or name in files:
                    out[p] = _entry(p)
    return out


def _entry(p):
    st = os.lstat(p)
    if os.path.islink(p):
        return ("link", os.readlink(p))
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device: never open it
        return ("special", st.st_mode)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return ("file", h.hexdigest(), st.st_size, st.st_mtime_ns, st.st_mode)


def _show(argv, p) -> str:
    return f"\nargv: {' '.join(map(str, argv))}\nexit: {p.returncode}\n--- stdout\n{p.stdout}--- stderr\n{p.stderr}"


def _names(line: str, name, ws) -> bool:
    """``name`` occurs in ``line``; a bare name must not merely occur inside the test's temp path."""
    name = str(name)
    if not name.startswith(str(ws.root)):
        line = line.replace(str(ws.root), "<tmp>")
    return name in line


def _says_missing(line: str, ws) -> bool:
    return bool(re.search(r"exist|no such|not found|missing", line.replace(str(ws.root), "<tmp>"), re.I))


def refuse(ws, argv, *, names=(), any_of=(), watch=(), save=None, limit_memory=True, max_seconds=None,
           timeout=CLI_TIMEOUT) -> str:
    """Run a command that must be refused; check everything issue 4 asks of a refusal.

    ``names``: every one must appear in the error line. ``any_of``: at least one must.
    ``watch``: input roots that must be unchanged (the test's temp dir always is).
    ``save``: the save directory (defaults to the workspace's). Returns the error line.
    """
    save = str(save or ws.save)
    save_before = snapshot(save) if os.path.lexists(save) else None
    # the test's whole temp dir too: nothing may appear next to the save dir or the input either
    watched = [str(w) for w in watch] + [str(ws.root)]
    before = snapshot(*watched)
    t0 = time.monotonic()
    try:
        p = cli(argv, ws.cwd, limit_memory=limit_memory, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"streamconv hung: no answer within {timeout} s\nargv: {' '.join(map(str, argv))}")
    elapsed = time.monotonic() - t0
    shown = _show(argv, p)
    assert "Traceback" not in p.stderr + p.stdout, "traceback in the output" + shown
    assert p.returncode == 2, "exit status must be 2" + shown
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr must be exactly one line, got {len(lines)}" + shown
    line = lines[0]
    assert line.startswith(ERR), f"the line must start with {ERR!r}" + shown
    print(f"refused: {line}")
    for n in names:
        assert _names(line, n, ws), f"the error line must name {n!r}" + shown
    if any_of:
        assert any(_names(line, n, ws) for n in any_of), f"the error line must name one of {list(any_of)}" + shown
    if save_before is None:
        assert not os.path.lexists(save), f"the save directory {save} was created" + shown
    else:
        assert snapshot(save) == save_before, f"the pre-existing save directory {save} was changed" + shown
    assert snapshot(*watched) == before, "the input was modified" + shown
    assert os.listdir(ws.cwd) == [], f"files were written to the working directory: {os.listdir(ws.cwd)}" + shown
    if max_seconds is not None:
        assert elapsed < max_seconds, f"refusal took {elapsed:.1f} s (limit {max_seconds} s)" + shown
    return line


def accept(ws, argv, *, watch=(), timeout=CLI_TIMEOUT) -> subprocess.CompletedProcess:
    before = snapshot(*[str(w) for w in watch])
    p = cli(argv, ws.cwd, timeout=timeout)
    shown = _show(argv, p)
    assert p.returncode == 0, "conversion must succeed" + shown
    assert "Traceback" not in p.stderr + p.stdout, shown
    assert snapshot(*[str(w) for w in watch]) == before, "the input was modified" + shown
    assert os.listdir(ws.cwd) == [], f"files were written to the working directory: {os.listdir(ws.cwd)}" + shown
    return p


class Workspace:
    def __init__(self, root):
        self.root = root
        self.cwd = root / "cwd"
        self.cwd.mkdir()
        self.inp = root / "in"
        self.save = root / "out"


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path)


# --------------------------------------------------------------------------- writing inputs


def model_entries(spec: ModelSpec) -> list:
    return [(n, spec.dtype, tuple(s)) for n, s in stored_tensors(spec).items()]


def _data(nbytes: int, seed: int = 0) -> bytes:
    vals = np.random.default_rng(seed).uniform(-0.05, 0.05, size=(nbytes + 3) // 4).astype("<f4")
    return vals.tobytes()[:nbytes]


def write_st(path, entries, *, metadata=None) -> str:
    """A safetensors file packed back to back (MindSpore style) from (name, dtype, shape)."""
    header, off = {}, 0
    for name, dt, shape in entries:
        nb = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZE[dt] if shape else DTYPE_SIZE[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    header["__metadata__"] = metadata or {"format": "ms"}
    write_raw(path, json.dumps(header, separators=(",", ":")).encode(), _data(off))
    return str(path)


def write_raw(path, header_bytes: bytes, data: bytes, length: int | None = None) -> None:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes) if length is None else length))
        f.write(header_bytes)
        f.write(data)


def read_st(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def patch_header(path, fn) -> None:
    """Rewrite ``path``'s header through ``fn(header_dict, data_size)``; the data section is kept."""
    hdr, data = read_st(path)
    fn(hdr, len(data))
    write_raw(path, json.dumps(hdr, separators=(",", ":")).encode(), data)


BASE = ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=2, vocab=256)


def base_model(ws, spec: ModelSpec = BASE) -> str:
    """A fresh copy of a tiny valid model in ``ws.inp``; returns the weight file's path."""
    (path,) = write_checkpoint(str(ws.inp), spec)
    return path


MODELS = {
    "base": BASE,
    "qkln": ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=2, vocab=256, qk_layernorm=True),
    "gelu": ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=2, vocab=256, swiglu=False),
    "layernorm": ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=2, vocab=256, norm="LayerNorm"),
    "groups1": ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=1, vocab=256),
    "mha3": ModelSpec(layers=2, hidden=48, ffn=128, heads=3, groups=3, vocab=256),
    "ffn127": ModelSpec(layers=2, hidden=64, ffn=127, heads=4, groups=2, vocab=256),
    "vocab255": ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=2, vocab=255),
    "layers3": ModelSpec(layers=3, hidden=64, ffn=128, heads=4, groups=2, vocab=256),
    "tied": ModelSpec(layers=2, hidden=64, ffn=128, heads=4, groups=2, vocab=256, tied=True),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Read-only tiny models shared by the flag tests (each test still checks they stay unchanged)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, spec in MODELS.items():
        d = root / name
        write_checkpoint(str(d), spec)
        out[name] = str(d)
    return out


# =========================================================================== safetensors damage

WEIGHT_FILE = "model.safetensors"
T_A = "decoder.layers.0.input_layernorm.weight"  # [64] F32
T_B = "decoder.layers.0.pre_mlp_layernorm.weight"  # [64] F32, same size as T_A


@pytest.mark.parametrize("cut", ["mid-data", "last-byte", "mid-header", "inside-length", "empty"])
def test_truncated_file(ws, cut):
    path = base_model(ws)
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    keep = {"mid-data": 8 + n + (len(raw) - 8 - n) // 2, "last-byte": len(raw) - 1,
            "mid-header": 8 + n // 2, "inside-length": 5, "empty": 0}[cut]
    open(path, "wb").write(raw[:keep])
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE], watch=[ws.inp])


@pytest.mark.parametrize("length", ["file-size", "16GiB", "u64-max"])
def test_header_length_beyond_file(ws, length):
    path = base_model(ws)
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    claim = {"file-size": len(raw), "16GiB": 16 * 2**30, "u64-max": 2**64 - 1}[length]
    open(path, "wb").write(struct.pack("<Q", claim) + raw[8:])
    refuse(ws, ["--load-dir", path, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE], watch=[ws.inp])


@pytest.mark.parametrize("damage", ["unclosed", "garbage", "not-utf8", "not-an-object", "trailing-junk", "nul-bytes"])
def test_unparsable_header_json(ws, damage):
    path = base_model(ws)
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    hb, data = raw[8:8 + n], raw[8 + n:]
    if damage == "unclosed":
        hb = hb[:-1] + b" "
    elif damage == "garbage":
        hb = b"\x00\x13garbage" + hb[9:]
    elif damage == "not-utf8":
        i = hb.index(b"input_layernorm")
        hb = hb[:i] + b"\xff\xfe" + hb[i + 2:]
    elif damage == "not-an-object":
        hb = b"[" + b" " * (len(hb) - 2) + b"]"
    elif damage == "trailing-junk":
        hb = hb[:-3] + b"}}}"
    else:
        hb = b"\x00" * len(hb)
    write_raw(path, hb, data)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE], watch=[ws.inp])


@pytest.mark.parametrize("dtype", ["F33", "Q4_0", "f32", "", "I32"])  # I32: known, not a weight dtype
def test_unknown_dtype(ws, dtype):
    path = base_model(ws)

    def f(h, _):
        h[T_A]["dtype"] = dtype

    patch_header(path, f)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE, T_A], watch=[ws.inp])


@pytest.mark.parametrize("where", ["past-end", "straddles-end", "negative"])
def test_data_offsets_out_of_range(ws, where):
    path = base_model(ws)

    def f(h, size):
        nb = h[T_A]["data_offsets"][1] - h[T_A]["data_offsets"][0]  # the span stays consistent with the shape
        h[T_A]["data_offsets"] = {"past-end": [size + 64, size + 64 + nb], "straddles-end": [size - nb // 2, size - nb // 2 + nb],
                                  "negative": [-nb, 0]}[where]

    patch_header(path, f)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE], any_of=[T_A],
           watch=[ws.inp])


@pytest.mark.parametrize("how", ["identical", "partial"])
def test_overlapping_offsets(ws, how):
    path = base_model(ws)

    def f(h, _):
        b, e = h[T_A]["data_offsets"]
        h[T_B]["data_offsets"] = [b, e] if how == "identical" else [b + 4, e + 4]

    patch_header(path, f)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE], any_of=[T_A, T_B],
           watch=[ws.inp])


@pytest.mark.parametrize("how", ["shape", "dtype", "scalar"])
def test_shape_dtype_size_differs_from_span(ws, how):
    path = base_model(ws)

    def f(h, _):
        if how == "shape":
            h[T_A]["shape"] = [63]
        elif how == "dtype":
            h[T_A]["dtype"] = "BF16"  # 64 x 2 bytes in a 256-byte span
        else:
            h[T_A]["shape"] = []  # a scalar: 4 bytes in a 256-byte span

    patch_header(path, f)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE, T_A], watch=[ws.inp])


@pytest.mark.parametrize("claim", ["16GiB-tensor-in-range-of-nothing", "petabyte-shape-small-span",
                                   "shape-product-of-4500-digits", "header-claims-1PiB"])
def test_lying_header_claims_huge_size(ws, claim):
    """A header claiming sizes far beyond the file must be refused from the header alone,
    under an address-space limit (no allocation sized from the claim)."""
    path = base_model(ws)
    if claim == "header-claims-1PiB":
        raw = open(path, "rb").read()
        open(path, "wb").write(struct.pack("<Q", 2**50) + raw[8:])
    else:
        def f(h, size):
            b = h[T_A]["data_offsets"][0]
            if claim == "16GiB-tensor-in-range-of-nothing":
                h[T_A]["shape"] = [2**17, 2**15]
                h[T_A]["data_offsets"] = [b, b + 2**34]
            elif claim == "petabyte-shape-small-span":
                h[T_A]["shape"] = [2**25, 2**25]
            else:
                # each dimension is a legal JSON integer (1500 digits), their product is not printable
                # with Python's default int->str limit: formatting it must not crash the refusal
                h[T_A]["shape"] = [10**1500, 10**1500, 10**1500]

        patch_header(path, f)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE], watch=[ws.inp])


def test_lying_header_with_a_million_dimensions_is_refused_quickly(ws):
    """600,000 dimensions of 2 (a 1.2 MB header): the size check must not cost quadratic big-int work."""
    path = base_model(ws)

    def f(h, _):
        h[T_A]["shape"] = [2] * 600_000

    patch_header(path, f)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[WEIGHT_FILE], watch=[ws.inp],
           max_seconds=5)


# =========================================================================== checkpoint content


@pytest.mark.parametrize("missing", [
    "decoder.layers.1.mlp.linear_fc2.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.1.pre_mlp_layernorm.weight",
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
])
def test_needed_tensor_missing(ws, missing):
    entries = [e for e in model_entries(BASE) if e[0] != missing]
    assert len(entries) == len(model_entries(BASE)) - 1
    write_st(ws.inp / WEIGHT_FILE, entries)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[missing], watch=[ws.inp])


def test_middle_layer_missing(ws):
    spec = MODELS["layers3"]
    entries = [e for e in model_entries(spec) if not e[0].startswith("decoder.layers.1.")]
    write_st(ws.inp / WEIGHT_FILE, entries)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], any_of=["decoder.layers.1.", "layer 1"],
           watch=[ws.inp])


@pytest.mark.parametrize("index", ["10**15", "5000-digits"])
def test_layer_index_far_beyond_the_others(ws, index):
    """A lying header naming layer 10**15 (or a 5000-digit layer): refused from the names,
    not by building a list of that many layers (run under the address-space limit)."""
    i = str(10**15) if index == "10**15" else "7" * 5000
    name = f"decoder.layers.{i}.input_layernorm.weight"
    write_st(ws.inp / WEIGHT_FILE, model_entries(BASE) + [(name, "F32", (64,))])
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS],
           any_of=[name, "decoder.layers.2.", "layer 2", i[:40]], watch=[ws.inp])


def test_tensor_listed_in_index_but_absent_from_its_file(ws):
    paths = write_checkpoint(str(ws.inp), dataclasses.replace(BASE, files=2))
    assert len(paths) == 2
    idx = ws.inp / "model.safetensors.index.json"
    obj = json.load(open(idx))
    obj["weight_map"]["decoder.layers.0.self_attention.extra_tensor.weight"] = os.path.basename(paths[0])
    idx.write_text(json.dumps(obj))
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS],
           names=["decoder.layers.0.self_attention.extra_tensor.weight"], watch=[ws.inp])


@pytest.mark.parametrize("layout", ["two-files", "indexed-shards", "same-file-two-names"])
def test_same_tensor_in_two_files(ws, layout):
    dup = "decoder.final_layernorm.weight"
    if layout == "two-files":
        write_st(ws.inp / "a.safetensors", model_entries(BASE))
        write_st(ws.inp / "b.safetensors", [(dup, "F32", (64,))])
        files = ["a.safetensors", "b.safetensors"]
    elif layout == "indexed-shards":
        paths = write_checkpoint(str(ws.inp), dataclasses.replace(BASE, files=2))
        wm = json.load(open(ws.inp / "model.safetensors.index.json"))["weight_map"]
        dup = next(n for n, f in wm.items() if f == os.path.basename(paths[0]) and n.endswith("norm.weight"))
        second = paths[1]
        shape = read_st(paths[0])[0][dup]["shape"]
        hdr, _ = read_st(second)
        entries = [(k, v["dtype"], tuple(v["shape"])) for k, v in hdr.items() if k != "__metadata__"]
        write_st(second, entries + [(dup, "F32", tuple(shape))])
        files = [os.path.basename(p) for p in paths]
    else:
        # mcore and legacy names of the same weight side by side in one file
        write_st(ws.inp / WEIGHT_FILE, model_entries(BASE) + [("model.norm_out.weight", "F32", (64,))])
        refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS],
               any_of=["model.norm_out.weight", dup], watch=[ws.inp])
        return
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[dup], any_of=files, watch=[ws.inp])


@pytest.mark.parametrize("name", [
    "decoder.layers.0.mlp.router.weight",
    "vision_encoder.patch_embed.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight_scale",
    "exp_avg.decoder.layers.0.mlp.linear_fc1.weight",
])
def test_unknown_tensor_name(ws, name):
    write_st(ws.inp / WEIGHT_FILE, model_entries(BASE) + [(name, "F32", (4, 64))])
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[name], watch=[ws.inp])


def _unified_dir(d, spec=BASE) -> dict:
    """MindSpore's unified_safetensors output: partN files, param_name_map.json, hyper_param.safetensors."""
    entries = model_entries(spec)
    parts = {"part0.safetensors": entries[0::2], "part1.safetensors": entries[1::2]}
    wm = {}
    for fname, ents in parts.items():
        write_st(os.path.join(d, fname), ents)
        wm.update({n: fname for n, _, _ in ents})
    total = sum(int(np.prod(s)) * DTYPE_SIZE[dt] for _, dt, s in entries)
    with open(os.path.join(d, "param_name_map.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f)
    # rank-0 slices of filtered-out parameters under their full names, plus step entries
    write_st(os.path.join(d, "hyper_param.safetensors"), [
        ("embedding.word_embeddings.weight", "F32", (spec.vocab // 2, spec.hidden)),
        ("global_step", "I32", (1,)), ("epoch_num", "I32", (1,)),
    ])
    return wm


@pytest.mark.parametrize("damage", ["not-json", "no-weight-map", "weight-map-not-strings"])
def test_index_file_unreadable(ws, damage):
    write_checkpoint(str(ws.inp), dataclasses.replace(BASE, files=2))
    idx = ws.inp / "model.safetensors.index.json"
    obj = json.load(open(idx))
    if damage == "not-json":
        idx.write_text(json.dumps(obj)[:-7])
    elif damage == "no-weight-map":
        idx.write_text(json.dumps({"metadata": obj["metadata"]}))
    else:
        obj["weight_map"]["embedding.word_embeddings.weight"] = 3
        idx.write_text(json.dumps(obj))
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=["model.safetensors.index.json"],
           watch=[ws.inp])


@pytest.mark.parametrize("layout", ["hf-index-dir", "hf-index-file", "unified-param-name-map"])
def test_index_points_at_missing_file(ws, layout):
    if layout == "unified-param-name-map":
        _unified_dir(str(ws.inp))
        gone = "part1.safetensors"
        load = ws.inp
    else:
        paths = write_checkpoint(str(ws.inp), dataclasses.replace(BASE, files=2))
        gone = os.path.basename(paths[1])
        load = ws.inp if layout == "hf-index-dir" else ws.inp / "model.safetensors.index.json"
    os.remove(ws.inp / gone)
    refuse(ws, ["--load-dir", load, "--save-dir", ws.save, *BASE_FLAGS], names=[gone], watch=[ws.inp])


def _tp2_slices(spec: ModelSpec) -> list:
    """What one rank of a TP=2 training run stores: slices under the full names."""
    out = []
    for n, dt, shape in model_entries(spec):
        shape = list(shape)
        if n.endswith(("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")):
            shape[0] //= 2
        elif n.endswith(("linear_proj.weight", "linear_fc2.weight")):
            shape[1] //= 2
        out.append((n, dt, tuple(shape)))
    return out + [("adam_m." + n, dt, s) for n, dt, s in out[:3]] + [("global_step", "I32", (1,))]


@pytest.mark.parametrize("load", ["checkpoint-root", "rank-dir", "rank-file", "flat-dir-of-rank-files"])
def test_per_rank_training_output(ws, load):
    """Per-rank output without its strategy, or one rank of it alone, cannot be read (tests/test_msdist_convert.py
    converts it when the strategy is there)."""
    slices = _tp2_slices(BASE)
    if load == "flat-dir-of-rank-files":
        for r in range(2):
            write_st(ws.inp / f"llama_rank_{r}-1_1.safetensors", slices)
        target, names = ws.inp, ["--src-strategy-path"]
    else:
        for r in range(2):
            write_st(ws.inp / f"rank_{r}" / f"llama_rank_{r}-1_1.safetensors", slices)
        target = {"checkpoint-root": ws.inp, "rank-dir": ws.inp / "rank_0",
                  "rank-file": ws.inp / "rank_0" / "llama_rank_0-1_1.safetensors"}[load]
        names = ["--src-strategy-path"] if load == "checkpoint-root" else ["rank_0"]
    refuse(ws, ["--load-dir", target, "--save-dir", ws.save, *BASE_FLAGS], names=names, watch=[ws.inp])


@pytest.mark.parametrize("how", ["as-load-dir", "mapped-by-the-index"])
def test_hyper_param_offered_as_weights(ws, how):
    wm = _unified_dir(str(ws.inp))
    if how == "as-load-dir":
        target = ws.inp / "hyper_param.safetensors"
    else:
        wm["embedding.word_embeddings.weight"] = "hyper_param.safetensors"
        with open(ws.inp / "param_name_map.json", "w") as f:
            json.dump({"metadata": {"total_size": 1}, "weight_map": wm}, f)
        target = ws.inp
    refuse(ws, ["--load-dir", target, "--save-dir", ws.save, *BASE_FLAGS], names=["hyper_param.safetensors"],
           watch=[ws.inp])


# =========================================================================== flags vs content


@pytest.mark.parametrize("model,flags,flag", [
    ("base", BASE_FLAGS + ["--num-layers", "3"], "--num-layers"),
    ("base", BASE_FLAGS + ["--num-layers", "1"], "--num-layers"),
    ("base", BASE_FLAGS + ["--hidden-size", "128"], "--hidden-size"),
    ("base", BASE_FLAGS + ["--ffn-hidden-size", "256"], "--ffn-hidden-size"),
    ("qkln", ["--num-attention-heads", "8"], "--num-attention-heads"),  # q_layernorm fixes head dim 16
    ("base", ["--num-attention-heads", "3"], "--num-attention-heads"),  # does not divide 64 query rows
    ("qkln", ["--num-attention-heads", "4", "--num-query-groups", "4"], "--num-query-groups"),
    ("base", ["--num-attention-heads", "4", "--num-query-groups", "1"], "--num-query-groups"),
    ("base", ["--num-query-groups", "3"], "--num-query-groups"),
    ("base", BASE_FLAGS + ["--normalization", "LayerNorm"], "--normalization"),
    ("layernorm", BASE_FLAGS + ["--normalization", "RMSNorm"], "--normalization"),
    ("gelu", BASE_FLAGS + ["--swiglu"], "--swiglu"),
    ("base", BASE_FLAGS + ["--add-bias-linear"], "--add-bias-linear"),
    ("base", BASE_FLAGS + ["--add-qkv-bias"], "--add-qkv-bias"),
    ("base", BASE_FLAGS + ["--qk-layernorm"], "--qk-layernorm"),
    ("qkln", BASE_FLAGS + ["--kv-channels", "8"], "--kv-channels"),
    ("base", BASE_FLAGS + ["--padded-vocab-size", "384"], "--padded-vocab-size"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_dimension_flag_contradicts_shapes(ws, models, model, flags, flag):
    refuse(ws, ["--load-dir", models[model], "--save-dir", ws.save, *flags], names=[flag], watch=[models[model]])


@pytest.mark.parametrize("model,flags,flag", [
    ("base", BASE_FLAGS + ["--loader", "llama_mistral"], "--loader"),
    ("base", BASE_FLAGS + ["--saver", "hf"], "--saver"),
    ("base", BASE_FLAGS + ["--target-expert-parallel-size", "2"], "--target-expert-parallel-size"),
    ("base", BASE_FLAGS + ["--position-embedding-type", "learned_absolute"], "--position-embedding-type"),
    ("base", BASE_FLAGS + ["--seq-length", "0"], "--seq-length"),
    ("base", BASE_FLAGS + ["--seq-length", "4096", "--max-position-embeddings", "2048"], "--max-position-embeddings"),
    ("base", BASE_FLAGS + ["--target-tensor-parallel-size", "0"], "--target-tensor-parallel-size"),
    ("base", BASE_FLAGS + ["--target-pipeline-parallel-size", "x"], "--target-pipeline-parallel-size"),
    ("tied", BASE_FLAGS + ["--untie-embeddings-and-output-weights"], "--untie-embeddings-and-output-weights"),
    ("base", BASE_FLAGS + ["--fc1-layout", "zigzag"], "--fc1-layout"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_other_flags_refused(ws, models, model, flags, flag):
    refuse(ws, ["--load-dir", models[model], "--save-dir", ws.save, *flags], names=[flag], watch=[models[model]])


def test_vocab_file_unreadable_or_contradicting(ws, models):
    src = models["base"]
    missing = ws.root / "vocab.json"
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, "--vocab-file", missing],
           names=["--vocab-file"], watch=[src])
    vocab = ws.root / "vocab5.json"
    vocab.write_text(json.dumps({f"t{i}": i for i in range(5)}))
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, "--vocab-file", vocab,
                "--true-vocab-size", "3"], names=["--vocab-file", "--true-vocab-size"], watch=[src])


def test_some_linear_biases_missing(ws):
    """linear_proj has a bias, linear_fc1/fc2 do not: Megatron's add_bias_linear cannot load that."""
    path = base_model(ws)
    hdr, data = read_st(path)
    entries = [(n, v["dtype"], tuple(v["shape"])) for n, v in hdr.items() if n != "__metadata__"]
    entries.append(("decoder.layers.0.self_attention.linear_proj.bias", "F32", (64,)))
    entries.append(("decoder.layers.1.self_attention.linear_proj.bias", "F32", (64,)))
    write_st(path, entries)
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], any_of=["linear", "bias"],
           watch=[ws.inp])


def test_index_entry_escaping_the_checkpoint_directory(ws):
    base_model(ws)
    hdr, _ = read_st(ws.inp / WEIGHT_FILE)
    wm = {n: WEIGHT_FILE for n in hdr if n != "__metadata__"}
    wm[T_A] = "../elsewhere/model.safetensors"
    (ws.inp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    refuse(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], names=[T_A], watch=[ws.inp])


def test_unreadable_manifest(ws, models):
    """A damaged bookkeeping file: --resume is refused naming it; --overwrite starts over."""
    src = models["base"]
    (ws.save / ".streamconv").mkdir(parents=True)
    (ws.save / ".streamconv" / "run.json").write_text("{not json")
    (ws.save / "mine.txt").write_text("keep")
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, "--resume"],
           names=[".streamconv/run.json"], watch=[src])
    accept(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, "--overwrite", "--quiet"], watch=[src])
    assert open(ws.save / TRACKER).read() == "1"
    assert (ws.save / "mine.txt").read_text() == "keep"
    assert not (ws.save / ".streamconv").exists()


@pytest.mark.parametrize("model,flags,what", [
    ("groups1", ["--num-attention-heads", "4", "--num-query-groups", "1"], "query groups"),
    # every multiple of the query groups is a multiple of TP when the groups are, so heads that TP
    # does not divide come with groups it does not divide: an MHA model with 3 heads
    ("mha3", ["--num-attention-heads", "3", "--num-query-groups", "3"], "heads"),
    ("ffn127", BASE_FLAGS, "ffn"),
])
def test_tp_does_not_divide(ws, models, model, flags, what):
    refuse(ws, ["--load-dir", models[model], "--save-dir", ws.save, *flags, "--target-tensor-parallel-size", "2"],
           names=["--target-tensor-parallel-size"], watch=[models[model]])


def test_tp_does_not_divide_vocab_without_true_vocab_size(ws, models):
    src = models["vocab255"]
    argv = ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, "--target-tensor-parallel-size", "2"]
    refuse(ws, argv, names=["--target-tensor-parallel-size"], watch=[src])
    # accepted once the true vocab size says how to pad: 255 -> 256 rows
    accept(ws, argv + ["--true-vocab-size", "255", "--quiet"], watch=[src])
    assert open(ws.save / TRACKER).read() == "1"
    assert sorted(os.listdir(ws.save / "iter_0000001")) == ["mp_rank_00", "mp_rank_01"]


def test_pp_does_not_divide_layers(ws, models):
    src = models["layers3"]
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, "--target-pipeline-parallel-size", "2"],
           names=["--target-pipeline-parallel-size"], watch=[src])


@pytest.mark.parametrize("value", ["0", "-128"])
def test_vocab_divisor_must_be_positive(ws, models, value):
    src = models["base"]
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, "--true-vocab-size", "200",
                f"--make-vocab-size-divisible-by={value}"], names=["--make-vocab-size-divisible-by"], watch=[src])


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|TiB|kB|KB|MB|GB|TB|K|M|G|B)\b")


def test_max_memory_below_floor_states_the_smallest_budget_that_works(ws, models):
    src = models["base"]
    argv = ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS]
    line = refuse(ws, argv + ["--max-memory", "1MiB"], names=["--max-memory"], watch=[src], limit_memory=False)
    stated = [m for m in _SIZE_RE.finditer(line) if m.group(0).replace(" ", "") not in ("1MiB", "1.00MiB")]
    assert stated, f"the message must state the smallest budget that works: {line}"
    # the largest size in the message is the budget it asks for (the floor itself is smaller)
    unit = {"B": 1, "K": 1024, "KB": 1000, "kB": 1000, "KiB": 1024, "M": 2**20, "MB": 10**6, "MiB": 2**20,
            "G": 2**30, "GB": 10**9, "GiB": 2**30, "TB": 10**12, "TiB": 2**40}
    best = max(stated, key=lambda m: float(m.group(1)) * unit[m.group(2)])
    smallest = float(best.group(1)) * unit[best.group(2)]
    # The stated budget must really work (it is what the message promises). The floor is measured
    # in each process and jitters by a fraction of a MiB, so allow 2 MiB on top of the stated value.
    accept(ws, argv + ["--max-memory", str(int(smallest) + 2 * 2**20), "--quiet"], watch=[src])
    assert open(ws.save / TRACKER).read() == "1"


@pytest.mark.parametrize("value", ["0", "lots", "-5GiB"])
def test_max_memory_not_a_size(ws, models, value):
    src = models["base"]
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, f"--max-memory={value}"],
           names=["--max-memory"], watch=[src])


# =========================================================================== paths


def test_load_dir_does_not_exist(ws):
    missing = ws.root / "no-such-checkpoint"
    line = refuse(ws, ["--load-dir", missing, "--save-dir", ws.save, *BASE_FLAGS], names=[missing], watch=[ws.root])
    assert _says_missing(line, ws), f"must say that the load path does not exist: {line}"


def test_load_dir_does_not_exist_relative_paths(ws):
    """Relative paths from the working directory, as a user types them."""
    line = refuse(ws, ["--load-dir", "ckpt", "--save-dir", "out", *BASE_FLAGS], names=["ckpt"],
                  save=ws.cwd / "out", watch=[ws.root])
    assert _says_missing(line, ws), f"must say that the load path does not exist: {line}"


def test_load_dir_flag_missing(ws):
    refuse(ws, ["--save-dir", ws.save, *BASE_FLAGS], names=["--load-dir"], watch=[ws.root])


@pytest.mark.parametrize("where", ["subdir", "same-dir", "via-symlink", "next-to-load-file", "dotdot",
                                   "save-is-dangling-symlink-into-load"])
def test_save_dir_inside_load_dir(ws, where):
    path = base_model(ws)
    load = ws.inp
    if where == "subdir":
        save = ws.inp / "megatron"
    elif where == "same-dir":
        save = ws.inp
    elif where == "via-symlink":
        os.symlink(ws.inp, ws.root / "link")
        save = ws.root / "link" / "megatron"
    elif where == "next-to-load-file":
        load, save = path, ws.inp / "megatron"
    elif where == "dotdot":
        save = str(ws.root / "elsewhere" / ".." / "in" / "megatron")
    else:
        save = ws.root / "outlink"
        os.symlink(ws.inp / "megatron", save)
    refuse(ws, ["--load-dir", load, "--save-dir", save, *BASE_FLAGS], any_of=["--save-dir", str(save)],
           save=save, watch=[ws.root])


@pytest.mark.parametrize("what", ["dev-null", "fifo-as-load-dir", "fifo-weight-file-in-dir"])
def test_load_dir_is_not_a_regular_file_or_directory(ws, what):
    """A device or a FIFO must be refused, not opened (a FIFO blocks forever) nor crash."""
    if what == "dev-null":
        load, names = "/dev/null", ["/dev/null"]
    else:
        ws.inp.mkdir()
        os.mkfifo(ws.inp / WEIGHT_FILE)
        load = ws.inp / WEIGHT_FILE if what == "fifo-as-load-dir" else ws.inp
        names = [WEIGHT_FILE]
    refuse(ws, ["--load-dir", load, "--save-dir", ws.save, *BASE_FLAGS], names=names, watch=[ws.root], timeout=10)


def _foreign_save_dir(save):
    """A non-empty directory that is not a partial streamconv output."""
    os.makedirs(save / "iter_0000001" / "mp_rank_00")
    (save / "notes.txt").write_text("my notes\n")
    (save / TRACKER).write_text("7")
    (save / "iter_0000001" / "README.md").write_text("hands off\n")
    (save / "iter_0000001" / "mp_rank_00" / "other.bin").write_bytes(b"\x00\x01" * 100)
    (save / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt.bak").write_bytes(b"backup")
    return ["notes.txt", "iter_0000001/README.md", "iter_0000001/mp_rank_00/other.bin",
            "iter_0000001/mp_rank_00/model_optim_rng.pt.bak"]


def test_nonempty_save_dir_not_from_streamconv_is_refused(ws, models):
    src = models["base"]
    _foreign_save_dir(ws.save)
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS], any_of=["--save-dir", str(ws.save)],
           watch=[src])


def test_overwrite_keeps_files_streamconv_did_not_write(ws, models):
    src = models["base"]
    foreign = _foreign_save_dir(ws.save)
    kept = {rel: contents(ws.save / rel) for rel in foreign}
    accept(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS, "--overwrite"], watch=[src])
    for rel, data in kept.items():
        assert (ws.save / rel).is_file(), f"--overwrite deleted {rel}, which streamconv did not write"
        assert contents(ws.save / rel) == data, f"--overwrite changed {rel}, which streamconv did not write"
    assert open(ws.save / TRACKER).read() == "1"
    assert (ws.save / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    left = sorted(os.path.relpath(os.path.join(d, f), ws.save) for d, _, fs in os.walk(ws.save) for f in fs)
    assert left == sorted(foreign + [TRACKER, "iter_0000001/mp_rank_00/model_optim_rng.pt"]), left


def test_nonempty_save_dir_with_only_a_hidden_file(ws, models):
    src = models["base"]
    ws.save.mkdir()
    (ws.save / ".keep").write_text("")
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS], any_of=["--save-dir", str(ws.save)],
           watch=[src])


def test_save_dir_is_a_file(ws, models):
    src = models["base"]
    ws.save.write_text("not a directory")
    refuse(ws, ["--load-dir", src, "--save-dir", ws.save, *BASE_FLAGS], any_of=["--save-dir", str(ws.save)],
           watch=[src])


# =========================================================================== accepted cases


def _optimizer_entries(path) -> int:
    hdr, _ = read_st(path)
    return sum(k.startswith(("adam_m.", "adam_v.", "moment1.", "moment2.", "accu_grads.")) for k in hdr)


@pytest.mark.parametrize("fixture", ["tiny_gpt_train_adamw.safetensors", "tiny_gpt_train_adam_losscale.safetensors"])
def test_mindspore_fixture_with_optimizer_states_converts(ws, fixture):
    src = os.path.join(FIXTURES, fixture)
    n_opt = _optimizer_entries(src)
    assert n_opt > 0
    p = accept(ws, ["--load-dir", src, "--save-dir", ws.save, *FIXTURE_FLAGS, "--qk-layernorm"], watch=[src])
    out = p.stdout + p.stderr
    assert any("skip" in line.lower() and re.search(rf"\b{n_opt}\b", line) for line in out.splitlines()), (
        f"the output must say that {n_opt} optimizer-state entries were skipped:\n{out}")
    files = sorted(os.path.relpath(os.path.join(d, f), ws.save) for d, _, fs in os.walk(ws.save) for f in fs)
    assert files == [os.path.join("iter_0000001", "mp_rank_00", "model_optim_rng.pt"), TRACKER]
    assert open(ws.save / TRACKER).read() == "1"

    import torch

    sd = torch.load(ws.save / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", map_location="cpu",
                    weights_only=False)
    keys = list(sd["model"])
    assert not [k for k in keys if re.search(r"adam|moment|global_step|learning_rate|power|scale_sense", k)]
    assert "decoder.layers.1.self_attention.q_layernorm.weight" in keys
    a = sd["args"]
    assert (a.num_attention_heads, a.num_query_groups, a.num_layers, a.hidden_size) == (4, 2, 2, 32)
    assert a.qk_layernorm is True


def test_unified_directory_with_hyper_param_converts(ws):
    """Control for the hyper_param refusal: the unified directory itself is fine, hyper_param is skipped."""
    _unified_dir(str(ws.inp))
    p = accept(ws, ["--load-dir", ws.inp, "--save-dir", ws.save, *BASE_FLAGS], watch=[ws.inp])
    assert "hyper_param.safetensors" in p.stdout + p.stderr
    assert open(ws.save / TRACKER).read() == "1"
