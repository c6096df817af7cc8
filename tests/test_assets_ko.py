"""Tests of the Korean corpora: HTML cleaning and the Hangul filter on tiny snippets, and (slow) the real ones."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from elo_cpt.demo import assets as assets_module
from elo_cpt.demo.assets import LanguageAssets, prepare_assets, prepare_language
from elo_cpt.files import cache_root
from elo_cpt.errors import EloError
from elo_cpt.demo.textformats import hangul_lines, hangul_share, html_to_text, mallard_to_text

KOREAN = "문서에 하나 이상의 매크로가 포함되어 있을 때 매크로 보안 대화 상자가 나타납니다."
ENGLISH = "Use a master document to organize complex projects, such as a book."

# Shaped like a page of libreoffice-help-ko: chrome around #DisplayArea, untranslated paragraphs, switches.
LIBREOFFICE_PAGE = f"""<!DOCTYPE html>
<html lang="ko"><head><title>마스터 문서</title><script>var x = "스크립트";</script></head>
<body>
<header><a class="logo"><p>LibreOffice 7.4 Help</p></a><button>Module</button></header>
<aside class="leftside"><label>Contents</label></aside>
<div id="DisplayArea">
<h1 id="hd_1">마스터 문서</h1>
  <p id="par_1" class="paragraph">{ENGLISH} <span class="avis">A master document can contain files.</span></p>
  <p id="par_2" class="paragraph">{KOREAN.replace("매크로 보안", "<a href='x.html'>매크로 보안</a>")}</p>
<div class="howtoget"><div><p class="howtogetheader">이 명령을 사용하려면...</p></div>
<div class="howtogetbody"><p class="embedded"><span class="switchinline"><span hidden="true" id="MACtext_1" class="MAC">\
LibreOffice - 환경 설정</span><span hidden="true" id="defaulttext_1">도구 - 옵션</span></span> - 보안 &amp; 개인 정보를\
 선택합니다.</p></div></div>
<span class="switch"><span hidden="true" id="CALCtext_2" class="CALC"><p>계산 시트에서만 보이는 단락입니다.</p></span>\
<span hidden="true" id="WRITERtext_2" class="WRITER"><p>텍스트 문서에서만 보이는 단락입니다.</p></span></span>
<table><tr><td><p>열 너비</p></td><td><p>42</p></td></tr></table>
<p>첫 줄<br>둘째 줄</p>
<div class="bascode"><pre><code>MsgBox "안녕하세요"
End Sub</code></pre></div>
<div class="relatedtopics"><p class="related">관련 주제</p><p><a href="y.html">다른 페이지 제목</a></p></div>
<p hidden="true">숨겨진 단락입니다.</p>
<p><img src="icon.svg" alt="tip"></p>
</div>
<footer><div class="debug"><p>This page is: /text/shared/01/01010001.xhp</p></div></footer>
</body></html>
"""

MALLARD_PAGE = """<page xmlns="http://projectmallard.org/1.0/" id="net-wireless-connect">
  <info><credit><name>Phil Bull</name></credit><desc>무선 네트워크에 연결합니다.</desc></info>
  <title>무선 네트워크 연결</title>
  <p>무선 연결이 가능한 컴퓨터를 가지고 있다면 무선 네트워크에 연결할 수 있습니다.</p>
  <steps>
    <item><p>상단 표시줄의 우측에서 <gui>시스템 메뉴</gui>를 엽니다.</p></item>
    <item><p>Click the name of the network you want.</p></item>
    <item><p><keyseq><key>Ctrl</key><key>V</key></keyseq></p></item>
  </steps>
