"""Command line: ``streamconv {convert,plan,verify}``, accepting the official converter's flags.

A user of ``python tools/checkpoint/convert.py --model-type GPT --loader core_mf
--saver core ...`` swaps only the program name: every flag of that command
(convert.py's, the core_mf loader plugin's, the core saver's) is accepted with
the same meaning. Flags that only make sense for the official pipeline
(``--megatron-path``, ``--ms2torch-ckpt-path``, ``--max-queue-size``,
``--no-checking``, ``--loader-transformer-impl``) are accepted and ignored with a
one-line notice. Bare flags without a subcommand mean ``convert``.

Errors print one line, ``streamconv: error: ...``, and exit 2 (bad input, flags
or paths), 3 (write failure; ``--resume`` finishes), 1 (verify found
differences) or 130 (interrupted). ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from . import __version__
from .core.errors import FlagError, StreamconvError, VerifyMismatch
from .core.interrupts import InterruptGuard
from .core.launch import under_torchrun
from .core.options import FC1_LAYOUTS, QKV_LAYOUTS, TRANSFORMER_IMPLS, CkptFormat, ConvertOptions
from .core.sizes import parse_size

IGNORED = {
    "megatron_path": "--megatron-path is not needed (streamconv does not import Megatron); ignored",
    "ms2torch_ckpt_path": "--ms2torch-ckpt-path ignored: streamconv writes no intermediate copy",
    "max_queue_size": "--max-queue-size ignored: streamconv's memory is bounded by --max-memory",
    "no_checking": "--no-checking ignored: streamconv always checks",
    "loader_transformer_impl": None,  # silently accepted: it does not change the output
}


class UsageError(Exception):
    """A malformed command line; reported in one line like every other refusal."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage block
        raise UsageError(self.prog, message)


