"""`elo run`: the whole ELO pipeline in one resumable run folder.

    OUT/config.yaml          the resolved configuration (a rerun with another config is refused)
    OUT/stages/vocab/        with vocab.add: the model with its vocabulary extended (`elo vocab`), which every
                             later step trains and tokenizes with (the base model is evaluated as it is)
    OUT/data/                the stage-1 and alignment mixtures actually trained on, and their summary
    OUT/stages/stage1/       the trained shallow model (a Hugging Face folder plus provenance)
    OUT/stages/merged/       the base model with the trained layers written back
    OUT/stages/align/        the alignment's training stats, loss plot and TensorBoard logs
    OUT/model/               the final, aligned model: a standard Hugging Face folder
    OUT/chat_model/          stage 3 (optional, off by default): the chat vector and/or SFT on conversations
                             (pipeline_stage3), with OUT/stages/chat_vector/ and OUT/stages/sft/
    OUT/eval/                bits/char per language, generation samples, answer bits/char and chat answers through
                             the chat template, and lm-eval scores of the base, merged, final and stage-3 models (one
                             JSON file each, so a resumed run skips what it has)
    OUT/timings.json         wall-clock seconds per step, added up over the invocations that ran it
    OUT/metrics.json         all of the above in one file: bits/char per model, time and tokens per stage
    OUT/report.html, .md     the run report: gain, forgetting, cost, loss curves, samples, config (see report.py)

Every step writes its output atomically; rerunning the same command after an interruption skips finished
steps and resumes training from its last checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import yaml
from transformers import AutoConfig

from elo_cpt import checkpoint, config as config_mod, corpus, data, distributed, emulation, evaluation, files, layerprobe, report
from elo_cpt import surgery, train, vocabulary
from elo_cpt import pipeline_stage3 as stage3
from elo_cpt.config import RunConfig
from elo_cpt.demo import assets, chats
from elo_cpt.pipeline_eval import VOCAB_DIR, check_eval_settings, finish_run, print_report
from elo_cpt.stageclock import Timings
from elo_cpt.errors import EloError


#: Stage-1 tokens of the embedded demo when stage1.tokens is unset (the default run's budget; docs/results.md).
DEMO_STAGE1_TOKENS = 160_000
#: Settings a finished run can change without retraining stages 1 and 2: eval.* (evaluated again), control (trained
#: alone), keep_intermediate (the intermediate weights deleted), and stage 3's chat. and sft. (stage 3 redone).
ADDITIVE_SETTINGS = ("eval.", "control:", "keep_intermediate:", *stage3.STAGE3_SETTINGS)


log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)


def resolve_defaults(cfg: RunConfig, out: Path | None = None) -> RunConfig:
    """Fill what the user left empty: the embedded default (SmolLM2, German target, English replay, and its held-out
    conversations for the chat evaluation) and, with the user's own corpora, a stage-1 budget of one pass over them
    (the one recorded in `out`, when resuming there); `sft.data`'s `demo` becomes the demo's training conversations."""
    return with_demo_chats(resolve_data(cfg, out), embedded=not cfg.data.target)


def with_demo_chats(cfg: RunConfig, embedded: bool) -> RunConfig:
    """`cfg` with `demo` in sft.data replaced by the demo's German and English training conversations and, on the
    embedded corpora with eval.chat unset and a model that has a chat template, the demo's held-out conversations (the
    languages of the run among German and English) as eval.chat."""
    held_out = embedded and cfg.eval.chat is None and stage3.has_chat_template(cfg)
    if stage3.DEMO not in cfg.sft.data and not held_out:
        return cfg
    found = chats.prepare_chats()
    sft_data = [part for spec in cfg.sft.data for part in
                ([str(found.train_de), str(found.train_en)] if spec == stage3.DEMO else [spec])]
    chat = {lang: str(found.path("eval", lang)) for lang in dict.fromkeys([cfg.target_language, "en"]) if lang in ("de", "en")}
    return replace(cfg, sft=replace(cfg.sft, data=sft_data), eval=replace(cfg.eval, chat=chat) if held_out else cfg.eval)


def resolve_data(cfg: RunConfig, out: Path | None = None) -> RunConfig:
    """The model and corpora of `cfg`, the embedded ones where it names none, and the stage-1 budget."""
    if cfg.data.target and not cfg.data.eval:
        raise EloError("data.eval is empty; give held-out text per language, e.g. data.eval={ko: held_out_ko.txt, en: held_out_en.txt}")
    if cfg.data.target and not cfg.data.english and cfg.data.english_share > 0:
        # a replay that silently vanished would change the method (the paper mixes English:target 1:9)
        raise EloError(f"data.target is given without data.english, the English replay mixed in at "
                       f"data.english_share={cfg.data.english_share}; give data.english=[...], or set "
                       "data.english_share=0 to train on target text only")
    if cfg.model and cfg.data.target:
        return with_token_budget(cfg, out)
    if not cfg.data.english and cfg.data.replay_language != "en" and cfg.data.english_share > 0:
        raise EloError(f"data.replay_language is {cfg.data.replay_language!r} but the embedded replay corpus is English; "
                       "give your replay corpora in data.english, or leave data.replay_language at en")
    default = assets.prepare_assets()
    if cfg.data.target:
        return with_token_budget(replace(cfg, model=str(default.model)), out)
    # No corpora given: the embedded ones of the target language (German by default, or e.g. target_language=ko).
    embedded = assets.prepare_language(cfg.target_language)
    return replace(
        cfg,
        model=cfg.model or str(default.model),
        data=replace(
            cfg.data,
            target=[str(embedded.train)],
            english=cfg.data.english or [str(embedded.train_english)],
            eval=cfg.data.eval or {cfg.target_language: str(embedded.eval), "en": str(embedded.eval_english)},
        ),
        stage1=replace(cfg.stage1, tokens=cfg.stage1.tokens or DEMO_STAGE1_TOKENS),
    )


def with_token_budget(cfg: RunConfig, out: Path | None = None) -> RunConfig:
    """`cfg` with an unset stage1.tokens set to one pass over the user's corpora (or to what the run in `out` recorded
    for the same data), and an unset alignment budget capped at one pass over the held-out alignment part."""
    if cfg.stage1.tokens is not None:
        return cfg
    if cfg.vocab.add:  # the budget is counted in the extended tokenizer's tokens, which do not exist yet
        raise EloError("vocab.add with your own corpora needs stage1.tokens (tokens of the extended tokenizer, e.g. "
                       "stage1.tokens=2000000); one pass over the corpora is not sized for an extended vocabulary yet")
    recorded = yaml.safe_load((out / "config.yaml").read_text()) if out and (out / "config.yaml").is_file() else None
    resolved = config_mod.to_dict(cfg)
    if recorded and all(recorded.get(k) == resolved[k] for k in ("model", "data", "seq_len")):
        return replace(cfg, stage1=replace(cfg.stage1, tokens=recorded["stage1"]["tokens"]),
                       align=replace(cfg.align, tokens=recorded["align"]["tokens"]))
    paths, weights, _ = mixture_sources(cfg)
    log(f"stage1.tokens is unset: sizing one pass over {', '.join(map(str, paths))}")
    tokenizer = checkpoint.load_tokenizer(cfg.model)
    splits = [data.split_stream(functools.partial(corpus.source_documents, p), cfg.data.align_holdout, str(p)) for p in paths]
    budgets = [data.one_pass_tokens([split[part] for split in splits], weights, tokenizer, [str(p) for p in paths])
               // cfg.seq_len * cfg.seq_len for part in (0, 1)]
    if budgets[0] < cfg.seq_len:
        raise EloError(f"{', '.join(map(str, paths))} hold less than one {cfg.seq_len}-token sequence for stage 1; give more text")
    stage1 = replace(cfg.stage1, tokens=budgets[0])
    align = cfg.align
    if align.tokens is None and align_tokens(replace(cfg, stage1=stage1)) > budgets[1]:
        align = replace(align, tokens=budgets[1])  # the held-out part cannot fill token_ratio x stage 1
    log(f"stage 1 will train {stage1.tokens:,} tokens, one pass over the corpora at their shares; alignment "
        f"{align_tokens(replace(cfg, stage1=stage1, align=align)):,} tokens (set stage1.tokens and align.tokens to choose)")
    return replace(cfg, stage1=stage1, align=align)


def mixture_sources(cfg: RunConfig) -> tuple[list[str], list[float], list[str]]:
    """The corpora of the training mixtures, each one's byte share and language: target corpora share
    1 - data.english_share, replay corpora data.english_share (none when it is 0)."""
    english = cfg.data.english if cfg.data.english_share > 0 else []
    paths = cfg.data.target + english
    weights = [(1 - cfg.data.english_share) / len(cfg.data.target)] * len(cfg.data.target)
    weights += [cfg.data.english_share / len(english)] * len(english) if english else []
    languages = [cfg.target_language] * len(cfg.data.target) + [cfg.data.replay_language] * len(english)
    return paths, weights, languages


def write_mixtures(cfg: RunConfig, folder: Path, parts: tuple[str, ...] = ("stage1", "align")) -> dict:
    """Write the stage-1 and alignment mixtures (those of `parts` with a token budget) to `folder/<part>.jsonl`, one
    JSON line per document with its language, over disjoint documents; return a summary of them.

    The corpora are streamed (split, mixed and written without being held in memory), and each file is written
    atomically: a bad corpus raises before its file appears.
    """
    tokenizer = checkpoint.load_tokenizer(cfg.model)
    paths, weights, languages = mixture_sources(cfg)
    splits = [data.split_stream(functools.partial(corpus.source_documents, p), cfg.data.align_holdout, str(p)) for p in paths]
    budgets = {"stage1": cfg.stage1.tokens, "align": align_tokens(cfg)}
    summary: dict = {}
    for index, (name, tokens) in enumerate(budgets.items()):
        if not tokens or name not in parts:
            continue
        names = [f"{p} ({name} part)" for p in paths]
        mixture = data.mix_stream([split[index] for split in splits], weights, tokenizer, tokens, names)
        byte_counts: Counter = Counter()

        def records(mixture=mixture, byte_counts=byte_counts):
            for which, document in mixture:
                byte_counts[languages[which]] += len(document.encode())
                yield {"text": document, "lang": languages[which]}

        documents = data.write_jsonl(folder / f"{name}.jsonl", records())
        total = sum(byte_counts.values())
        summary[name] = {
            "documents": documents,
            "tokens": tokens,
            "byte_share": {lang: round(b / total, 4) for lang, b in byte_counts.items()},
        }
    summary["sources"] = {str(p): lang for p, lang in zip(paths, languages)}
    return summary


def align_tokens(cfg: RunConfig) -> int:
    if cfg.align.tokens is not None:
        return cfg.align.tokens
    return int(round((cfg.stage1.tokens or 0) * cfg.align.token_ratio / cfg.seq_len)) * cfg.seq_len


def make_shallow(cfg: RunConfig, stage1_data: Path, shallow: Path) -> None:
    """The shallow model of `cfg` in `shallow`: detached, plus its bridges when `stage1.bridge_tokens` asks for them
    (fitted on the first tokens of the stage-1 data). Finishes a folder an interrupted call left without bridges."""
    if not shallow.is_dir() and cfg.stage1.emulator_layers:
        log(f"the removed middle gets a {cfg.stage1.emulator_layers}-layer distilled emulator (bridges are not fitted)")
        emulation.emulator(cfg.model, cfg.layers, cfg.stage1.emulator_layers, [str(stage1_data)], shallow,
                           cfg.stage1.emulator_tokens, cfg.seq_len, seed=cfg.seed, max_tokens=cfg.stage1.tokens)
    elif not shallow.is_dir():
        surgery.detach(cfg.model, cfg.layers, shallow, frozen_layers=cfg.stage1.frozen_layers)
    if wants_bridges(cfg) and not (shallow / surgery.BRIDGE_FILE).is_file():
        log("fitting the bridges for the removed layers (one full-model forward pass)")
        # the stage-1 mixture holds no more than stage1.tokens
        used = train.bridge(shallow, [str(stage1_data)], cfg.stage1.bridge_tokens, cfg.seq_len, cfg.stage1.tokens)
        log(f"bridges fitted on {used:,} stage-1 tokens")


def wants_bridges(cfg: RunConfig) -> bool:
    """Whether stage 1 fits bridges: stage1.bridge_tokens asks for them and no emulator stands in for the middle."""
    return bool(cfg.stage1.bridge_tokens) and not cfg.stage1.emulator_layers


def config_changes(recorded: dict, resolved: dict) -> list[str]:
    """What differs between a run folder's recorded config and `resolved`, e.g. `stage1.lr: 1.5e-05 -> 1e-05`; empty
    when nothing does. The record is read through the dataclasses, so a setting added to elo-cpt since the run
    started takes its default instead of counting as a difference."""
    try:
        return config_mod.differences(config_mod.to_dict(config_mod.from_dict(recorded)), resolved)
    except EloError as err:
        return [f"its config.yaml no longer loads: {err}"]


def run(cfg: RunConfig, out: str | Path) -> dict:
    """Run the pipeline into `out` and return the metrics (also written to `out/metrics.json`).

    Under torchrun or accelerate launch every process trains; the main one alone prepares the data, detaches, fits
    the bridges, merges, evaluates and writes the report, while the others wait (`distributed`).
    """
    started = time.perf_counter()
    out = Path(out)
    cfg = distributed.main_only(resolve_defaults, cfg, out)  # the embedded assets are prepared by one process
    resolved = config_mod.to_dict(cfg)
    checked: dict = {}  # what the main process's checks found, for its evaluation at the end
    finished = distributed.main_only(prepare_run, cfg, out, resolved, checked)
    if finished is not None:
        return finished
    data_dir = out / "data"
    data_summary = json.loads((data_dir / "summary.json").read_text())
    if config_mod.probe_size(cfg.layers):  # `layers: probe`: measured once, cached in out/probe
        cfg = distributed.main_only(layerprobe.probe_layers, cfg, out)
        resolved = {**resolved, "probed_layers": cfg.layers}  # metrics.json and the report name the layers trained
    timings = Timings(out / "timings.json", write=distributed.is_main())
    base_cfg, cfg = cfg, extended(cfg, out)  # from here on the model trained is the extended one (vocab.add)

    merged = stage1_and_merge(cfg, data_dir / "stage1.jsonl", out / "stages", timings)
    model_dir = out / "model"
    if not model_dir.is_dir():
        with timings.step("align"):
            if "align" in data_summary:
                log(f"[5/6] alignment ({cfg.align.method}) on {data_summary['align']['tokens']:,} tokens")
                align_cfg = replace(cfg.align, tokens=data_summary["align"]["tokens"])
                train.finetune(merged, [str(data_dir / "align.jsonl")], model_dir, align_cfg, cfg.seq_len, cfg.seed,
                               method=cfg.align.method, layers=cfg.layers, held_out=cfg.data.eval)
            else:
                distributed.main_only(copy_merged, merged, model_dir)
    control = out / "stages" / "control"
    if cfg.control and not control.is_dir():
        with timings.step("control"):
            log(f"control: aligning the base model alone ({cfg.align.method}, no stage 1) on the same "
                f"{data_summary['align']['tokens']:,} tokens")
            align_cfg = replace(cfg.align, tokens=data_summary["align"]["tokens"])
            train.finetune(cfg.model, [str(data_dir / "align.jsonl")], control, align_cfg, cfg.seq_len, cfg.seed,
                           method=cfg.align.method, layers=cfg.layers, held_out=cfg.data.eval)
    stage3.run_stage3(cfg, out, timings)
    return distributed.main_only(finish_run, base_cfg, out, resolved, data_summary, timings, checked.get("tasks"), started)


def extended(cfg: RunConfig, out: Path) -> RunConfig:
    """`cfg` with the model every step after the vocabulary extension trains: OUT/stages/vocab with vocab.add."""
    return replace(cfg, model=str(out / VOCAB_DIR)) if cfg.vocab.add else cfg


def vocab_step(cfg: RunConfig, out: Path, resolved: dict) -> None:
    """Extend the model's vocabulary into OUT/stages/vocab (vocab.add new tokens learned from vocab.data, or else
    data.target), once; an error in a run folder this call made leaves no run folder."""
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out / "config.yaml", resolved)  # a run interrupted from here on is resumed
        sources = cfg.vocab.data or cfg.data.target
        log(f"[0/6] extending the vocabulary of {cfg.model} by {cfg.vocab.add:,} tokens learned from {', '.join(sources)}")
        with Timings(out / "timings.json").step("vocab"):
            summary = vocabulary.extend_vocabulary(cfg.model, sources, cfg.vocab.add, out / VOCAB_DIR,
                                                   ascii_context=cfg.vocab.ascii_context)
        log(f"vocabulary {summary['vocab_size']:,} rows; tokens per character of the training text "
            f"{summary['tokens_per_char_before']:.3f} -> {summary['tokens_per_char_after']:.3f}")
    except Exception:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def prepare_run(cfg: RunConfig, out: Path, resolved: dict, checked: dict) -> dict | None:
    """Check everything a run needs and build its mixtures into `out/data` (once); the metrics of a run that is
    already complete, else None."""
    metrics_path = out / "metrics.json"
    config_path = out / "config.yaml"
    checkpoint.check_output(out)  # not a file, and writable: before any model is read
    if config_path.is_file():
        changes = config_changes(yaml.safe_load(config_path.read_text()), resolved)
        if changes and all(change.startswith(ADDITIVE_SETTINGS) for change in changes):
            # the trained models stand: what the change adds (a new evaluation, the control) is done, the report redone
            log(f"updating {out}: {'; '.join(changes)}")
            if any(change.startswith("eval.") for change in changes):
                shutil.rmtree(out / "eval", ignore_errors=True)
            if any(change.startswith(stage3.STAGE3_SETTINGS) for change in changes):
                stage3.forget(out)  # stage 3 is redone with the new settings
            shutil.rmtree(out / report.FILES_DIR, ignore_errors=True)
            for stale in (metrics_path, out / report.HTML_FILE, out / report.MD_FILE):
                stale.unlink(missing_ok=True)
        elif changes:
            raise EloError(f"{out} holds a run with another configuration ({'; '.join(changes)}); choose another --out "
                           "or delete it (eval., chat. and sft. settings, control and keep_intermediate alone can change: "
                           "the run is then updated)")
        if metrics_path.is_file():
            log(f"{out} is already complete")
            metrics = json.loads(metrics_path.read_text())
            print(report.summary(metrics))
            if not (out / report.HTML_FILE).is_file():
                print_report(out)
            return metrics
        log(f"resuming the run in {out}")
    elif out.exists() and any(out.iterdir()):
        raise EloError(f"{out} exists and is not an elo run folder; choose another --out")
    # a hub id is fetched here, once, with every shard: the write-back copies the whole base model
    model_dir = checkpoint.require_model_dir(cfg.model)
    n_layers = surgery.num_layers(AutoConfig.from_pretrained(model_dir))
    checkpoint.load_tokenizer(cfg.model)  # a model folder without a tokenizer fails here, not after the data is built
    # the merged and the final model are full copies of the base (the shallow ones and the data are far smaller)
    copies = sum(not (out / part).is_dir() for part in ("stages/merged", "model", *([VOCAB_DIR] if cfg.vocab.add else [])))
    copies += sum(not folder.is_dir() for folder in stage3.model_dirs(cfg, out))
    checkpoint.check_output(out, needed_bytes=copies * checkpoint.folder_bytes(model_dir))
    probed = config_mod.probe_size(cfg.layers)
    if probed is None:
        surgery.resolve_layers(cfg.layers, n_layers)
    elif probed > n_layers:
        raise EloError(f"layers {cfg.layers!r} asks for {probed} layers of a model with {n_layers}")
    if cfg.stage1.emulator_layers and probed is None:  # a probed layer set is checked when the emulator is built
        emulation.emulator_sources(surgery.resolve_layers(cfg.layers, n_layers), n_layers, cfg.stage1.emulator_layers)
    if cfg.stage1.frozen_layers:
        surgery.resolve_layers(cfg.stage1.frozen_layers, n_layers)
    for path in cfg.data.eval.values():
        evaluation.read_eval_text(path)
    checked["tasks"] = check_eval_settings(cfg)
    stage3.check_stage3(cfg)
    if cfg.stage1.train_new_rows and not cfg.vocab.add and vocabulary.new_rows(model_dir) is None:
        raise EloError(f"stage1.train_new_rows=true trains the rows of the tokens vocab.add adds, but vocab.add is 0 and "
                       f"{cfg.model} was not extended by elo vocab; set vocab.add (e.g. 8000), or leave train_new_rows false")
    data_dir = out / "data"
    if cfg.vocab.add and not (out / VOCAB_DIR).is_dir():
        with checkpoint.new_parents(out):
            vocab_step(cfg, out, resolved)
    if not (data_dir / "summary.json").is_file():
        log("[1/6] preparing the stage-1 and alignment mixtures")
        # built beside the run folder and moved in when complete: bad corpora leave no output
        with checkpoint.new_parents(out):  # parent folders made for the run are removed if this step fails
            build_data(extended(cfg, out), out, resolved)
    write_config(config_path, resolved)
    return None


def build_data(cfg: RunConfig, out: Path, resolved: dict) -> None:
    """Build the mixtures beside the run folder and move them in, with the config, when complete: bad corpora or a
    full disk leave no output (and no run folder, if this call made it)."""
    data_dir, config_path = out / "data", out / "config.yaml"
    for leftover in out.parent.glob(f".{out.name}.data.*"):  # of a run killed while it built the mixtures
        shutil.rmtree(leftover, ignore_errors=True)
    made = not out.exists()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.data.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); data/ gets the mode of any folder made here
    try:
        summary = write_mixtures(cfg, staging)
        for lang, path in cfg.data.eval.items():  # held-out scores mean nothing if the text was trained on
            summary.setdefault("eval_overlap", {})[lang] = data.check_no_overlap(
                (d for part in ("stage1", "align") if (staging / f"{part}.jsonl").is_file()
                 for d in corpus.iter_documents(staging / f"{part}.jsonl")),
                evaluation.read_eval_text(path, cfg.eval.max_chars), name=f"held-out {lang} text {path}")
        files.write_json(staging / "summary.json", summary)
        out.mkdir(parents=True, exist_ok=True)
        # the config first: a run interrupted before the move is then resumed (and rebuilds its data)
        write_config(config_path, resolved)
        shutil.rmtree(data_dir, ignore_errors=True)  # a leftover of an interrupted move
        staging.rename(data_dir)
    except Exception:  # an error, not an interruption: a run folder this call made holds nothing finished
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_config(path: Path, resolved: dict) -> None:
    files.write_text(path, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))


def stage1_and_merge(cfg: RunConfig, stage1_data: Path, folder: Path, timings: Timings) -> Path:
    """ELO's detach, stage 1 and write-back into folder/shallow, folder/stage1 and folder/merged, each step skipped
    when its output is there (the shallow model is deleted once merged); the merged model's folder. Every process
    trains, the main one alone detaches and merges (`elo study` shares one stage 1 between cells this way too)."""
    shallow, stage1, merged = (folder / name for name in ("shallow", "stage1", "merged"))
    if not stage1.is_dir():
        distributed.main_only(detach_step, cfg, stage1_data, shallow, timings)
        log(f"[3/6] ELO stage 1: training layers {cfg.layers} of the shallow model on {cfg.stage1.tokens:,} tokens")
        with timings.step("stage1"):
            train.pretrain(shallow, [str(stage1_data)], stage1, cfg.stage1, cfg.seq_len, cfg.seed,
                           train_norm=cfg.stage1.train_norm, held_out=cfg.data.eval,
                           train_new_rows=cfg.stage1.train_new_rows, new_rows_lr=cfg.stage1.new_rows_lr)
    distributed.main_only(merge_step, cfg, shallow, stage1, merged, timings)
    return merged


def detach_step(cfg: RunConfig, stage1_data: Path, shallow: Path, timings: Timings) -> None:
    if not shallow.is_dir() or (wants_bridges(cfg) and not (shallow / surgery.BRIDGE_FILE).is_file()):
        log(f"[2/6] detaching layers {cfg.layers} into a shallow model")
        with timings.step("detach"):
            make_shallow(cfg, stage1_data, shallow)


def merge_step(cfg: RunConfig, shallow: Path, stage1: Path, merged: Path, timings: Timings) -> None:
    shutil.rmtree(shallow, ignore_errors=True)
    if not merged.is_dir():
        log("[4/6] writing the trained layers back into the base model")
        with timings.step("merge"):
            surgery.merge(cfg.model, stage1, merged)


def copy_merged(merged: Path, model_dir: Path) -> None:
    log("[5/6] alignment budget is 0: the final model is the merged one")
    with checkpoint.atomic_output(model_dir) as staging:
        shutil.copytree(merged, staging, dirs_exist_ok=True)
