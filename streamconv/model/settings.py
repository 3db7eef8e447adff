"""The values Megatron's ``args`` need that the weights cannot tell, and where each one came from.

Every such value is decided once, in this order: the flag (Megatron's name), a
hint from the model config beside the checkpoint (:mod:`~streamconv.sources.hints`),
the default. The first two are written into the options before anything is
planned (so a run's identity, ``--resume`` and the derived file ids see the
final values); :func:`notes` then tells the user, for every value that matters
to this model, where it came from — loudly when it is a default, because
Megatron's ``--use-checkpoint-args`` takes it from the checkpoint and a wrong
rope base loads fine and generates garbage. Such a note begins with
``ASSUMED``, so ``--quiet`` still prints it (it can make the output wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import InputError

DEFAULT = "default"


@dataclass(frozen=True)
class Setting:
    field: str
    flag: str
    default: object  # stored when neither flag nor config gives one; None: Megatron's own default applies
    megatron_default: object = None  # what Megatron uses when the field is left out (for the note)
    moe: bool = False  # only matters for MoE models
    mla: bool = False  # only matters for MLA models


SETTINGS = (
    Setting("rotary_base", "--rotary-base", 10000),
    Setting("seq_length", "--seq-length", 2048),
    Setting("max_position_embeddings", "--max-position-embeddings", None),  # resolve_config derives it
    Setting("norm_epsilon", "--norm-epsilon", None, 1e-5),
    Setting("use_rope_scaling", "--use-rope-scaling", None, False),
    Setting("moe_router_topk", "--moe-router-topk", None, 2, moe=True),
    Setting("moe_router_score_function", "--moe-router-score-function", None, "softmax", moe=True),
    Setting("moe_router_topk_scaling_factor", "--moe-router-topk-scaling-factor", None, "none", moe=True),
    Setting("moe_router_num_groups", "--moe-router-num-groups", None, "none (no group-limited routing)", moe=True),
    Setting("moe_router_group_topk", "--moe-router-group-topk", None, "none", moe=True),
    Setting("moe_router_pre_softmax", "--moe-router-pre-softmax", None, False, moe=True),
    Setting("rotary_scaling_factor", "--rotary-scaling-factor", None, 1.0, mla=True),
    Setting("mscale", "--mscale", None, 1.0, mla=True),
    Setting("mscale_all_dim", "--mscale-all-dim", None, 0.0, mla=True),
)
#: recorded in args, but load_args_from_checkpoint (core_r0.12.0) does not read them back
UNREAD_BY_MEGATRON = ("norm_epsilon", "use_rope_scaling")
#: source layouts of fused mindformers tensors: flag, else a mindformers YAML, else mindformers' defaults
LAYOUT_DEFAULTS = {"fc1_layout": "interleaved", "qkv_layout": "grouped"}


def apply(o, hints: dict) -> None:
    """Fill every field the user left unset from ``hints``, then the stored defaults; record origins."""
    for name, hint in hints.items():
        if name.startswith("_") or not hasattr(o, name):
            continue
        current = getattr(o, name)
        if current is None or (current is False and name == "untie_embeddings_and_output_weights"):
            setattr(o, name, hint.value)
            o.provenance[name] = hint.origin
    for s in SETTINGS:
        if getattr(o, s.field) is None and s.default is not None:
            default = s.default
            if s.field == "seq_length" and o.max_position_embeddings:
                default = min(default, o.max_position_embeddings)  # a sequence never longer than the positions
            setattr(o, s.field, default)
            o.provenance[s.field] = DEFAULT
    for name, value in LAYOUT_DEFAULTS.items():
        if getattr(o, name) is None:
            setattr(o, name, value)
            o.provenance[name] = DEFAULT


def notes(o, cfg) -> list:
    """One line per value that matters to this model and came from a config file or a default; one line for
    everything left to Megatron's own defaults."""
    out, megatron_defaults = [], []
    is_moe = cfg.moe is not None
    is_mla = cfg.mla is not None
    yarn = (o.rotary_scaling_factor or 1.0) != 1.0
    for s in SETTINGS:
        if (s.moe and not is_moe) or (s.mla and not is_mla):
            continue
        if s.field == "rotary_base" and cfg.position_embedding_type != "rope":
            continue
        if s.field == "moe_router_pre_softmax" and o.moe_router_score_function == "sigmoid":
            continue  # only softmax routing has a pre-softmax choice
        if s.field in ("mscale", "mscale_all_dim") and not yarn:
            continue
        if s.field == "use_rope_scaling" and not o.use_rope_scaling:
            continue  # off unless a flag or config.json (Llama 3.1) says so
        value = getattr(o, s.field)
        origin = o.provenance.get(s.field)
        if s.field == "max_position_embeddings" and value is None:
            out.append(f"ASSUMED max_position_embeddings={cfg.max_position_embeddings} (not in the weights; default: "
                       f"2048, or the sequence length if larger): pass {s.flag} if your model used another")
        elif value is None:
            megatron_defaults.append(f"{s.field}={s.megatron_default}")
        elif origin == DEFAULT:
            out.append(f"ASSUMED {s.field}={value} (not in the weights; default): pass {s.flag} if your model used "
                       "another")
        elif origin is not None:
            out.append(f"{s.field}={value} from {origin}")
    unread = {s.field: s.flag + ("" if s.field == "use_rope_scaling" else f" {getattr(o, s.field):g}")
              for s in SETTINGS if s.field in UNREAD_BY_MEGATRON and getattr(o, s.field)}
    if unread:
        out.append(f"Megatron does not read {' or '.join(unread)} back from the checkpoint "
                   f"(--use-checkpoint-args): run it with {' '.join(unread.values())}")
    if megatron_defaults:
        out.append("ASSUMED Megatron's defaults for values not in the weights" + (" or the model config" if o.provenance
                                                                                   else "")
                   + " (pass the flag if your model differs): " + ", ".join(megatron_defaults))
    return out


def mtp_note(hints: dict, cfg) -> list:
    """The model config's MTP layer count against the weights': refuse a contradiction, say when they are absent.

    transformers does not load DeepSeek's MTP layer and leaves it out when it
    saves a model, but keeps ``num_nextn_predict_layers`` in config.json: such a
    model converts without MTP, and the user is told.
    """
    declared = hints.get("_mtp_layers")
    found = len(cfg.mtp_layers)
    if declared is None or declared.value == found:
        return []
    if found:
        raise InputError(f"{declared.origin} {declared.value} contradicts the weights: they hold {found} "
                         "multi-token-prediction layer(s); config.json and the weights are not the same model")
    return [f"{declared.origin} {declared.value}, but the weights hold no MTP layer (transformers leaves it out when "
            "it saves a model): converted without MTP"]


def check_rope_scaling(o, cfg) -> None:
    """Yarn scaling exists in Megatron r0.12 only inside multi-latent attention: refuse it for other models."""
    if cfg.mla is None and (o.rotary_scaling_factor or 1.0) != 1.0:
        where = o.source_of("rotary_scaling_factor", "--rotary-scaling-factor")
        raise InputError(f"{where} {o.rotary_scaling_factor}: yarn rope scaling is applied by Megatron r0.12 only in "
                         "multi-latent attention; this model has standard attention, so it cannot be expressed")