def _model_flags(p: argparse.ArgumentParser, verify: bool = False) -> None:
    g = p.add_argument_group("input and output")
    g.add_argument("--load-dir", required=True, help="MindSpore safetensors checkpoint (a file, a directory, an "
                   "index/param_name_map.json, a unified directory or mindformers' iteration output), a Hugging "
                   "Face Llama/Qwen2/Qwen3/Qwen3-MoE/DeepSeek-V3 model directory (config.json + model.safetensors or "
                   "shards with their index; FP8 releases with 128x128 block scales are dequantized as read), or "
                   "per-rank training output (rank_N/ files + strategy, read without merging)")
    g.add_argument("--save-dir", required=True, help="directory for the Megatron-LM checkpoint")
    g.add_argument("--src-strategy-path", metavar="FILE_OR_DIR",
                   help="per-rank input: the parallel strategy (strategy/ directory, or one merged strategy "
                        "file, JSON or protobuf); default: strategy/ beside checkpoint/")
    g.add_argument("--step", type=int, metavar="N",
                   help="per-rank input: the checkpoint step to read (default: the newest every rank saved)")
    lay = p.add_argument_group("source layouts (mindformers' training options)")
    lay.add_argument("--fc1-layout", choices=FC1_LAYOUTS, default=None,
                     help="gated linear_fc1 row layout: 'interleaved' = use_interleaved_weight_layout_mlp: True "
                          "(mindformers default), 'concat' = [gate; up]. Default: from a mindformers YAML beside "
                          "the input, else interleaved (assumed, and said so)")
    lay.add_argument("--qkv-layout", choices=QKV_LAYOUTS, default=None,
                     help="linear_qkv row layout: 'grouped' = per query group [q;k;v] (mindformers default "
                          "use_contiguous_weight_layout_attention: False), 'contiguous' = [all Q; all K; all V]. "
                          "Default: from a mindformers YAML beside the input, else grouped (assumed, and said so)")
    lay.add_argument("--model-config", metavar="FILE",
                     help="Hugging Face config.json or mindformers YAML to take the values the weights cannot "
                          "tell from (default: a config.json, or the only *.yaml, beside the input)")
    if verify:
        return
    o = p.add_argument_group("official convert.py flags")
    o.add_argument("--model-type", choices=["GPT"], default="GPT", help="only GPT models are converted")
    o.add_argument("--loader", default="core_mf", help="must be core_mf (MindSpore Transformers safetensors)")
    o.add_argument("--saver", default="core", help="must be core (or mcore): Megatron-LM core legacy checkpoint")
    o.add_argument("--target-tensor-parallel-size", type=int, default=1, metavar="TP",
                   help="tensor-parallel size of the output (default 1)")
    o.add_argument("--target-pipeline-parallel-size", type=int, default=1, metavar="PP",
                   help="pipeline-parallel size of the output (default 1); layers are split evenly unless "
                        "--decoder-first/last-pipeline-num-layers say otherwise")
    o.add_argument("--target-expert-parallel-size", type=int, default=1, metavar="EP",
                   help="expert parallel size of the output (MoE models; default 1)")
    o.add_argument("--target-expert-tensor-parallel-size", type=int, default=None, metavar="ETP",
                   help="tensor parallel size inside each expert (default: TP, Megatron's default)")
    o.add_argument("--saver-transformer-impl", choices=TRANSFORMER_IMPLS, default="transformer_engine",
                   help="key names of the output (official default: transformer_engine)")
    o.add_argument("--ckpt-format", choices=CkptFormat.values(), default=CkptFormat.TORCH.value,
                   help="output container (Megatron's flag): torch = one torch.save file per rank, as convert.py "
                        "writes; torch_dist = Megatron's distributed checkpoint, loadable at any TP/PP")
    o.add_argument("--loader-transformer-impl", choices=TRANSFORMER_IMPLS, default=None,
                   help="accepted for compatibility; does not change the output")
    o.add_argument("--position-embedding-type", metavar="{rope,none}", default="rope",
                   help="rope (default here) or none; the official loader's default learned_absolute is "
                        "refused: mindformers GPT checkpoints have no learned position embeddings")
    o.add_argument("--true-vocab-size", type=int, help="real vocabulary size: the table is padded/trimmed to "
                   "a multiple of 128 x TP (Megatron's rule)")
    o.add_argument("--vocab-file", help="JSON vocabulary; its length is the true vocab size")
    o.add_argument("--padded-vocab-size", type=int, help="accepted; must equal the embedding rows unless "
                   "--true-vocab-size is given (then it is recomputed)")
    o.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocab padding unit per TP rank (default 128), as in Megatron")
    o.add_argument("--num-layers", type=int, help="transformer layers (inferred; checked if given)")
    o.add_argument("--seq-length", type=int, default=None,
                   help="sequence length stored in args (default: from a mindformers YAML, else 2048)")
    o.add_argument("--max-position-embeddings", type=int,
                   help="default: 2048, or --seq-length when that is larger")
    o.add_argument("--hidden-size", type=int, help="hidden size (inferred; checked if given)")
    o.add_argument("--ffn-hidden-size", type=int, help="MLP hidden size (inferred; checked if given)")
    o.add_argument("--num-attention-heads", type=int,
                   help="attention heads: needed unless the model has q/k-layernorm (the shapes cannot tell)")
    o.add_argument("--num-query-groups", type=int, help="GQA key/value groups (inferred; checked if given)")
    o.add_argument("--kv-channels", type=int, help="head dim (inferred from q_layernorm or hidden/heads)")
    o.add_argument("--group-query-attention", action="store_true", help="accepted; inferred from the shapes")
    o.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"],
                   help="norm kind (inferred from the presence of norm biases; checked if given)")
    o.add_argument("--add-bias-linear", action="store_true", help="linear biases (inferred; checked if given)")
    o.add_argument("--add-qkv-bias", action="store_true", help="qkv bias only, Qwen2 style (inferred; checked)")
    o.add_argument("--swiglu", action="store_true", help="gated MLP (inferred from linear_fc1's rows; checked)")
    o.add_argument("--qk-layernorm", action="store_true", help="Qwen3-style q/k layernorm (also inferred)")
    o.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="accepted; inferred from the presence of output_layer.weight")
    o.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                   help="stored in args (default HuggingFaceTokenizer)")
    o.add_argument("--decoder-first-pipeline-num-layers", type=int, metavar="N",
                   help="layers of the first pipeline stage when PP does not divide the layers evenly")
    o.add_argument("--decoder-last-pipeline-num-layers", type=int, metavar="N",
                   help="layers of the last pipeline stage (Megatron's uneven pipeline split)")
    m = p.add_argument_group("mixture of experts and multi-latent attention (Megatron's flag names; the shapes "
                             "decide the sizes, a given value must agree with them)")
    m.add_argument("--num-experts", type=int, help="routed experts per MoE layer (inferred; checked if given)")
    m.add_argument("--moe-ffn-hidden-size", type=int, help="hidden size of each routed expert (inferred; checked)")
    m.add_argument("--moe-shared-expert-intermediate-size", type=int,
                   help="hidden size of the shared experts together (inferred; checked if given)")
    m.add_argument("--moe-layer-freq", type=_layer_freq, metavar="FREQ",
                   help="1, N, or a list such as '[0]*3+[1]*58' (which layers have experts; inferred, checked)")
    m.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="router expert bias (DeepSeek-V3 aux-loss-free balancing; inferred from the weights)")
    m.add_argument("--multi-latent-attention", action="store_true", help="accepted; inferred from the shapes")
    m.add_argument("--q-lora-rank", type=int, help="MLA query low-rank dimension (inferred; checked if given)")
    m.add_argument("--kv-lora-rank", type=int, help="MLA key/value low-rank dimension (inferred; checked if given)")
    m.add_argument("--qk-head-dim", type=int, help="MLA query/key head dim without rope (inferred; checked)")
    m.add_argument("--qk-pos-emb-head-dim", type=int, help="MLA rope part of the query/key head dim (inferred; "
                   "checked)")
    m.add_argument("--v-head-dim", type=int, help="MLA value head dim (inferred; checked if given)")
    m.add_argument("--mtp-num-layers", type=int, help="multi-token prediction layers (inferred; checked if given)")
    m.add_argument("--moe-grouped-gemm", action="store_true",
                   help="write experts as TEGroupedMLP (mlp.experts.linear_fc1.weight<i>; transformer_engine only)")
    r = p.add_argument_group("MoE routing and rope scaling: stored in args, not in the weights (default: from the "
                             "model config, else Megatron's default)")
    r.add_argument("--moe-router-topk", type=int, help="experts each token is routed to")
    r.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"],
                   help="router score function (DeepSeek-V3: sigmoid)")
    r.add_argument("--moe-router-topk-scaling-factor", type=float,
                   help="scale applied to the top-k routing weights (DeepSeek-V3: routed_scaling_factor)")
    r.add_argument("--moe-router-num-groups", type=int, help="expert groups for group-limited routing (n_group)")
    r.add_argument("--moe-router-group-topk", type=int, help="groups each token may use (topk_group)")
    r.add_argument("--moe-router-pre-softmax", action="store_true", default=None,
                   help="softmax before top-k (Qwen-MoE norm_topk_prob false)")
    r.add_argument("--rotary-scaling-factor", type=float, help="yarn rope scaling factor (MLA)")
    r.add_argument("--mscale", type=float, help="yarn mscale (MLA; default 1.0)")
    r.add_argument("--mscale-all-dim", type=float, help="yarn mscale_all_dim (MLA; default 0.0)")
    a = p.add_argument_group("values stored in args that the weights cannot tell (Megatron's flag names; "
                             "defaults are what the official pipeline writes)")
    a.add_argument("--rotary-base", type=int, default=None,
                   help="rope base (Llama 3: 500000, Qwen3: 1000000); default: from the model config, else 10000")
    a.add_argument("--norm-epsilon", type=float, help="default: from the model config, else Megatron's 1e-5")
    a.add_argument("--use-rope-scaling", action="store_true", default=None,
                   help="Llama 3.1 rope scaling (default: from the model config's rope_scaling llama3, else off)")
    a.add_argument("--rotary-percent", type=float, default=1.0, help="fraction of the head dim rotated (default 1.0)")
    a.add_argument("--rotary-interleaved", action="store_true", help="interleaved rope (default: off)")
    a.add_argument("--attention-dropout", type=float, default=0.1, help="stored in args (default 0.1)")
    a.add_argument("--hidden-dropout", type=float, default=0.1, help="stored in args (default 0.1)")
    o.add_argument("--megatron-path", help=argparse.SUPPRESS)
    o.add_argument("--ms2torch-ckpt-path", help=argparse.SUPPRESS)
    o.add_argument("--max-queue-size", type=int, help=argparse.SUPPRESS)
    o.add_argument("--no-checking", action="store_true", help=argparse.SUPPRESS)


