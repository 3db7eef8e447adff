"""Property tests: a safetensors header is untrusted input (issue 4).

``streamconv.sources.header.read_header`` (and ``streamconv.sources.index.index_checkpoint`` on a
directory holding the file) must, for *any* bytes, either

* return a result consistent with the file, checked here against an independent
  reading of the format: every tensor's span inside the data section, no two
  non-empty spans overlapping, ``prod(shape) * itemsize == span``, the header's
  own names/dtypes/shapes/offsets, ``__metadata__`` a string -> string map; or
* raise :class:`streamconv.errors.InputError`,

and never anything else (no ``ValueError``, ``RecursionError``, ``MemoryError`` ...).
No allocation may follow a claimed size: each call runs under ``tracemalloc`` and
its peak must stay within a small multiple of the (tiny) file size.

Inputs: arbitrary bytes; valid files (always accepted, and parsed exactly) and every
truncation of them (always refused); valid headers with random JSON edits (wrong
types, negative/huge numbers, missing or extra fields, duplicate keys, non-UTF-8
bytes, NaN, deep nesting, a wrong length prefix); and random index files next to a
valid model. Files stay under a few KiB; the whole module runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamconv.core.errors import InputError
from streamconv.sources.index import SourceIndex, index_checkpoint
from streamconv.sources.header import read_header
from synth import ModelSpec, stored_tensors

#: element sizes from the safetensors format, written out independently of streamconv
FORMAT_DTYPES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

FUZZ = settings(
    max_examples=100,
    deadline=2000,  # ms per example; a few ms is typical
    database=None,  # write nothing into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

#: a real (tiny) model: the names index_checkpoint must accept, so fuzzing gets past the name check
TINY = ModelSpec(layers=1, hidden=4, ffn=4, heads=2, groups=1, vocab=8)
TINY_ENTRIES = [(n, "F32", tuple(s)) for n, s in stored_tensors(TINY).items()]
NAMES = [n for n, _, _ in TINY_ENTRIES]

# tracemalloc peak allowed per call: fixed overhead + a generous multiple of the file size
ALLOC_FIXED = 2 * 2**20
ALLOC_PER_FILE_BYTE = 64


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fuzz"))


# --------------------------------------------------------------------------- building files


def pack(entries, metadata=None, gap=0) -> tuple:
    """(header dict, data bytes) for (name, dtype, shape) entries packed back to back."""
    header, off = {}, 0
    for name, dt, shape in entries:
        n = 1
        for s in shape:
            n *= s
        nb = n * FORMAT_DTYPES[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb + gap
    if metadata is not None:
        header["__metadata__"] = metadata
    data = bytes((i * 37 + 11) & 0xFF for i in range(max(0, off - gap)))
    return header, data


def to_file(header_bytes: bytes, data: bytes, length: int | None = None) -> bytes:
    n = len(header_bytes) if length is None else length
    return struct.pack("<Q", n) + header_bytes + data


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


# --------------------------------------------------------------------------- the oracle


def _independent_header(blob: bytes):
    """The header as the format defines it, or None when it cannot be read as a JSON object."""
    if len(blob) < 8:
        return None, None
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        return None, None
    try:
        obj = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, None
    return (obj if isinstance(obj, dict) else None), n


def check_header_result(hdr, path: str, blob: bytes) -> None:
    """``hdr`` (returned by read_header) must describe ``blob`` consistently."""
    obj, n = _independent_header(blob)
    assert obj is not None, "read_header accepted a file whose header is not a JSON object"
    assert hdr.file_size == len(blob)
    assert hdr.data_start == 8 + n <= len(blob)
    meta = obj.get("__metadata__")
    if meta is not None:
        assert isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        assert hdr.metadata == meta
    names = [k for k in obj if k != "__metadata__"]
    assert sorted(hdr.tensors) == sorted(names)
    data_size = len(blob) - hdr.data_start
    spans = []
    for name in names:
        e, info = obj[name], hdr.tensors[name]
        assert isinstance(e, dict)
        assert e["dtype"] in FORMAT_DTYPES and info.dtype == e["dtype"]
        shape = e["shape"]
        assert isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)
        assert tuple(info.shape) == tuple(shape)
        b, en = e["data_offsets"]
        assert type(b) is int and type(en) is int
        assert 0 <= b <= en <= data_size, f"{name}: span [{b}, {en}) outside the {data_size}-byte data section"
        numel = 1
        for s in shape:
            numel *= s
        assert numel * FORMAT_DTYPES[e["dtype"]] == en - b, f"{name}: shape x dtype != span"
        assert info.start == hdr.data_start + b and info.nbytes == en - b
        assert info.start + info.nbytes <= len(blob)
        if en > b:
            spans.append((b, en, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        assert b1 >= e0, f"{n0} and {n1} overlap"


def _traced(fn, *args):
    """Run fn(*args) and return (result or exception, tracemalloc peak in bytes)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - classified by the caller
            out = e
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    return out, peak


