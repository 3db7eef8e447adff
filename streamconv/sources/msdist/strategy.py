"""Read MindSpore parallel strategy files into per-stage parameter layouts.

A strategy says, for every parameter, how it was cut across the devices of its
pipeline stage (FORMAT.md §8). MindSpore writes it in two forms with the same
fields: JSON (``*.json``) and protobuf (anything else, as MindSpore itself
decides by the extension), and in two scopes:

* per rank (``strategy/ckpt_strategy_rank_N.{ckpt,json}``): only that rank's
  stage, names un-prefixed; the stage is the one of its ``parallel_strategy_item``
  entries (how MindSpore's own merge reads it);
* merged (``merge_pipeline_strategys``' output): every stage, each name
  prefixed ``"<stage>-<name>"``.

A directory is read as the union of its strategy files. Layouts of the same
stage and parameter from different files must agree: the slicing of every rank
file is computed from one of them, so a disagreement would silently mis-place
rows. A parameter may sit in several stages (a shared embedding); it then has a
layout per stage.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace

from google.protobuf.message import DecodeError

from ...core.errors import InputError
from . import strategy_pb

_STAGE_PREFIX_RE = re.compile(r"(0|[1-9]\d{0,5})-(.+)")
_RANK_FILE_RE = re.compile(r".*_rank_(0|[1-9]\d{0,6})\.(?:ckpt|json)")
#: a strategy file is small (a few MB for the largest models); anything far bigger is not one
MAX_STRATEGY_BYTES = 1 << 30


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter was cut across the devices of one pipeline stage.

    ``tensor_map`` has one entry per tensor dimension: the device-matrix axes
    that split it, counted from the right of ``dev_matrix`` as MindSpore does,
    outermost first; ``()`` = not split. (MindSpore writes ``-1`` for "not
    split" and a plain int for one axis; several axes on one dimension come
    from its ``Layout`` API.)
    """

    name: str  # parameter name, without any "<stage>-" prefix
    stage: int
    dev_matrix: tuple
    tensor_map: tuple  # tuple of tuples of ints
    param_split_shape: tuple = ()
    indices_offset: tuple = ()
    field: int = 0
    opt_weight_shard_step: int = 0
    opt_weight_shard_size: int = 0
    tensor_shape: tuple | None = None  # JSON only: the full shape MindSpore recorded
    source: str = ""  # strategy file it was read from (for messages)

    @property
    def stage_device_num(self) -> int:
        return math.prod(self.dev_matrix)

    def same_layout(self, other: ParamLayout) -> bool:
        """Equal in everything that decides the slicing (not where it was read from)."""
        return replace(self, source="", tensor_shape=None) == replace(other, source="", tensor_shape=None)


@dataclass(frozen=True)
class StrategyFile:
    path: str
    form: str  # "json" | "protobuf"
    merged: bool  # names carry "<stage>-" prefixes
    stages: tuple  # stages it holds layouts for
    rank: int | None  # from a "..._rank_N" file name


@dataclass
class Strategy:
    """Layouts of every parameter, per pipeline stage, from one or more files."""

    layouts: dict = field(default_factory=dict)  # stage -> {name: ParamLayout}
    files: list = field(default_factory=list)  # [StrategyFile]

    @property
    def stages(self) -> list:
        return sorted(self.layouts)

    @property
    def stage_device_num(self) -> int:
        """Devices per pipeline stage (= product of every layout's dev_matrix)."""
        for per_stage in self.layouts.values():
            for lay in per_stage.values():
                return lay.stage_device_num
        return 0

    @property
    def world_size(self) -> int:
        return len(self.layouts) * self.stage_device_num

    def for_param(self, name: str) -> dict:
        """{stage: ParamLayout} of every stage holding ``name`` (empty if none)."""
        return {s: per[name] for s, per in sorted(self.layouts.items()) if name in per}

    def names(self) -> list:
        """Every parameter name, lowest stage first, then in file order."""
        seen = {}
        for s in self.stages:
            for n in self.layouts[s]:
                seen.setdefault(n, None)
        return list(seen)


# ---------------------------------------------------------------- reading values


def _ints(value, what: str, where: str) -> tuple:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(f"{where}: {what} {value!r} is not a list of integers; the strategy file is damaged")
    return tuple(int(v) for v in value)


def _tensor_map(raw_dims: list, ndev: int, where: str) -> tuple:
    """Normalize per-dimension entries (int or list of ints) to tuples of axes, -1 dropped."""
    out, used = [], set()
    for d in raw_dims:
        axes = d if isinstance(d, (list, tuple)) else [d]
        axes = _ints(list(axes), "tensor_map entry", where)
        kept = []
        for a in axes:
            if a == -1:
                continue
            if not 0 <= a < ndev:
                raise InputError(
                    f"{where}: tensor_map refers to device axis {a} but dev_matrix has {ndev} axes; "
                    "the strategy file is damaged"
                )
            if a in used:
                raise InputError(f"{where}: tensor_map uses device axis {a} twice; the strategy file is damaged")
            used.add(a)
            kept.append(a)
        out.append(tuple(kept))
    return tuple(out)


