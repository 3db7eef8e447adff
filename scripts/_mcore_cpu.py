"""Run real Megatron-Core r0.12 (and Megatron-LM's own training-side code) on CPU with gloo.

Shared plumbing of scripts/megatron_truth.py, scripts/check_megatron_moe.py and
scripts/_harness_selftest.py. Not part of CI; runs only in the separate venv
described in megatron_truth.py's docstring.

Why Megatron-LM's training code and not a hand-made TransformerConfig: the point of
these scripts is ground truth that does not depend on our reading of Megatron.
So the model is built exactly as ``pretrain_gpt.py`` builds it: Megatron's own
``parse_args`` + ``validate_args`` turn a Megatron command line into ``args``,
``megatron.training.training.get_model(pretrain_gpt.model_provider)`` builds the
GPTModel (Float16Module applies the bf16 cast, as in training), and the
checkpoint names come from ``megatron.training.checkpointing``. The pip package
``megatron-core`` ships only ``megatron/core``; the training side is read from a
Megatron-LM source tree at branch ``core_r0.12.0`` (``--megatron-lm PATH`` or
``$MEGATRON_LM``; nothing of it is copied into this repository). Its
``megatron/training`` is grafted onto the installed ``megatron`` namespace
package, so ``megatron.core`` is the registry's 0.12.x (whose code is identical
to the branch apart from ``package_info.py``).

CPU stand-ins (each one changes no parameter, buffer or key; all applied by
``apply_cpu_shims``):

* ``torch.cuda.current_device`` -> ``"cpu"``; ``torch.nn.Module.cuda`` and
  ``torch.Tensor.cuda`` -> identity (get_model moves the model to the GPU; the
  rotary embedding moves ``inv_freq`` to ``current_device()``; tied embeddings with
  PP > 1 ``.cuda()`` the shared weight before the all-reduce).
* ``torch.cuda.synchronize`` -> no-op (Megatron's dist-checkpoint writer calls it
  after its device-to-host copies).
* The CUDA RNG tracker is initialised as the inference tracker (its ``fork()`` is a
  no-op): ``model_parallel_cuda_manual_seed`` needs CUDA. Initial weights come from
  the CPU generator (``--use-cpu-initialization``).
* MLA local spec (upstream issue #1589): ``MLASelfAttention`` passes ``k_channels``
  and ``v_channels`` to its core attention, which r0.12's ``DotProductAttention``
  does not accept. ``gpt_layer_specs.DotProductAttention`` is replaced by a subclass
  that accepts them and sizes its output by ``v_channels`` (q/k use ``k_channels``
  through the tensors themselves); it has no parameters.
* Sequence parallelism (which Megatron requires for TP > 1 with EP > 1) is refused by
  the local torch norm (``WrappedTorchNorm`` asserts ``not sequence_parallel``). The
  norm is per token, so sequence parallelism does not change its math: the wrapper
  builds the same ``torch.nn.RMSNorm``/``LayerNorm`` with the assertion skipped.
* ``numpy.product`` (removed in numpy 2.0; megatron-core 0.12's fully-parallel save
  strategy still calls it when DP > 1) is ``numpy.prod``. The registry's megatron-core
  0.12.x pulls zarr/ml-dtypes that need numpy >= 2, so numpy stays 2.x.
* ``megatron.training.checkpointing`` sees a ``torch`` whose ``tensor(..., device='cuda')``
  makes a CPU tensor: ``read_metadata`` all-reduces the iteration number in a CUDA tensor.
* ``checkpointing.fix_fp8_params_lose_precision_when_loading_dist_ckpt`` (torch_dist load)
  asks for the Transformer Engine version before looking for fp8 parameters; without TE
  that import fails. There are no fp8 parameters here, so it is a no-op.
* Only with ``--moe-grouped-gemm`` (local spec -> legacy ``GroupedMLP``, which needs the
  CUDA-only ``grouped_gemm`` package): ``grouped_gemm_is_available`` is made to say
  yes and ``torch.cuda.get_device_capability`` to say (9, 0) (validate_args checks
  it), so the module can be BUILT for its keys and shardings. Its forward cannot run.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
from typing import Optional

import torch

MLM_ENV = "MEGATRON_LM"


# ----------------------------------------------------------------------------- Megatron-LM graft

def add_megatron_lm(path: Optional[str]) -> str:
    """Make ``megatron.training``/``megatron.legacy`` and ``pretrain_gpt`` importable from a source tree."""
    path = path or os.environ.get(MLM_ENV)
    if not path:
        raise SystemExit(f"need a Megatron-LM source tree at core_r0.12.0: --megatron-lm PATH or ${MLM_ENV}")
    path = os.path.abspath(path)
    if not os.path.exists(os.path.join(path, "megatron", "training", "checkpointing.py")) or \
            not os.path.exists(os.path.join(path, "pretrain_gpt.py")):
        raise SystemExit(f"{path}: not a Megatron-LM source tree (no megatron/training/checkpointing.py "
                         "or pretrain_gpt.py)")
    import megatron

    sub = os.path.join(path, "megatron")
    if sub not in list(megatron.__path__):
        megatron.__path__.append(sub)
    if path not in sys.path:
        sys.path.append(path)  # after site-packages: megatron.core stays the installed one
    os.environ[MLM_ENV] = path  # spawned workers inherit it
    return path


# ----------------------------------------------------------------------------- CPU stand-ins

def apply_cpu_shims(grouped_gemm_stub: bool = False) -> None:
    """Install every stand-in listed in the module docstring (idempotent)."""
    if getattr(apply_cpu_shims, "_done", False):
        return
    import numpy

    if not hasattr(numpy, "product"):
        numpy.product = numpy.prod
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self

    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import dot_product_attention, torch_norm
    from megatron.core.utils import divide

    base_dpa = dot_product_attention.DotProductAttention

    class DotProductAttentionKV(base_dpa):
        """r0.12 DotProductAttention that accepts MLA's k_channels/v_channels (issue #1589)."""

        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                from megatron.core import parallel_state

                tp = parallel_state.get_tensor_model_parallel_world_size()
                self.hidden_size_per_attention_head = v_channels
                self.hidden_size_per_partition = divide(v_channels * self.config.num_attention_heads, tp)

    gpt_layer_specs.DotProductAttention = DotProductAttentionKV

    orig_new = torch_norm.WrappedTorchNorm.__new__

    def norm_new(cls, config, *args, **kwargs):
        if config.sequence_parallel:
            config = copy.copy(config)
            config.sequence_parallel = False  # per-token op: identical math and parameters
        return orig_new(cls, config, *args, **kwargs)

    torch_norm.WrappedTorchNorm.__new__ = norm_new

    import types

    from megatron.training import checkpointing

    class _TorchOnCPU(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def tensor(*a, device=None, **k):
            return torch.tensor(*a, device=None if str(device).startswith("cuda") else device, **k)

    checkpointing.torch = _TorchOnCPU("torch")
    checkpointing.fix_fp8_params_lose_precision_when_loading_dist_ckpt = lambda state_dict: None

    if grouped_gemm_stub:
        from megatron.core.transformer.moe import grouped_gemm_util

        grouped_gemm_util.grouped_gemm_is_available = lambda: True
        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    apply_cpu_shims._done = True


# ----------------------------------------------------------------------------- HF config -> Megatron flags

def hf_to_megatron_argv(cfg: dict, num_layers: Optional[int] = None, mtp_layers: Optional[int] = None) -> list:
    """Megatron flags for a Hugging Face config (Llama, Qwen2, Qwen3, Qwen3-MoE, DeepSeek-V3).

    FORMAT.md section 6 ("Megatron args for these models") is the mapping; it was
    checked there by running real Megatron against transformers. ``num_layers``
    overrides the layer count (e.g. to make PP split evenly); ``mtp_layers`` adds
    MTP layers (DeepSeek-V3's ``num_nextn_predict_layers``).
    """
    mt = cfg["model_type"]
    if mt not in ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"):
        raise SystemExit(f"unsupported model_type {mt!r} (llama, qwen2, qwen3, qwen3_moe, deepseek_v3)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise SystemExit(f"hidden_act {cfg['hidden_act']!r}: only silu (SwiGLU) is mapped")
    L = num_layers or cfg["num_hidden_layers"]
    H, n = cfg["hidden_size"], cfg["num_attention_heads"]
    ng = cfg.get("num_key_value_heads") or n
    a = ["--num-layers", L, "--hidden-size", H, "--num-attention-heads", n,
         "--max-position-embeddings", cfg["max_position_embeddings"], "--seq-length",
         min(16, cfg["max_position_embeddings"]), "--position-embedding-type", "rope",
         "--rotary-base", int(cfg.get("rope_theta", 10000)), "--normalization", "RMSNorm",
         "--norm-epsilon", cfg.get("rms_norm_eps", 1e-6), "--swiglu", "--disable-bias-linear",
         "--attention-dropout", 0.0, "--hidden-dropout", 0.0, "--vocab-size", cfg["vocab_size"],
         "--ffn-hidden-size", cfg["intermediate_size"]]
    if cfg.get("rope_scaling"):
        raise SystemExit("rope_scaling is not mapped by this script")
    if not cfg.get("tie_word_embeddings", False):
        a.append("--untie-embeddings-and-output-weights")
    if mt == "deepseek_v3":
        a += ["--multi-latent-attention", "--kv-lora-rank", cfg["kv_lora_rank"],
              "--qk-head-dim", cfg["qk_nope_head_dim"], "--qk-pos-emb-head-dim", cfg["qk_rope_head_dim"],
              "--v-head-dim", cfg["v_head_dim"], "--qk-layernorm"]
        if cfg.get("q_lora_rank"):
            a += ["--q-lora-rank", cfg["q_lora_rank"]]
        k = cfg.get("first_k_dense_replace", 0)
        a += ["--num-experts", cfg["n_routed_experts"], "--moe-router-topk", cfg["num_experts_per_tok"],
              "--moe-ffn-hidden-size", cfg["moe_intermediate_size"],
              "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
              "--moe-router-topk-scaling-factor", cfg.get("routed_scaling_factor", 1.0),
              "--moe-layer-freq", f"[0]*{k}+[1]*{L - k}"]
        if cfg.get("n_shared_experts"):
            a += ["--moe-shared-expert-intermediate-size", cfg["n_shared_experts"] * cfg["moe_intermediate_size"]]
        if (cfg.get("n_group") or 1) > 1:
            a += ["--moe-router-num-groups", cfg["n_group"], "--moe-router-group-topk", cfg["topk_group"]]
        if not cfg.get("norm_topk_prob", True):
            raise SystemExit("deepseek_v3 with norm_topk_prob false is not mapped")
        mtp = cfg.get("num_nextn_predict_layers") if mtp_layers is None else mtp_layers
        if mtp:
            a += ["--mtp-num-layers", mtp]
    else:
        hd = cfg.get("head_dim") or H // n
        a += ["--kv-channels", hd]
        if ng != n:
            a += ["--group-query-attention", "--num-query-groups", ng]
        if mt == "qwen2" or cfg.get("attention_bias"):
            a.append("--add-qkv-bias")
        if mt in ("qwen3", "qwen3_moe"):
            a.append("--qk-layernorm")
        if mt == "qwen3_moe":
            a += ["--num-experts", cfg["num_experts"], "--moe-router-topk", cfg["num_experts_per_tok"],
                  "--moe-ffn-hidden-size", cfg["moe_intermediate_size"], "--moe-router-score-function", "softmax"]
            dense = set(cfg.get("mlp_only_layers") or [])
            step = cfg.get("decoder_sparse_step", 1)
            pattern = [0 if (i in dense or (i + 1) % step) else 1 for i in range(L)]
            a += ["--moe-layer-freq", "1" if all(pattern) else "[" + ",".join(map(str, pattern)) + "]"]
            if not cfg.get("norm_topk_prob", False):
                a.append("--moe-router-pre-softmax")
    return [str(x) for x in a]


def layout_argv(tp: int, pp: int, ep: int = 1, etp: Optional[int] = None, moe: bool = False,
                first_stage_layers: Optional[int] = None) -> list:
    """Parallel-layout flags; sequence parallelism when Megatron requires it (TP > 1 with EP > 1)."""
    a = ["--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp]
    if moe:
        a += ["--expert-model-parallel-size", ep]
        if etp is not None:
            a += ["--expert-tensor-parallel-size", etp]
        if tp > 1 and ep > 1:
            a.append("--sequence-parallel")
    if first_stage_layers is not None:
        a += ["--decoder-first-pipeline-num-layers", first_stage_layers]
    return [str(x) for x in a]


# Flags every run adds: CPU execution (no fused kernels), bf16 model as in training, local spec.
RUN_ARGV = ["--micro-batch-size", "1", "--bf16", "--use-cpu-initialization", "--transformer-impl", "local",
            "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
            "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
            "--distributed-backend", "gloo", "--tokenizer-type", "NullTokenizer", "--seed", "1234"]


def world_size_for(tp: int, pp: int, ep: int = 1, etp: Optional[int] = None) -> int:
    """Smallest world size Megatron accepts: a multiple of TP*PP and of ETP*EP*PP."""
    import math

    etp = tp if etp is None else etp
    return math.lcm(tp * pp, etp * ep * pp)


# ----------------------------------------------------------------------------- Megatron's writer on CPU

def patch_writer() -> None:
    """Let Megatron's own torch_dist writer run on CPU with torch 2.13.

    * ``FileSystemWriterAsync.write_preloaded_data`` calls torch's private
      ``_write_item(transforms, stream, data, write_item, storage_key)``; torch 2.13 added a
      trailing ``serialization_format`` argument. The stand-in passes torch's default
      (``SerializationFormat.TORCH_SAVE``: the item is ``torch.save(tensor)``), which is what
      the older torch paired with r0.12 did unconditionally.
    * ``torch.cuda.synchronize`` (after the device-to-host copies) is already a no-op
      (apply_cpu_shims). ``torch.cuda.get_rng_state`` (saved under ``rng_state``) returns an
      empty byte tensor: there is no CUDA generator.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from torch.distributed.checkpoint import filesystem as tfs

    if getattr(fa, "_cpu_patched", False):
        return
    orig = tfs._write_item
    fa._write_item = lambda *a: orig(*a, tfs.SerializationFormat.TORCH_SAVE) if len(a) == 5 else orig(*a)
    torch.cuda.get_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    fa._cpu_patched = True


def real_save(args, wrapped, fmt: str, save_dir: str, converter_like: bool = False) -> None:
    """Megatron's own save_checkpoint (iteration 1, no optimizer) in ``fmt`` (torch or torch_dist).

    ``converter_like``: leave out what only a training run has and a converted checkpoint
    does not: the RNG state (``--no-save-rng``) and the rerun-state-machine entry. Both
    matter for torch_dist: Megatron's load requests ``rerun_state_machine_state`` whenever
    common.pt has a ``rerun_state_machine`` key and the TP/PP are unchanged, and with
    ``--dist-ckpt-strictness raise_all`` a checkpoint object the model does not request
    (``rng_state`` under ``--no-load-rng``, the rerun state at another TP/PP) is an error.
    """
    from megatron.training import checkpointing

    patch_writer()
    args.save, args.save_interval, args.ckpt_format = save_dir, 1, fmt
    args.use_dist_ckpt = fmt != "torch"
    args.no_save_optim, args.no_save_rng = True, converter_like
    orig = checkpointing.generate_state_dict
    if converter_like:
        def generate_state_dict(*a, **k):
            sd = orig(*a, **k)
            sd.pop("rerun_state_machine", None)
            return sd

        checkpointing.generate_state_dict = generate_state_dict
    try:
        checkpointing.save_checkpoint(1, wrapped, None, None, 0)
    finally:
        checkpointing.generate_state_dict = orig
    torch.distributed.barrier()


# ----------------------------------------------------------------------------- process setup

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron(argv: list, rank: int, world: int, port: int, padded_vocab: Optional[int] = None,
                  patch_args=None):
    """parse_args + validate_args + globals + gloo + model-parallel groups, as initialize_megatron would.

    ``initialize_megatron`` itself skips ``mpu.initialize_model_parallel`` when no
    CUDA device is present, so the groups are created here with the exact argument
    list of ``megatron.training.initialize._initialize_distributed``.
    ``patch_args(args)``, if given, runs between parse_args and validate_args (to take
    model fields from a checkpoint's args). Returns ``args``.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      CUDA_DEVICE_MAX_CONNECTIONS="1",  # validate_args demands it with TP > 1
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding

    saved = sys.argv
    sys.argv = ["pretrain_gpt.py", *argv]
    try:
        args = parse_args()
    finally:
        sys.argv = saved
    if patch_args is not None:
        patch_args(args)
    validate_args(args, {})
    set_global_variables(args, build_tokenizer=False)
    # what _build_tokenizer would set; the true vocab size (not NullTokenizer's +1 eod) as converters use it
    if padded_vocab or not getattr(args, "padded_vocab_size", None):
        args.padded_vocab_size = padded_vocab or _vocab_size_with_padding(args.vocab_size, args, logging_enabled=False)

    from datetime import timedelta

    dist.init_process_group(backend=args.distributed_backend, world_size=world, rank=rank,
                            timeout=timedelta(minutes=args.distributed_timeout_minutes))
    mpu.initialize_model_parallel(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        args.pipeline_model_parallel_split_rank,
        pipeline_model_parallel_comm_backend=args.pipeline_model_parallel_comm_backend,
        context_parallel_size=args.context_parallel_size,
        hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
        expert_model_parallel_size=args.expert_model_parallel_size,
        num_distributed_optimizer_instances=args.num_distributed_optimizer_instances,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        nccl_communicator_config_path=args.nccl_communicator_config_path,
        order='tp-cp-ep-dp-pp' if not args.use_tp_pp_dp_mapping else 'tp-cp-ep-pp-dp',
        encoder_tensor_model_parallel_size=args.encoder_tensor_model_parallel_size,
        encoder_pipeline_model_parallel_size=args.encoder_pipeline_model_parallel_size,
        create_gloo_process_groups=args.enable_gloo_process_groups,
    )
    tp_random.initialize_rng_tracker(inference_rng_tracker=True)
    torch.manual_seed(args.seed)
    return args


def build_model():
    """get_model(pretrain_gpt.model_provider) without DDP, unwrapped as save_checkpoint unwraps it."""
    import pretrain_gpt
    from megatron.training.training import get_model
    from megatron.training.utils import unwrap_model

    wrapped = get_model(pretrain_gpt.model_provider, wrap_with_ddp=False)
    return wrapped, unwrap_model(wrapped)


def teardown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    dist.barrier()
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


def rank_coords() -> dict:
    """This rank's coordinates in every Megatron group that matters for checkpoints."""
    from megatron.core import parallel_state as mpu

    return {
        "rank": torch.distributed.get_rank(),
        "tp": mpu.get_tensor_model_parallel_rank(),
        "pp": mpu.get_pipeline_model_parallel_rank(),
        "dp": mpu.get_data_parallel_rank(),
        "ep": mpu.get_expert_model_parallel_rank(),
        "etp": mpu.get_expert_tensor_parallel_rank(),
        "edp": mpu.get_expert_data_parallel_rank(),
    }


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
