"""torch_dist container pieces (streamconv.formats.torch_dist) against stock torch and, where installed, real Megatron.

Expectations come from torch itself (torch.save / dcp.save bytes, stock DCP
loading), from Megatron core_r0.12 (its loader and config writer, when
megatron-core is importable), and from hand-computed chunk tables.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import sys
import types
import warnings
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from helpers import Contents, contents
from streamconv.formats.torch_dist import torch_sid
from streamconv.formats.torch_dist.common import (
    COMMON_FILE,
    METADATA_JSON_FILE,
    common_pt_bytes,
    common_state,
    metadata_json_bytes,
)
from streamconv.formats.torch_dist.item import TensorItemWriter, item_size, object_item_bytes
from streamconv.formats.torch_dist.metadata import (
    METADATA_FILE,
    Chunk,
    ObjectEntry,
    TensorEntry,
    build_metadata,
    check_coverage,
    check_storage_files,
    metadata_bytes,
    read_metadata,
)
from streamconv.core.errors import InputError
from streamconv.megatron.sharded import sharded_object_key

TDTYPE = {"bf16": torch.bfloat16, "f32": torch.float32}


def _raw(t: torch.Tensor) -> bytes:
    """The chunk's bytes, C order, as the converter would stream them."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_item(fd: int, t: torch.Tensor, dtype: str, piece: int = 7) -> tuple:
    """Stream ``t`` as one item at the fd's position; return (offset, length)."""
    start = os.lseek(fd, 0, os.SEEK_CUR)
    w = TensorItemWriter(fd, dtype, tuple(t.shape))
    raw = _raw(t)
    for i in range(0, len(raw), piece):
        w.write(raw[i:i + piece])
    length = w.finish()
    assert os.lseek(fd, 0, os.SEEK_CUR) == start + length
    return start, length


# -- items ----------------------------------------------------------------------

SHAPES = [(7,), (3, 5), (1, 4, 6), (2, 3, 4), (1, 1, 1, 9), (0, 4), ()]


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_item_is_torch_save_of_the_chunk(tmp_path, dtype, shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    t = torch.randn(shape, generator=g).to(TDTYPE[dtype])
    ref = _torch_save(t)  # what FileSystemWriter's _write_item stores for this chunk
    path = tmp_path / "__0_0.distcp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"x" * 37)  # an item rarely starts at offset 0
    off, length = _write_item(fd, t, dtype)
    os.close(fd)
    data = path.read_bytes()
    assert off == 37
    assert data[off:off + length] == ref
    assert item_size(dtype, shape) == length == len(ref)


def test_item_of_a_slice_equals_what_dcp_stores_for_it():
    """A chunk that is a (non-contiguous) slice is stored as its own storage: DCP's loader
    clones such a view before torch.save, and the clone has contiguous strides."""
    full = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5).to(torch.bfloat16)
    chunk = full[1:2, :, 1:4]
    assert not chunk.is_contiguous()
    buf = io.BytesIO()
    w = TensorItemWriter(buf, "bf16", tuple(chunk.shape))
    w.write(_raw(chunk))
    w.finish()
    assert buf.getvalue() == _torch_save(chunk.clone())


def test_item_whose_data_looks_like_a_zip_descriptor(tmp_path):
    """torch's id folds in bytes 4..8 of a record starting with PK\\x07\\x08; ours must too."""
    raw = bytearray(b"PK\x07\x08\x01\x02\x03\x04" + bytes(range(40)))
    t = torch.frombuffer(raw, dtype=torch.uint8).view(torch.bfloat16).clone()
    buf = io.BytesIO()
    w = TensorItemWriter(buf, "bf16", tuple(t.shape))
    for b in raw:  # byte by byte: the head must be gathered across pieces
        w.write(bytes([b]))
    w.finish()
    assert buf.getvalue() == _torch_save(t)


def test_item_refuses_wrong_amount_of_data():
    w = TensorItemWriter(io.BytesIO(), "f32", (2, 2))
    with pytest.raises(ValueError):
        w.write(bytes(17))
    w.write(bytes(12))
    with pytest.raises(ValueError):
        w.finish()
    with pytest.raises(ValueError):
        TensorItemWriter(io.BytesIO(), "int8", (2,))


