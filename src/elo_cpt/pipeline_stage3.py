"""Stage 3 of `elo run`, after the alignment, each step optional: the chat vector (chat.instruct - chat.base, added to
the aligned model) and supervised fine-tuning on conversations (sft.data), into one chat model.

    OUT/stages/chat_vector/  the aligned model + chat.scale x (instruct - base), when SFT follows (without SFT it is
                             OUT/chat_model/ itself)
    OUT/chat_model/          the stage-3 model: a standard Hugging Face folder with a model card (like OUT/model/)
    OUT/stages/sft/          the SFT's training stats, loss plot and TensorBoard logs (moved out of chat_model/)

Each step is skipped when its output exists, and SFT resumes from its last checkpoint, as the other stages do. The
chat settings are checked with the rest of the run, before anything trains: the chat vector's three models, the
conversation files, and a chat template wherever stage 3 or a chat evaluation needs one.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from elo_cpt import chatdata, chattokens, chatvector, checkpoint, distributed, files, train
from elo_cpt.config import RunConfig
from elo_cpt.corpus import Source
from elo_cpt.errors import EloError
from elo_cpt.stageclock import Timings

log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)

#: `sft.data: [demo]`: the embedded demo's German and English training conversations (`demo.chats`).
DEMO = "demo"
#: Settings a finished run can change by redoing stage 3 alone (the models before it stand).
STAGE3_SETTINGS = ("chat.", "sft.")
CHAT_MODEL = "chat_model"
#: The models stage 3 adds to the evaluation (the chat vector's only when SFT follows it).
MODELS = ("chat_vector", CHAT_MODEL)


def enabled(cfg: RunConfig) -> bool:
    return bool(cfg.chat.base or cfg.sft.data)


def vector_dir(cfg: RunConfig, out: Path) -> Path:
    """Where the chat vector goes: an intermediate model when SFT follows, else the stage-3 model itself."""
    return out / "stages" / "chat_vector" if cfg.sft.data else out / CHAT_MODEL


def model_dirs(cfg: RunConfig, out: Path) -> list[Path]:
    """The model folders stage 3 writes with these settings (each a full copy of the model)."""
    if not enabled(cfg):
        return []
    return list(dict.fromkeys([*([vector_dir(cfg, out)] if cfg.chat.base else []), out / CHAT_MODEL]))


def forget(out: Path) -> None:
    """Remove every file and folder stage 3 wrote, finished or not, and its steps' seconds: a run whose chat. or
    sft. settings changed redoes stage 3 (the models before it stand)."""
    folders = [out / CHAT_MODEL, out / "stages" / "chat_vector", out / "stages" / "sft"]
    for folder in [*folders, *(checkpoint.staging_path(f) for f in folders)]:
        shutil.rmtree(folder, ignore_errors=True)
    for cached in (out / "eval").glob("*.json"):
        if cached.name.split(".")[0] in MODELS:
            cached.unlink()
    timings = out / "timings.json"
    if timings.is_file():
        seconds = json.loads(timings.read_text())
        files.write_json(timings, {step: s for step, s in seconds.items() if step.split()[-1] not in ("chat_vector", "sft", *MODELS)})


def chat_seq_len(cfg: RunConfig) -> int:
    """The longest conversation, in tokens, that SFT trains on and the chat evaluation scores."""
    return cfg.chat.seq_len or cfg.seq_len


def template_text(cfg: RunConfig) -> str | None:
    """The Jinja text of chat.template, or None to use each tokenizer's own chat template."""
    return chattokens.read_template(cfg.chat.template) if cfg.chat.template else None


def has_chat_template(cfg: RunConfig) -> bool:
    """Whether the run's models can be talked to: chat.template is given, or the base model's tokenizer (which every
    model of the run keeps) has a chat template."""
    return bool(cfg.chat.template) or bool(getattr(checkpoint.load_tokenizer(cfg.model), "chat_template", None))


