"""The human-readable schedule printed by ``streamconv plan``."""

from __future__ import annotations

from ..core.sizes import human


def describe(plan) -> str:
    c, o, sz = plan.config, plan.options, plan.sizes
    src = plan.source
    names = ", ".join(s.description for s in src.schemes if s.name != "mindformers-mcore")
    lines = [
        f"input    {src.load_path} ({src.layout}{', ' + names if names else ''}, {len(src.files)} file(s), "
        f"{len(src.tensors)} weights, {human(src.total_bytes)})",
        *[f"{label:<8} {text}" for label, text in src.details],
        f"model    {c.num_layers} layers, hidden {c.hidden_size}, ffn {c.ffn_hidden_size}, heads {c.num_attention_heads}, "
        f"groups {c.num_query_groups}, head dim {c.kv_channels}, vocab {c.source_vocab} -> {c.padded_vocab_size}, "
        f"{c.normalization}, {'swiglu' if c.swiglu else 'gelu'}, "
        f"{'biases' if c.add_bias_linear else ('qkv bias' if c.add_qkv_bias else 'no biases')}, "
        f"{'qk-layernorm, ' if c.qk_layernorm else ''}{'tied' if c.tied else 'untied'} output",
        f"target   TP {sz.tp} x PP {sz.pp}, BF16, {o.saver_transformer_impl} names, {o.ckpt_format} format "
        f"-> {o.save_dir}",
    ]
    for g in plan.groups:
        lines.append(f"stage {g.index}: layers {g.layers.start}..{g.layers.stop - 1}"
                     + (" + embedding" if g.index == 0 else "")
                     + (" + final norm + output layer" if g.index == sz.pp - 1 else ""))
        for f in g.files:
            lines.append(f"  {f.relpath}  {f.size} bytes ({human(f.size)}), {len(f.entries)} keys, "
                         f"reads {human(f.source_bytes)}")
    lines.append(f"read     {human(plan.read_bytes)}   write {human(plan.write_bytes)}")
    lines.append(
        f"memory   budget {human(plan.budget)}{'' if plan.budget_explicit else ' (default: ~one layer)'}, "
        f"floor {human(plan.floor)}, block {human(plan.block_bytes)}, predicted peak {human(plan.predicted_peak)}"
    )
    for n in plan.notes:
        lines.append(f"note     {n}")
    return "\n".join(lines)
