#!/usr/bin/env python3
"""Load streamconv's rank files into real Megatron-Core (CPU, gloo) and compare its logits.

Not part of CI (CI has no megatron-core). Run it from a separate venv that has
megatron-core 0.12.x, torch, numpy, safetensors and pytest (the reference forward
pass is imported from tests/test_logits.py), e.g.:

    python3 -m venv /work/venv-mcore
    /work/venv-mcore/bin/pip install torch==2.13.0 "megatron-core==0.12.*" numpy safetensors pytest
    /work/venv-mcore/bin/python scripts/check_megatron_load.py            # every case of test_logits.py
    /work/venv-mcore/bin/python scripts/check_megatron_load.py --cases tp1pp1_tied_mqa

For each case: the synthetic mindformers checkpoint is written (scripts/synth.py),
converted with the streamconv CLI (``--streamconv-python``: a Python that has
streamconv installed), then TP x PP worker processes (gloo, CPU) each build a
``GPTModel`` from ``get_gpt_layer_local_spec`` with a ``TransformerConfig`` taken
from the rank file's ``args``, ``load_state_dict(strict=True)`` their own
``mp_rank_*`` file, and run the forward pass (pipeline stages hand the hidden
states on with send/recv; the vocab-parallel logits are gathered over TP).
The logits are compared with the reference forward pass of the SOURCE model.

Strict loading is tried on the file as written. Without Transformer Engine the
final norm is a plain torch norm, which has no ``_extra_state``; when strict
loading rejects exactly that key, the script reports it and loads again with
only that key dropped (``--no-drop-final-norm-extra-state`` to fail instead).
Exit code 0 only if every case loads and matches (and, with --negative, every
negative control loads and does NOT match).

``--ckpt-format torch_dist``: the case is converted to Megatron's distributed
checkpoint (chunked at the case's TP x PP) and loaded at ``--load-tp`` x
``--load-pp`` the way ``load_checkpoint`` does it: ``common.pt`` read with
``dist_checkpointing.load_common_state_dict``, each rank's
``model.sharded_state_dict()`` filled by ``dist_checkpointing.load`` (Megatron's
torch_dist strategy reshards), then ``load_state_dict(strict=True)``. As with
``--dist-ckpt-strictness raise_all``, every key the model asks for must be in the
checkpoint and every key of the checkpoint must be asked for.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402

FINAL_NORM_EXTRA = "decoder.final_layernorm._extra_state"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(args, pre_process: bool, post_process: bool):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    swiglu = bool(args.swiglu)
    cfg = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=1e-5,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=bool(getattr(args, "qk_layernorm", False)),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        params_dtype=torch.float32,  # BF16 weights are copied in exactly; compute in float32
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,  # the fused bias-gelu is the tanh approximation
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=cfg.qk_layernorm, normalization=args.normalization)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )


def strict_load(model, sd: dict, drop_final_norm_extra: bool) -> dict:
    """load_state_dict(strict=True); on failure report the exact missing/unexpected keys."""
    report = {"strict_ok": False, "missing": [], "unexpected": [], "error": None, "dropped": []}
    try:
        model.load_state_dict(sd, strict=True)
        report["strict_ok"] = True
        return report
    except RuntimeError as e:
        report["error"] = str(e).splitlines()[0]
    res = model.load_state_dict(sd, strict=False)  # only to list the keys (weights are loaded anyway)
    report["missing"], report["unexpected"] = list(res.missing_keys), list(res.unexpected_keys)
    if drop_final_norm_extra and report["unexpected"] == [FINAL_NORM_EXTRA] and not report["missing"]:
        sd = {k: v for k, v in sd.items() if k != FINAL_NORM_EXTRA}
        model.load_state_dict(sd, strict=True)
        report["dropped"] = [FINAL_NORM_EXTRA]
    return report


def worker(rank: int, world: int, port: int, save_dir: str, tokens: torch.Tensor, out_dir: str,
           drop_final_norm_extra: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as tp_random

    it_file = os.path.join(save_dir, "latest_checkpointed_iteration.txt")
    it_dir = os.path.join(save_dir, f"iter_{int(open(it_file).read()):07d}")
    any_rank = sorted(os.listdir(it_dir))[0]
    args = torch.load(os.path.join(it_dir, any_rank, "model_optim_rng.pt"), map_location="cpu",
                      weights_only=False)["args"]
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    assert tp * pp == world, (tp, pp, world)

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    # model_parallel_cuda_manual_seed() needs CUDA; the inference tracker's fork() is a no-op
    tp_random.initialize_rng_tracker(inference_rng_tracker=True)
    # RotaryEmbedding.forward moves inv_freq to torch.cuda.current_device() on first use
    torch.cuda.current_device = lambda: "cpu"
    # tied embeddings with PP > 1: setup_embeddings_and_output_layer() moves the shared weight
    # with .cuda() before all-reducing it over the embedding group; keep it on the CPU
    torch.Tensor.cuda = lambda self, *a, **k: self

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    sd = torch.load(os.path.join(it_dir, name, "model_optim_rng.pt"), map_location="cpu", weights_only=False)["model"]

    model = build_model(args, pre_process=first, post_process=last)
    report = strict_load(model, sd, drop_final_norm_extra)
    report.update(rank=rank, file=name)
    loaded = report["strict_ok"] or bool(report["dropped"])
    # every tensor made it in unchanged (BF16 -> float32 is exact)
    if loaded:
        msd = model.state_dict()
        for k, v in sd.items():
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state"):
                assert torch.equal(msd[k], v.float()), k
    model.eval()

    logits = None
    ok = torch.tensor([1 if loaded else 0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item():
        n = tokens.numel()
        ids = tokens.view(1, n)
        pos = torch.arange(n).view(1, n)
        mask = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)  # True = masked out
        with torch.no_grad():
            if not first:
                hidden = torch.empty(n, 1, args.hidden_size)
                dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            out = model(ids if first else None, pos, mask)
            if not last:
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            else:
                parts = [torch.empty_like(out) for _ in range(tp)]
                dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(parts, -1)[0]  # [seq, padded vocab]
    with open(os.path.join(out_dir, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)
    if logits is not None and tp_rank == 0:
        torch.save(logits, os.path.join(out_dir, "logits.pt"))
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def dist_worker(rank: int, world: int, port: int, save_dir: str, tokens: torch.Tensor, out_dir: str,
                tp: int, pp: int) -> None:
    """Load a torch_dist checkpoint at TP ``tp`` x PP ``pp`` with Megatron's dist_checkpointing; forward."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron.core.tensor_parallel import random as tp_random

    it_file = os.path.join(save_dir, "latest_checkpointed_iteration.txt")
    it_dir = os.path.join(save_dir, f"iter_{int(open(it_file).read()):07d}")
    common = dist_checkpointing.load_common_state_dict(it_dir)
    args = common["args"]
    report = {"rank": rank, "file": f"torch_dist at TP{tp} PP{pp}", "strict_ok": False, "missing": [],
              "unexpected": [], "error": None, "dropped": [],
              "ckpt_tp_pp": [args.tensor_model_parallel_size, args.pipeline_model_parallel_size]}
    # load_checkpoint: the run's own TP/PP; what the checkpoint was chunked at only decides
    # whether optimizer/RNG state could be reused (no_save_optim / no_save_rng say there is none)
    assert args.ckpt_format == "torch_dist" and args.no_save_optim and args.no_save_rng
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = tp, pp

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tp_random.initialize_rng_tracker(inference_rng_tracker=True)
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = build_model(args, pre_process=first, post_process=last)
    loaded = False
    try:
        sharded = {"model": model.sharded_state_dict()}
        state, ckpt_only, not_in_ckpt = dist_checkpointing.load(sharded, it_dir, strict=StrictHandling.RETURN_ALL)
        # Megatron's words: "missing" = in the checkpoint, not asked for; "unexpected" = asked for, absent
        report["unexpected"], report["missing"] = sorted(map(str, not_in_ckpt)), sorted(map(str, ckpt_only))
        if report["unexpected"]:
            report["error"] = f"the model asks for keys the checkpoint lacks: {report['unexpected'][:5]}"
        elif report["missing"]:  # as --dist-ckpt-strictness raise_all: nothing in the checkpoint goes unused
            report["error"] = f"the checkpoint has keys the model does not use: {report['missing'][:5]}"
        else:
            model.load_state_dict(state["model"], strict=True)
            report["strict_ok"] = loaded = True
            for k, v in model.state_dict().items():  # every parameter came from the checkpoint, no NaN/init left
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    assert torch.isfinite(v).all(), k
    except Exception as e:  # noqa: BLE001 - reported to the coordinator
        report["error"] = f"{type(e).__name__}: {e}"
    model.eval()
    logits = None
    ok = torch.tensor([1 if loaded else 0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    tp_rank = ps.get_tensor_model_parallel_rank()
    if ok.item():
        n = tokens.numel()
        ids, pos = tokens.view(1, n), torch.arange(n).view(1, n)
        mask = torch.ones(1, 1, n, n, dtype=torch.bool).triu(1)
        with torch.no_grad():
            if not first:
                hidden = torch.empty(n, 1, args.hidden_size)
                dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(hidden)
            out = model(ids if first else None, pos, mask)
            if not last:
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            else:
                parts = [torch.empty_like(out) for _ in range(tp)]
                dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(parts, -1)[0]
    with open(os.path.join(out_dir, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)
    if logits is not None and tp_rank == 0:
        torch.save(logits, os.path.join(out_dir, "logits.pt"))
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def default_streamconv_python() -> str:
    """$STREAMCONV_PYTHON, else the first of this Python and /work/venv/bin/python that imports streamconv."""
    if os.environ.get("STREAMCONV_PYTHON"):
        return os.environ["STREAMCONV_PYTHON"]
    for py in (sys.executable, "/work/venv/bin/python"):
        if os.path.exists(py) and subprocess.run([py, "-c", "import streamconv"], cwd=tempfile.gettempdir(),
                                                 capture_output=True).returncode == 0:
            return py
    return "/work/venv/bin/python"


def run_case(name: str, work: str, streamconv_python: str, drop: bool = True, verbose: bool = True,
             ckpt_format: str = "torch", load_tp: int | None = None, load_pp: int | None = None) -> dict:
    """Convert, load into Megatron, compare. ``name``: a test_logits CASES or WRONG (negative control) key.

    Returns {"ok", "expect_match", "match", "diff", "reports", "error"}; ``ok`` means every
    rank loaded (strict, or strict after dropping only the final norm's _extra_state) and the
    logits matched (or, for a negative control, did not match).
    """
    import torch.multiprocessing as mp
    from synth import write_checkpoint
    import test_logits as T

    say = print if verbose else (lambda *a, **k: None)
    base, flags = T.WRONG[name] if name in T.WRONG else (name, None)
    case = T.CASES[base]
    res = {"ok": False, "expect_match": flags is None, "match": None, "diff": None, "reports": [], "error": None}
    src = os.path.join(work, base, "src")
    save, out = (os.path.join(work, name, d) for d in ("out", "megatron"))
    for d in (save, out):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(out)
    spec_file = os.path.join(src, "synth_spec.json")
    if not (os.path.exists(spec_file) and json.load(open(spec_file)) == json.loads(json.dumps(asdict(case["spec"])))):
        shutil.rmtree(src, ignore_errors=True)  # (re)write unless the same source is already there
        write_checkpoint(src, case["spec"])
    argv = T._argv(case, src, save, flags) + ["--ckpt-format", ckpt_format]
    p = subprocess.run([streamconv_python, "-m", "streamconv", "convert", *argv], capture_output=True, text=True)
    if p.returncode:
        res["error"] = f"conversion failed:\n{p.stdout}{p.stderr}"
        say(f"[{name}] {res['error']}")
        return res
    s = case["spec"]
    tv = case["true_vocab"] or s.vocab
    tokens = T._tokens(tv, s.seed)
    ref = T.reference_logits(src, s, tokens, tv)

    dist = ckpt_format == "torch_dist"
    ltp, lpp = (load_tp or case["tp"], load_pp or case["pp"]) if dist else (case["tp"], case["pp"])
    world = ltp * lpp
    t0 = time.time()
    try:
        if dist:
            mp.spawn(dist_worker, args=(world, _free_port(), save, tokens, out, ltp, lpp), nprocs=world, join=True)
        else:
            mp.spawn(worker, args=(world, _free_port(), save, tokens, out, drop), nprocs=world, join=True)
    except Exception as e:  # noqa: BLE001 - report and go on with the next case
        res["error"] = f"Megatron worker failed: {e}"
        say(f"[{name}] {res['error']}")
        return res
    res["reports"] = reports = [json.load(open(os.path.join(out, f"report_{r}.json"))) for r in range(world)]
    loaded = True
    for r in reports:
        if r["strict_ok"]:
            status = "strict=True OK"
        elif r["dropped"]:
            status = f"strict=True rejects only {r['unexpected']}; OK after dropping it"
        else:
            status = f"strict=True FAILED ({r['error']}): missing={r['missing']} unexpected={r['unexpected']}"
            loaded = False
        say(f"[{name}] rank {r['rank']} {r['file']}: {status}")
    if not loaded:
        res["error"] = "strict loading failed"
        return res
    got = torch.load(os.path.join(out, "logits.pt"))[:, :tv]
    res["diff"] = diff = (got - ref).abs().max().item()
    res["match"] = match = torch.allclose(got, ref, atol=T.ATOL, rtol=T.RTOL)
    res["ok"] = match == res["expect_match"]
    what = "" if flags is None else f" [negative control, converted with {' '.join(flags)}: must NOT match]"
    layout = f"TP{case['tp']} PP{case['pp']}" + (f" ({ckpt_format}, loaded at TP{ltp} PP{lpp})" if dist else "")
    say(f"[{name}] {layout}: Megatron logits vs source reference: max |diff| {diff:.2e} "
        f"(max |logit| {ref.abs().max().item():.2f}) -> {'MATCH' if match else 'MISMATCH'}{what} "
        f"({time.time() - t0:.1f}s)")
    return res


def main(argv=None) -> int:
    import test_logits as T

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help=f"comma-separated, from: {', '.join(list(T.CASES) + list(T.WRONG))} "
                    "(default: every positive case)")
    ap.add_argument("--negative", action="store_true", help="also run the negative controls (wrong layout flags)")
    ap.add_argument("--work", help="working directory (default: a temporary one, removed)")
    ap.add_argument("--streamconv-python", default=default_streamconv_python(),
                    help="a Python with streamconv installed (default: this one if it has streamconv, else "
                         "/work/venv/bin/python; or $STREAMCONV_PYTHON)")
    ap.add_argument("--no-drop-final-norm-extra-state", action="store_true",
                    help="do not retry strict loading without decoder.final_layernorm._extra_state")
    ap.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                    help="convert to this format; torch_dist is loaded with Megatron's dist_checkpointing")
    ap.add_argument("--load-tp", type=int, help="torch_dist: TP to load at (default: the case's)")
    ap.add_argument("--load-pp", type=int, help="torch_dist: PP to load at (default: the case's)")
    a = ap.parse_args(argv)
    import megatron.core

    print(f"megatron-core {megatron.core.__version__}, torch {torch.__version__}")
    names = a.cases.split(",") if a.cases else list(T.CASES) + (list(T.WRONG) if a.negative else [])
    work = a.work or tempfile.mkdtemp(prefix="mcore_check_")
    results = {}
    try:
        for n in names:
            results[n] = run_case(n, work, a.streamconv_python, not a.no_drop_final_norm_extra_state,
                                  ckpt_format=a.ckpt_format, load_tp=a.load_tp, load_pp=a.load_pp)["ok"]
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print("summary:", ", ".join(f"{n}={'ok' if v else 'FAIL'}" for n, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