def test_torch_save_to_archive_pt_path_equals_stream(tmp_path):
    """Basis of the >4 GiB test, which compares against a file to avoid two copies in memory."""
    t = torch.randn(3, 7).to(torch.bfloat16)
    torch.save(t, tmp_path / "archive.pt")
    assert contents(tmp_path / "archive.pt") == Contents(_torch_save(t))


@pytest.mark.slow
def test_item_over_4gib(tmp_path):
    rows, cols = 65540, 32768  # 2**31 + 131072 bf16 elements: past 4 GiB, ZIP64 fields
    t = torch.empty((1, rows, cols), dtype=torch.bfloat16)
    v = t.view(torch.int16).view(rows, cols)
    v[:] = torch.arange(cols, dtype=torch.int16)
    v[:, 0] = torch.arange(rows, dtype=torch.int32).to(torch.int16)
    ref = tmp_path / "archive.pt"
    torch.save(t, ref)
    ours = tmp_path / "__0_0.distcp"
    fd = os.open(ours, os.O_WRONLY | os.O_CREAT)
    w = TensorItemWriter(fd, "bf16", (1, rows, cols))
    flat = v.view(-1).numpy().view("uint8")
    step = 1 << 26
    for i in range(0, flat.nbytes, step):
        w.write(flat[i:i + step])
    length = w.finish()
    os.close(fd)
    assert length == item_size("bf16", (1, rows, cols)) == ref.stat().st_size == ours.stat().st_size
    with open(ref, "rb") as a, open(ours, "rb") as b:
        while True:
            x, y = a.read(1 << 26), b.read(1 << 26)
            assert x == y
            if not x:
                break


def test_object_item_is_megatron_sharded_object_bytes():
    # Megatron: torch.save([sh_obj.data for sh_obj in sh_objs], BytesIO()) -> DCP load_bytes torch.loads it
    for obj in (None, {"fp8": [1, 2]}, torch.tensor([1, 2], dtype=torch.uint8)):
        got = torch.load(io.BytesIO(object_item_bytes(obj)), weights_only=False)
        assert isinstance(got, list) and len(got) == 1
        if isinstance(obj, torch.Tensor):
            assert torch.equal(got[0], obj)
        else:
            assert got[0] == obj


# -- serialization id -----------------------------------------------------------------

@pytest.mark.parametrize("n", range(0, 9))
def test_serialization_id_matches_torch(n):
    g = torch.Generator().manual_seed(n)
    z = zipfile.ZipFile(io.BytesIO(_torch_save({f"t{i}": torch.randn(i + 1, generator=g) for i in range(n)})))
    infos = z.infolist()
    assert infos[-1].filename == "archive/.data/serialization_id"
    names = [i.filename.split("/", 1)[1] for i in infos[:-1]]
    records = [(i.file_size, i.CRC, z.read(i.filename)[:8]) for i in infos[:-1]]
    want = z.read(infos[-1].filename).decode()
    assert torch_sid.serialization_id(names, torch_sid.descriptor_values(records)) == want


def test_serialization_id_refuses_archives_it_does_not_model():
    with pytest.raises(ValueError):
        torch_sid.serialization_id([f"data/{i}" for i in range(14)], [])


# -- common.pt / metadata.json ---------------------------------------------------------

def _args():
    return argparse.Namespace(
        num_layers=3, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1, params_dtype=torch.bfloat16, no_save_optim=True,
        no_save_rng=True, ckpt_format="torch_dist", tokenizer_type="NullTokenizer", seq_length=None,
        spec=["a", "b"],
    )


def test_common_pt_is_torch_save_to_common_pt(tmp_path):
    args = _args()
    torch.save(common_state(args), tmp_path / "common.pt")  # Megatron's save_common
    assert common_pt_bytes(args) == (tmp_path / "common.pt").read_bytes()
    sd = torch.load(io.BytesIO(common_pt_bytes(args)), weights_only=False)
    assert vars(sd["args"]) == vars(args)
    assert sd["checkpoint_version"] == 3.0 and sd["iteration"] == 1
    assert "rerun_state_machine" not in sd and "model" not in sd


