"""Mixture-of-experts layers: router, routed experts, shared experts, from the shapes of one layer.

The router ``mlp.router.weight`` [E, H] gives the expert count. mindformers
stores the routed experts stacked and transposed relative to Megatron
(FORMAT.md §6): ``weight1`` [E*H, 2F] (each expert [H, 2F], columns
[gate | up]) and ``weight2`` [E*F, H]; mindformers 1.6 declared ``weight1`` as
[H, E*2F] over the same bytes, which is read as [E*H, 2F]. Hugging Face stores
one gate/up/down tensor per expert. Shared experts are one gated MLP of
intermediate size S. What Megatron r0.12 cannot load is refused here: a router
without experts, non-gated experts, a shared-expert gate.
"""

from __future__ import annotations

from dataclasses import replace

from ..core.errors import FlagError, InputError
from ..sources.tensor import SourceTensor
from .config import ExpertStorage, MlpConfig, MlpKind, MoeConfig
from .tensors import LayerTensors, check_flag


def is_moe(lt: LayerTensors) -> bool:
    return lt.has("mlp.router.weight")


def _expert_names(e: int) -> tuple:
    return (f"mlp.experts.{e}.linear_fc1_gate.weight", f"mlp.experts.{e}.linear_fc1_up.weight",
            f"mlp.experts.{e}.linear_fc2.weight")


def infer(lt: LayerTensors, h: int, o, notes: list) -> MoeConfig:
    router = lt.need("mlp.router.weight")
    if len(router.shape) != 2 or router.shape[1] != h:
        raise InputError(f"{router.path}: {router.name} has shape {list(router.shape)}; expected [experts, {h}]")
    e = router.shape[0]
    reshaped = False
    if lt.has("mlp.experts.weight1") or lt.has("mlp.experts.weight2"):
        storage = ExpertStorage.STACKED_TRANSPOSED
        w1, w2 = lt.need("mlp.experts.weight1"), lt.need("mlp.experts.weight2")
        if len(w2.shape) != 2 or w2.shape[1] != h or w2.shape[0] % e:
            raise InputError(f"{w2.path}: {w2.name} has shape {list(w2.shape)}; expected [{e} x ffn, {h}] "
                             f"({e} experts from {router.name})")
        f = w2.shape[0] // e
        if tuple(w1.shape) == (h, e * 2 * f) and h != e * h:
            reshaped = True  # mindformers 1.6's declaration of the same bytes
        elif tuple(w1.shape) != (e * h, 2 * f):
            raise InputError(f"{w1.path}: {w1.name} has shape {list(w1.shape)}; expected [{e * h}, {2 * f}] "
                             f"({e} gated experts of ffn {f}, stored [in, out])")
    elif lt.has(_expert_names(0)[0]):
        storage = ExpertStorage.PER_EXPERT
        gate = lt.need(_expert_names(0)[0])
        f = gate.shape[0]
    else:
        raise InputError(f"{router.path}: {router.name} is a MoE router, but layer {lt.i} has no expert weights "
                         "(mlp.experts.weight1/weight2); the checkpoint is incomplete")
    if lt.has("mlp.shared_experts.shared_experts_gate.weight"):
        g = lt.need("mlp.shared_experts.shared_experts_gate.weight")
        raise InputError(f"{g.path}: {g.name}: Megatron r0.12's MoE layer spec has no shared-expert gate, so it "
                         "cannot load this model")
    shared = None
    if lt.has("mlp.shared_experts.linear_fc2.weight"):
        fc2 = lt.need("mlp.shared_experts.linear_fc2.weight")
        if len(fc2.shape) != 2 or fc2.shape[0] != h:
            raise InputError(f"{fc2.path}: {fc2.name} has shape {list(fc2.shape)}; expected [{h}, shared ffn]")
        size = fc2.shape[1]
        split = not lt.has("mlp.shared_experts.linear_fc1.weight")
        if not split:
            fc1 = lt.need("mlp.shared_experts.linear_fc1.weight")
            if tuple(fc1.shape) != (2 * size, h):
                raise InputError(f"{fc1.path}: {fc1.name} has shape {list(fc1.shape)}; expected [{2 * size}, {h}] "
                                 "(a gated shared expert: Megatron's shared experts use the experts' SwiGLU)")
        shared = MlpConfig(MlpKind.DENSE, size, gated=True, bias=False, split=split)
    bias = lt.get("mlp.router.expert_bias")
    if bias is not None and tuple(bias.shape) != (e,):
        raise InputError(f"{bias.path}: {bias.name} has shape {list(bias.shape)}; expected [{e}]")
    if o.moe_router_enable_expert_bias and bias is None:
        raise FlagError(f"{o.source_of('moe_router_enable_expert_bias', '--moe-router-enable-expert-bias')} "
                        f"given, but layer {lt.i}'s router has no expert_bias")
    check_flag(o.source_of("num_experts", "--num-experts"), o.num_experts, e, f"{router.name} gives an expert count of")
    check_flag(o.source_of("moe_ffn_hidden_size", "--moe-ffn-hidden-size"), o.moe_ffn_hidden_size, f,
               f"layer {lt.i}'s experts give a per-expert ffn size of")
    check_flag(o.source_of("moe_shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size"),
               o.moe_shared_expert_intermediate_size, shared.ffn if shared else None,
               f"layer {lt.i}'s shared experts give an intermediate size of")
    notes.append(f"mixture of experts: {e} experts of ffn {f}"
                 + (f", shared experts of {shared.ffn}" if shared else "")
                 + (", router expert bias (kept fp32)" if bias is not None else ""))
    return MoeConfig(MlpKind.MOE, e, f, storage, bias is not None, shared, reshaped)


def reshaped_weight1(src, cfg: MoeConfig, h: int):
    """``weight1`` seen as [E*H, 2F] (mindformers 1.6 declared the same bytes [H, E*2F])."""
    if not cfg.reshaped:
        return src
    if not isinstance(src, SourceTensor):  # per-rank slices are boxes of [H, E*2F]; no one file's bytes to re-view
        raise InputError(
            f"{src.path}: {src.name} is declared [H, E*2F] (mindformers 1.6's experts) and stored as per-rank "
            "slices, which streamconv cannot read as [E*H, 2F]; merge the checkpoint first (MindSpore's "
            "unified_safetensors) and convert the merged directory"
        )
    info = replace(src.info, shape=(cfg.num_experts * h, 2 * cfg.ffn))
    return replace(src, info=info)


def expected_shapes(m: MoeConfig, h: int) -> dict:
    """Per-layer suffix -> source shape of every MoE tensor this config implies."""
    e, f = m.num_experts, m.ffn
    s = {"mlp.router.weight": (e, h)}
    if m.expert_bias:
        s["mlp.router.expert_bias"] = (e,)
    if m.storage is ExpertStorage.STACKED_TRANSPOSED:
        s["mlp.experts.weight1"] = (h, e * 2 * f) if m.reshaped else (e * h, 2 * f)
        s["mlp.experts.weight2"] = (e * f, h)
    else:
        for i in range(e):
            g, u, d = _expert_names(i)
            s[g], s[u], s[d] = (f, h), (f, h), (h, f)
    if m.shared is not None:
        size = m.shared.ffn
        if m.shared.split:
            s["mlp.shared_experts.linear_fc1_gate.weight"] = (size, h)
            s["mlp.shared_experts.linear_fc1_up.weight"] = (size, h)
        else:
            s["mlp.shared_experts.linear_fc1.weight"] = (2 * size, h)
        s["mlp.shared_experts.linear_fc2.weight"] = (h, size)
    return s
