"""The `elo` command. Each subcommand calls one function of the Python API (see `elo_cpt/__init__.py`)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from elo_cpt import cli_stage1, cli_tools, distributed
from elo_cpt.config import OPTIMIZERS, elo_version
from elo_cpt.errors import EloError

DEFAULT_OUT = "runs/default"
#: Options whose value is a layer spec, which may start with a minus sign (`-2:`, `-1,3`).
LAYER_SPEC_OPTIONS = ("--layers", "--frozen-layers")


def join_layer_specs(argv: list[str]) -> list[str]:
    """`--layers -2:` as `--layers=-2:`, and the same for every option of LAYER_SPEC_OPTIONS.

    argparse reads an argument that starts with '-' and is not a plain negative number (`-2:`, `-1,3`) as an option,
    so such a value is joined to its option in argparse's documented `--option=value` form (no private parser state).
    """
    joined: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return joined + argv[i:]
        if joined and joined[-1] in LAYER_SPEC_OPTIONS and len(arg) > 1 and arg[0] == "-" and arg[1].isdigit():
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):
        # The top-level parser joins; subcommand parsers (the same class) then receive joined arguments.
        return super().parse_known_args(join_layer_specs(sys.argv[1:] if args is None else list(args)), namespace)


TEXT_DATA_HELP = ("training corpus: a .txt, .jsonl or .parquet file, a folder, a glob, a save_to_disk folder or "
                  "hf:NAME[:CONFIG[:SPLIT]] (docs/data.md); repeat to mix, weights are byte shares")
CHAT_DATA_HELP = ("conversations: a .jsonl, .json or .parquet file of `messages` or ShareGPT `conversations` records, a "
                  "folder, a glob, a save_to_disk folder or hf:NAME[:CONFIG[:SPLIT]] (docs/stage3.md); repeat to mix, "
                  "weights are byte shares (with --tokens)")


def _add_training_options(parser: argparse.ArgumentParser, lr: float, data_help: str = TEXT_DATA_HELP) -> None:
    parser.add_argument("--data", action="append", default=[], metavar="SOURCE[#FIELD][@WEIGHT]", help=data_help)
    parser.add_argument("--out", required=True, help="output model folder (written when complete)")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens (default: one pass over the data)")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and initialisation (default 0)")
    parser.add_argument("--save-steps", type=int, default=50, help="resumable checkpoint every N steps (default 50)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="adamw_8bit needs bitsandbytes; adamw_kahan "
                        "(Kahan-summed updates, for bf16-true) needs torch-optimi; memory-lean: adafactor, galore "
                        "(galore-torch), apollo (apollo-torch); docs/training.md")
    parser.add_argument("--optimizer-rank", type=int, default=128, help="rank of galore's and apollo's projections (default 128)")
    parser.add_argument("--precision", default="auto", metavar="{auto,32-true,bf16-mixed,bf16-true}",
                        help="auto (default): bf16-mixed on a GPU with bf16, else 32-true; bf16-mixed keeps fp32 master weights; "
                             "bf16-true needs --optimizer adamw_kahan")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="positions per chunk of the vocabulary loss; 0: full logits")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--step-in-backward", action="store_true", help="step each weight in the backward pass and free its "
                        "gradient: less memory (adamw, adamw_kahan, adafactor; one process, no accumulation, no global clipping)")
    parser.add_argument("--schedule", default="cosine", help="learning-rate schedule after warm-up: cosine, linear, constant, ... (default cosine)")
    parser.add_argument("--warmup-ratio", type=float, default=0.05, help="fraction of the steps warming the learning rate up (default 0.05)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 turns clipping off (default 1.0)")
    parser.add_argument("--logging-steps", type=int, default=0, help="log the loss every N steps (default 0: about 20 times)")
    parser.add_argument("--eval-text", action="append", default=[], metavar="LANG=PATH",
                        help="held-out text whose loss is logged during training (with --eval-steps); repeat per language")
    parser.add_argument("--eval-steps", type=int, default=0,
                        help="log the loss on each --eval-text every N optimizer steps and at the end (default 0: off)")
    parser.add_argument("--report-to", default="tensorboard", metavar="A,B",
                        help="experiment trackers: tensorboard (default), wandb, mlflow, comet_ml, clearml, dvclive, neptune, or none")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elo", description="ELO continual pretraining: train a few layers of a shallow model, write them back, align.")
    parser.add_argument("--version", action="version", version=f"elo-cpt {elo_version()}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (as ELO_DEBUG=1 does)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole pipeline (stage 1, write-back, alignment, evaluation)")
    run.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]", help="optional YAML config, then overrides such as stage1.lr=1e-5")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT}); rerunning resumes it")
    run.add_argument("--show-config", action="store_true", help="list every config key with its value (after CONFIG.yaml and the overrides) and meaning, then exit")

    detach = sub.add_parser("detach", help="cut the shallow model (selected layers only) out of a model")
    detach.add_argument("model", help="Hugging Face model folder")
    detach.add_argument("--layers", default="0,-1", help="layers to keep, e.g. 0,-1 or 0,15,-1 or 0:4 (default 0,-1)")
    detach.add_argument("--frozen-layers", default="", help="extra layers kept frozen in the shallow model and not written back (e.g. 10,20)")
    detach.add_argument("--out", required=True, help="output shallow model folder (written when complete)")

    bridge = sub.add_parser("bridge", help="fit least-squares bridges for the layers a shallow model removed (pretrain applies them)")
    bridge.add_argument("shallow", help="shallow model folder from `elo detach` (its base model must still be where it was)")
    bridge.add_argument("--data", action="append", required=True, metavar="SOURCE",
                        help="calibration text, e.g. the stage-1 data (any source form of docs/data.md; repeatable)")
    bridge.add_argument("--tokens", default="auto", help="calibration tokens, or auto: max(4096, 4x hidden size) (default auto)")
    bridge.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (default 256)")

    pretrain = sub.add_parser("pretrain", help="ELO stage 1: train the layers of a shallow model")
    pretrain.add_argument("shallow", help="shallow model folder from `elo detach`")
    _add_training_options(pretrain, lr=1.5e-5)
    pretrain.add_argument("--train-norm", action="store_true", help="also train the final norm (written back by merge)")
    pretrain.add_argument("--train-new-rows", action="store_true", help="also train the embedding/head rows elo vocab added (old rows stay)")
    pretrain.add_argument("--new-rows-lr", type=float, help="peak learning rate of those new rows (default: --lr)")

    merge = sub.add_parser("merge", help="write a shallow model's layers back into its base model")
    merge.add_argument("base", help="the model the shallow one was detached from (folder or hub id)")
    merge.add_argument("shallow", help="the trained shallow model folder (from `elo pretrain`)")
    merge.add_argument("--out", required=True, help="output model folder (written when complete)")

    chat = sub.add_parser("chat-vector", help="stage 3's start: TARGET + scale x (INSTRUCT - BASE), streamed tensor by tensor")
    chat.add_argument("target", help="the adapted model (e.g. runs/default/model), whose config and tokenizer the output keeps")
    chat.add_argument("--base", required=True, help="the official base model the Instruct model was tuned from (folder or hub id)")
    chat.add_argument("--instruct", required=True, help="the official Instruct model (folder or hub id)")
    chat.add_argument("--out", required=True, help="output model folder (written when complete)")
    chat.add_argument("--scale", type=float, default=1.0, help="multiplies the chat vector (default 1.0)")
    chat.add_argument("--skip", default="", metavar="embeddings,head", help="keep these tensors as TARGET's (default: none)")

    align = sub.add_parser("align", help="alignment: full fine-tuning of a (merged) model")
    align.add_argument("model")
    _add_training_options(align, lr=5e-5)

    finetune = sub.add_parser("finetune", help="a baseline on the same data and budget: full fine-tuning, freeze-tuning or LoRA")
    finetune.add_argument("model")
    finetune.add_argument("--method", choices=["fft", "freeze", "lora"], default="fft",
                          help="fft: every parameter; freeze: only --layers train, whole model computed; lora: adapters on every linear layer")
    finetune.add_argument("--layers", default="0,-1", help="layers trained by --method freeze (default 0,-1)")
    finetune.add_argument("--lora-rank", type=int, default=16)
    _add_training_options(finetune, lr=5e-5)

    sft = sub.add_parser("sft", help="stage 3: supervised fine-tuning on conversations through the model's chat template",
                         description="Supervised fine-tuning on conversations rendered with the model's chat template; "
                                     "the loss is on the assistant's answers only. Conversations longer than --seq-len "
                                     "tokens are skipped and counted.")
    sft.add_argument("model", help="Hugging Face model folder or hub id (e.g. the output of elo chat-vector)")
    sft.add_argument("--method", choices=["fft", "lora"], default="fft", help="fft: every parameter (default); lora: adapters, merged at the end")
    sft.add_argument("--lora-rank", type=int, default=16)
    sft.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use instead of the tokenizer's (kept in the output)")
    _add_training_options(sft, lr=5e-5, data_help=CHAT_DATA_HELP)

    ev = sub.add_parser("eval", help="bits per character on held-out text per language, and lm-evaluation-harness tasks")
    ev.add_argument("model", help="Hugging Face model folder (safetensors)")
    ev.add_argument("--text", action="append", default=[], metavar="LANG=PATH", help="held-out text for bits/char; repeat per language")
    ev.add_argument("--chat", action="append", default=[], metavar="LANG=FILE",
                    help="held-out conversations for answer bits/char through the chat template; repeat per language")
    ev.add_argument("--chat-template", metavar="FILE", help="with --chat: Jinja chat template to use instead of the tokenizer's")
    ev.add_argument("--tasks", default="", metavar="A,B", help="lm-eval tasks, groups or tags, e.g. kobest_copa,mmlu")
    ev.add_argument("--include-path", metavar="DIR", help="folder of extra lm-eval task YAML files (local tasks)")
    ev.add_argument("--limit", type=int, help="at most this many examples per lm-eval task (quick checks)")
    ev.add_argument("--num-fewshot", type=int, help="few-shot examples per lm-eval prompt (default: each task's own)")
    ev.add_argument("--batch-size", type=int, default=8, help="windows or lm-eval requests at once (default 8)")
    ev.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation window; with --chat, longer conversations are skipped (default 256)")
    ev.add_argument("--max-chars", type=int, default=0, help="use at most this many characters per text (default all)")
    ev.add_argument("--json", help="also write the results to this JSON file: {bits_per_char: {lang: ...}, lm_eval: {task: ...}}")

    rep = sub.add_parser("report", help="write report.html and report.md for a finished run folder")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of an `elo run`")

    sub.add_parser("assets", help="prepare and cache the default model, corpora and demo conversations; print where they are").add_argument(
        "--language", default="de", help="target language of the corpora: de (default) or ko")

    cli_tools.add_parsers(sub)  # bench, plan

    vocab = sub.add_parser("vocab", help="add tokens learned from target-language text to a byte-level BPE model (docs/vocab.md)")
    vocab.add_argument("model", help="Hugging Face model folder or hub id with a byte-level BPE tokenizer")
    vocab.add_argument("--data", action="append", required=True, metavar="SOURCE", help="target-language text (docs/data.md); repeatable")
    vocab.add_argument("--add", type=int, required=True, help="how many new tokens to learn, e.g. 8000")
    vocab.add_argument("--out", required=True, help="output model folder (written when complete)")
    vocab.add_argument("--ascii-context", action="store_true",
                       help="let new tokens hold ASCII bytes (a leading space) next to non-ASCII ones: fewer tokens; pure ASCII text still keeps its encoding")

    cli_stage1.add_parsers(sub)
    study = sub.add_parser("study", help="a grid of runs (ELO variants and baselines) on the same data; one results table",
                           description="Run a study: ELO, its ablations and the baselines (full fine-tuning, LoRA, "
                                       "freeze-tuning, alignment only) at equal tokens or equal cost-model FLOPs. "
                                       "Rerunning resumes: finished cells are kept.")
    study.add_argument("study", metavar="CONFIG", help="study YAML file, or a built-in study: de (German), ko (Korean)")
    study.add_argument("--out", help="study folder (results.md, results.json, results.png); required unless --list")
    study.add_argument("--cells", help="run only these cells, comma-separated (default: all, in file order)")
    study.add_argument("--list", action="store_true", help="list the cells with their planned tokens and FLOPs, then exit")
    study.add_argument("--launch", metavar="LAUNCHER", help="start each cell with this launcher, e.g. "
                       "'torchrun --nproc_per_node 8' (every process trains; one prepares, evaluates and writes)")
    return parser


def _count(value: str, flag: str) -> int:
    if not value.isdigit():
        raise EloError(f"{flag} takes a whole number of tokens or auto, not {value!r}")
    return int(value)


def _train_config(args: argparse.Namespace):
    from elo_cpt.config import TrainConfig

    return TrainConfig(tokens=args.tokens, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       save_steps=args.save_steps, optimizer=args.optimizer, optimizer_rank=args.optimizer_rank, precision=args.precision, loss_chunk=args.loss_chunk,
                       gradient_checkpointing=args.gradient_checkpointing, step_in_backward=args.step_in_backward, lora_rank=getattr(args, "lora_rank", 16),
                       schedule=args.schedule, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                       max_grad_norm=args.max_grad_norm, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
                       report_to=[t.strip() for t in args.report_to.split(",") if t.strip()])


def _held_out(args: argparse.Namespace) -> dict | None:
    """--eval-text LANG=PATH pairs, checked before anything loads; they need --eval-steps to be used."""
    from elo_cpt.evaluation import parse_texts, read_eval_text

    texts = parse_texts(args.eval_text)
    if texts and args.eval_steps < 1:
        raise EloError("--eval-text needs --eval-steps N (the held-out loss every N optimizer steps)")
    if args.eval_steps and not texts:
        raise EloError("--eval-steps needs held-out text: pass --eval-text LANG=PATH")
    for path in texts.values():
        read_eval_text(path)
    return texts or None


def _trained(stats, out: str) -> str:
    resumed = f" over {stats.resumes + 1} invocations" if stats.resumes else ""
    return f"trained {stats.tokens:,} tokens in {stats.seconds:.0f} s{resumed}; final loss {stats.final_loss}; saved {out}"


def _eval(args: argparse.Namespace, api) -> None:
    """Bits/char, answer bits/char and lm-eval tasks on one loaded model: the folder is read once for all."""
    from elo_cpt.chateval import check_chats, parse_chats
    from elo_cpt.chattokens import ChatEncoder, read_template
    from elo_cpt.checkpoint import check_output, load_tokenizer
    from elo_cpt.evaluation import check_eval_settings, load_for_eval, parse_texts, read_eval_text
    from elo_cpt.files import write_json
    from elo_cpt.lmeval import parse_tasks, task_manager

    texts, chats, tasks = parse_texts(args.text), parse_chats(args.chat), parse_tasks(args.tasks)
    if not texts and not chats and not tasks:
        raise EloError("nothing to evaluate; pass --text LANG=PATH (bits/char), --chat LANG=FILE (answer bits/char) "
                       "and/or --tasks A,B (lm-eval)")
    if args.chat_template and not chats:
        raise EloError("--chat-template applies to --chat conversations; pass --chat LANG=FILE too")
    template = read_template(args.chat_template) if args.chat_template else None  # a bad file fails before the model loads
    check_eval_settings(args.seq_len, args.batch_size, args.max_chars)
    if args.limit is not None and args.limit < 1:
        raise EloError(f"--limit must be at least 1 example per task, not {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise EloError(f"--num-fewshot must be >= 0, not {args.num_fewshot}")
    if args.json:
        check_output(args.json, flag="--json", file=True)  # writable, before the model is loaded
    for path in texts.values():  # unreadable or binary text fails before the model is loaded
        read_eval_text(path)
    check_chats(chats)  # and so do missing chat files and bad records
    tokenizer = None
    if chats:  # and a tokenizer without a chat template
        tokenizer = load_tokenizer(args.model)
        ChatEncoder(tokenizer, str(args.model), template)
    # A typo in a task name fails here, before the model is loaded.
    manager = task_manager(tasks, args.include_path) if tasks else None
    model, tokenizer = load_for_eval(args.model, tokenizer)
    results: dict = {}
    if texts:
        results["bits_per_char"] = api.evaluate(model, texts, tokenizer, seq_len=args.seq_len, max_chars=args.max_chars,
                                                batch_size=args.batch_size)
        for lang, result in results["bits_per_char"].items():
            print(f"{lang}\t{result['bits_per_char']:.4f} bits/char\t{result['bits_per_byte']:.4f} bits/byte\t{result['chars']} chars")
    if chats:
        results["answer_bits_per_char"] = api.evaluate_chat(model, chats, tokenizer, seq_len=args.seq_len,
                                                            batch_size=args.batch_size, chat_template=args.chat_template)
        for lang, result in results["answer_bits_per_char"].items():
            skipped = f"\t{result['skipped_too_long']} longer than {args.seq_len} tokens skipped" if result["skipped_too_long"] else ""
            print(f"{lang}\t{result['answer_bits_per_char']:.4f} answer bits/char\t{result['answer_chars']} answer chars\t"
                  f"{result['conversations']} conversations{skipped}")
    if tasks:
        results["lm_eval"] = api.evaluate_tasks(model, tasks, tokenizer, include_path=args.include_path, limit=args.limit,
                                                batch_size=args.batch_size, num_fewshot=args.num_fewshot, manager=manager)
        for task, scored in results["lm_eval"].items():
            for metric, value in scored["metrics"].items():
                stderr = scored["stderr"].get(metric)
                shown = "n/a" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                print(f"{task}\t{metric}\t{shown}\t{scored['samples'] or ''} examples".rstrip())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.json), results)


def dispatch(args: argparse.Namespace) -> None:
    import elo_cpt as api

    if args.command == "run":
        config_file = args.args[0] if args.args and "=" not in args.args[0] else None
        overrides = args.args[1:] if config_file else args.args
        cfg = api.load_config(config_file, overrides)
        if args.show_config:  # the config as resolved from the file and the overrides
            for key, value, doc in api.describe_config(cfg):
                print(f"{key} = {value}\n    {doc}")
            return
        api.run(cfg, args.out)
    elif args.command == "detach":
        print(api.detach(args.model, args.layers, args.out, frozen_layers=args.frozen_layers))
    elif args.command == "bridge":
        tokens = args.tokens if args.tokens == "auto" else _count(args.tokens, "--tokens")
        used = api.bridge(args.shallow, args.data, tokens, args.seq_len)
        print(f"bridges fitted on {used:,} tokens; saved in {args.shallow}")
    elif args.command in cli_stage1.COMMANDS:
        cli_stage1.dispatch(args, api)
    elif args.command == "pretrain":
        stats = api.pretrain(args.shallow, args.data, args.out, _train_config(args), args.seq_len, args.seed, args.train_norm,
                             held_out=_held_out(args), train_new_rows=args.train_new_rows, new_rows_lr=args.new_rows_lr)
        print(_trained(stats, args.out))
    elif args.command == "merge":
        print(api.merge(args.base, args.shallow, args.out))
    elif args.command == "chat-vector":
        print(api.chat_vector(args.target, args.base, args.instruct, args.out, args.scale, args.skip))
    elif args.command == "align":
        stats = api.align(args.model, args.data, args.out, _train_config(args), args.seq_len, args.seed, held_out=_held_out(args))
        print(_trained(stats, args.out))
    elif args.command == "finetune":
        stats = api.finetune(args.model, args.data, args.out, _train_config(args), args.seq_len, args.seed, args.method, args.layers,
                             held_out=_held_out(args))
        print(_trained(stats, args.out))
    elif args.command == "sft":
        stats = api.sft(args.model, args.data, args.out, _train_config(args), args.seq_len, args.seed, args.method,
                        args.chat_template, held_out=_held_out(args))
        print(_trained(stats, args.out))
    elif args.command == "eval":
        _eval(args, api)
    elif args.command == "report":
        html_path, md_path = api.write_report(args.run_dir)
        print(f"{html_path}\n{md_path}")
    elif args.command in cli_tools.COMMANDS:
        cli_tools.dispatch(args, api)
    elif args.command == "vocab":
        done = api.vocab(args.model, args.data, args.add, args.out, ascii_context=args.ascii_context)
        print(f"{args.out}: {done['added']:,} new tokens, vocabulary {done['vocab_size']:,}; tokens per character on the "
              f"training text {done['tokens_per_char_before']:.3f} -> {done['tokens_per_char_after']:.3f}")
    elif args.command == "study":
        if args.list:
            from elo_cpt.study_runner import load_study, plan

            parsed = load_study(args.study)
            for cell in parsed.cells:
                planned = plan(parsed, cell)
                print(f"{cell.name}\t{cell.method}\t{cell.group or '-'}\t{planned['tokens']:,} tokens\t{planned['flops'] / 1e12:.1f} TFLOPs")
            return
        if not args.out:
            raise EloError("elo study needs --out DIR, the study folder (rerun with the same folder to resume)")
        api.study(args.study, args.out, args.cells, args.launch)
        print(f"{Path(args.out) / 'results.md'}")
    elif args.command == "assets":
        names = ("root", "model", "train_target", "train_english", "eval_target", "eval_english", "manifest")
        if args.language == "de":
            found = api.prepare_assets()
            paths = [getattr(found, name) for name in names]
        else:  # same keys; the target-language ones point at that language's files
            from elo_cpt.demo.assets import prepare_language

            lang = prepare_language(args.language)  # rejects an unknown language first, then prepares the defaults
            found = api.prepare_assets()  # already prepared: returns at once
            paths = [found.root, found.model, lang.train, lang.train_english, lang.eval, lang.eval_english, lang.manifest]
        for name, path in zip(names, paths, strict=True):
            print(f"{name}\t{path}")
        from elo_cpt.demo.chats import prepare_chats

        found = prepare_chats()  # the demo conversations (German and English, whatever the target language)
        for split in ("train", "eval"):
            for lang in ("de", "en"):
                print(f"chat_{split}_{lang}\t{found.path(split, lang)}")


#: What to do about an OSError, by errno name.
_OS_FIXES = {
    "ENOSPC": "free some space or choose another {flag} on a larger disk, then rerun",
    "EDQUOT": "free some space or choose another {flag}, then rerun",
    "EROFS": "the file system is read-only; choose another {flag}",
    "EACCES": "you may not write or read there; choose another path or fix its permissions",
    "EPERM": "you may not write or read there; choose another path or fix its permissions",
    "ENOENT": "check the path",
    "ENOTDIR": "a file stands where a folder is needed; check the path",
    "EISDIR": "a folder stands where a file is needed; check the path",
    "EIO": "the disk reported an I/O error; check it, or choose another {flag}",
}


def os_error_message(err: OSError, args: argparse.Namespace) -> str:
    """One line for an OSError that got past the checks: what happened, at which path, and what to do."""
    import errno

    name = errno.errorcode.get(err.errno or 0, "")
    flag = "--out" if getattr(args, "out", None) else "--json" if getattr(args, "json", None) else "output"
    where = err.filename or getattr(args, "out", None) or getattr(args, "json", None)
    what = err.strerror or str(err) or type(err).__name__
    fix = _OS_FIXES.get(name, "check the path and the disk, then rerun").format(flag=flag)
    return f"{what}{f': {where}' if where else ''}; {fix}"


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    args = build_parser().parse_args(argv)
    distributed.setup_logging()
    debug = args.debug or os.environ.get("ELO_DEBUG", "") not in ("", "0")
    try:
        dispatch(args)
    except KeyboardInterrupt:
        print("elo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (EloError, OSError, SafetensorError) as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, EloError):
            message = str(err)
        elif isinstance(err, OSError):
            message = os_error_message(err, args)
        else:
            message = f"a safetensors file is truncated or corrupt ({err}); download the model again or re-save it with save_pretrained"
        hint = "" if debug or isinstance(err, EloError) else " (ELO_DEBUG=1 shows the traceback)"
        print(f"elo: error: {message}{hint}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