def test_common_pt_refuses_tensors_in_args():
    with pytest.raises(ValueError):
        common_pt_bytes(argparse.Namespace(w=torch.zeros(2)))


def test_metadata_json_text():
    # FORMAT.md §7 / Megatron save_config: json.dump(asdict(CheckpointingConfig('torch_dist', 1)))
    assert metadata_json_bytes() == (
        b'{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
        b'"common_backend": "torch", "common_backend_version": 1}')


# -- a hand-built torch_dist checkpoint --------------------------------------------------

L, R, C = 3, 8, 6  # stacked bf16 [L, R, C], written as 2 "TP" row chunks per layer
F_ROWS, F_COLS = 10, 4  # f32 [10, 4] in uneven chunks
A_KEY = "decoder.layers.mlp.linear_fc1.weight"
B_KEY = "decoder.final_layernorm.weight_f32"
X_KEY = "decoder.layers.self_attention.linear_proj._extra_state"

#: (offsets, sizes, file) hand-written
A_CHUNKS = [((l, 4 * t, 0), (1, 4, C), f"__{t}_0.distcp") for l in range(L) for t in range(2)]
B_CHUNKS = [((0, 0), (3, 4), "__0_0.distcp"), ((3, 0), (7, 2), "__1_0.distcp"), ((3, 2), (7, 2), "__0_0.distcp")]


def _originals():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(L, R, C, generator=g).to(torch.bfloat16)
    b = torch.randn(F_ROWS, F_COLS, generator=g)
    objs = {sharded_object_key(X_KEY, (l,), (L,)): (None if l != 1 else {"state": l}) for l in range(L)}
    return a, b, objs


def _region(t, off, size):
    for d, (o, s) in enumerate(zip(off, size)):
        t = t.narrow(d, o, s)
    return t


