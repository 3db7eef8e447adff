"""Index a checkpoint: canonical name -> where its bytes are, from the headers alone.

:func:`index_checkpoint` locates the weight files (:mod:`.locate`), reads and
validates each header (:mod:`.header`), and asks the naming schemes
(:mod:`.schemes`) what every entry is. Model weights become
:class:`~.tensor.SourceTensor` s under their canonical names; optimizer states,
step counters and placeholders are skipped and counted; anything else is
refused, because guessing would risk a silently wrong model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.errors import InputError
from .header import read_header
from .locate import locate
from .mapped import file_identity
from .schemes import SCHEMES, EntryClass, classify
from .tensor import Skipped, SourceTensor


@dataclass
class SourceIndex:
    load_path: str
    layout: str  # human description of what was found
    files: list  # safetensors files read, in order
    tensors: dict  # canonical name -> SourceTensor
    skipped: Skipped
    schemes: tuple = ()  # the InputSchemes whose names occur, in registry order

    @property
    def scheme(self):
        """The scheme that decides layouts and notes: the first of the registry that occurs."""
        return self.schemes[0] if self.schemes else SCHEMES[0]

    @property
    def legacy_names(self) -> bool:
        return any(s.name == "mindformers-legacy" for s in self.schemes)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fingerprint(self) -> list:
        """What identifies this input for ``--resume``: files with size, mtime and inode.

        The inode tells a file replaced by another of the same size and time (a
        copy renamed into place); the stream checks the same identity when it
        opens each file, so a file changed after planning is refused.
        """
        out = []
        for p in self.files:
            st = os.stat(p)
            out.append([os.path.abspath(p), *file_identity(st)])
        return out


def index_checkpoint(load_path: str) -> SourceIndex:
    """Read every header of the checkpoint at ``load_path`` and classify its tensors."""
    skipped = Skipped()
    found = locate(load_path, skipped)
    weight_map = found.weight_map
    tensors: dict = {}
    raw_seen: dict = {}
    used = set()
    unknown = []
    for path in found.files:
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
            if cls.kind is EntryClass.OPTIMIZER:
                skipped.optimizer += 1
                skipped.optimizer_bytes += info.nbytes
                continue
            if cls.kind is EntryClass.STEP:
                skipped.steps += 1
                continue
            if cls.kind is EntryClass.PLACEHOLDER:
                skipped.placeholders += 1
                continue
            if cls.kind is EntryClass.UNKNOWN:
                unknown.append((name, path))
                continue
            used.add(cls.scheme.name)
            if cls.canonical in tensors:
                other = tensors[cls.canonical]
                raise InputError(
                    f"tensor {name!r} in {path} and {other.name!r} in {other.path} are the same weight "
                    f"({cls.canonical}); the checkpoint mixes two naming schemes"
                )
            tensors[cls.canonical] = SourceTensor(cls.canonical, name, path, info, cls.scheme.name)
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
    schemes = tuple(s for s in SCHEMES if s.name in used)
    return SourceIndex(load_path, found.layout, found.files, tensors, skipped, schemes)