</page>
"""


def test_html_to_text_keeps_visible_text_and_drops_markup() -> None:
    text = html_to_text(LIBREOFFICE_PAGE, assets_module.LIBREOFFICE_SKIP)
    lines = text.splitlines()
    assert lines[0] == "마스터 문서"  # the <h1>; <head> with its <title> is chrome
    assert f"{ENGLISH} A master document can contain files." in lines  # inline spans join, one line per <p>
    assert KOREAN in lines  # the link's text stays, its markup goes
    assert "도구 - 옵션 - 보안 & 개인 정보를 선택합니다." in lines  # default branch of a switch, entities decoded
    assert "계산 시트에서만 보이는 단락입니다." in lines and "텍스트 문서에서만 보이는 단락입니다." in lines  # no default
    assert ["열 너비", "42"] == lines[lines.index("열 너비"):lines.index("열 너비") + 2]  # one line per cell
    assert ["첫 줄", "둘째 줄"] == lines[lines.index("첫 줄"):lines.index("첫 줄") + 2]  # <br> breaks the line
    for gone in ("<", ">", "LibreOffice 7.4 Help", "Module", "Contents", "스크립트", "환경 설정", "이 명령을",
                 "MsgBox", "관련 주제", "다른 페이지", "숨겨진", "tip", "xhp"):
        assert gone not in text, gone
    assert text == text.strip() and "\n\n" not in text


def test_html_to_text_forgives_unclosed_tags() -> None:
    src = "<html><body><div><p>첫째 단락<p>둘째 단락<ul><li>항목 하나<li>항목 둘</ul></div><p>끝</body>"
    assert html_to_text(src).splitlines() == ["첫째 단락", "둘째 단락", "항목 하나", "항목 둘", "끝"]
    assert html_to_text("<p>a<b>b</i>c</p>") == "abc"  # a stray end tag is ignored


def test_hangul_share_counts_words() -> None:
    assert hangul_share(KOREAN) == 1.0
    assert hangul_share(ENGLISH) == 0.0
    assert hangul_share("12 + 34 = 46") == 0.0  # no letters
    # A Korean sentence naming English terms stays Korean; a particle makes a word Korean.
    assert hangul_share("현재 stable은 bookworm를 가리킵니다.") == 1.0
    assert hangul_share("LibreOffice에서 Microsoft Office 문서를 엽니다.") == pytest.approx(3 / 5)
    assert hangul_share("Press Ctrl+V to paste the 파일.") < 0.5


def test_hangul_lines_keeps_korean_paragraphs_and_drops_english() -> None:
    text = "\n".join([KOREAN, ENGLISH, "Ctrl+V", "42", "현재 stable은 bookworm를 가리킵니다."])
    assert hangul_lines(text) == f"{KOREAN}\n현재 stable은 bookworm를 가리킵니다."
    assert hangul_lines(text, min_share=0.0) == text


def test_korean_evaluation_page() -> None:
    text = hangul_lines(mallard_to_text(MALLARD_PAGE))
    assert text.splitlines() == [
        "무선 네트워크 연결",
        "무선 연결이 가능한 컴퓨터를 가지고 있다면 무선 네트워크에 연결할 수 있습니다.",
        "상단 표시줄의 우측에서 시스템 메뉴를 엽니다.",
    ]  # untranslated step and bare key names dropped, <info> never read


def test_korean_documents_filters_deduplicates_and_drops_stubs(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text(LIBREOFFICE_PAGE, encoding="utf-8")
    (text,) = assets_module._html_pages([page], assets_module.LIBREOFFICE_SKIP, "test")
    evaluation_line = "계산 시트에서만 보이는 단락입니다."
    seen = {evaluation_line}
    extra = "이 페이지에만 있는 긴 한국어 문장이 하나 더 있습니다. 문서가 너무 짧지 않도록 충분히 길게 씁니다."
    other = f"다른 페이지\n{KOREAN}\n{ENGLISH}\n{extra}\n{extra}"
    stub = "제목만 있는 페이지"
    docs = assets_module._korean_documents([text, other, stub], seen)
    assert len(docs) == 2  # the stub is under MIN_KO_DOC_CHARS
    first, second = (doc.splitlines() for doc in docs)
    assert KOREAN in first and ENGLISH not in docs[0] and evaluation_line not in first
    assert "42" not in first and "열 너비" in first
    assert second == ["다른 페이지", extra]  # each line once, across pages and within one
    assert stub not in seen  # a dropped stub's line may still come with a later page
    assert KOREAN in seen and evaluation_line in seen


def test_unsupported_language_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(EloError, match=r"'ja'.*supported: de, ko") as error:
        prepare_language("ja", tmp_path / "cache")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()  # failed before touching anything


def _lines(path: Path) -> list[str]:
    return [line for doc in path.read_text(encoding="utf-8").split("\n\n") for line in doc.splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_prepare_language_ko_real(monkeypatch: pytest.MonkeyPatch) -> None:
    found = prepare_language("ko")  # the real cache: $ELO_CPT_CACHE or the default
    defaults = prepare_assets()
    assert found == LanguageAssets(language="ko", train=cache_root() / "ko/train.jsonl",
                                   eval=cache_root() / "ko/eval.txt", manifest=cache_root() / "ko/manifest.json",
                                   train_english=defaults.train_english, eval_english=defaults.eval_english)

    manifest = json.loads(found.manifest.read_text(encoding="utf-8"))
    assert manifest["language"] == "ko"
    for package, licence in (("libreoffice-help-ko", "MPL-2.0"), ("gnome-user-docs", "CC-BY-SA-3.0"),
                             ("debian-faq-ko", "SPI")):
        source = manifest["sources"][package]
        assert source["version"] and len(source["sha256"]) == 64 and licence in source["licence"]
    for path in (found.train, found.eval):
        entry = manifest["files"][path.name]
        assert entry["bytes"] == path.stat().st_size and len(entry["sha256"]) == 64

    train = [json.loads(line)["text"] for line in found.train.read_text(encoding="utf-8").splitlines()]
    evaluation = found.eval.read_text(encoding="utf-8").rstrip("\n").split("\n\n")
    assert len(train) == manifest["files"]["train.jsonl"]["documents"] > 1000
    assert sum(map(len, train)) == manifest["files"]["train.jsonl"]["characters"] > 500_000
    assert len(evaluation) == manifest["files"]["eval.txt"]["documents"] > 200
    assert sum(map(len, evaluation)) == manifest["files"]["eval.txt"]["characters"] > 100_000
    assert len(set(train)) == len(train)
    assert all(len(doc) >= assets_module.MIN_KO_DOC_CHARS and "\n\n" not in doc for doc in train + evaluation)
    train_lines = [line for doc in train for line in doc.splitlines()]
    assert len(set(train_lines)) == len(train_lines)  # each line once
    assert all(hangul_share(line) >= 0.5 for line in train_lines + _lines(found.eval))
    assert not set(train_lines) & set(_lines(found.eval))  # disjoint from evaluation
    # Tags may be quoted in prose ("<h1> 태그"), but no attribute of the HTML itself survives.
    assert not any(marker in doc for doc in train for marker in ('class="', "href=", 'id="par_id'))

    # German is the default set, unchanged.
    german = prepare_language("de")
    assert (german.train, german.eval, german.manifest) == (defaults.train_target, defaults.eval_target,
                                                           defaults.manifest)

    # Prepared once: a second call only checks sizes, never fetches.
    def no_fetch(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetched again")

    monkeypatch.setattr(assets_module, "_fetch_debs", no_fetch)
    mtimes = {p: p.stat().st_mtime_ns for p in found.manifest.parent.iterdir()}
    start = time.perf_counter()
    assert prepare_language("ko") == found
    assert time.perf_counter() - start < 2.0
    assert {p: p.stat().st_mtime_ns for p in found.manifest.parent.iterdir()} == mtimes