def _build(dirpath, drop_a_chunk=None, extra_b_chunk=None, drop_object=None):
    """Write items into two files, then .metadata, common.pt, metadata.json. Returns the entries."""
    a, b, objs = _originals()
    os.makedirs(dirpath, exist_ok=True)
    fds = {n: os.open(os.path.join(dirpath, n), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
           for n in ("__0_0.distcp", "__1_0.distcp")}
    planned = {n: 0 for n in fds}  # offsets planned from item_size alone
    obj_entries = []
    for i, (key, obj) in enumerate(objs.items()):  # Megatron writes byte items first
        name = f"__{i % 2}_0.distcp"
        data = object_item_bytes(obj)
        off = os.lseek(fds[name], 0, os.SEEK_CUR)
        os.write(fds[name], data)
        obj_entries.append(ObjectEntry(key, name, off, len(data)))
        planned[name] += len(data)
    tensors = []
    for key, t, dtype, table in ((A_KEY, a, "bf16", A_CHUNKS), (B_KEY, b, "f32", B_CHUNKS)):
        chunks = []
        for off, size, name in table:
            piece = _region(t, off, size)
            o, n = _write_item(fds[name], piece, dtype, piece=11)
            assert (o, n) == (planned[name], item_size(dtype, size))
            planned[name] += n
            chunks.append(Chunk(off, size, name, o, n))
        tensors.append(TensorEntry(key, dtype, tuple(t.shape), tuple(chunks)))
    for fd in fds.values():
        os.close(fd)
    if drop_a_chunk is not None:
        ch = list(tensors[0].chunks)
        del ch[drop_a_chunk]
        tensors[0] = TensorEntry(A_KEY, "bf16", (L, R, C), tuple(ch))
    if drop_object is not None:
        del obj_entries[drop_object]
    if extra_b_chunk is not None:
        tensors[1] = TensorEntry(B_KEY, "f32", (F_ROWS, F_COLS), tensors[1].chunks + (extra_b_chunk,))
    with open(os.path.join(dirpath, METADATA_FILE), "wb") as f:
        f.write(metadata_bytes(tensors, obj_entries))
    with open(os.path.join(dirpath, COMMON_FILE), "wb") as f:
        f.write(common_pt_bytes(_args()))
    with open(os.path.join(dirpath, METADATA_JSON_FILE), "wb") as f:
        f.write(metadata_json_bytes())
    return tensors, obj_entries


def _dcp_load(state_dict, path, planner=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(state_dict, storage_reader=FileSystemReader(str(path)), planner=planner, no_dist=True)


def test_stock_dcp_loads_the_whole_checkpoint(tmp_path):
    _build(tmp_path)
    a, b, objs = _originals()
    sd = {A_KEY: torch.full((L, R, C), float("nan"), dtype=torch.bfloat16),
          B_KEY: torch.full((F_ROWS, F_COLS), float("nan"))}
    sd.update({k: io.BytesIO() for k in objs})
    _dcp_load(sd, tmp_path)
    assert torch.equal(sd[A_KEY], a)
    assert torch.equal(sd[B_KEY], b)
    for k, obj in objs.items():
        assert sd[k] == [obj]  # Megatron's list of local objects
    assert check_coverage(read_metadata(str(tmp_path / METADATA_FILE))) == []
    assert check_storage_files(read_metadata(str(tmp_path / METADATA_FILE)), str(tmp_path)) == []


class _RegionPlanner(DefaultLoadPlanner):
    """Load only a region of each tensor, the way a sharded (TP/PP) load asks for its shard."""

    def __init__(self, regions):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions  # fqn -> (global offsets, destination tensor)
        self.files = set()

    def create_local_plan(self):
        items = []
        for fqn, (off, t) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(off), sizes=t.size())
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        self.files = {self.metadata.storage_data[i.storage_index].relative_path for i in items}
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.regions[index.fqn][1]


def test_stock_dcp_loads_a_region_spanning_chunks_in_both_files(tmp_path):
    _build(tmp_path)
    a, b, _ = _originals()
    a_off, a_size = (1, 2, 1), (2, 4, 4)  # layers 1-2, rows 2..6 (TP chunks 0 and 1), cols 1..5
    b_off, b_size = (2, 1), (5, 2)  # rows 2..7 cols 1..3: all three f32 chunks
    dest_a = torch.zeros(a_size, dtype=torch.bfloat16)
    dest_b = torch.zeros(b_size)
    planner = _RegionPlanner({A_KEY: (a_off, dest_a), B_KEY: (b_off, dest_b)})
    _dcp_load({A_KEY: dest_a, B_KEY: dest_b}, tmp_path, planner)
    assert planner.files == {"__0_0.distcp", "__1_0.distcp"}
    assert torch.equal(dest_a, _region(a, a_off, a_size))
    assert torch.equal(dest_b, _region(b, b_off, b_size))


class _MegatronLikeSavePlanner(DefaultSavePlanner):
    """As Megatron's MCoreSavePlanner: byte objects arrive already torch.saved, stored as they are."""

    def transform_object(self, write_item, object):
        return object


def test_our_files_equal_what_dcp_save_writes(tmp_path):
    """Same items in the same order: torch's own FileSystemWriter writes the same .distcp bytes,
    and the same metadata (save for its run-specific storage_meta and index hints)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, generator=g).to(torch.bfloat16)
    n = torch.randn(5, generator=g)
    okey = sharded_object_key("m._extra_state", (0,), (1,))
    obytes = object_item_bytes(None)
    ref = tmp_path / "ref"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({okey: io.BytesIO(obytes), "w": w, "n": n}, checkpoint_id=str(ref), no_dist=True,
                 planner=_MegatronLikeSavePlanner(flatten_state_dict=False))
    ours = tmp_path / "ours"
    ours.mkdir()
    fd = os.open(ours / "__0_0.distcp", os.O_WRONLY | os.O_CREAT)
    os.write(fd, obytes)  # FileSystemWriter: byte items first, then tensors in plan order
    tw = []
    for key, t, dt in (("w", w, "bf16"), ("n", n, "f32")):
        o, ln = _write_item(fd, t, dt)
        tw.append(TensorEntry(key, dt, tuple(t.shape), (Chunk((0,) * t.dim(), tuple(t.shape), "__0_0.distcp", o, ln),)))
    os.close(fd)
    assert contents(ours / "__0_0.distcp") == contents(ref / "__0_0.distcp")
    with open(ref / ".metadata", "rb") as f:
        theirs = pickle.load(f)
    mine = build_metadata(tw, [ObjectEntry(okey, "__0_0.distcp", 0, len(obytes))])
    assert mine.state_dict_metadata == theirs.state_dict_metadata
    assert mine.storage_data == theirs.storage_data
    assert mine.version == theirs.version and mine.planner_data == theirs.planner_data
    # and our restricted reader reads torch's own file (a PosixPath in storage_meta and all)
    assert read_metadata(str(ref / ".metadata")).storage_data == theirs.storage_data


# -- coverage -----------------------------------------------------------------------------

def test_coverage_finds_an_omitted_chunk_that_dcp_silently_loads(tmp_path):
    _build(tmp_path, drop_a_chunk=3)  # layer 1, rows 4..8
    problems = check_coverage(read_metadata(str(tmp_path / METADATA_FILE)))
    assert len(problems) == 1 and A_KEY in problems[0] and "cover 120 of 144" in problems[0]
    # stock DCP does not notice: the region keeps whatever the destination held
    sd = {A_KEY: torch.full((L, R, C), 7.0, dtype=torch.bfloat16)}
    _dcp_load(sd, tmp_path)
    assert torch.all(sd[A_KEY][1, 4:8] == 7.0)


def test_coverage_finds_an_overlap(tmp_path):
    # a second copy of rows 2..5 x cols 0..2: overlaps the first and second f32 chunks
    extra = Chunk((2, 0), (3, 2), "__1_0.distcp", 0, 10)
    _build(tmp_path, extra_b_chunk=extra)
    problems = check_coverage(read_metadata(str(tmp_path / METADATA_FILE)))
    text = "\n".join(problems)
    assert "overlap" in text and B_KEY in text
    assert any("[0, 0] and [2, 0] overlap" in p for p in problems)
    assert any("[2, 0] and [3, 0] overlap" in p for p in problems)
    # its storage entry (bytes 0..10 of __1_0.distcp) also collides with the item already there
    assert any(p.startswith("__1_0.distcp: items of") and "overlap in the file" in p for p in problems)


def test_coverage_finds_outside_chunks_missing_storage_and_bad_paths(tmp_path):
    tensors, objs = _build(tmp_path)
    md = build_metadata(tensors, objs)
    md.state_dict_metadata[B_KEY].chunks.append(ChunkStorageMetadata(torch.Size([8, 0]), torch.Size([3, 4])))
    del md.storage_data[MetadataIndex(A_KEY, (0, 0, 0))]
    info = md.storage_data[MetadataIndex(objs[0].fqn)]
    info.relative_path = "../../etc/passwd"
    md.storage_data[MetadataIndex(B_KEY, (5, 0))] = md.storage_data[MetadataIndex(B_KEY, (0, 0))]
    problems = check_coverage(md)
    assert any("storage_data entry for " + B_KEY + " chunk at [5, 0] matches no chunk" in p for p in problems)
    assert any("outside the global shape" in p and B_KEY in p for p in problems)
    assert any("no storage_data entry" in p and A_KEY in p for p in problems)
    assert any("not a plain file name" in p for p in problems)


def test_coverage_agrees_with_painting_every_element():
    """Random boxes on small shapes: overlap/gap verdicts equal a brute-force element count."""
    import itertools
    import random

    rnd = random.Random(11)
    for _ in range(400):
        shape = tuple(rnd.randint(1, 5) for _ in range(rnd.randint(1, 3)))
        boxes = set()
        for _ in range(rnd.randint(1, 6)):
            off = tuple(rnd.randrange(d) for d in shape)
            boxes.add((off, tuple(rnd.randint(1, d - o) for o, d in zip(off, shape))))
        count = dict.fromkeys(itertools.product(*map(range, shape)), 0)
        for off, size in boxes:
            for e in itertools.product(*(range(o, o + n) for o, n in zip(off, size))):
                count[e] += 1
        chunks = tuple(Chunk(off, size, "f", 10 * i, 10) for i, (off, size) in enumerate(sorted(boxes)))
        problems = check_coverage(build_metadata([TensorEntry("t", "f32", shape, chunks)]))
        overlap = any(c > 1 for c in count.values())
        gap = any(c == 0 for c in count.values())
        assert any("overlap" in p for p in problems) == overlap, (shape, boxes, problems)
        if not overlap:
            assert any("cover" in p for p in problems) == gap, (shape, boxes, problems)
        if not overlap and not gap:
            assert problems == []


def test_storage_file_checks(tmp_path):
    _build(tmp_path)
    md = read_metadata(str(tmp_path / METADATA_FILE))
    with open(tmp_path / "__1_0.distcp", "r+b") as f:
        f.truncate(100)
    os.remove(tmp_path / "__0_0.distcp")
    problems = check_storage_files(md, str(tmp_path))
    assert len(problems) == 2
    assert any("__0_0.distcp: data file is missing" in p for p in problems)
    assert any("__1_0.distcp: data file has 100 bytes" in p for p in problems)


# -- restricted reading -----------------------------------------------------------------

class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_read_metadata_refuses_a_hostile_pickle(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / ".metadata"
    p.write_bytes(pickle.dumps(_Hostile(marker)))
    with pytest.raises(InputError, match=r"refusing to unpickle (posix|os)\.system"):
        read_metadata(str(p))
    assert not marker.exists()
    # hidden inside otherwise valid metadata
    tensors, objs = _build(tmp_path / "ck")
    md = build_metadata(tensors, objs)
    md.storage_meta.modules = [_Hostile(marker)]
    p.write_bytes(pickle.dumps(md))
    with pytest.raises(InputError, match="refusing"):
        read_metadata(str(p))
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(argparse.Namespace(a=1)),  # arbitrary class
    pickle.dumps({"state_dict_metadata": {}}),  # no globals, wrong type
    b"\x80\x04\x95",  # truncated
    b"",
    pickle.dumps(collections.OrderedDict(a=1)),  # a harmless class, still not metadata
])
def test_read_metadata_refuses_non_metadata(tmp_path, payload):
    p = tmp_path / ".metadata"
    p.write_bytes(payload)
    with pytest.raises(InputError, match=r"\.metadata"):
        read_metadata(str(p))


def test_read_metadata_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_metadata(str(tmp_path / ".metadata"))


def test_read_metadata_accepts_megatron_extras(tmp_path):
    """Megatron's .metadata also carries mcore_data and all_local_plans (MCoreSavePlan objects)."""
    from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
    from torch.distributed.checkpoint.planner import SavePlan

    modname = "megatron.core.dist_checkpointing.strategies.torch"
    parts = modname.split(".")
    saved = {n: sys.modules.get(n) for n in (".".join(parts[:i]) for i in range(1, len(parts) + 1))}
    try:
        for n in saved:
            sys.modules[n] = types.ModuleType(n)

        class MCoreSavePlan(SavePlan):
            pass

        MCoreSavePlan.__module__ = modname
        MCoreSavePlan.__qualname__ = "MCoreSavePlan"
        sys.modules[modname].MCoreSavePlan = MCoreSavePlan
        tensors, objs = _build(tmp_path)
        md = build_metadata(tensors, objs)
        local = create_default_local_save_plan({"w": torch.zeros(2, 3)}, True)
        plan = MCoreSavePlan(items=local.items, storage_data=None, planner_data={})
        object.__setattr__(plan, "mcore_data", {"w": {}})
        md.all_local_plans = [plan]
        from pathlib import PosixPath
        md.storage_meta.checkpoint_id = PosixPath("/ckpt/iter_0000001")
        md.storage_meta.save_id = "5f0c"
        data = pickle.dumps(md)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    p = tmp_path / ".metadata"
    p.write_bytes(data)
    got = read_metadata(str(p))
    # megatron is never imported: an inert stand-in holds the plan's fields
    assert type(got.all_local_plans[0]).__module__ == "streamconv.formats.torch_dist.metadata"
    assert got.all_local_plans[0].items == local.items
    assert got.all_local_plans[0].mcore_data == {"w": {}}
    assert got.state_dict_metadata == md.state_dict_metadata


def test_metadata_pickle_references_only_dcp_and_torch_globals(tmp_path):
    tensors, objs = _build(tmp_path)
    seen = set()

    class Recorder(pickle.Unpickler):  # our own output: safe to load while recording
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(metadata_bytes(tensors, objs))).load()
    assert all(m.startswith("torch") for m, _ in seen), seen
    assert {("torch.distributed.checkpoint.metadata", "Metadata"), ("torch", "Size"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "bfloat16"),
            ("torch", "float32")} <= seen


