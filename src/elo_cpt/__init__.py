"""elo-cpt: the reference implementation of ELO continual pretraining (arXiv 2601.03648).

The Python API mirrors the `elo` command one to one:

    elo run       -> run(load_config(...), out)
    elo detach    -> detach(model, layers, out)
    elo bridge    -> bridge(shallow, data, tokens="auto")
    elo probe     -> probe(model, data, english=None, tokens=8192, layers=2, out=None)
    elo emulator  -> emulator(model, layers, k, data, out=None, tokens=65536)
    elo pretrain  -> pretrain(shallow, data, out, ...)
    elo merge     -> merge(base, shallow, out)
    elo chat-vector -> chat_vector(target, base, instruct, out, scale=1.0, skip=())
    elo align     -> align(model, data, out, ...)
    elo finetune  -> finetune(model, data, out, ..., method=fft|freeze|lora)
    elo sft       -> sft(model, data, out, ..., method=fft|lora, chat_template=None)
    elo eval      -> evaluate(model, {lang: path}, ...), evaluate_chat(model, {lang: chats}, ...) and
                     evaluate_tasks(model, "task1,task2", ...); chat_answers(model, tokenizer, prompts) for samples
    elo report    -> write_report(run_dir)
    elo assets    -> prepare_assets() / prepare_language(language) / prepare_chats() (the demo conversations)
    elo bench     -> bench(model_or_shape, methods, ...)
    elo plan      -> plan(model_or_shape, gpus, gpu_memory_gb, ...)
    elo vocab     -> vocab(model, sources, add, out, ascii_context=False)
    elo study     -> study(study_file_or_name, out, cells=None, launch=None)
"""

from importlib import import_module

from elo_cpt.errors import EloError

#: API name -> (module, attribute); imported on first use so `elo --help` does not load torch.
_API = {
    "prepare_assets": ("elo_cpt.demo.assets", "prepare_assets"),
    "prepare_language": ("elo_cpt.demo.assets", "prepare_language"),
    "prepare_chats": ("elo_cpt.demo.chats", "prepare_chats"),
    "describe_config": ("elo_cpt.config", "describe"),
    "load_config": ("elo_cpt.config", "load_config"),
    "evaluate": ("elo_cpt.evaluation", "evaluate"),
    "evaluate_tasks": ("elo_cpt.lmeval", "evaluate_tasks"),
    "evaluate_chat": ("elo_cpt.chateval", "evaluate_chat"),
    "chat_answers": ("elo_cpt.chateval", "chat_answers"),
    "write_report": ("elo_cpt.report", "write_report"),
    "run": ("elo_cpt.pipeline", "run"),
    "detach": ("elo_cpt.surgery", "detach"),
    "merge": ("elo_cpt.surgery", "merge"),
    "chat_vector": ("elo_cpt.chatvector", "chat_vector"),
    "align": ("elo_cpt.train", "align"),
    "finetune": ("elo_cpt.train", "finetune"),
    "sft": ("elo_cpt.train", "sft"),
    "pretrain": ("elo_cpt.train", "pretrain"),
    "bridge": ("elo_cpt.train", "bridge"),
    "probe": ("elo_cpt.layerprobe", "probe"),
    "emulator": ("elo_cpt.emulation", "emulator"),
    "bench": ("elo_cpt.benchmark", "bench"),
    "plan": ("elo_cpt.planner", "plan"),
    "study": ("elo_cpt.study_runner", "study"),
    "vocab": ("elo_cpt.vocabulary", "extend_vocabulary"),
}

__all__ = ["EloError", *_API]


def __getattr__(name: str):
    if name in _API:
        module, attribute = _API[name]
        return getattr(import_module(module), attribute)
    raise AttributeError(f"module 'elo_cpt' has no attribute {name!r}")
