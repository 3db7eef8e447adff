"""Find the weight files of a MindSpore checkpoint and index their tensors.

A checkpoint reaches us in many shapes (FORMAT.md §1 "How checkpoints sit on
disk"): one file, a directory, a directory with ``param_name_map.json`` or
``model.safetensors.index.json``, a unified directory whose
``hyper_param.safetensors`` must never be read as weights, mindformers' newer
``iteration_XXXXXXXX/model-*.safetensors`` output, or per-rank training output
that holds TP *slices* and must be merged first. This module turns any of them
into one :class:`SourceIndex`: canonical name -> where its bytes are, plus what
was skipped. Only headers are read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from .errors import InputError, PathError
from .names import classify
from .st_header import TensorInfo, read_header

HYPER_PARAM_FILE = "hyper_param.safetensors"
UNIFIED_MAP = "param_name_map.json"
_PER_RANK_FILE_RE = re.compile(r".*_rank_\d+-\d+_\d+\.safetensors")
_RANK_DIR_RE = re.compile(r"rank_\d+")
_ITER_DIR_RE = re.compile(r"iteration_(\d+)")


@dataclass(frozen=True)
class SourceTensor:
    """A model weight in the input: its canonical name and where its bytes are."""

    canonical: str
    name: str  # name as stored in the file
    path: str
    info: TensorInfo

    @property
    def shape(self) -> tuple:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype


@dataclass
class Skipped:
    """Entries and files that carry no model weights, reported once in the summary."""

    optimizer: int = 0
    optimizer_bytes: int = 0
    steps: int = 0
    placeholders: int = 0
    files: list = field(default_factory=list)  # (path, reason)

    def lines(self) -> list:
        out = []
        if self.optimizer:
            out.append(
                f"skipped {self.optimizer} optimizer-state tensors "
                f"({self.optimizer_bytes / 2**20:.1f} MiB: adam/moment/accu_grads)"
            )
        if self.steps:
            out.append(f"skipped {self.steps} step/loss-scale entries (global_step, learning_rate, ...)")
        if self.placeholders:
            out.append(f"skipped {self.placeholders} dropout placeholder entries (no weights)")
        for path, reason in self.files:
            out.append(f"skipped file {path}: {reason}")
        return out


@dataclass
class SourceIndex:
    load_path: str
    layout: str  # human description of what was found
    files: list  # safetensors files read, in order
    tensors: dict  # canonical name -> SourceTensor
    skipped: Skipped
    legacy_names: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors.values())

    def fingerprint(self) -> list:
        """What identifies this input for ``--resume``: files with size and mtime."""
        out = []
        for p in self.files:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
        return out


def _read_index_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except RecursionError:
        raise InputError(f"{path}: cannot read the index file (JSON nested too deeply); re-copy or remove it") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the index file ({e}); re-copy or remove it") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict):
        raise InputError(f"{path}: index has no 'weight_map' of tensor name -> file name")
    for k, v in wm.items():
        if not isinstance(v, str) or not v or os.path.isabs(v) or ".." in v.split("/"):
            raise InputError(f"{path}: weight_map entry {k!r} -> {v!r} is not a file name in the checkpoint directory")
    return wm


def _refuse_per_rank(directory: str) -> None:
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    rank_dirs = sorted(e for e in entries if _RANK_DIR_RE.fullmatch(e) and os.path.isdir(os.path.join(directory, e)))
    per_rank_files = [e for e in entries if _PER_RANK_FILE_RE.fullmatch(e)]
    if rank_dirs or per_rank_files or _RANK_DIR_RE.fullmatch(os.path.basename(os.path.normpath(directory))):
        what = os.path.join(directory, rank_dirs[0]) if rank_dirs else directory
        raise InputError(
            f"{what}: per-rank (unmerged) training output; its files hold tensor-parallel slices, "
            "not whole weights. Merge them first (mindspore.unified_safetensors / mindformers' "
            "unified checkpoint tool) and point --load-dir at the merged directory"
        )


def _files_from_index(directory: str, index_path: str, skipped: Skipped):
    wm = _read_index_json(index_path)
    files = []
    for name, fname in wm.items():
        if os.path.basename(fname) == HYPER_PARAM_FILE:
            raise InputError(
                f"{index_path}: maps tensor {name!r} to {HYPER_PARAM_FILE}, which holds rank-0 slices "
                "and hyper-parameters, not merged weights; the index is damaged"
            )
        p = os.path.join(directory, fname)
        if p not in files:
            files.append(p)
    for p in files:
        if not os.path.isfile(p):
            raise InputError(f"{index_path}: points at {os.path.basename(p)}, which does not exist in {directory}; the checkpoint is incomplete")
    if os.path.exists(os.path.join(directory, HYPER_PARAM_FILE)):
        skipped.files.append((os.path.join(directory, HYPER_PARAM_FILE), "hyper-parameters and rank-0 slices, not weights"))
    return files, wm


def _resolve(load_path: str, skipped: Skipped):
    """Return (layout description, files, weight_map or None)."""
    if not os.path.exists(load_path):
        raise PathError(f"--load-dir {load_path} does not exist; give the checkpoint file or directory")
    if not os.path.isfile(load_path) and not os.path.isdir(load_path):
        raise PathError(f"--load-dir {load_path} is not a file or directory (a device or FIFO?); give the checkpoint")
    if os.path.isfile(load_path):
        base = os.path.basename(load_path)
        if base == HYPER_PARAM_FILE:
            raise InputError(
                f"{load_path}: is the hyper-parameter side file of a unified checkpoint (rank-0 slices, "
                "not weights); point --load-dir at its directory instead"
            )
        if base.endswith(".json"):
            d = os.path.dirname(os.path.abspath(load_path))
            files, wm = _files_from_index(d, load_path, skipped)
            return f"index {base}", files, wm
        if _PER_RANK_FILE_RE.fullmatch(base):
            _refuse_per_rank(os.path.dirname(os.path.abspath(load_path)) or ".")
        return "single file", [load_path], None

    directory = load_path
    tracker = os.path.join(directory, "latest_checkpointed_iteration.txt")
    if os.path.isfile(tracker):
        try:
            it = open(tracker, "r", encoding="utf-8").read().strip()
            step = int(it)
        except (OSError, ValueError):
            raise InputError(f"{tracker}: does not hold an iteration number; the checkpoint is damaged") from None
        sub = os.path.join(directory, f"iteration_{step:08d}")
        if not os.path.isdir(sub):
            raise InputError(f"{tracker}: names iteration {step} but {sub} does not exist; the checkpoint is incomplete")
        directory = sub
    _refuse_per_rank(directory)

    for index_name in (UNIFIED_MAP, "model.safetensors.index.json"):
        idx = os.path.join(directory, index_name)
        if os.path.isfile(idx):
            files, wm = _files_from_index(directory, idx, skipped)
            return f"directory with {index_name}", files, wm

    entries = sorted(os.listdir(directory))
    st_files = [e for e in entries if e.endswith(".safetensors")]
    layout = "directory"
    is_iteration = bool(_ITER_DIR_RE.fullmatch(os.path.basename(os.path.normpath(directory))))
    model_files = [e for e in st_files if e.startswith("model-") or e.startswith("model.")]
    opt_files = [e for e in st_files if e.startswith("opt-")]
    if is_iteration or (model_files and opt_files):
        layout = "mindformers iteration directory"
        for e in opt_files:
            skipped.files.append((os.path.join(directory, e), "optimizer states"))
        st_files = [e for e in st_files if not e.startswith("opt-")]
    if HYPER_PARAM_FILE in st_files:
        skipped.files.append((os.path.join(directory, HYPER_PARAM_FILE), "hyper-parameters and rank-0 slices, not weights"))
        st_files.remove(HYPER_PARAM_FILE)
    if not st_files:
        raise InputError(f"{directory}: no .safetensors weight files found; point --load-dir at the checkpoint")
    return layout, [os.path.join(directory, e) for e in st_files], None


def index_checkpoint(load_path: str) -> SourceIndex:
    """Read every header of the checkpoint at ``load_path`` and classify its tensors."""
    skipped = Skipped()
    layout, files, weight_map = _resolve(load_path, skipped)
    tensors: dict = {}
    raw_seen: dict = {}
    legacy = False
    unknown = []
    for path in files:
        hdr = read_header(path)
        for name, info in hdr.tensors.items():
            if name in raw_seen:
                raise InputError(
                    f"tensor {name!r} appears in both {raw_seen[name]} and {path}; "
                    "remove the duplicate file (mixed checkpoints?)"
                )
            raw_seen[name] = path
            if weight_map is not None and name in weight_map:
                want = os.path.join(os.path.dirname(path), weight_map[name])
                if os.path.abspath(want) != os.path.abspath(path):
                    raise InputError(f"{path}: holds {name!r}, but the index says it is in {weight_map[name]}; the index is stale")
            cls = classify(name)
            if cls.kind == "optimizer":
                skipped.optimizer += 1
                skipped.optimizer_bytes += info.nbytes
                continue
            if cls.kind == "step":
                skipped.steps += 1
                continue
            if cls.kind == "placeholder":
                skipped.placeholders += 1
                continue
            if cls.kind == "unknown":
                unknown.append((name, path))
                continue
            legacy = legacy or cls.legacy
            if cls.canonical in tensors:
                other = tensors[cls.canonical]
                raise InputError(
                    f"tensor {name!r} in {path} and {other.name!r} in {other.path} are the same weight "
                    f"({cls.canonical}); the checkpoint mixes two naming schemes"
                )
            tensors[cls.canonical] = SourceTensor(cls.canonical, name, path, info)
    if weight_map is not None:
        missing = [n for n in weight_map if n not in raw_seen]
        if missing:
            raise InputError(
                f"index lists {missing[0]!r} in {weight_map[missing[0]]}, but that file does not hold it"
                + (f" ({len(missing)} such tensors)" if len(missing) > 1 else "")
                + "; the checkpoint is incomplete"
            )
    if unknown:
        name, path = unknown[0]
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InputError(
            f"{path}: tensor {name!r}{more} is neither a GPT model weight nor a known optimizer/step "
            "entry; streamconv converts Llama/Qwen-style GPT checkpoints only"
        )
    if not tensors:
        raise InputError(f"{load_path}: holds no model weights (only optimizer or step entries)")
    return SourceIndex(load_path, layout, files, tensors, skipped, legacy)
