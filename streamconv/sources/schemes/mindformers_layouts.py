"""What both mindformers schemes tell the user about fused tensors whose layout the file does not record.

mindformers can store a gated ``linear_fc1`` interleaved or concatenated and a
``linear_qkv`` grouped or contiguous, and nothing in the checkpoint says which
(FORMAT.md §1 "Row layouts"). A wrong guess gives a model that loads and
produces garbage, so every run states the assumption loudly, naming the
training option and the flag that changes it. A layout the user stated with
its flag is no longer an assumption and is reported plainly.
"""

from __future__ import annotations

from ...core.options import Fc1Layout, QkvLayout


def layout_notes(config, options) -> list:
    """``config``: the resolved model (read for its fused tensors: gated fc1s, linear_qkv).

    Where each layout came from is ``options.provenance``: absent = the flag
    (stated: reported plainly), ``"default"`` = mindformers' default (ASSUMED,
    which ``--quiet`` never hides), anything else = the config file it was read from.
    """
    notes = []
    dense = config.dense_mlp
    shared = config.moe.shared if config.moe is not None else None
    att = config.attention
    fused_fc1 = (dense is not None and dense.gated and not dense.split) or (shared is not None and not shared.split)
    origin = options.provenance.get("fc1_layout")
    if fused_fc1 and origin not in (None, "default"):
        rows = "interleaved rows gate_0, up_0, ... are de-interleaved" if options.fc1_layout == Fc1Layout.INTERLEAVED \
            else "[gate; up], copied as is"
        notes.append(f"fc1 layout '{options.fc1_layout}' from {origin}: linear_fc1 {rows}")
    elif fused_fc1 and origin is None:
        if options.fc1_layout == Fc1Layout.INTERLEAVED:
            notes.append("fc1 layout 'interleaved' (--fc1-layout interleaved): linear_fc1 rows gate_0, up_0, "
                         "gate_1, ... are de-interleaved")
        else:
            notes.append("fc1 layout 'concat' (--fc1-layout concat): linear_fc1 is [gate; up], copied as is")
    elif fused_fc1:
        notes.append(
            "ASSUMED fc1 layout 'interleaved' (mindformers default use_interleaved_weight_layout_mlp: True): "
            "linear_fc1 rows are gate_0, up_0, gate_1, ... and are de-interleaved. If your model was trained "
            "with use_interleaved_weight_layout_mlp: False, rerun with --fc1-layout concat"
        )
    standard = att.kind.value == "standard"
    origin = options.provenance.get("qkv_layout")
    if standard and not att.split and origin not in (None, "default"):
        notes.append(f"qkv layout '{options.qkv_layout}' from {origin}")
    elif standard and not att.split and origin is None:
        if options.qkv_layout == QkvLayout.GROUPED:
            notes.append("qkv layout 'grouped' (--qkv-layout grouped): linear_qkv is [q, k, v] per query group, "
                         "Megatron's layout, copied as is")
        else:
            notes.append("qkv layout 'contiguous' (--qkv-layout contiguous): linear_qkv [all Q; all K; all V] is "
                         "regrouped per query group")
    elif standard and not att.split:
        notes.append(
            "ASSUMED qkv layout 'grouped' (mindformers default use_contiguous_weight_layout_attention: False): "
            "linear_qkv is [q, k, v] per query group, Megatron's layout. If your model used "
            "use_contiguous_weight_layout_attention: True (mindformers 1.6 default), rerun with --qkv-layout contiguous"
        )
    if standard and att.split:
        notes.append("legacy separate wq/wk/wv are fused into Megatron's per-group linear_qkv")
    if dense is not None and dense.split:
        notes.append("legacy separate w1 (gate) / w3 (up) are fused into linear_fc1 = [gate; up]")
    return notes