def _layout(name, stage, dev, tmap_raw, pss, ioff, fld, step, size, tshape, path) -> ParamLayout:
    where = f"{path}: parameter {name!r}"
    dev = _ints(dev, "dev_matrix", where)
    if not dev or any(d < 1 for d in dev):
        raise InputError(f"{where}: dev_matrix {list(dev)} must be a non-empty list of positive sizes")
    pss = _ints(pss, "param_split_shape", where)
    ioff = _ints(ioff, "indices_offset", where)
    if len(pss) != len(ioff):
        raise InputError(
            f"{where}: param_split_shape has {len(pss)} entries but indices_offset {len(ioff)}; "
            "the strategy file is damaged"
        )
    for what, v in (("field", fld), ("opt_weight_shard_step", step), ("opt_weight_shard_size", size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise InputError(f"{where}: {what} {v!r} is not an integer; the strategy file is damaged")
    if tshape is not None:
        tshape = _ints(tshape, "tensor_shape", where)
    return ParamLayout(
        name=name, stage=stage, dev_matrix=dev, tensor_map=_tensor_map(tmap_raw, len(dev), where),
        param_split_shape=pss, indices_offset=ioff, field=int(fld),
        opt_weight_shard_step=int(step), opt_weight_shard_size=int(size),
        tensor_shape=tshape, source=path,
    )


def _split_stage(name: str, path: str):
    m = _STAGE_PREFIX_RE.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def _assign_stages(items: list, file_stage: int, path: str):
    """[(raw name, ...)] -> merged?, [(stage, name, ...)]: all names prefixed (merged file) or none."""
    split = [(_split_stage(raw, path), rest) for raw, *rest in items]
    prefixed = [s is not None for (s, _), _ in split]
    if all(prefixed):
        return True, [(s, n, *rest) for (s, n), rest in split]
    if any(prefixed):
        a = next(raw for (raw, *_), p in zip(items, prefixed) if p)
        b = next(raw for (raw, *_), p in zip(items, prefixed) if not p)
        raise InputError(
            f"{path}: mixes stage-prefixed names ({a!r}) with un-prefixed ones ({b!r}); "
            "it is neither one rank's strategy nor a merged one"
        )
    return False, [(file_stage, raw, *rest) for raw, *rest in items]


def _read_bytes(path: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > MAX_STRATEGY_BYTES:
            raise InputError(f"{path}: {size} bytes is far too large for a strategy file; point at the strategy")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read the strategy file ({e.strerror or e})") from None


def _read_json(path: str):
    try:
        obj = json.loads(_read_bytes(path).decode("utf-8"))
    except RecursionError:
        raise InputError(f"{path}: not a MindSpore strategy file (JSON nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a MindSpore strategy file (invalid JSON: {e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("parallel_layout_item"), dict):
        raise InputError(f"{path}: not a MindSpore strategy file (no 'parallel_layout_item' object)")
    strat_items = obj.get("parallel_strategy_item") or {}
    file_stage = 0
    if isinstance(strat_items, dict) and strat_items:
        first = next(iter(strat_items.values()))
        st = first.get("stage") if isinstance(first, dict) else None
        if not isinstance(st, int) or isinstance(st, bool) or st < 0:
            raise InputError(f"{path}: parallel_strategy_item has no valid 'stage'; the strategy file is damaged")
        file_stage = st
    items = []
    for raw, it in obj["parallel_layout_item"].items():
        if not isinstance(it, dict) or "dev_matrix" not in it or "tensor_map" not in it:
            raise InputError(f"{path}: parameter {raw!r} has no dev_matrix/tensor_map; the strategy file is damaged")
        tmap = it["tensor_map"]
        if not isinstance(tmap, list):
            raise InputError(f"{path}: parameter {raw!r}: tensor_map {tmap!r} is not a list")
        items.append((
            raw, it["dev_matrix"], tmap, it.get("param_split_shape", []), it.get("indices_offset", []),
            it.get("field", 0), it.get("opt_weight_shard_step", 0), it.get("opt_weight_shard_size", 0),
            it.get("tensor_shape"),
        ))
    return file_stage, items


def _read_protobuf(path: str):
    msg = strategy_pb.ParallelStrategyMap()
    try:
        msg.ParseFromString(_read_bytes(path))
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InputError(
            f"{path}: not a MindSpore strategy file (protobuf parse failed: {e}); "
            "a JSON strategy must be named *.json"
        ) from None
    file_stage = msg.parallel_strategy_item[0].parallel_strategys.stage if msg.parallel_strategy_item else 0
    items = []
    for it in msg.parallel_layout_item:
        lay = it.parallel_layouts
        if not it.param_name or len(lay.dev_matrix) != 1 or len(lay.tensor_map) < 1:
            raise InputError(
                f"{path}: layout item {it.param_name!r} lacks a name, a dev_matrix or a tensor_map; "
                "the file is damaged or not a MindSpore strategy"
            )
        if len(lay.tensor_map) == 1:  # one entry per tensor dim, one axis (or -1) each
            tmap = list(lay.tensor_map[0].dim)
        else:
            # MindSpore's Layout API: one TensorMap per tensor dim, each listing its axes; a
            # 1-D tensor gets an empty TensorMap appended so the two forms stay distinguishable
            tmap = [list(t.dim) for t in lay.tensor_map if len(t.dim) > 0]
        pss = list(lay.param_split_shape[0].dim) if lay.param_split_shape else []
        ioff = list(lay.indices_offset[0].dim) if lay.indices_offset else []
        items.append((
            it.param_name, list(lay.dev_matrix[0].dim), tmap, pss, ioff,
            lay.field, lay.opt_weight_shard_step, lay.opt_weight_shard_size, None,
        ))
    return file_stage, items


def read_strategy_file(path: str):
    """Parse one strategy file -> (StrategyFile, {stage: {name: ParamLayout}})."""
    form = "json" if path.endswith(".json") else "protobuf"
    file_stage, items = (_read_json if form == "json" else _read_protobuf)(path)
    if not items:
        raise InputError(f"{path}: the strategy has no parameter layouts; it is empty or not a MindSpore strategy")
    merged, staged = _assign_stages(items, file_stage, path)
    layouts: dict = {}
    for stage, name, *fields in staged:
        per = layouts.setdefault(stage, {})
        if name in per:
            raise InputError(f"{path}: parameter {name!r} appears twice for stage {stage}")
        per[name] = _layout(name, stage, *fields, path)
    m = _RANK_FILE_RE.fullmatch(os.path.basename(path))
    rank = int(m.group(1)) if m and not merged else None
    return StrategyFile(path, form, merged, tuple(sorted(layouts)), rank), layouts


def _strategy_files(path: str) -> list:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"{path}: strategy path does not exist; give the strategy file or the strategy/ directory")
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise InputError(f"{path}: cannot list the strategy directory ({e.strerror or e})") from None
    files = [
        os.path.join(path, e) for e in entries
        if e.endswith((".ckpt", ".json")) and os.path.isfile(os.path.join(path, e))
    ]
    if not files:
        raise InputError(f"{path}: no strategy files (*.ckpt or *.json) in this directory")
    return files


def load_strategy(path: str) -> Strategy:
    """Read a strategy file or a directory of them into one :class:`Strategy`.

    Refuses (one line naming the files and parameter): two files disagreeing on a
    parameter's layout in the same stage, layouts of one stage over different
    device counts, a missing stage, and a per-rank file whose stage is not the one
    its rank number falls in.
    """
    strat = Strategy()
    for p in _strategy_files(path):
        sf, layouts = read_strategy_file(p)
        strat.files.append(sf)
        for stage, per in layouts.items():
            have = strat.layouts.setdefault(stage, {})
            for name, lay in per.items():
                old = have.get(name)
                if old is None:
                    have[name] = lay
                elif not old.same_layout(lay):
                    raise InputError(
                        f"parameter {name!r} (stage {stage}): {old.source} and {lay.source} give different "
                        "layouts; they are not strategies of the same run"
                    )
    strat.layouts = dict(sorted(strat.layouts.items()))
    ndev = None
    for per in strat.layouts.values():
        for lay in per.values():
            if ndev is None:
                ndev, first = lay.stage_device_num, lay
            elif lay.stage_device_num != ndev:
                raise InputError(
                    f"{lay.source}: parameter {lay.name!r} is laid out over {lay.stage_device_num} devices "
                    f"(dev_matrix {list(lay.dev_matrix)}) but {first.name!r} over {ndev}; every stage must "
                    "have the same device count"
                )
    missing = [s for s in range(max(strat.layouts) + 1) if s not in strat.layouts]
    if missing:
        raise InputError(
            f"{path}: the strategy has no layouts for pipeline stage {missing[0]} (it has stages "
            f"{strat.stages}); give every stage's strategy file (the whole strategy/ directory)"
        )
    for sf in strat.files:
        if sf.rank is not None and sf.stages and sf.rank // ndev != sf.stages[0]:
            raise InputError(
                f"{sf.path}: holds stage {sf.stages[0]} but rank {sf.rank} is in stage {sf.rank // ndev} "
                f"({ndev} devices per stage); the strategy files are mixed up"
            )
    return strat
