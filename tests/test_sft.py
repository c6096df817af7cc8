"""Stage 3's supervised fine-tuning (`elo sft`) and chat evaluation: reading both conversation formats, the label
mask on three template families token by token, over-long and bad records, training end to end (fft, LoRA,
gradient accumulation, resume) on tiny models, and (slow) SmolLM2 learning German answers."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from conftest import FIXTURES, crash_at_step, make_tokenizer, save_tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from elo_cpt import chateval, chattokens, train
from elo_cpt.chatdata import iter_conversations, to_conversation
from elo_cpt.cli import main
from elo_cpt.config import TrainConfig
from elo_cpt.errors import EloError

CHATS = FIXTURES / "chat"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
#: Llama 3's template (its structure and tokens; the date and tool parts left out).
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
#: Gemma 2's template, verbatim.
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
         "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
         "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
         "role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{'<start_of_turn>model\n'}}{% endif %}")
SPECIAL = {"chatml": ["<|im_start|>", "<|im_end|>"], "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           "gemma": ["<start_of_turn>", "<end_of_turn>"]}
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}
DIALOGUE = [("Wie spät ist es?", "Es ist kurz nach drei."), ("Und morgen?", "Morgen um diese Zeit ist es wieder drei Uhr.")]


def tokenizer_with(family: str):
    """The fixture tokenizer with a family's special tokens (ids below the tiny models' vocabulary) and template."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[family]})
    tokenizer.chat_template = TEMPLATES[family]
    return tokenizer


def chat_model(path, family: str = "chatml", arch: str = "llama", seed: int = 0):
    """A tiny random model whose tokenizer has a chat template."""
    save_tiny_model(path, arch, seed=seed)
    tokenizer_with(family).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def smollm2():
    from elo_cpt.demo.assets import prepare_assets

    return prepare_assets().model


