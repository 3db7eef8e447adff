"""The dense MLP: ffn size and gating from the shapes of one layer.

``linear_fc2`` [hidden, ffn] fixes the ffn size; ``linear_fc1`` has 2 x ffn rows
when the unit is gated (SwiGLU: [gate; up] in some row layout) and ffn rows
otherwise. Legacy checkpoints store gate and up separately (w1 / w3).
"""

from __future__ import annotations

from ..core.errors import FlagError, InputError
from .config import MlpConfig, MlpKind
from .tensors import LayerTensors, check_flag


def infer_dense(lt: LayerTensors, h: int, o, notes: list) -> MlpConfig:
    """The dense MLP of layer ``lt`` (bias filled in with the attention's, see attention.py)."""
    split = lt.shape("mlp.linear_fc1.weight") is None and lt.shape("mlp.linear_fc1_gate.weight") is not None
    fc2 = lt.need("mlp.linear_fc2.weight")
    if len(fc2.shape) != 2 or fc2.shape[0] != h:
        raise InputError(f"{fc2.path}: {fc2.name} has shape {list(fc2.shape)}; expected [{h}, ffn]")
    ffn = fc2.shape[1]
    check_flag(o.source_of("ffn_hidden_size", "--ffn-hidden-size"), o.ffn_hidden_size, ffn,
               f"{fc2.name} {list(fc2.shape)} gives ffn hidden size")
    return MlpConfig(MlpKind.DENSE, ffn, gated=False, bias=False, split=split)


def infer_gating(lt: LayerTensors, mlp: MlpConfig, h: int, o, notes: list) -> MlpConfig:
    """Decide SwiGLU from linear_fc1's rows (after the attention, to keep the notes in reading order)."""
    ffn = mlp.ffn
    if mlp.split:
        gate = lt.need("mlp.linear_fc1_gate.weight")
        lt.need("mlp.linear_fc1_up.weight")
        if gate.shape != (ffn, h):
            raise InputError(f"{gate.path}: {gate.name} has shape {list(gate.shape)}; expected [{ffn}, {h}]")
        gated = True
    else:
        fc1 = lt.need("mlp.linear_fc1.weight")
        if len(fc1.shape) != 2 or fc1.shape[1] != h or fc1.shape[0] not in (ffn, 2 * ffn):
            raise InputError(f"{fc1.path}: {fc1.name} has shape {list(fc1.shape)}; expected [{2 * ffn} or {ffn}, {h}]")
        gated = fc1.shape[0] == 2 * ffn
    if o.swiglu and not gated:
        raise FlagError(f"--swiglu given, but layer 0's linear_fc1 has {ffn} rows = ffn (not 2*ffn): the MLP is not gated")
    if gated and not o.swiglu:
        notes.append("swiglu (linear_fc1 has 2*ffn rows)")
    return MlpConfig(mlp.kind, ffn, gated, mlp.bias, mlp.split)


def has_fc_biases(lt: LayerTensors, mlp: MlpConfig) -> list:
    """[fc2 has a bias, fc1 has a bias]."""
    return [lt.has("mlp.linear_fc2.bias"),
            lt.has("mlp.linear_fc1_gate.bias") if mlp.split else lt.has("mlp.linear_fc1.bias")]


def expected_shapes(m: MlpConfig, h: int) -> dict:
    """Per-layer suffix -> source shape of every MLP tensor this config implies."""
    ffn = m.ffn
    s = {"mlp.linear_fc2.weight": (h, ffn)}
    if m.split:
        s["mlp.linear_fc1_gate.weight"] = (ffn, h)
        s["mlp.linear_fc1_up.weight"] = (ffn, h)
        if m.bias:
            s["mlp.linear_fc1_gate.bias"] = (ffn,)
            s["mlp.linear_fc1_up.bias"] = (ffn,)
    else:
        rows = 2 * ffn if m.gated else ffn
        s["mlp.linear_fc1.weight"] = (rows, h)
        if m.bias:
            s["mlp.linear_fc1.bias"] = (rows,)
    if m.bias:
        s["mlp.linear_fc2.bias"] = (h,)
    return s
