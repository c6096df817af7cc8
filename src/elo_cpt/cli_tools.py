"""The `elo` subcommands that measure and plan rather than train: `bench` and `plan` (a second CLI module, so that
cli.py stays readable)."""

from __future__ import annotations

import argparse

from elo_cpt.config import OPTIMIZERS, PRECISIONS

COMMANDS = ("bench", "plan")


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="tokens/s and peak memory per training step of each method, next to the cost model")
    bench.add_argument("model", help="model folder, or a named shape with random weights: smollm2-135m, llama-3.2-1b, llama-3.1-8b, mistral-7b, qwen2-7b")
    bench.add_argument("--methods", default="elo,freeze,lora,fft,align", help="comma-separated: elo,freeze,lora,fft,align,elo-logits (default: the first five)")
    bench.add_argument("--batch-size", "--batch", dest="batch", type=int, default=4, help="sequences per step (default 4)")
    bench.add_argument("--seq-len", "--seq", dest="seq", type=int, default=256, help="tokens per sequence (default 256)")
    bench.add_argument("--steps", type=int, default=3, help="timed steps per method (default 3)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    bench.add_argument("--layers", default="0,-1", help="layers ELO and freeze train (default 0,-1)")
    bench.add_argument("--loss-chunk", type=int, default=1024, help="positions per chunk of the vocabulary loss; 0: full logits")
    bench.add_argument("--lora-rank", type=int, default=16)
    bench.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed", "bf16-true"],
                       help="as in training (default auto: bf16-mixed on a GPU with bf16, else 32-true); bf16-true steps "
                            "with Kahan summation (needs torch-optimi)")
    bench.add_argument("--dtype", choices=["float32", "bfloat16"], help=argparse.SUPPRESS)  # before --precision: 32-true, bf16-true
    bench.add_argument("--force", action="store_true", help="run methods even where the memory estimate exceeds what is available")
    bench.add_argument("--json", help="write the results to this JSON file")
    bench.add_argument("--data", action="append", metavar="SOURCE",
                       help="instead: tokenize + pack throughput of this corpus (repeatable) with MODEL's tokenizer, at --seq")
    bench.add_argument("--documents", type=int, metavar="N", help="with --data: only the first N documents")
    bench.add_argument("--workers", type=int, metavar="N", help="with --data: also time N threads and N processes (default: the CPU count)")
    bench.add_argument("--align-method", choices=OPTIMIZERS, help="the align row's optimizer, as align.optimizer "
                       "(default adamw; adamw_kahan under bf16-true); docs/training.md")
    bench.add_argument("--align-checkpointing", action="store_true", help="the align row with activation checkpointing")
    bench.add_argument("--align-step-in-backward", action="store_true", help="the align row with each weight stepped inside "
                       "the backward pass, its gradient freed at once (align.step_in_backward; adamw, adamw_kahan, adafactor)")


    plan = sub.add_parser("plan", help="peak memory per GPU of stage 1, alignment and fft, whether it fits, what would make it fit, and the time",
                          description="Estimate from the cost model (docs/costmodel.md) the peak memory per GPU of each stage, "
                                      "whether it fits, the cheapest setting that makes it fit, and the time at a throughput.")
    plan.add_argument("model", help="model folder, hub id (its config only is fetched) or named shape (smollm2-135m, llama-3.1-8b, ...)")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs (processes) training together (default 1)")
    plan.add_argument("--gpu-memory", type=float, required=True, metavar="GB", help="memory of one GPU in GB (10^9 bytes), e.g. 80")
    plan.add_argument("--precision", default="bf16-mixed", choices=[p for p in PRECISIONS if p != "auto"], help="default bf16-mixed")
    plan.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="the optimizer you plan with (default adamw)")
    plan.add_argument("--optimizer-rank", type=int, default=128, help="rank of galore and apollo (default 128)")
    plan.add_argument("--gradient-checkpointing", action="store_true", help="plan with activation checkpointing")
    plan.add_argument("--step-in-backward", action="store_true", help="plan with each weight stepped inside the backward "
                      "pass (step_in_backward: one GPU; adamw, adamw_kahan, adafactor)")
    plan.add_argument("--layers", default="0,-1", help="layers stage 1 trains (default 0,-1)")
    plan.add_argument("--batch-size", type=int, default=4, help="sequences per step and GPU (default 4)")
    plan.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    plan.add_argument("--loss-chunk", type=int, default=1024, help="positions per chunk of the vocabulary loss (default 1024)")
    plan.add_argument("--tokens", type=float, help="training tokens T of the fft baseline; stage 1 trains 0.9 T, alignment 0.1 T (default 1e9)")
    plan.add_argument("--tokens-per-s", type=float, help="measured fft tokens/s of all GPUs together (default: from --gpu-tflops)")
    plan.add_argument("--gpu-tflops", type=float, help="dense bf16 TFLOP/s of one GPU, used at 40%% utilisation without --tokens-per-s (default 989)")
    plan.add_argument("--json", help="also write the plan to this JSON file")


def dispatch(args: argparse.Namespace, api) -> None:
    if args.command == "bench" and args.data:
        from elo_cpt.benchdata import bench_tokenization

        bench_tokenization(args.data, args.model, args.seq, args.documents, args.workers, args.json)
    elif args.command == "bench":
        api.bench(args.model, args.methods, args.batch, args.seq, args.steps, args.warmup, args.layers, args.loss_chunk,
                  args.lora_rank, {"float32": "32-true", "bfloat16": "bf16-true"}.get(args.dtype, args.precision), args.json,
                  args.force, args.align_method, args.align_checkpointing, args.align_step_in_backward)
    elif args.command == "plan":
        api.plan(args.model, args.gpus, args.gpu_memory, args.precision, args.optimizer, args.gradient_checkpointing,
                 step_in_backward=args.step_in_backward, layers=args.layers, batch=args.batch_size, seq=args.seq_len,
                 loss_chunk=args.loss_chunk, optimizer_rank=args.optimizer_rank, tokens=args.tokens, tokens_per_s=args.tokens_per_s,
                 gpu_tflops=args.gpu_tflops, json_path=args.json)