def check_stage3(cfg: RunConfig) -> None:
    """Refuse, before anything trains, chat settings that cannot work: no chat template where stage 3 or a chat
    evaluation needs one, chat-vector models that do not match the run's model, unreadable conversations."""
    template = template_text(cfg)  # a missing or bad chat.template file fails here
    asked = [name for name, given in (("stage 3", enabled(cfg)), ("eval.chat", cfg.eval.chat),
                                      ("eval.chat_prompts", cfg.eval.chat_prompts),
                                      ("eval.chat_template_tasks", cfg.eval.chat_template_tasks)) if given]
    if asked and not template and not has_chat_template(cfg):
        raise EloError(f"{asked[0]} needs a chat template, but {cfg.model} has none (in tokenizer_config.json or "
                       "chat_template.jinja); set chat.template=FILE (e.g. the chat_template.jinja of its Instruct model)")
    if cfg.chat.base:
        # the aligned model has the base model's tensors and shapes, so the trio is checked with the base model
        chatvector.check_compatible(cfg.model, cfg.chat.base, cfg.chat.instruct, cfg.chat.skip)
    trained = set()
    for spec in cfg.sft.data:
        if not Source.parse(spec).hub:  # a hub dataset is streamed when SFT starts, not fetched twice
            trained.update(c.messages[i]["content"] for c in chatdata.iter_conversations(spec) for i in c.answers)
    for lang, spec in (cfg.eval.chat or {}).items():
        held_out = [c.messages[i]["content"] for c in chatdata.iter_conversations(spec) for i in c.answers]
        if leaked := sum(answer in trained for answer in held_out):
            print(f"warning: {leaked} of {len(held_out)} held-out {lang} answers of {spec} are also in sft.data: the "
                  "stage-3 model's answer bits/char on them are not held out", file=sys.stderr)


def run_stage3(cfg: RunConfig, out: Path, timings: Timings) -> None:
    """The chat vector (main process only) and SFT (every process) on the aligned model OUT/model, into
    OUT/chat_model; each step skipped when its output is there."""
    if not enabled(cfg):
        return
    chat_model, start = out / CHAT_MODEL, out / "model"
    if cfg.chat.base:
        start = vector_dir(cfg, out)
        if not start.is_dir() and not chat_model.is_dir():  # an SFT run's chat vector is not needed once SFT is done
            distributed.main_only(chat_vector_step, cfg, out / "model", start, timings)
        template, written = template_text(cfg), start / chattokens.TEMPLATE_FILE
        if template and not cfg.sft.data and not (written.is_file() and written.read_text(encoding="utf-8") == template):
            # the stage-3 model keeps the template it is evaluated with (SFT writes it itself)
            distributed.main_only(chattokens.write_template, start, template)
    if cfg.sft.data and not chat_model.is_dir():
        log(f"stage 3: SFT ({cfg.sft.method}) of {'the chat-vector model' if cfg.chat.base else 'the final model'} on "
            f"{', '.join(cfg.sft.data)}")
        with timings.step("sft"):
            train.sft(start, cfg.sft.data, chat_model, cfg.sft, chat_seq_len(cfg), cfg.seed, method=cfg.sft.method,
                      chat_template=cfg.chat.template, held_out=cfg.data.eval)


def chat_vector_step(cfg: RunConfig, model_dir: Path, target: Path, timings: Timings) -> None:
    log(f"stage 3: adding the chat vector {cfg.chat.instruct} - {cfg.chat.base} (x {cfg.chat.scale:g}) to the final model")
    with timings.step("chat_vector"):
        chatvector.chat_vector(model_dir, cfg.chat.base, cfg.chat.instruct, target, cfg.chat.scale, cfg.chat.skip)


def move_sft_records(out: Path) -> None:
    """Move the SFT's stats, loss plot and logs out of the stage-3 model into OUT/stages/sft, so that the model folder
    holds the model alone, ready to share (as the alignment's go to OUT/stages/align)."""
    record = out / "stages" / "sft"
    for name in (train.STATS_FILE, "loss.png", "logs"):
        if (out / CHAT_MODEL / name).exists():
            record.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(record / name, ignore_errors=True)
            (out / CHAT_MODEL / name).rename(record / name)
