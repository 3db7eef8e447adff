"""Normalization: RMSNorm or LayerNorm, told apart by whether the norms have biases.

mindformers' LayerNorm stores ``weight`` and ``bias``; RMSNorm only ``weight``.
Layer 0's input norm decides; every other norm (pre-MLP, q/k, final) must agree,
which the per-layer shape check and :func:`final_norm` enforce.
"""

from __future__ import annotations

from ..core.errors import FlagError, InputError
from .config import Normalization
from .tensors import LayerTensors, Tensors


def infer(lt: LayerTensors, o, notes: list) -> Normalization:
    norm_bias = lt.has("input_layernorm.bias")
    norm = Normalization.LAYERNORM if norm_bias else Normalization.RMSNORM
    if o.normalization is not None and o.normalization != norm:
        why = "has norm biases" if norm_bias else "has no norm biases (LayerNorm needs them)"
        raise FlagError(f"--normalization {o.normalization} contradicts the checkpoint: layer 0's input_layernorm {why}; it is {norm}")
    if o.normalization is None:
        notes.append(f"normalization={norm}")
    return norm


def layer_shapes(h: int, norm_bias: bool) -> dict:
    """The two per-layer norms around attention and MLP."""
    s = {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,)}
    if norm_bias:
        s["input_layernorm.bias"] = (h,)
        s["pre_mlp_layernorm.bias"] = (h,)
    return s


def final_norm(t: Tensors, h: int, norm_bias: bool) -> list:
    """Check the final norm; return its canonical names."""
    fin = t.need("decoder.final_layernorm.weight")
    if tuple(fin.shape) != (h,):
        raise InputError(f"{fin.path}: {fin.name} has shape {list(fin.shape)}; expected [{h}]")
    names = ["decoder.final_layernorm.weight"]
    if norm_bias:
        t.need("decoder.final_layernorm.bias")
        names.append("decoder.final_layernorm.bias")
    return names
