"""The `elo` subcommands that choose or prepare what stage 1 trains with: `elo probe` (which layers) and
`elo emulator` (a distilled stand-in for the removed middle). Split from cli.py, which calls `add_parsers` and
`dispatch`."""

from __future__ import annotations

import argparse

COMMANDS = ("probe", "emulator")
DATA_HELP = "target-language text: a .txt, .jsonl or .parquet file, a folder, a glob or hf:NAME (docs/data.md); repeat to mix"


def add_parsers(sub) -> None:
    probe = sub.add_parser("probe", help="per-layer importance (block influence, gradient norm) on target and English "
                                         "text, and a suggested layer set (docs/probe.md)")
    probe.add_argument("model", help="Hugging Face model folder (safetensors) or hub id")
    probe.add_argument("--data", action="append", required=True, metavar="SOURCE", help=DATA_HELP)
    probe.add_argument("--english", action="append", metavar="SOURCE", help="English text to compare with (same formats)")
    probe.add_argument("--tokens", type=int, default=8192, help="tokens per language (default 8192)")
    probe.add_argument("--layers", type=int, default=2, metavar="K", help="size of the suggested layer set (default 2)")
    probe.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    probe.add_argument("--language", default="target", help="code of the target language, for the table and JSON")
    probe.add_argument("--out", help="folder for probe.json and probe.png (default: print only)")
    emulator = sub.add_parser("emulator", help="distil (or find in the cache) a frozen emulator of the middle layers stage 1 "
                                               "removes (Offsite-Tuning; docs/probe.md)")
    emulator.add_argument("model", help="Hugging Face model folder (safetensors) or hub id")
    emulator.add_argument("--layers", default="0,-1", help="the layers stage 1 trains (default 0,-1)")
    emulator.add_argument("--emulator-layers", type=int, default=2, metavar="K", help="layers of the emulator (default 2)")
    emulator.add_argument("--data", action="append", required=True, metavar="SOURCE", help="distillation text (the stage-1 "
                          "mixture in elo run), same formats as elo probe")
    emulator.add_argument("--tokens", type=int, default=65536, help="distillation tokens (default 65536)")
    emulator.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    emulator.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate (default 1e-3)")
    emulator.add_argument("--loss", choices=("mse", "relative"), default="relative", help="each token's relative squared "
                          "error (default), or mse on the residual stream")
    emulator.add_argument("--out", help="also write the shallow model with the emulator here, for elo pretrain")


def dispatch(args: argparse.Namespace, api) -> None:
    if args.command == "probe":
        from elo_cpt.layerprobe import format_table

        result = api.probe(args.model, args.data, args.english, args.tokens, args.seq_len, args.layers, args.out, args.language)
        print(format_table(result))
    elif args.command == "emulator":
        info = api.emulator(args.model, args.layers, args.emulator_layers, args.data, args.out, args.tokens, args.seq_len,
                            args.lr, loss=args.loss)
        print(f"emulator of layers {info['sources']} (for the removed {info['gap'][0] + 1}..{info['gap'][1] - 1}): relative "
              f"error {info['error_before']:.4f} -> {info['error_after']:.4f} (no emulator {info['error_skip']:.4f}), per token "
              f"{info['token_error_before']:.4f} -> {info['token_error_after']:.4f} (no emulator {info['token_error_skip']:.4f}); "
              f"cached in {info['cache']}" + (f"; shallow model in {info['shallow']}" if info["shallow"] else ""))
