"""Find the weight files of a checkpoint, whatever shape it reaches us in.

FORMAT.md §1 "How checkpoints sit on disk": one file, a directory, a directory
with ``param_name_map.json`` or ``model.safetensors.index.json``, a unified
directory whose ``hyper_param.safetensors`` must never be read as weights,
mindformers' newer ``iteration_XXXXXXXX/model-*.safetensors`` output, or
per-rank training output (``[checkpoint/]rank_N/<prefix>_rank_N-E_S.safetensors``)
whose files hold *slices*, read through its strategy by :mod:`.msdist`. A Hugging
Face model directory (``config.json`` + ``model.safetensors`` or shards with
``model.safetensors.index.json``) is a directory with an index like any other;
its ``config.json`` may also be given as the path. The
answer is a list of files (plus, for an index, the name -> file map to check
them against), or, for per-rank output, the directory to hand to
:mod:`.msdist`; nothing but directory listings and small JSON files is read.
One rank's directory or file alone is refused: it holds slices of every
weight, never a whole one; except a lone ``rank_0/`` (no other ``rank_N``
beside it), the output of a one-device run, whose file holds whole weights.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from ..core.errors import InputError, PathError
from .ckpt import ckpt_advice, looks_like_ckpt
from .skipped import Skipped

HYPER_PARAM_FILE = "hyper_param.safetensors"
UNIFIED_MAP = "param_name_map.json"
MODEL_CONFIG = "config.json"  # a Hugging Face model's description, beside its weights
_PER_RANK_FILE_RE = re.compile(r".*_rank_\d+-\d+_\d+\.safetensors")
_RANK_DIR_RE = re.compile(r"rank_\d+")
_ITER_DIR_RE = re.compile(r"iteration_(\d+)")


@dataclass
class Located:
    layout: str  # human description of what was found
    files: list  # safetensors files to read, in order
    weight_map: dict | None  # name -> file name, when an index said where each tensor is
    per_rank: str | None = None  # per-rank training output: the directory msdist.discover reads


def _read_index_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except RecursionError:
        raise InputError(f"{path}: cannot read the index file (JSON nested too deeply); re-copy or remove it") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the index file ({e}); re-copy or remove it") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if wm is None and isinstance(obj, dict) and obj and all(isinstance(v, str) for v in obj.values()):
        wm = obj  # mindformers' convert_weight.py writes param_name_map.json as a flat {name: file}
    if not isinstance(wm, dict):
        raise InputError(f"{path}: index has no 'weight_map' of tensor name -> file name")
    for k, v in wm.items():
        if not isinstance(v, str) or not v or os.path.isabs(v) or ".." in v.split("/"):
            raise InputError(f"{path}: weight_map entry {k!r} -> {v!r} is not a file name in the checkpoint directory")
    return wm


def _lone_rank_0(directory: str) -> bool:
    """``rank_0`` with no other ``rank_N`` beside it: a one-device run, whose files hold whole weights."""
    if os.path.basename(os.path.normpath(directory)) != "rank_0":
        return False
    parent = os.path.dirname(os.path.abspath(directory))
    try:
        siblings = [e for e in os.listdir(parent) if _RANK_DIR_RE.fullmatch(e)]
    except OSError:
        return False
    return siblings == ["rank_0"]


def _has_rank_files(directory: str) -> bool:
    """``directory`` holds ``rank_N/`` subdirectories or ``*_rank_N-E_S.safetensors`` files."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return False
    return any(
        (_RANK_DIR_RE.fullmatch(e) and os.path.isdir(os.path.join(directory, e))) or _PER_RANK_FILE_RE.fullmatch(e)
        for e in entries
    )


def _one_rank(what: str) -> InputError:
    return InputError(
        f"{what}: one rank's part of a per-rank (unmerged) training run, which holds slices of the weights; "
        "point --load-dir at the directory holding every rank_N/ (the run's output or its checkpoint/ "
        "directory) and give --src-strategy-path if the strategy/ directory is not beside checkpoint/"
    )


_STRATEGY_FILE_RE = re.compile(r".*strategy.*\.(ckpt|json)")


def _strategy_beside(directory: str) -> str | None:
    """A MindSpore parallel strategy in ``directory``, its ``strategy/`` or its parent's ``strategy/``.

    Weights saved with a strategy are one rank's slices (a one-device run saves none), whatever the file is
    called: a slice renamed to model.safetensors must not pass for a smaller model.
    """
    parent = os.path.dirname(os.path.abspath(directory))
    for d in (directory, os.path.join(directory, "strategy"), os.path.join(parent, "strategy")):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        found = sorted(n for n in names if _STRATEGY_FILE_RE.fullmatch(n) and os.path.isfile(os.path.join(d, n)))
        if found:
            return os.path.join(d, found[0])
    return None


def _refuse_with_strategy(what: str, directory: str) -> None:
    found = _strategy_beside(directory)
    if found is not None:
        raise InputError(
            f"{what}: a parallel strategy ({found}) lies beside it, so its weights are one rank's slices of a "
            "per-rank training run, not whole tensors; point --load-dir at the directory holding every rank_N/ "
            "(with --src-strategy-path if needed)"
        )


def _per_rank_root(directory: str) -> str | None:
    """``directory`` if it is per-rank training output (or holds it in ``checkpoint/``), else None."""
    if _has_rank_files(os.path.join(directory, "checkpoint")):
        return directory
    if not _has_rank_files(directory):
        return None
    if _RANK_DIR_RE.fullmatch(os.path.basename(os.path.normpath(directory))):
        if _lone_rank_0(directory):
            return None  # a one-device run: its file holds whole weights, read as a plain directory
        raise _one_rank(directory)
    return directory


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
    if os.path.isfile(load_path) and os.path.basename(load_path) == MODEL_CONFIG:
        load_path = os.path.dirname(os.path.abspath(load_path))  # a Hugging Face model named by its config.json
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
        if _PER_RANK_FILE_RE.fullmatch(base) and not _lone_rank_0(os.path.dirname(os.path.abspath(load_path))):
            raise _one_rank(load_path)
        _refuse_with_strategy(load_path, os.path.dirname(os.path.abspath(load_path)))
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
    root = _per_rank_root(directory)
    if root is not None:
        return Located("per-rank training output", [], None, per_rank=root)
    _refuse_with_strategy(directory, directory)

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