def check_file(blob: bytes, d: str, expect=None):
    """Write ``blob`` as ``d/model.safetensors``; check read_header and index_checkpoint on it.

    ``expect``: None (either outcome), "accept" or "refuse". Returns read_header's result.
    """
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    path = os.path.join(d, "model.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    budget = ALLOC_FIXED + ALLOC_PER_FILE_BYTE * len(blob)

    hdr, peak = _traced(read_header, path)
    if isinstance(hdr, Exception) and not isinstance(hdr, InputError):
        raise AssertionError(f"read_header raised {type(hdr).__name__} (not InputError): {hdr}") from hdr
    assert peak <= budget, f"read_header allocated {peak} bytes for a {len(blob)}-byte file"
    if expect == "accept":
        assert not isinstance(hdr, Exception), f"read_header refused a valid file: {hdr}"
    if expect == "refuse":
        assert isinstance(hdr, InputError), "read_header accepted a damaged file"
    if not isinstance(hdr, Exception):
        check_header_result(hdr, path, blob)

    idx, peak = _traced(index_checkpoint, d)
    if isinstance(idx, Exception) and not isinstance(idx, InputError):
        raise AssertionError(f"index_checkpoint raised {type(idx).__name__} (not InputError): {idx}") from idx
    assert peak <= budget, f"index_checkpoint allocated {peak} bytes for a {len(blob)}-byte file"
    if isinstance(hdr, Exception):
        assert isinstance(idx, InputError), "index_checkpoint accepted a file read_header refuses"
    if isinstance(idx, SourceIndex):
        assert idx.files == [path]
        for t in idx.tensors.values():
            assert t.path == path and hdr.tensors[t.name] == t.info
    return hdr


# --------------------------------------------------------------------------- strategies

dtypes = st.sampled_from(sorted(FORMAT_DTYPES))
small_shapes = st.lists(st.integers(0, 5), max_size=3).map(tuple)
entry_names = st.sampled_from(NAMES) | st.text(min_size=0, max_size=12)


@st.composite
def valid_files(draw):
    """A valid safetensors file (random tensors, or the tiny model), as (entries, metadata, bytes)."""
    if draw(st.booleans()):
        entries = list(TINY_ENTRIES)
        if draw(st.booleans()):
            entries = draw(st.permutations(entries))
    else:
        entries = draw(st.lists(st.tuples(entry_names, dtypes, small_shapes), max_size=6,
                                unique_by=lambda e: e[0]).filter(lambda es: all(e[0] != "__metadata__" for e in es)))
    metadata = draw(st.none() | st.just({"format": "ms"})
                    | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    header, data = pack(entries, metadata)
    return header, data


huge_ints = st.sampled_from([2**31, 2**32 - 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100,
                             10**1500, -1, -(2**63), -(10**1500)])
numbers = st.integers(-300, 300) | huge_ints | st.floats(allow_nan=True, allow_infinity=True)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@st.composite
def mutated_files(draw):
    """A valid file whose header got one to three random edits."""
    header, data = draw(valid_files())
    header = json.loads(json.dumps(header))
    raw_edit = None
    for _ in range(draw(st.integers(1, 3))):
        names = [k for k in header if k != "__metadata__"]
        kind = draw(st.sampled_from([
            "set-field", "drop-field", "extra-field", "replace-entry", "add-entry", "numbers",
            "shape-dims", "offsets", "metadata", "dup-key", "non-utf8", "length", "data-size", "flip",
        ]))
        if kind in ("set-field", "drop-field", "extra-field", "replace-entry", "numbers", "shape-dims", "offsets") \
                and not names:
            kind = "add-entry"
        if kind == "set-field":
            e = header[draw(st.sampled_from(names))]
            if isinstance(e, dict):
                e[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        elif kind == "drop-field":
            e = header[draw(st.sampled_from(names))]
            if isinstance(e, dict):
                e.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "extra-field":
            e = header[draw(st.sampled_from(names))]
            if isinstance(e, dict):
                e[draw(st.text(max_size=5))] = draw(json_values)
        elif kind == "replace-entry":
            header[draw(st.sampled_from(names))] = draw(json_values)
        elif kind == "add-entry":
            header[draw(entry_names)] = draw(st.fixed_dictionaries({
                "dtype": dtypes | st.text(max_size=4), "shape": st.lists(numbers, max_size=3),
                "data_offsets": st.lists(numbers, min_size=0, max_size=3)}))
        elif kind == "numbers":
            e = header[draw(st.sampled_from(names))]
            if isinstance(e, dict) and isinstance(e.get("data_offsets"), list) and e["data_offsets"]:
                i = draw(st.integers(0, len(e["data_offsets"]) - 1))
                e["data_offsets"][i] = draw(numbers)
        elif kind == "shape-dims":
            e = header[draw(st.sampled_from(names))]
            if isinstance(e, dict):
                e["shape"] = draw(st.lists(numbers | st.integers(0, 10**6), max_size=5))
        elif kind == "offsets":
            # move a span somewhere plausible: overlaps, gaps, out of range by a little
            e = header[draw(st.sampled_from(names))]
            if isinstance(e, dict) and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2 \
                    and all(type(x) is int for x in e["data_offsets"]):
                b, en = e["data_offsets"]
                shift = draw(st.integers(-len(data) - 8, len(data) + 8))
                e["data_offsets"] = [b + shift, en + shift]
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "dup-key":
            raw_edit = ("dup", draw(st.sampled_from(names)) if names else "x")
        elif kind == "non-utf8":
            raw_edit = ("bytes", draw(st.binary(min_size=1, max_size=3).filter(lambda b: b[0] >= 0x80)),
                        draw(st.integers(0, 10**6)))
        elif kind == "length":
            raw_edit = ("length", draw(st.integers(0, 2**64 - 1) | st.integers(0, 4096)))
        elif kind == "data-size":
            delta = draw(st.integers(-16, 16))
            data = data[:max(0, len(data) + delta)] if delta < 0 else data + b"\x00" * delta
        else:
            raw_edit = ("flip", draw(st.integers(0, 10**6)), draw(st.integers(1, 255)))
    hb = dumps(header)
    length = None
    if raw_edit is not None:
        if raw_edit[0] == "dup":
            # the same key twice in one object: JSON parsers disagree on which wins
            dup = raw_edit[1]
            first = json.dumps(dup) + ":" + json.dumps(header.get(dup, {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}))
            hb = b"{" + first.encode() + b"," + hb[1:] if len(hb) > 2 else b"{" + first.encode() + b"}"
        elif raw_edit[0] == "bytes":
            at = raw_edit[2] % (len(hb) + 1)
            hb = hb[:at] + raw_edit[1] + hb[at:]
        elif raw_edit[0] == "length":
            length = raw_edit[1]
        else:
            blob = bytearray(to_file(hb, data))
            at = raw_edit[1] % len(blob)
            blob[at] ^= raw_edit[2]
            return bytes(blob)
    return to_file(hb, data, length)


# --------------------------------------------------------------------------- properties


@FUZZ
@given(blob=st.binary(max_size=256) | st.builds(lambda n, b: struct.pack("<Q", n) + b,
                                                  st.integers(0, 300) | st.integers(0, 2**64 - 1),
                                                  st.binary(max_size=300)))
@example(blob=b"")
@example(blob=struct.pack("<Q", 2**64 - 1))
@example(blob=struct.pack("<Q", 2) + b"{}")
@example(blob=struct.pack("<Q", 2) + b"[]")
def test_arbitrary_bytes(fuzz_dir, blob):
    check_file(blob, os.path.join(fuzz_dir, "arbitrary"))


@FUZZ
@given(f=valid_files(), cut=st.floats(0, 1, exclude_max=True))
def test_valid_files_are_read_exactly_and_every_truncation_is_refused(fuzz_dir, f, cut):
    header, data = f
    blob = to_file(dumps(header), data)
    hdr = check_file(blob, os.path.join(fuzz_dir, "valid"), expect="accept")
    for name, e in header.items():
        if name != "__metadata__":
            info = hdr.tensors[name]
            assert (info.dtype, list(info.shape), info.start - hdr.data_start, info.nbytes) == (
                e["dtype"], e["shape"], e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0])
    # the data ends exactly at the last tensor, so any shorter file is damaged
    check_file(blob[:int(cut * len(blob))], os.path.join(fuzz_dir, "valid"), expect="refuse")


@FUZZ
@given(blob=mutated_files())
def test_mutated_headers(fuzz_dir, blob):
    check_file(blob, os.path.join(fuzz_dir, "mutated"))


@FUZZ
@given(index=json_values | st.fixed_dictionaries(
    {"weight_map": st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8),
                                   st.sampled_from(["model.safetensors", "", ".", "..", "../model.safetensors",
                                                    "/dev/null", "missing.safetensors", "hyper_param.safetensors",
                                                    "a\x00b"]) | json_values,
                                   max_size=4)},
    optional={"metadata": json_values}))
