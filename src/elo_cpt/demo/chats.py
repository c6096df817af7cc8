"""The embedded demo's conversations: German and English questions and answers built from the GNOME help pages that
`assets.prepare_assets` caches (eval-de.txt, eval-en.txt), with a held-out part on other pages.

Each conversation asks what the GNOME help says under one page's title and answers with the page's first lines (140
to 300 characters), in the `messages` format. gnome-user-docs is page-aligned (German page n is a translation of
English page n), so both languages get the same pages and questions: the training part is German and English 1:1.
The first `HELD_OUT` usable pages are held out for evaluation (`eval.chat` of the embedded default run), the other
pages are the training part (stage 3's SFT with `sft.data=demo`); no page is in both, in either language. The held-out
pages come first because the raw-text evaluation reads the first `eval.max_chars` characters of the same files: the
training part starts after them (the manifest records where), so SFT never trains on the default raw held-out text.

Sources and licence (also in the cache's chat/manifest.json, with the package version and checksums): the titles and
answers are text of the GNOME help (Debian package gnome-user-docs, usr/share/help/{de,C}/gnome-help/), (c) the GNOME
documentation project and its translators, CC-BY-SA-3.0; the files built from it are CC-BY-SA-3.0 too. The question
wording is elo-cpt's own (Apache-2.0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elo_cpt.demo.assets import _locked, _log, _manifest_complete, _remove_stale, _sha256, _write_atomic, prepare_assets
from elo_cpt.errors import EloError

FORMAT = 1  # bump when the conversations change, so that old caches are rebuilt
LICENCE = ("CC-BY-SA-3.0: titles and answers are GNOME help text (gnome-user-docs), (c) the GNOME documentation project "
           "and its translators; question wording elo-cpt's (Apache-2.0)")
#: Conversations per language held out for evaluation (the first usable pages).
HELD_OUT = 16
#: An answer is a page's first lines, at least MIN_CHARS and at most MAX_CHARS characters (pages without are skipped).
MIN_CHARS, MAX_CHARS = 140, 300
#: Question wordings, taken in turn page by page (the same one for both languages of a page).
QUESTIONS = {
    "de": ("Was erklärt die GNOME-Hilfe unter „{}“?", "Worum geht es in der GNOME-Hilfe bei „{}“?",
           "Was sagt die GNOME-Hilfe zum Thema „{}“?"),
    "en": ("What does the GNOME help explain under “{}”?", "What is the GNOME help topic “{}” about?",
           "What does the GNOME help say about “{}”?"),
}
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class DemoChats:
    """Paths of the demo conversations (JSON Lines, `messages` format); all exist once `prepare_chats` has returned."""

    train_de: Path
    train_en: Path
    eval_de: Path
    eval_en: Path
    manifest: Path

    def path(self, split: str, lang: str) -> Path:
        return getattr(self, f"{split}_{lang}")


def answer(lines: list[str]) -> str | None:
    """A page's first lines (after its title) of MIN_CHARS to MAX_CHARS characters, or None when they do not fit."""
    taken: list[str] = []
    for line in lines:
        if len(" ".join(taken + [line])) > MAX_CHARS:
            break
        taken.append(line)
        if len(" ".join(taken)) >= MIN_CHARS:
            return "\n".join(taken)
    return None


def pages(text: str) -> list[list[str]]:
    """The lines of each page of a help-pages file (pages separated by a blank line, title first)."""
    return [block.splitlines() for block in text.strip().split("\n\n")]


def build(de_text: str, en_text: str, held_out: int = HELD_OUT) -> tuple[dict[str, list[dict]], dict]:
    """The conversations of two page-aligned help-pages files: {"train-de": [records], "train-en", "eval-de",
    "eval-en"}, and a summary (pages used per split, and the characters of the files before the first training page)."""
    de, en = pages(de_text), pages(en_text)
    if len(de) != len(en):
        raise EloError(f"the German and English help pages are not aligned ({len(de)} and {len(en)} pages); rebuild the "
                       "default assets with `elo assets` (one gnome-user-docs version for both)")
    usable = [i for i in range(len(de)) if len(de[i]) > 1 and len(en[i]) > 1 and answer(de[i][1:]) and answer(en[i][1:])]
    if len(usable) <= held_out:
        raise EloError(f"only {len(usable)} help pages make a conversation, not more than the {held_out} held out; "
                       "rebuild the default assets with `elo assets`")
    chosen = {"eval": usable[:held_out], "train": usable[held_out:]}
    found: dict[str, list[dict]] = {}
    for split in SPLITS:
        for lang, lines in (("de", de), ("en", en)):
            found[f"{split}-{lang}"] = [
                {"messages": [{"role": "user", "content": QUESTIONS[lang][i % len(QUESTIONS[lang])].format(lines[i][0])},
                              {"role": "assistant", "content": answer(lines[i][1:])}]}
                for i in chosen[split]]
    first_train = chosen["train"][0]
    summary = {"pages": {split: chosen[split] for split in SPLITS}, "held_out": held_out,
               "chars_before_training_pages": {lang: sum(len("\n".join(p)) + 2 for p in lines[:first_train])
                                               for lang, lines in (("de", de), ("en", en))}}
    return found, summary


def _layout(root: Path) -> DemoChats:
    folder = root / "chat"
    return DemoChats(**{f"{split}_{lang}": folder / f"{split}-{lang}.jsonl" for split in SPLITS for lang in ("de", "en")},
                     manifest=folder / "manifest.json")


def prepare_chats(cache_dir: Path | None = None) -> DemoChats:
    """Build the demo conversations once into `<cache>/chat/` (from the default assets, prepared first if needed) and
    return their paths; afterwards, while the manifest matches the files, this returns at once."""
    defaults = prepare_assets(cache_dir)
    found = _layout(defaults.root)
    needed = [found.path(split, lang) for split in SPLITS for lang in ("de", "en")]
    if _manifest_complete(found.manifest, needed, FORMAT):
        return found
    found.manifest.parent.mkdir(exist_ok=True)
    with _locked(defaults.root):  # the cache's one lock
        if _manifest_complete(found.manifest, needed, FORMAT):
            return found
        _remove_stale(found.manifest.parent)
        sources = {path: path.read_text(encoding="utf-8") for path in (defaults.eval_target, defaults.eval_english)}
        conversations, summary = build(sources[defaults.eval_target], sources[defaults.eval_english])
        files = {}
        for name, records in conversations.items():
            path = found.manifest.parent / f"{name}.jsonl"
            _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            files[path.name] = {"conversations": len(records), "bytes": path.stat().st_size, "sha256": _sha256(path)}
        package = json.loads(defaults.manifest.read_text(encoding="utf-8"))["sources"]["gnome-user-docs"]
        manifest = {"format": FORMAT, "licence": LICENCE, "builder": "elo_cpt.demo.chats",
                    "sources": {"gnome-user-docs": package,
                                **{path.name: {"sha256": _sha256(path)} for path in sources}},
                    **summary, "files": files}
        _write_atomic(found.manifest, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    _log(f"demo conversations ready in {found.manifest.parent}")
    return found
