"""Find the weight files of a checkpoint, whatever shape it reaches us in.

FORMAT.md §1 "How checkpoints sit on disk": one file, a directory, a directory
with ``param_name_map.json`` or ``model.safetensors.index.json``, a unified
directory whose ``hyper_param.safetensors`` must never be read as weights,
mindformers' newer ``iteration_XXXXXXXX/model-*.safetensors`` output, or
per-rank training output that holds TP *slices* and is refused here. The
answer is a list of files (plus, for an index, the name -> file map to check
them against); nothing but directory listings and small JSON files is read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..core.errors import InputError, PathError
from .ckpt import ckpt_advice, looks_like_ckpt
from .tensor import Skipped

HYPER_PARAM_FILE = "hyper_param.safetensors"
UNIFIED_MAP = "param_name_map.json"
_PER_RANK_FILE_RE = re.compile(r".*_rank_\d+-\d+_\d+\.safetensors")
_RANK_DIR_RE = re.compile(r"rank_\d+")
_ITER_DIR_RE = re.compile(r"iteration_(\d+)")


@dataclass
class Located:
    layout: str  # human description of what was found
    files: list  # safetensors files to read, in order
    weight_map: dict | None  # name -> file name, when an index said where each tensor is


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


def locate(load_path: str, skipped: Skipped) -> Located:
    """The weight files of the checkpoint at ``load_path`` (files only listed, not read)."""
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
            return Located(f"index {base}", files, wm)
        if _PER_RANK_FILE_RE.fullmatch(base):
            _refuse_per_rank(os.path.dirname(os.path.abspath(load_path)) or ".")
        return Located("single file", [load_path], None)

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
            return Located(f"directory with {index_name}", files, wm)

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
        ckpts = [e for e in entries if e.endswith(".ckpt") and looks_like_ckpt(os.path.join(directory, e))]
        if ckpts:
            raise InputError(ckpt_advice(directory, found=ckpts))
        raise InputError(f"{directory}: no .safetensors weight files found; point --load-dir at the checkpoint")
    return Located(layout, [os.path.join(directory, e) for e in st_files], None)