def segments_of(family: str, dialogue, system: str | None, bos: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, written out by hand for each template family: what
    the label mask must equal. Trained pieces are an answer and its end-of-turn token."""
    pieces: list[tuple[str, bool]] = []
    if family == "chatml":
        pieces.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for question, answer in dialogue:
            pieces += [(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", False), (f"{answer}<|im_end|>", True), ("\n", False)]
    elif family == "llama3":
        pieces.append((f"{bos}<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>", False))
        for question, answer in dialogue:
            pieces += [(f"<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
                       (f"{answer}<|eot_id|>", True)]
    else:
        pieces.append((bos, False))
        for question, answer in dialogue:
            pieces += [(f"<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n", False), (f"{answer}<end_of_turn>", True), ("\n", False)]
    return pieces


def expected_mask(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """Token ids of the whole text and, for each token, whether its characters fall in a trained piece."""
    text = "".join(piece for piece, _ in pieces)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained_chars = np.zeros(len(text), dtype=bool)
    start = 0
    for piece, trained in pieces:
        trained_chars[start : start + len(piece)] = trained
        start += len(piece)
    return encoding["input_ids"], [bool(trained_chars[begin:end].any()) for begin, end in encoding["offset_mapping"]]


@pytest.mark.parametrize("family", ["chatml-smollm2", "llama3", "gemma"])
def test_the_label_mask_is_the_answers_and_their_end_of_turn_tokens(family, smollm2):
    if family == "chatml-smollm2":  # the real tokenizer and its own template (which adds a default system prompt)
        tokenizer, family, system = AutoTokenizer.from_pretrained(smollm2), "chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    else:
        tokenizer, system = tokenizer_with(family), "Antworte kurz."
    messages = [{"role": "system", "content": system}] if family == "llama3" else []
    for question, answer in DIALOGUE:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids, mask = chattokens.ChatEncoder(tokenizer, family).encode(to_conversation({"messages": messages}, "test"))
    want_ids, want_mask = expected_mask(tokenizer, segments_of(family, DIALOGUE, system, tokenizer.bos_token))
    assert ids.tolist() == want_ids
    shown = [(tokenizer.decode([i]), bool(m)) for i, m in zip(ids, mask)]
    assert mask.tolist() == want_mask, shown
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}[family]
    assert tokenizer.decode(ids[mask]) == "".join(answer + end for _, answer in DIALOGUE)


def test_a_prompt_ending_in_a_blank_line_is_cut_at_the_answer_by_offsets(smollm2):
    """SmolLM2's tokenizer writes a final blank line as one token but splits it before text, so Llama 3's prompt
    is not a token prefix of prompt + answer there: the answer is found from the tokens' characters instead."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL["llama3"]})
    prompt = tokenizer("<|eot_id|>\n\n", add_special_tokens=False)["input_ids"]
    assert tokenizer("<|eot_id|>\n\nEs", add_special_tokens=False)["input_ids"][: len(prompt)] != prompt  # the premise
    messages = [{"role": "system", "content": "Antworte kurz."}]
    for question, answer in DIALOGUE:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    ids, mask = chattokens.ChatEncoder(tokenizer, "smollm2", LLAMA3).encode(to_conversation({"messages": messages}, "t"))
    want_ids, want_mask = expected_mask(tokenizer, segments_of("llama3", DIALOGUE, "Antworte kurz.", tokenizer.bos_token))
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert tokenizer.decode(ids[mask]) == "".join(answer + "<|eot_id|>" for _, answer in DIALOGUE)


def write_formats(folder, conversations: list[list[tuple[str, str]]]) -> dict[str, str]:
    """The same conversations as messages JSON Lines, a ShareGPT JSON array, ShareGPT JSON Lines in a .json file (as
    `Dataset.to_json` writes), ShareGPT Parquet, and a folder of messages JSON Lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in conversations]
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c} for r, c in conv]}
                for conv in conversations]
    (folder / "folder").mkdir(parents=True, exist_ok=True)
    (folder / "messages.jsonl").write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in messages))
    (folder / "folder" / "part.jsonl").write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in messages))
    (folder / "sharegpt.json").write_text(json.dumps(sharegpt, indent=2, ensure_ascii=False))
    (folder / "lines.json").write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sharegpt))
    pq.write_table(pa.Table.from_pylist(sharegpt), folder / "sharegpt.parquet")
    return {name: str(folder / name) for name in ("messages.jsonl", "sharegpt.json", "lines.json", "sharegpt.parquet", "folder")}


CONVERSATIONS = [
    [("system", "Sei knapp."), ("user", "Was ist grün?"), ("assistant", "Gras.")],
    [("user", "  Wer bist du? "), ("assistant", "Ein Modell.\n"), ("user", "Sicher?"), ("assistant", "Ja.")],
    [("user", "Zähle bis drei."), ("assistant", "Eins, zwei, drei.")],
]


def test_both_formats_and_every_source_kind_give_the_same_tokens(tmp_path):
    import datasets

    tokenizer = tokenizer_with("chatml")
    sources = write_formats(tmp_path, CONVERSATIONS)
    datasets.Dataset.from_json(sources["lines.json"]).save_to_disk(str(tmp_path / "saved"))
    sources |= {"saved": str(tmp_path / "saved"), "hub": f"hf:{tmp_path / 'folder'}", "glob": str(tmp_path / "share*.json"),
                "field": f"{tmp_path / 'sharegpt.parquet'}#conversations"}
    results = {}
    for name, source in sources.items():
        dataset = chattokens.load_chat_data([source], tokenizer, seq_len=512)
        results[name] = [(dataset[i]["input_ids"].tolist(), dataset[i]["labels"].tolist()) for i in range(len(dataset))]
    reference = results.pop("messages.jsonl")
    assert len(reference) == 3
    for name, result in results.items():
        assert result == reference, name
    # whitespace at the edges of a message is stripped, as Llama 3's and Gemma's templates do themselves
    assert "<|im_start|>user\nWer bist du?<|im_end|>\n<|im_start|>assistant\nEin Modell.<|im_end|>" in tokenizer.decode(reference[1][0])


def test_over_long_conversations_are_skipped_and_counted(tmp_path, capsys):
    tokenizer = tokenizer_with("chatml")
    source = write_formats(tmp_path, CONVERSATIONS)["messages.jsonl"]
    lengths = sorted(len(chattokens.ChatEncoder(tokenizer).encode(c)[0]) for c in iter_conversations(source))
    dataset = chattokens.load_chat_data([source], tokenizer, seq_len=lengths[1])
    assert len(dataset) == 2 and dataset.summary["skipped_too_long"] == 1 and dataset.summary["tokens"] == sum(lengths[:2])
    assert f"1 longer than {lengths[1]} tokens skipped" in capsys.readouterr().err
    with pytest.raises(EloError, match=rf"every conversation of .* is longer than --seq-len {lengths[0] - 1} tokens \(3 skipped\); raise --seq-len"):
        chattokens.load_chat_data([source], tokenizer, seq_len=lengths[0] - 1)


def test_a_token_budget_mixes_sources_by_byte_share(tmp_path):
    tokenizer = tokenizer_with("chatml")
    many = [[("user", f"Frage {i}?"), ("assistant", "Antwort " * (1 + i % 3))] for i in range(60)]
    de = write_formats(tmp_path / "de", many)["messages.jsonl"]
    en = write_formats(tmp_path / "en", [[("user", f"Question {i}?"), ("assistant", "Answer " * (1 + i % 3))] for i in range(60)])["sharegpt.json"]
    dataset = chattokens.load_chat_data([f"{de}@3", f"{en}@1"], tokenizer, seq_len=256, n_tokens=1500)
    sources = dataset.summary["sources"]
    assert dataset.summary["tokens"] >= 1500 > dataset.summary["tokens"] - max(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
    share = sources[0]["bytes"] / (sources[0]["bytes"] + sources[1]["bytes"])
    assert 0.7 < share < 0.8
    with pytest.raises(EloError, match=r"has too few conversations for 100,000 tokens at a 75% byte share; lower --tokens"):
        chattokens.load_chat_data([f"{de}@3", f"{en}@1"], tokenizer, seq_len=256, n_tokens=100_000)


def test_a_template_that_is_not_prefix_stable_is_refused(tmp_path):
    tokenizer = make_tokenizer()  # marks the last message, so a turn renders differently once another follows it
    unstable = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    conversation = to_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                 {"role": "user", "content": "c"}]}, "chats.jsonl:4")
    with pytest.raises(EloError, match=r"^the chat template of M is not prefix-stable: in chats.jsonl:4, the conversation rendered up "
                                       r"to answer 1 is not the start .*\(--chat-template FILE\)$"):
        chattokens.ChatEncoder(tokenizer, "M", unstable).encode(conversation)
    with pytest.raises(EloError, match=r"^the chat template of M refused chats.jsonl:4: System role not supported; fix the record"):
        chattokens.ChatEncoder(tokenizer_with("gemma"), "M").encode(
            to_conversation({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}]}, "chats.jsonl:4"))


BAD = {
    "missing file": (None, r"corpus {dir}/nothing.jsonl does not exist; check the path"),
    "neither field": ('{"text": "hallo"}\n', r"{file}:1 has neither 'messages' nor 'conversations' \(it has text\); give each record"),
    "unknown role": ('{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}\n',
                     r"{file}:1: message 2 has role 'tool'; the roles understood are system, user and assistant \(ShareGPT: system, human and gpt\)"),
    "no answer": ('{"conversations": [{"from": "human", "value": "a"}]}\n', r"{file}:1 has no assistant answer after a prompt; each conversation needs"),
    "not json": ('{"messages": [\n', r"{file}:1 is not valid JSON; each line must be one conversation record"),
    "no text": ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}\n', r"{file}:1: message 1 has no text"),
    "text file": ("hallo\n", r"{dir}/chats.txt: chat data must be .jsonl, .json or .parquet"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_chat_data_is_one_line_naming_the_record_and_leaves_nothing(case, tmp_path, capsys):
    model = chat_model(tmp_path / "model")
    content, pattern = BAD[case]
    data = tmp_path / ("chats.txt" if case == "text file" else "nothing.jsonl" if content is None else "chats.jsonl")
    if content is not None:
        data.write_text(content)
    capsys.readouterr()  # the model's saving progress
    assert main(["sft", str(model), "--data", str(data), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("elo: error: ")
    assert re.search(pattern.format(file=data, dir=tmp_path), err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_model_without_a_chat_template_is_one_line_naming_it_and_the_fix(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "plain")
    capsys.readouterr()  # the model's saving progress
    assert main(["sft", str(model), "--data", str(CHATS / "de_train.jsonl"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err == (f"elo: error: {model} has no chat template (none in tokenizer_config.json or chat_template.jinja); use a model "
                   "whose tokenizer has one, or pass --chat-template FILE (e.g. the chat_template.jinja of its Instruct variant)\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def tensors(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_elo_sft_end_to_end(method, tmp_path, capsys):
    if method == "fft":
        model, extra = chat_model(tmp_path / "model"), []
    else:  # a model without a template, given one on the command line: the output keeps it
        model = save_tiny_model(tmp_path / "model")
        tokenizer = make_tokenizer()
        tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL["chatml"]})
        tokenizer.save_pretrained(model)
        (tmp_path / "chatml.jinja").write_text(CHATML)
        extra = ["--chat-template", str(tmp_path / "chatml.jinja")]
    out = tmp_path / "sft"
    args = ["sft", str(model), "--data", f"{CHATS / 'de_train.jsonl'}@1", "--data", f"{CHATS / 'en_train.json'}@1",
            "--out", str(out), "--method", method, "--batch-size", "8", "--seq-len", "512", "--lr", "1e-3", "--report-to", "none"]
    assert main(args + extra) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "chat data: 64 conversations" in captured.err and "0 longer than 512 tokens skipped" in captured.err
    assert f"saved {out}" in captured.out
    stats = json.loads((out / train.STATS_FILE).read_text())
    assert stats["method"] == method and stats["chat_data"]["conversations"] == 64 and stats["steps"] == 8
    assert stats["tokens"] == stats["chat_data"]["tokens"]  # every conversation once, padding not counted
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML
    before, after = tensors(model), tensors(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if method == "fft":
        assert changed == set(before)
    else:  # LoRA on every linear layer, merged: the attention and MLP weights move, embeddings and norms do not
        assert changed and all("proj" in k for k in changed) and "model.embed_tokens.weight" not in changed
    assert loaded.config.vocab_size == 384
    result = chateval.evaluate_chat(out, {"de": str(CHATS / "de_eval.jsonl")}, seq_len=512)["de"]
    assert result["conversations"] == 10 and result["answer_bits_per_char"] > 0


def test_the_loss_is_the_mean_over_answer_tokens_of_the_accumulated_batch(tmp_path):
    """4 conversations x 1 step, 2 x 2 accumulated, with and without the chunked loss: padding and masked prompts
    do not change the result (the loss is summed over answer tokens and divided by their count in the batch)."""
    model = chat_model(tmp_path / "model")
    data = [str(CHATS / "de_eval.jsonl")]  # 10 conversations: two full steps and a last one of 2
    results = []
    for name, batch, accum, chunk in [("a", 4, 1, 1024), ("b", 2, 2, 1024), ("c", 4, 1, 0)]:
        cfg = TrainConfig(lr=1e-3, batch_size=batch, grad_accum=accum, loss_chunk=chunk, report_to=["none"], logging_steps=1)
        stats = train.sft(model, data, tmp_path / name, cfg, seq_len=512)
        results.append((tensors(tmp_path / name), [loss for _, loss in stats.losses]))
    (weights, losses), others = results[0], results[1:]
    for other_weights, other_losses in others:
        assert other_losses == pytest.approx(losses, rel=1e-5)
        for key in weights:
            torch.testing.assert_close(other_weights[key], weights[key], rtol=1e-4, atol=1e-6)


def test_the_first_loss_is_the_answer_nll_the_evaluation_measures(tmp_path):
    """Trainer's first logged loss (one step, lr 0 so nothing moves) equals the evaluation's answer negative
    log-likelihood per answer token: training and evaluation mask the same tokens."""
    model = chat_model(tmp_path / "model")
    data = str(CHATS / "de_eval.jsonl")
    stats = train.sft(model, [data], tmp_path / "out", TrainConfig(lr=1e-12, batch_size=10, report_to=["none"], logging_steps=1), seq_len=512)
    loaded = AutoModelForCausalLM.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    result = chateval.answer_bits_per_char(loaded, tokenizer, data, seq_len=512)
    nats_per_token = result["answer_bits_per_char"] * result["answer_chars"] * np.log(2) / result["answer_tokens"]
    assert stats.losses[0][1] == pytest.approx(nats_per_token, rel=1e-4)


def test_interrupted_sft_resumes_to_the_same_weights(tmp_path):
    model = chat_model(tmp_path / "model")
    cfg = TrainConfig(lr=1e-3, batch_size=2, save_steps=2, report_to=["none"])
    data = [str(CHATS / "de_eval.jsonl")]
    straight = train.sft(model, data, tmp_path / "straight", cfg, seq_len=512)
    with crash_at_step(4):
        train.sft(model, data, tmp_path / "resumed", cfg, seq_len=512)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = train.sft(model, data, tmp_path / "resumed", cfg, seq_len=512)
    assert resumed.resumes == 1 and resumed.steps == straight.steps == 5 and resumed.tokens == straight.tokens
    want, got = tensors(tmp_path / "straight"), tensors(tmp_path / "resumed")
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_elo_eval_chat_and_greedy_answers(tmp_path, capsys):
    model = chat_model(tmp_path / "model")
    report = tmp_path / "eval.json"
    assert main(["eval", str(model), "--chat", f"de={CHATS / 'de_eval.jsonl'}", "--chat", f"en={CHATS / 'en_eval.json'}",
                 "--seq-len", "512", "--json", str(report)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["de", "en"] and "answer bits/char" in lines[0]
    results = json.loads(report.read_text())["answer_bits_per_char"]
    assert results["de"]["conversations"] == 10 and results["de"]["answer_chars"] == sum(
        c.answer_chars for c in iter_conversations(str(CHATS / "de_eval.jsonl")))
    assert main(["eval", str(model), "--chat", "de=missing.jsonl"]) == 1
    assert capsys.readouterr().err == "elo: error: corpus missing.jsonl does not exist; check the path\n"
    plain = save_tiny_model(tmp_path / "plain")
    capsys.readouterr()
    assert main(["eval", str(plain), "--chat", f"de={CHATS / 'de_eval.jsonl'}"]) == 1
    assert capsys.readouterr().err.startswith(f"elo: error: {plain} has no chat template")
    (tmp_path / "chatml.jinja").write_text(CHATML)  # the fixture tokenizer has no ChatML tokens: they are text here
    assert main(["eval", str(plain), "--chat", f"de={CHATS / 'de_eval.jsonl'}", "--chat-template", str(tmp_path / "chatml.jinja")]) == 0
    # as text, the ChatML tokens make two conversations longer than the default --seq-len: skipped and counted
    assert "\t8 conversations\t2 longer than 256 tokens skipped\n" in capsys.readouterr().out
    loaded, tokenizer = AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model)
    answers = chateval.chat_answers(loaded, tokenizer, ["Hallo?", "Wie geht es?"], max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answers == chateval.chat_answers(loaded, tokenizer, ["Hallo?", "Wie geht es?"], max_new_tokens=5)  # greedy


@pytest.mark.slow
def test_sft_on_smollm2_lowers_held_out_german_answer_bits_per_char(tmp_path, smollm2):
    """SmolLM2-135M-Instruct, full fine-tuning on 32 German and 32 English conversations (1:1), one pass: the
    held-out German answers' bits/char must fall, English must not get much worse."""
    started = time.perf_counter()
    held_out = {"de": str(CHATS / "de_eval.jsonl"), "en": str(CHATS / "en_eval.json")}
    before = chateval.evaluate_chat(smollm2, held_out)
    cfg = TrainConfig(lr=5e-5, batch_size=4, report_to=["none"])
    stats = train.sft(smollm2, [f"{CHATS / 'de_train.jsonl'}@1", f"{CHATS / 'en_train.json'}@1"], tmp_path / "sft", cfg, seq_len=256)
    after = chateval.evaluate_chat(tmp_path / "sft", held_out)
    loaded, tokenizer = chateval.load_for_eval(tmp_path / "sft")
    answer = chateval.chat_answers(loaded, tokenizer, ["Was erklärt die GNOME-Hilfe unter „Dateien suchen“?"], max_new_tokens=40)
    print(f"\nSFT on SmolLM2: {stats.steps} steps, {stats.tokens} tokens, {stats.seconds:.0f} s training, "
          f"{time.perf_counter() - started:.0f} s in all")
    for lang in held_out:
        print(f"{lang}: answer bits/char {before[lang]['answer_bits_per_char']:.4f} -> {after[lang]['answer_bits_per_char']:.4f}")
    print(f"answer after SFT: {answer[0]!r}")
    assert after["de"]["answer_bits_per_char"] < before["de"]["answer_bits_per_char"] - 0.05
    assert after["en"]["answer_bits_per_char"] < before["en"]["answer_bits_per_char"] + 0.05
