#!/usr/bin/env python3
"""Load a Megatron checkpoint into real Megatron-Core r0.12 (CPU, gloo) and compare its logits with Hugging Face.

For checkpoints written by streamconv (or anyone): legacy ``torch`` format or
``torch_dist``; dense (Llama, Qwen2, Qwen3), Qwen3-MoE and DeepSeek-V3 (MLA, MoE,
shared experts, expert bias, MTP weights). Not part of CI. Runs in the venv of
scripts/megatron_truth.py (see its docstring: torch==2.13.0, megatron-core 0.12.x,
transformers 4.57, psutil, and a Megatron-LM source tree at core_r0.12.0 in
``$MEGATRON_LM`` or ``--megatron-lm``).

    /work/venv-mcore/bin/python scripts/check_megatron_moe.py --save-dir OUT \\
        --hf-dir /work/shared/fixtures/mindformers_moe/qwen3_moe/hf --tp 2 --ep 2 [--pp 1] [--etp 1]

What it does, one process per rank of the LOAD layout:

1. Model arguments come from the checkpoint (``common.pt`` for torch_dist, any
   ``mp_rank_*`` file for torch): every model-defining field of the stored ``args``
   (the TransformerConfig/MLATransformerConfig fields and the model-provider fields,
   minus layout, precision and kernel choices) is copied onto a fresh
   ``parse_args()`` for the load layout, then Megatron's ``validate_args`` runs. The
   fields the checkpoint lacks keep Megatron's defaults and are printed: the args a
   converter writes must describe the keys it wrote. The model is then built by
   ``pretrain_gpt.model_provider`` with the local spec (``--transformer-impl local``:
   no Transformer Engine on CPU) in float32 (``params_dtype`` fp32, no bf16 wrapper),
   so BF16 weights load exactly and the forward runs in fp32; an fp32
   ``expert_bias`` stays fp32. (Built with ``--bf16`` as in training, Megatron's
   ``Float16Module`` makes ``expert_bias`` a bf16 buffer and loading rounds it.)
2. Loading is Megatron's own ``megatron.training.checkpointing.load_checkpoint``
   (``--no-load-optim --no-load-rng``): legacy -> each rank ``torch.load``s the file
   ``get_checkpoint_name`` gives it and ``load_state_dict(strict=True)``; torch_dist ->
   ``dist_checkpointing.load`` with the model's ``sharded_state_dict`` at the load
   layout and ``--dist-ckpt-strictness raise_all`` (missing and unexpected keys are
   errors). Megatron does not notice a chunk that was never written (that region
   loads as garbage), so for torch_dist the script first checks that the chunks in
   ``.metadata`` tile every tensor exactly (``.metadata`` is read with torch's
   ``FileSystemReader``, i.e. unpickled, as Megatron's load itself does: only run this
   on checkpoints you trust). Legacy checkpoints load only at the layout they were
   written for (Megatron cannot reshard them); the script says so instead of trying.
3. Fixed token ids (``--tokens``, seeded) go through every pipeline stage (hidden
   states passed on with send/recv; with sequence parallelism each TP rank holds
   ``seq/TP`` positions), the vocab-parallel logits are gathered over TP, and compared
   with ``transformers`` (``AutoModelForCausalLM`` from ``--hf-dir``, eager attention,
   fp32 compute on the bf16-rounded parameters; buffers such as DeepSeek-V3's
   ``e_score_correction_bias`` are left fp32). Pass: ``max|diff| <= 1e-4 * max|logit|``
   over the true vocabulary. MTP layers are loaded (strictly) but take no part in the
   main logits, as in HF: r0.12's MTP block asserts ``labels`` in its forward, so
   ``model.mtp_process`` is switched off for the forward pass (after loading).

One line per case; exit code non-zero on any failure (``CHECK_MEGATRON_DEBUG=1`` prints
the first failing rank's traceback).

CPU stand-ins (scripts/_mcore_cpu.py has the details; none changes a parameter or a key):
``torch.cuda.current_device`` -> "cpu", ``Module.cuda``/``Tensor.cuda`` -> identity,
``torch.cuda.synchronize`` -> no-op, the inference RNG tracker instead of the CUDA one;
MLA's core attention accepts ``k_channels``/``v_channels`` (upstream issue #1589); the
local torch norm accepts sequence parallelism (required for TP > 1 with EP > 1; the norm
is per token); ``read_metadata``'s CUDA all-reduce tensor is made on the CPU; the fp8
fix-up of the torch_dist load (which imports Transformer Engine) is a no-op;
``numpy.product`` = ``numpy.prod``. In addition the token dispatcher is forced to
``allgather`` (``alltoall`` needs CUDA streams; the dispatcher changes no weights),
MTP is skipped in the forward (see 3.), and ``--moe-grouped-gemm`` checkpoints are
refused (the legacy GroupedMLP has no CPU kernels).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import _mcore_cpu as M  # noqa: E402

N_TOKENS = 16  # divisible by every TP size used with sequence parallelism here

# args that describe the run, not the model: never taken from the checkpoint
RUN_FIELDS = {
    "rank", "world_size", "local_rank", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "expert_model_parallel_size", "expert_tensor_parallel_size", "context_parallel_size",
    "data_parallel_size", "virtual_pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
    "pipeline_model_parallel_split_rank", "decoder_first_pipeline_num_layers",
    "decoder_last_pipeline_num_layers", "num_layers_in_first_pipeline_stage",
    "num_layers_in_last_pipeline_stage", "sequence_parallel", "encoder_tensor_model_parallel_size",
    "encoder_pipeline_model_parallel_size", "hierarchical_context_parallel_sizes", "cp_comm_type",
    "fp16", "bf16", "params_dtype", "pipeline_dtype", "autocast_dtype", "fp8", "fp8_param",
    "fp8_param_gather", "first_last_layers_bf16", "transformer_impl", "use_cpu_initialization",
    "perform_initialization", "gradient_accumulation_fusion", "masked_softmax_fusion",
    "bias_activation_fusion", "bias_dropout_fusion", "bias_gelu_fusion", "bias_swiglu_fusion",
    "apply_rope_fusion", "persist_layer_norm", "no_persist_layer_norm", "memory_efficient_layer_norm",
    "moe_token_dispatcher_type", "moe_grouped_gemm", "moe_use_legacy_grouped_gemm",
    "moe_permute_fusion", "cross_entropy_loss_fusion", "distribute_saved_activations",
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "tp_comm_overlap", "deallocate_pipeline_outputs", "batch_p2p_comm", "overlap_p2p_comm",
    "use_te_rng_tracker", "enable_cuda_graph", "external_cuda_graph", "attention_backend",
    "timers", "barrier_with_L1_time", "config_logger_dir", "init_model_with_meta_device",
    "moe_enable_deepep", "moe_router_fusion", "calculate_per_token_loss", "use_kitchen",
}
# model-provider fields beyond TransformerConfig's
MODEL_FIELDS = {
    "padded_vocab_size", "vocab_size", "max_position_embeddings", "seq_length", "position_embedding_type",
    "rotary_percent", "rotary_base", "rotary_interleaved", "use_rope_scaling", "rope_scaling_factor",
    "untie_embeddings_and_output_weights", "swiglu", "squared_relu", "group_query_attention",
    "num_experts", "norm_epsilon", "apply_layernorm_1p", "spec", "mtp_num_layers",
    "make_vocab_size_divisible_by", "add_position_embedding", "use_rotary_position_embeddings",
    "heterogeneous_layers_config_path", "heterogeneous_layers_config_encoded_json", "is_hybrid_model",
    "use_legacy_models", "yaml_cfg", "fp16_lm_cross_entropy",
}


# model fields whose absence from a checkpoint's args silently changes the model (reported when missing)
MATTERS = {"norm_epsilon", "qk_layernorm", "rotary_interleaved", "apply_residual_connection_post_layernorm",
           "add_bias_linear", "add_qkv_bias", "swiglu", "kv_channels", "num_query_groups", "group_query_attention",
           "untie_embeddings_and_output_weights", "normalization", "rotary_base", "rotary_percent",
           "position_embedding_type", "padded_vocab_size", "ffn_hidden_size", "use_rope_scaling",
           "multi_latent_attention", "num_experts"}
MATTERS_MLA = {"q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
               "rotary_scaling_factor", "mscale", "mscale_all_dim"}
MATTERS_MOE = {"moe_layer_freq", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk",
               "moe_router_pre_softmax", "moe_router_score_function", "moe_router_enable_expert_bias",
               "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
               "moe_router_load_balancing_type", "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity",
               "moe_input_jitter_eps"}


def model_fields() -> set:
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return ({f.name for f in dataclasses.fields(MLATransformerConfig)} | MODEL_FIELDS) - RUN_FIELDS


# ----------------------------------------------------------------------------- reading the checkpoint

def locate(save_dir: str):
    """(iteration dir, format, args Namespace) of a Megatron checkpoint directory."""
    tracker = os.path.join(save_dir, "latest_checkpointed_iteration.txt")
    if not os.path.exists(tracker):
        raise SystemExit(f"{save_dir}: no latest_checkpointed_iteration.txt (not a Megatron save dir)")
    it = open(tracker).read().strip()
    it_dir = os.path.join(save_dir, "release" if it == "release" else f"iter_{int(it):07d}")
    if os.path.exists(os.path.join(it_dir, "metadata.json")):
        meta = M.load_json(os.path.join(it_dir, "metadata.json"))
        if meta.get("sharded_backend") != "torch_dist":
            raise SystemExit(f"{it_dir}/metadata.json: sharded_backend {meta.get('sharded_backend')!r}, "
                             "only torch_dist is handled")
        common = torch.load(os.path.join(it_dir, "common.pt"), map_location="cpu", weights_only=False)
        return it_dir, "torch_dist", common["args"]
    ranks = sorted(d for d in os.listdir(it_dir) if d.startswith("mp_rank_"))
    if not ranks:
        raise SystemExit(f"{it_dir}: neither metadata.json (torch_dist) nor mp_rank_* (torch)")
    # mmap: only args are needed, not the weights
    ck = torch.load(os.path.join(it_dir, ranks[0], "model_optim_rng.pt"), map_location="cpu", weights_only=False,
                    mmap=True)
    return it_dir, "torch", ck["args"]


def check_coverage(it_dir: str) -> list:
    """Problems with the torch_dist chunk lists: every tensor must be tiled exactly by its chunks."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(it_dir).read_metadata()
    problems = []
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            continue
        total = 1
        for s in m.size:
            total *= s
        boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in m.chunks]
        vol = 0
        for off, sz in boxes:
            n = 1
            for o, s, g in zip(off, sz, m.size):
                if o < 0 or o + s > g:
                    problems.append(f"{fqn}: chunk at {list(off)} size {list(sz)} leaves the global shape {list(m.size)}")
                n *= s
            vol += n
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (a, sa), (b, sb) = boxes[i], boxes[j]
                if all(x < y + t and y < x + s for x, s, y, t in zip(a, sa, b, sb)):
                    problems.append(f"{fqn}: chunks at {list(a)} and {list(b)} overlap")
        if vol != total and not any(p.startswith(fqn + ":") for p in problems):
            problems.append(f"{fqn}: chunks cover {vol} of {total} elements")
    return problems