def test_sharded_object_key_round_trips_megatron_parsing():
    k = sharded_object_key("decoder.layers.mlp.linear_fc1._extra_state", (2, 0), (4, 1))
    assert k == "decoder.layers.mlp.linear_fc1._extra_state/shard_2.0_4.1"
    # Megatron's ShardedObject.empty_from_unique_key, by hand
    key, shard = k.split("/")
    tag, off, shape = shard.split("_")
    assert (tag, off, shape) == ("shard", "2.0", "4.1")
    with pytest.raises(ValueError):
        sharded_object_key("a/b", (0,), (1,))


# -- real Megatron (only where megatron-core is importable) ------------------------------

def _megatron():
    if "psutil" not in sys.modules:
        try:
            import psutil  # noqa: F401
        except ImportError:  # only Megatron's writer logs memory with it; the loader never calls it
            sys.modules["psutil"] = types.ModuleType("psutil")
    return pytest.importorskip("megatron.core.dist_checkpointing")


def test_megatron_loads_it_at_another_split(tmp_path):
    """Real Megatron dist_checkpointing.load, strict, with shards the files were not split for."""
    mdc = _megatron()
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.validation import StrictHandling

    (tmp_path / "mj").mkdir()
    save_config(CheckpointingConfig("torch_dist"), str(tmp_path / "mj"))
    assert (tmp_path / "mj" / "metadata.json").read_bytes() == metadata_json_bytes()

    ck = tmp_path / "iter_0000001"
    _build(ck)
    a, b, objs = _originals()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        sd = {}
        # stacked [L, R, C] written as per-layer row halves in two files; loaded as per-layer
        # column halves, so every shard reads from both files
        for l in range(L):
            for k in range(2):
                sd[f"a{l}_{k}"] = ShardedTensor.from_rank_offsets(
                    A_KEY, torch.zeros(R, C // 2, dtype=torch.bfloat16), (0, l, L), (2, k, 2),
                    prepend_axis_num=1)
        sd["b"] = ShardedTensor.from_rank_offsets(B_KEY, torch.zeros(F_ROWS, F_COLS))
        for l in range(L):
            sd[f"x{l}"] = ShardedObject(X_KEY, None, (L,), (l,), replica_id=0)
        loaded = mdc.load(sd, str(ck), strict=StrictHandling.RAISE_ALL)
    finally:
        torch.distributed.destroy_process_group()
    for l in range(L):
        for k in range(2):
            assert torch.equal(loaded[f"a{l}_{k}"], a[l, :, k * 3:(k + 1) * 3])
    assert torch.equal(loaded["b"], b)
    for l in range(L):
        assert loaded[f"x{l}"] == objs[sharded_object_key(X_KEY, (l,), (L,))]
    assert vars(loaded["args"]) == vars(_args()) and loaded["iteration"] == 1


def test_megatron_strict_load_misses_an_absent_extra_state(tmp_path):
    """Control for the test above: strict loading does look at the byte objects."""
    mdc = _megatron()
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException
    from megatron.core.dist_checkpointing.validation import StrictHandling

    _build(tmp_path / "ck", drop_object=2)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        sd = {f"x{l}": ShardedObject(X_KEY, None, (L,), (l,), replica_id=0) for l in range(L)}
        sd["a"] = ShardedTensor.from_rank_offsets(A_KEY, torch.zeros(L, R, C, dtype=torch.bfloat16))
        sd["b"] = ShardedTensor.from_rank_offsets(B_KEY, torch.zeros(F_ROWS, F_COLS))
        # Megatron's own check or torch's planner ("Missing key in checkpoint state_dict")
        with pytest.raises((CheckpointingException, CheckpointException), match="shard_2_3"):
            mdc.load(sd, str(tmp_path / "ck"), strict=StrictHandling.RAISE_ALL)
    finally:
        torch.distributed.destroy_process_group()
