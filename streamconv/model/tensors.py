"""Looking up canonical tensors while inferring the model, with the standard refusals.

Every inference module asks the same questions of the index — is this tensor
there, what shape has it, give it or refuse naming what is missing — and must
phrase the refusal the same way; :class:`Tensors` is that vocabulary.
"""

from __future__ import annotations

from ..core.errors import FlagError, InputError
from ..sources.schemes import layer_key


class Tensors:
    def __init__(self, index):
        self.index = index
        self.all = index.tensors

    def get(self, name: str):
        return self.all.get(name)

    def has(self, name: str) -> bool:
        return name in self.all

    def shape(self, name: str):
        t = self.all.get(name)
        return None if t is None else t.shape

    def need(self, name: str, why: str = ""):
        t = self.all.get(name)
        if t is None:
            raise InputError(
                f"tensor {name} is missing from {self.index.load_path}{why}; the checkpoint is incomplete "
                "(or not a GPT model)"
            )
        return t

    def layer(self, i: int) -> "LayerTensors":
        return LayerTensors(self, i)

    def mtp_layer(self, k: int) -> "LayerTensors":
        """The transformer layer inside multi-token-prediction layer ``k``."""
        return LayerTensors(self, k, f"mtp.layers.{k}.transformer_layer.")


class LayerTensors:
    """The tensors of one layer, addressed by their per-layer suffix."""

    def __init__(self, tensors: Tensors, i: int, prefix: str | None = None):
        self.tensors, self.i, self.prefix = tensors, i, prefix

    @property
    def label(self) -> str:
        return f"layer {self.i}" if self.prefix is None else f"MTP layer {self.i}"

    def key(self, suffix: str) -> str:
        return layer_key(self.i, suffix) if self.prefix is None else self.prefix + suffix

    def get(self, suffix: str):
        return self.tensors.get(self.key(suffix))

    def has(self, suffix: str) -> bool:
        return self.tensors.has(self.key(suffix))

    def shape(self, suffix: str):
        return self.tensors.shape(self.key(suffix))

    def need(self, suffix: str):
        return self.tensors.need(self.key(suffix))


def check_flag(flag: str, given, found, what: str) -> None:
    """``what`` reads "<evidence> gives <quantity>" and is followed by the value found."""
    if given is not None and given != found:
        raise FlagError(f"{flag} {given} contradicts the checkpoint: {what} {found}")