# ----------------------------------------------------------------------------- worker

def _argv(ck, layout: dict, fmt: str, save_dir: str) -> list:
    """A command line that parse_args accepts; the model fields are then copied from ``ck``."""
    req = ["--num-layers", ck.num_layers, "--hidden-size", ck.hidden_size,
           "--num-attention-heads", ck.num_attention_heads,
           "--max-position-embeddings", ck.max_position_embeddings, "--seq-length", N_TOKENS]
    moe = bool(getattr(ck, "num_experts", None))
    lay = M.layout_argv(layout["tp"], layout["pp"], layout["ep"], layout["etp"], moe=moe,
                        first_stage_layers=layout.get("first_stage_layers"))
    run = [a for a in M.RUN_ARGV if a != "--bf16"]
    load = ["--load", save_dir, "--ckpt-format", fmt, "--no-load-optim", "--no-load-rng",
            "--dist-ckpt-strictness", "raise_all", "--exit-on-missing-checkpoint",
            "--moe-token-dispatcher-type", "allgather"]
    return [str(x) for x in req + lay + run + load]


def _copy_model_fields(ck, report: dict):
    fields = model_fields()

    def patch(args):
        copied, missing = [], []
        for name in sorted(fields):
            if hasattr(ck, name):
                setattr(args, name, getattr(ck, name))
                copied.append(name)
            elif hasattr(args, name):
                missing.append(name)
        report["copied"], report["missing"] = copied, missing
        report["defaults"] = {k: repr(getattr(args, k, None)) for k in missing}
        args.seq_length = N_TOKENS
    return patch


