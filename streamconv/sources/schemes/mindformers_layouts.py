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
    """``config``: the resolved model (read for ``swiglu`` and the legacy split flags)."""
    notes = []
    dense = config.dense_mlp
    att = config.attention
    if dense is not None and dense.gated and not dense.split:
        stated = "fc1_layout" in getattr(options, "stated", ())
        if options.fc1_layout == Fc1Layout.INTERLEAVED and stated:
            notes.append("fc1 layout 'interleaved' (--fc1-layout interleaved): linear_fc1 rows gate_0, up_0, "
                         "gate_1, ... are de-interleaved")
        elif options.fc1_layout == Fc1Layout.INTERLEAVED:
            notes.append(
                "ASSUMED fc1 layout 'interleaved' (mindformers default use_interleaved_weight_layout_mlp: True): "
                "linear_fc1 rows are gate_0, up_0, gate_1, ... and are de-interleaved. If your model was trained "
                "with use_interleaved_weight_layout_mlp: False, rerun with --fc1-layout concat"
            )
        else:
            notes.append("fc1 layout 'concat' (--fc1-layout concat): linear_fc1 is [gate; up], copied as is")
    if not att.split:
        stated = "qkv_layout" in getattr(options, "stated", ())
        if options.qkv_layout == QkvLayout.GROUPED and stated:
            notes.append("qkv layout 'grouped' (--qkv-layout grouped): linear_qkv is [q, k, v] per query group, "
                         "Megatron's layout, copied as is")
        elif options.qkv_layout == QkvLayout.GROUPED:
            notes.append(
                "ASSUMED qkv layout 'grouped' (mindformers default use_contiguous_weight_layout_attention: False): "
                "linear_qkv is [q, k, v] per query group, Megatron's layout. If your model used "
                "use_contiguous_weight_layout_attention: True (mindformers 1.6 default), rerun with --qkv-layout contiguous"
            )
        else:
            notes.append("qkv layout 'contiguous' (--qkv-layout contiguous): linear_qkv [all Q; all K; all V] is regrouped per query group")
    if att.split:
        notes.append("legacy separate wq/wk/wv are fused into Megatron's per-group linear_qkv")
    if dense is not None and dense.split:
        notes.append("legacy separate w1 (gate) / w3 (up) are fused into linear_fc1 = [gate; up]")
    return notes