def test_random_index_file_next_to_a_valid_model(fuzz_dir, index):
    """index_checkpoint on a directory with a valid model and a random model.safetensors.index.json."""
    d = os.path.join(fuzz_dir, "indexed")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    header, data = pack(TINY_ENTRIES, {"format": "ms"})
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(to_file(dumps(header), data))
    with open(os.path.join(d, "model.safetensors.index.json"), "wb") as f:
        f.write(dumps(index))
    out, _ = _traced(index_checkpoint, d)
    if isinstance(out, Exception) and not isinstance(out, InputError):
        raise AssertionError(f"index_checkpoint raised {type(out).__name__} (not InputError): {out}") from out


# --------------------------------------------------------------------------- known hostile headers
# Deterministic cases that the strategies above reach only by luck.


def _entry_file(entry: dict) -> bytes:
    return to_file(dumps({"t": entry}), b"\x00" * 16)


HOSTILE = {
    # 100,000 nested arrays: Python's json raises RecursionError, not ValueError
    "deeply-nested-arrays": to_file(b'{"t":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b""),
    "deeply-nested-objects": to_file(b'{"t":' + b'{"a":' * 50_000 + b"0" + b"}" * 50_000 + b"}", b""),
    # three legal 1500-digit dimensions: their product cannot be printed with the default int->str limit
    "shape-product-over-4300-digits": _entry_file({"dtype": "F32", "shape": [10**1500] * 3, "data_offsets": [0, 16]}),
    "offset-of-5000-digits": to_file(b'{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,' + b"9" * 5000 + b"]}}",
                                     b"\x00" * 16),
    "negative-dimension": _entry_file({"dtype": "F32", "shape": [-4, -1], "data_offsets": [0, 16]}),
    "float-dimension": _entry_file({"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}),
    "bool-dimension": _entry_file({"dtype": "U8", "shape": [True] * 16, "data_offsets": [0, 1]}),
    "nan-offset": _entry_file({"dtype": "F32", "shape": [4], "data_offsets": [0, float("nan")]}),
    "three-offsets": _entry_file({"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}),
    "offsets-reversed": _entry_file({"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}),
    "u64-wraparound": _entry_file({"dtype": "F32", "shape": [2**62], "data_offsets": [0, 0]}),
    "header-len-u64-max": struct.pack("<Q", 2**64 - 1) + b"{}",
    "metadata-not-strings": to_file(dumps({"__metadata__": {"format": 1}}), b""),
    "duplicate-tensor-key": to_file(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                    b'"t":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', b"\x00" * 16),
    "surrogate-escape-name": to_file(b'{"\\ud800":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', b"\x00" * 16),
    "layer-index-of-5000-digits": to_file(
        dumps({f"decoder.layers.{'7' * 5000}.input_layernorm.weight": {"dtype": "F32", "shape": [4],
                                                                          "data_offsets": [0, 16]}}), b"\x00" * 16),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header(fuzz_dir, case):
    check_file(HOSTILE[case], os.path.join(fuzz_dir, "hostile-" + case))


def test_hostile_index_file_nested_deeply(fuzz_dir):
    d = os.path.join(fuzz_dir, "hostile-index")
    os.makedirs(d, exist_ok=True)
    header, data = pack(TINY_ENTRIES, {"format": "ms"})
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(to_file(dumps(header), data))
    with open(os.path.join(d, "model.safetensors.index.json"), "wb") as f:
        f.write(b'{"weight_map":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    out, _ = _traced(index_checkpoint, d)
    if isinstance(out, Exception) and not isinstance(out, InputError):
        raise AssertionError(f"index_checkpoint raised {type(out).__name__} (not InputError): {out}") from out