def worker(rank, world, port, save_dir, fmt, ck, layout, tokens, out_dir, drop_keys=()):
    M.add_megatron_lm(None)
    M.apply_cpu_shims()
    import json

    import torch.distributed as dist

    rep = {"rank": rank}
    args = M.init_megatron(_argv(ck, layout, fmt, save_dir), rank, world, port,
                           patch_args=_copy_model_fields(ck, rep))
    from megatron.core import parallel_state as mpu
    from megatron.training.checkpointing import get_checkpoint_name, load_checkpoint

    wrapped, (model,) = M.build_model()
    rep["coords"] = M.rank_coords()
    if fmt == "torch":
        rep["file"] = os.path.relpath(get_checkpoint_name(save_dir, 1), save_dir)
    if drop_keys:  # legacy only: named keys removed from the file's state dict before the strict load
        orig = wrapped[0].load_state_dict
        wrapped[0].load_state_dict = lambda sd, strict=True: orig(
            {k: v for k, v in sd.items() if k not in drop_keys}, strict=strict)
    ok = 1
    try:
        load_checkpoint(wrapped, None, None, strict=True)
    except BaseException as e:  # noqa: BLE001 - SystemExit from Megatron included: report it
        ok = 0
        import traceback

        rep["load_error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
        rep["traceback"] = traceback.format_exc()[-3000:]
    flag = torch.tensor([ok])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item():
        model.eval()
        # r0.12's MTP block asserts labels (it computes the MTP loss); the main logits do not depend on
        # it, and HF ignores MTP layers too: skip it in the forward (its weights were loaded strictly)
        model.mtp_process = False
        n = tokens.numel()
        ids, pos = tokens.view(1, n), torch.arange(n).view(1, n)
        mask = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)  # True = masked out
        first, last = mpu.is_pipeline_first_stage(), mpu.is_pipeline_last_stage()
        tp = mpu.get_tensor_model_parallel_world_size()
        with torch.no_grad():
            if not first:
                rows = n // tp if args.sequence_parallel else n
                hidden = torch.empty(rows, 1, args.hidden_size, dtype=torch.float32)
                dist.recv(hidden, src=mpu.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            out = model(ids, pos, mask)
            if not last:
                dist.send(out.contiguous(), dst=mpu.get_pipeline_model_parallel_next_rank())
            else:
                parts = [torch.empty_like(out) for _ in range(tp)]
                dist.all_gather(parts, out.contiguous(), group=mpu.get_tensor_model_parallel_group())
                if mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0:
                    torch.save(torch.cat(parts, -1)[0], os.path.join(out_dir, "logits.pt"))
    with open(os.path.join(out_dir, f"rank_{rank}.json"), "w") as f:
        json.dump(rep, f)
    M.teardown()


# ----------------------------------------------------------------------------- reference

def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits, fp32 compute on bf16-rounded parameters (buffers untouched)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        return model(tokens.view(1, -1)).logits[0].float()


def make_tokens(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (N_TOKENS,), generator=g)


# ----------------------------------------------------------------------------- driver

def check(save_dir: str, hf_dir: str, tp: int = 1, pp: int = 1, ep: int = 1, etp=None, first_stage_layers=None,
          seed: int = 0, name: str = None, verbose: bool = True, drop_keys=()) -> dict:
    """Load, run, compare; returns {"ok", "diff", "max_logit", "error", "line", "reports"}."""
    import torch.multiprocessing as mp

    name = name or os.path.basename(os.path.normpath(save_dir))
    res = {"ok": False, "diff": None, "max_logit": None, "error": None, "reports": []}
    it_dir, fmt, ck = locate(save_dir)
    layout = dict(tp=tp, pp=pp, ep=ep, etp=etp, first_stage_layers=first_stage_layers)
    where = f"TP{tp} PP{pp} EP{ep}" + (f" ETP{etp}" if etp else "") + (
        f" (dropped before strict load: {', '.join(drop_keys)})" if drop_keys else "")
    saved = (ck.tensor_model_parallel_size, ck.pipeline_model_parallel_size,
             getattr(ck, "expert_model_parallel_size", 1),
             getattr(ck, "expert_tensor_parallel_size", None) or ck.tensor_model_parallel_size)
    if getattr(ck, "moe_grouped_gemm", False):
        res["error"] = "checkpoint args say --moe-grouped-gemm: GroupedMLP has no CPU kernels"
    elif drop_keys and fmt != "torch":
        res["error"] = "--drop-key applies to legacy (torch) checkpoints only"
    elif fmt == "torch" and saved != (tp, pp, ep, etp or tp):
        res["error"] = (f"legacy checkpoint written for TP{saved[0]} PP{saved[1]} EP{saved[2]} ETP{saved[3]}; "
                        f"Megatron loads legacy files only at that layout (asked {where})")
    elif fmt == "torch_dist":
        problems = check_coverage(it_dir)
        if problems:
            res["error"] = "torch_dist chunks do not tile their tensors: " + "; ".join(problems[:5])
    if res["error"] is None:
        import json

        hf_cfg = M.load_json(os.path.join(hf_dir, "config.json"))
        tokens = make_tokens(hf_cfg["vocab_size"], seed)
        world = M.world_size_for(tp, pp, ep, etp)
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="mcore_moe_") as tmp:
            try:
                mp.spawn(worker, args=(world, M.free_port(), save_dir, fmt, ck, layout, tokens, tmp, tuple(drop_keys)),
                         nprocs=world, join=True)
            except Exception as e:  # noqa: BLE001 - one line per case
                res["error"] = f"Megatron worker failed: {str(e).strip().splitlines()[-1]}"
            reps = [json.load(open(os.path.join(tmp, f"rank_{r}.json")))
                    for r in range(world) if os.path.exists(os.path.join(tmp, f"rank_{r}.json"))]
            res["reports"] = reps
            errs = [f"rank {r['rank']}: {r['load_error']}" for r in reps if "load_error" in r]
            if errs:
                res["error"] = "load failed: " + errs[0].replace("\n", " | ")[:1500]
                if os.environ.get("CHECK_MEGATRON_DEBUG"):
                    print(next(r["traceback"] for r in reps if "traceback" in r))
            elif res["error"] is None:
                got = torch.load(os.path.join(tmp, "logits.pt"))[:, :hf_cfg["vocab_size"]]
                ref = hf_logits(hf_dir, tokens)
                res["diff"] = (got - ref).abs().max().item()
                res["max_logit"] = ref.abs().max().item()
                res["ok"] = res["diff"] <= 1e-4 * res["max_logit"]
        matters = MATTERS | (MATTERS_MLA if getattr(ck, "multi_latent_attention", False) else set()) | (
            MATTERS_MOE if getattr(ck, "num_experts", None) else set())
        missing = sorted(set(reps[0].get("missing", [])) & matters) if reps else []
        if missing and verbose:
            used = ", ".join(f"{k}={reps[0]['defaults'][k]}" for k in missing)
            print(f"[{name}] note: the checkpoint's args lack these model fields; Megatron's defaults used: {used}")
        res["seconds"] = time.time() - t0
    if res["error"] is None:
        res["line"] = (f"[{name}] {fmt} at {where}: max|diff| {res['diff']:.2e}, max|logit| {res['max_logit']:.3f}, "
                       f"ratio {res['diff'] / res['max_logit']:.1e} -> {'PASS' if res['ok'] else 'FAIL'}")
    else:
        res["line"] = f"[{name}] {fmt} at {where}: FAIL ({res['error']})"
    if verbose:
        print(res["line"], flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save-dir", required=True, help="Megatron checkpoint dir (has latest_checkpointed_iteration.txt)")
    ap.add_argument("--hf-dir", required=True, help="the Hugging Face model the checkpoint was made from")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--etp", type=int, help="expert tensor parallel size (default: TP)")
    ap.add_argument("--first-stage-layers", type=int, help="--decoder-first-pipeline-num-layers (uneven PP)")
    ap.add_argument("--seed", type=int, default=0, help="token ids seed")
    ap.add_argument("--drop-key", action="append", default=[], metavar="KEY",
                    help="legacy only: remove this state-dict key from every rank file before the strict load "
                         "(e.g. decoder.final_layernorm._extra_state, which a TE-built final norm has and the "
                         "local spec does not); reported in the result line")
    ap.add_argument("--megatron-lm", help=f"Megatron-LM source tree at core_r0.12.0 (default ${M.MLM_ENV})")
    a = ap.parse_args(argv)
    M.add_megatron_lm(a.megatron_lm)
    res = check(a.save_dir, a.hf_dir, a.tp, a.pp, a.ep, a.etp, a.first_stage_layers, a.seed,
                drop_keys=tuple(a.drop_key))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