def _run_flags(p: argparse.ArgumentParser, plan: bool = False) -> None:
    """Run flags; ``plan`` accepts them too (so a convert command line can be planned as is).

    For ``plan`` the flags that only change what ``convert`` does are accepted but
    not offered in its help: ``--overwrite``/``--resume`` change what plan says
    convert would do with the save directory, the others are ignored.
    """
    def hidden(text):
        return argparse.SUPPRESS if plan else text

    r = p.add_argument_group("streamconv")
    r.add_argument("--max-memory", metavar="SIZE",
                   help="hard ceiling on peak resident memory, e.g. 2GiB or 1500MB (default: about one layer)")
    r.add_argument("--overwrite", action="store_true",
                   help=hidden("write into a non-empty save directory: replaces the checkpoint, removes the rank "
                               "files of an earlier conversion it does not rewrite, keeps every other file"))
    r.add_argument("--resume", action="store_true",
                   help=hidden("finish an interrupted run in --save-dir (same flags and input)"))
    r.add_argument("--verify", action="store_true", help=hidden("run 'streamconv verify' after converting"))
    r.add_argument("--quiet", action="store_true",
                   help=hidden("no progress output (assumptions that can make the output wrong are still said)"))
    r.add_argument("--json-summary", metavar="FILE", help=hidden("write the run's figures as JSON"))
    r.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="streamconv",
        description="Stream a MindSpore Transformers safetensors checkpoint (or a Hugging Face Llama/Qwen2/Qwen3/"
                    "Qwen3-MoE/DeepSeek-V3 model, FP8 included) into a Megatron-LM core checkpoint, dense, MoE or "
                    "MLA.",
    )
    p.add_argument("--version", action="version", version=f"streamconv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{convert,plan,verify}")
    c = sub.add_parser("convert", help="convert a checkpoint (the official convert.py flags work here)")
    _model_flags(c)
    _run_flags(c)
    pl = sub.add_parser("plan", help="read only the headers and print the schedule; writes nothing",
                        description="Read only the headers and print the schedule, and what convert would do with "
                                    "--save-dir (and its free space). Writes nothing. Every convert flag is "
                                    "accepted, so a convert command line can be planned as is; with --overwrite "
                                    "or --resume it says what convert would do with them.")
    _model_flags(pl)
    _run_flags(pl, plan=True)
    v = sub.add_parser("verify", help="recompute every output tensor from the source and compare")
    _model_flags(v, verify=True)
    v.add_argument("--max-memory", metavar="SIZE", help="hard ceiling on peak resident memory (as for convert)")
    v.add_argument("--json-summary", metavar="FILE", help="write the findings as JSON")
    v.add_argument("--quiet", action="store_true", help="print only mismatches, not the verdict line")
    v.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _layer_freq(text: str):
    """Megatron's --moe-layer-freq: an int, or a list written as a Python expression of lists ('[0]*3+[1]*5')."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    out = []
    for term in text.replace(" ", "").split("+"):
        body, times = (term.rsplit("*", 1) + ["1"])[:2] if "]*" in term else (term, "1")
        if not (body.startswith("[") and body.endswith("]") and times.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r} is not an int or a list like [0]*3+[1]*5")
        items = [x for x in body[1:-1].split(",") if x]
        if not all(x in ("0", "1") for x in items):
            raise argparse.ArgumentTypeError(f"{text!r}: list entries must be 0 or 1")
        out += [int(x) for x in items] * int(times)
    return out


def options_from_args(a: argparse.Namespace) -> ConvertOptions:
    notices = []
    for k, msg in IGNORED.items():
        if getattr(a, k, None) not in (None, False) and msg:
            notices.append(msg)
    if a.loader not in ("core_mf", "mf"):
        raise _flag_error(f"--loader {a.loader}: streamconv reads MindSpore Transformers safetensors (--loader core_mf)")
    if a.saver not in ("core", "mcore"):
        raise _flag_error(f"--saver {a.saver}: streamconv writes Megatron-LM core checkpoints (--saver core)")
    if a.position_embedding_type not in ("rope", "none"):
        raise _flag_error(f"--position-embedding-type {a.position_embedding_type}: mindformers GPT checkpoints have "
                          "no learned position embeddings; use rope (the default here) or none")
    # every flag whose dest is an option field carries over as is; the few that need work follow
    given = {f.name: getattr(a, f.name) for f in fields(ConvertOptions) if hasattr(a, f.name)}
    given.update(
        loader_transformer_impl=a.loader_transformer_impl or "local",
        max_memory=parse_size(a.max_memory) if a.max_memory else None,
        notices=notices,
    )
    o = ConvertOptions(**given)
    return o


def _flag_error(msg):
    return FlagError(msg)


def _write_json(path: str | None, data: dict) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)


def _main(argv: list) -> int:
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "--version"):
        argv = ["convert"] + argv  # the official command line, program name swapped
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 2
    from .run.progress import Progress

    if a.command == "convert":
        from .run.convert import convert

        o = options_from_args(a)
        prog = Progress(quiet=o.quiet)
        summary = convert(o, prog)
        if summary.get("coordinator", True):  # under torchrun, worker 0 reports for every worker
            _write_json(a.json_summary, summary)
        return 0
    if a.command == "plan":
        from .engine.describe import describe
        from .engine.plan import build_plan

        from .run.savedir import describe_save_dir

        o = options_from_args(a)
        plan = build_plan(o)
        print(describe(plan))
        for line in describe_save_dir(plan):
            print(f"save dir {line}")
        return 0
    # verify
    from .engine.memory import peak_rss
    from .run.verify import verify

    layouts = {k: getattr(a, k) for k in ("fc1_layout", "qkv_layout") if getattr(a, k) is not None}
    base = ConvertOptions(load_dir=a.load_dir, max_memory=parse_size(a.max_memory) if a.max_memory else None,
                          src_strategy_path=a.src_strategy_path, step=a.step, **layouts)
    report = verify(a.load_dir, a.save_dir, base)
    d = report.as_dict()
    d["peak_rss_bytes"] = peak_rss()
    _write_json(a.json_summary, d)
    Progress(quiet=a.quiet).verified(report)
    if not report.ok:
        raise VerifyMismatch(f"{a.save_dir} does not match a conversion of {a.load_dir}: "
                             f"{len(report.problems)} problem(s) listed above")
    return 0


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The first Ctrl-C / SIGTERM interrupts; any later one is ignored, also while the process exits
    # (a second signal during the cleanup, or in torch's atexit handlers, would print a traceback).
    with InterruptGuard(keep_after_interrupt=True):
        return _run(argv)


def _run(argv: list) -> int:
    if under_torchrun():
        # a torchrun worker: a failed rendezvous must end in our one line, not in c10d's C++ log and stack
        # dump (read when torch is imported, so set before any import of it)
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    debug = "--debug" in argv
    try:
        return _main(argv)
    except StreamconvError as e:
        if debug:
            raise
        print(f"streamconv: error: {e}", file=sys.stderr)
        return e.exit_code
    except UsageError as e:
        print(f"streamconv: error: {e} (see '{e.prog} --help')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamconv: error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if debug:
            raise
        print(f"streamconv: internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback, "
              "and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
