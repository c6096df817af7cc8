"""Plain text out of the formats the default corpora come in: roff man pages, fortune files, Mallard help pages, HTML.

A leaf module with no dependency beyond the standard library, so the cleaners can be tested on small fixtures.
"""

from __future__ import annotations

import re
import unicodedata
import xml.etree.ElementTree as ET
from html.parser import HTMLParser


def _normalise(text: str) -> str:
    """NFC, no control characters but tab and newline, no trailing spaces, at most one blank line in a row."""
    # C1 controls in these files are Windows-1252 punctuation that was stored as if it were Latin-1.
    text = re.sub("[\x80-\x9f]", lambda m: m[0].encode("latin-1").decode("cp1252", "ignore"), text)
    text = unicodedata.normalize("NFC", re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text.replace("\r\n", "\n")))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def parse_fortunes(src: str) -> list[str]:
    """Split a fortune file (each fortune ended by a line holding only `%`) into cleaned fortunes."""
    fortunes = []
    for chunk in re.split(r"^%[ \t]*$", src, flags=re.M):
        if "\b" in chunk:  # typewriter overstrike (`_\bx`, `____\b\b\b\bword`): keep what was typed last
            kept: list[str] = []
            for ch in chunk:
                if ch != "\b":
                    kept.append(ch)
                elif kept and kept[-1] != "\n":
                    kept.pop()
            chunk = "".join(kept)
        if text := _normalise(chunk):
            fortunes.append(text)
    return fortunes


_GLYPHS = {"en": "–", "em": "—", "hy": "-", "mi": "-", "bu": "•", "aq": "'", "dq": '"', "lq": "“", "rq": "”",
           "oq": "‘", "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "co": "©", "rg": "®", "tm": "™",
           "at": "@", "rs": "\\", "ha": "^", "ti": "~", "sl": "/", "ga": "`", "de": "°", "mu": "×",
           "di": "÷", "+-": "±", "mc": "µ", "pd": "∂", "if": "∞", "is": "∫", "->": "→", "<-": "←", "<=": "≤",
           ">=": "≥", "!=": "≠", "12": "½", "14": "¼", "34": "¾", "S1": "¹", "S2": "²", "S3": "³", "la": "⟨",
           "ra": "⟩", "ss": "ß", "sc": "§", "ps": "¶", "Eu": "€", "eu": "€", "ba": "|", "br": "|", "or": "|",
           "ul": "_"}
_STRINGS = {"Aq": "'", "C`": '"', "C'": '"', 'L"': "“", 'R"': "”", "lq": "“", "rq": "”", "--": "–",
            "PI": "π", "R": "®", "Tm": "™"}
_ACCENTS = {"'": "\u0301", "`": "\u0300", ":": "\u0308", "^": "\u0302", "~": "\u0303", ",": "\u0327", "o": "\u030a"}
_GREEK = dict(zip("abgdezyhiklmncoprstufxqw", "αβγδεζηθικλμνξοπρστυφχψω", strict=True))
_ONE_CHAR = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "'": "'", "`": "`",
             ".": ".", "_": "_"}  # any other one-letter escape (\& \% \| \^ \c \/ \, ...) prints nothing
_ESCAPE = re.compile(
    r"\\(?:\((?P<g2>..)|\[(?P<gb>[^\]]*)\]"  # glyphs \(xx \[name]
    r"|\*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.))"  # strings \*x \*(xx \*[name]
    r"|[fFgkmMnVY](?:\(..|\[[^\]]*\]|.)"  # fonts, colours, registers
    r"|s[-+]?(?:\d|\(\d\d|\[[^\]]*\]|'[^']*')"  # point size
    r"|[ABbCDhHlLNoRSvwxXZ]'[^']*'"  # motions, widths, device controls
    r"|(?P<c>.))")
_COMMENT = re.compile(r"(?<!\\)((?:\\\\)*)\\[\"#].*")
_ARG = re.compile(r'"((?:[^"]|"")*)"?|((?:\\.|[^\s\\])+)')


def _glyph(name: str) -> str:
    if name in _GLYPHS:
        return _GLYPHS[name]
    if len(name) == 2 and name[0] == "*" and name[1].lower() in _GREEK:
        greek = _GREEK[name[1].lower()]
        return greek.upper() if name[1].isupper() else greek
    if len(name) == 2 and name[0] in _ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if m := re.fullmatch(r"u([0-9A-Fa-f]{4,6}(?:_[0-9A-Fa-f]{4,6})*)", name):  # \[u00E4], \[u0061_0308]
        return unicodedata.normalize("NFC", "".join(chr(int(code, 16)) for code in m[1].split("_")))
    return chr(int(name[4:])) if re.fullmatch(r"char\d+", name) else ""


def _unescape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        if (glyph := m["g2"] or m["gb"]) is not None:
            return _glyph(glyph)
        if (string := m["s2"] or m["sb"] or m["s1"]) is not None:
            return _STRINGS.get(string, "")
        return _ONE_CHAR.get(m["c"], "") if m["c"] is not None else ""
    return _ESCAPE.sub(one, text)


_SECTIONS = {"SH", "SS", "Sh", "Ss"}
_PARAGRAPHS = {"PP", "P", "LP", "Pp", "sp", "HP"}
_BREAKS = {"br", "TP", "TQ", "IP", "It", "RS", "RE", "nf", "fi", "EX", "EE", "Vb", "Ve", "Bl", "El", "Bd", "Ed",
           "Dl", "SY", "YS", "TS", "TE", "in", "ti"}
_ALTERNATING = {"BR", "BI", "IB", "IR", "RB", "RI"}  # fonts alternate between arguments, no spaces between
_WITH_TEXT = _SECTIONS | _ALTERNATING | {
    "B", "I", "SB", "SM", "SY", "OP", "IP", "It", "Nm", "Nd", "Ar", "Cm", "Op", "Xr", "Pa", "Dq", "Qq", "Sq", "Pq",
    "Aq", "Sx", "Ev", "Em", "Ic", "Ql", "Sy", "Dl", "Li", "Va", "Dv", "Fl", "An", "Lk", "Mt", "Fn", "Fa", "Ft",
    "Vt", "Er", "Tn"}
_MDOC_CALLABLE = {"Ar", "Cm", "Op", "Oo", "Oc", "Ns", "Pa", "Xr", "Dq", "Sq", "Qq", "Pq", "Ql", "Em", "Sy", "Ev",
                  "Ic", "Li", "Nm", "Va", "Dv", "Aq", "No", "Pf", "Sx"}


def _request_text(name: str, args: list[str]) -> str:
    if name == "IP":  # `.IP tag indent`: only the tag is printed
        args = args[:1]
    if name == "Xr" and len(args) >= 2:  # mdoc cross reference: `ls 1` prints `ls(1)`
        args = [f"{args[0]}({args[1]})", *args[2:]]
    if name[0].isupper() and name[1:].islower():  # mdoc: inner macro names are markup, `Fl x` prints `-x`
        words, dash = [], False
        for arg in args:
            if arg == "Fl":
                dash = True
            elif arg not in _MDOC_CALLABLE:
                words.append("-" + arg if dash else arg)
                dash = False
        args = words
    return ("" if name in _ALTERNATING else " ").join(_unescape(a) for a in args)


def roff_to_text(src: str) -> str:
    """Plain text of a man page written in roff (man or mdoc macros), without needing groff: groff's output varies
    with its version and settings, and the demo corpus must be byte-identical everywhere (docs/design.md).

    Filled paragraphs become single lines; section headings stand after a blank line; tables keep one
    line per row. Requests that only format (spacing, fonts, registers, macro definitions) vanish.
    """
    out: list[str] = []
    line_words: list[str] = []
    fill, tag_pending, table, skip_to_dots, brace_depth = True, False, "", False, 0

    def flush(blank: bool = False) -> None:
        if line_words:
            out.append(" ".join(line_words))
            line_words.clear()
        if blank:
            out.append("")

    def emit(text: str) -> None:
        nonlocal tag_pending
        if not text.strip():
            return
        line_words.append(text) if fill and not table else out.append(text)
        if tag_pending:  # the line after `.TP` is the tag, set on a line of its own
            flush()
            tag_pending = False

    for raw in src.splitlines():
        if brace_depth:  # body of a dropped `.if`/`.ie`/`.el` block
            brace_depth += raw.count("\\{") - raw.count("\\}")
            continue
        if skip_to_dots:  # body of `.de`/`.ig`
            skip_to_dots = raw.strip() != ".."
            continue
        if table == "format":  # tbl options and format lines end with the first line ending in `.`
            table = "rows" if raw.rstrip().endswith(".") else table
            continue
        if raw.lstrip().startswith('\\"'):
            continue
        line = _COMMENT.sub(r"\1", raw)
        if line[:1] not in (".", "'"):
            if table:
                row = _unescape(line.replace("T{", "").replace("T}", "")).replace("\t", "  ").strip()
                emit("" if row in ("_", "=") else row)
            elif not line.strip():
                flush(blank=True)
            else:
                if line[:1].isspace():
                    flush()
                emit(_unescape(line).strip() if fill else _unescape(line).rstrip())
            continue
        name, _, rest = line[1:].strip().partition(" ")
        if name in ("if", "ie", "el"):
            brace_depth = line.count("\\{") - line.count("\\}")
            continue
        if name in ("de", "de1", "am", "ig"):
            skip_to_dots = True
            continue
        if name in _SECTIONS or name in _PARAGRAPHS:
            flush(blank=True)
        elif name in _BREAKS:
            flush()
        fill = {"nf": False, "EX": False, "Vb": False, "fi": True, "EE": True, "Ve": True}.get(name, fill)
        table = {"TS": "format", "TE": ""}.get(name, table)
        tag_pending = name == "TP" or (tag_pending and name not in _SECTIONS | _PARAGRAPHS)
        if name in _WITH_TEXT:
            args = [m[2] if m[1] is None else m[1].replace('""', '"') for m in _ARG.finditer(rest)]
            if name in _SECTIONS and not args:
                tag_pending = True  # heading on the next line
            emit(_request_text(name, args))
            if name in _SECTIONS:
                flush()
    flush()
    return _normalise("\n".join(out))


_MALLARD_SKIP = {"info", "comment", "links", "credit", "license", "include"}  # not visible, or metadata
_MALLARD_BLOCKS = {"page", "section", "title", "subtitle", "p", "item", "td", "th", "tr", "note", "steps", "list",
                   "terms", "tree", "table", "example", "figure", "desc", "synopsis", "screen", "quote", "div"}
_MALLARD_JOINS = {"keyseq": "+", "guiseq": " ▸ "}


def mallard_to_text(src: str) -> str:
    """Visible text of a Mallard `.page`: one line per title, paragraph, list item or table cell.

    Metadata (`<info>`), editorial comments and automatic link lists are dropped; of an `if:choose`
    only the first branch is kept, so text meant for other platforms is not repeated.
    """
    parts: list[str] = []

    def walk(el: ET.Element, pre: bool) -> None:
        tag = el.tag.rsplit("}", 1)[-1]
        if tag in _MALLARD_SKIP:
            return
        children = list(el)[:1] if tag == "choose" else list(el)
        if tag == "media":  # an image; its inline fallback text stands in for it, block captions are dropped
            children = []
        pre = pre or tag == "screen"
        block = tag in _MALLARD_BLOCKS
        parts.append("\n" if block else "")
        parts.append(text(el.text, pre))
        for i, child in enumerate(children):
            if i and tag in _MALLARD_JOINS:
                parts.append(_MALLARD_JOINS[tag])
            walk(child, pre)
            if tag not in _MALLARD_JOINS or (child.tail or "").strip():
                parts.append(text(child.tail, pre))
        parts.append("\n" if block else "")

    def text(s: str | None, pre: bool) -> str:
        return (s or "") if pre else re.sub(r"\s+", " ", s or "")

    walk(ET.fromstring(src), pre=False)
    lines = (re.sub(" {2,}", " ", line).strip() for line in "".join(parts).split("\n"))
    return _normalise("\n".join(line for line in lines if line))


_HTML_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track",
              "wbr"}
_HTML_SKIP = {"head", "script", "style", "noscript", "template", "header", "footer", "aside", "nav", "button",
              "select", "textarea", "svg", "math"}  # invisible, or page chrome around the content
_HTML_BLOCKS = {"address", "article", "blockquote", "caption", "dd", "details", "div", "dl", "dt", "figcaption",
                "figure", "h1", "h2", "h3", "h4", "h5", "h6", "li", "main", "ol", "p", "pre", "section", "summary",
                "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul"}


class _HtmlNode:
    __slots__ = ("tag", "attrs", "children")

    def __init__(self, tag: str, attrs: dict[str, str | None]) -> None:
        self.tag, self.attrs = tag, attrs
        self.children: list[_HtmlNode | str] = []


class _HtmlTree(HTMLParser):
    """A forgiving element tree: void elements never nest, an end tag closes everything opened after its start tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _HtmlNode("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "p" and self.stack[-1].tag == "p":  # `<p>` implicitly ends an open paragraph
            self.stack.pop()
        node = _HtmlNode(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in _HTML_VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(_HtmlNode(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def _switch_branches(node: _HtmlNode) -> list[_HtmlNode | str]:
    """Children of a LibreOffice help `switch`/`switchinline` that a reader without module or system context sees.

    Each branch is a hidden span shown by JavaScript: `MAC...`, `WIN...`, `WRITER...`, `CALC...` or `default...`.
    The default branch wins where there is one (the others repeat it for another system); without one, the
    branches are module-specific text and all are kept.
    """
    branches = [c for c in node.children if isinstance(c, _HtmlNode)]
    default = [c for c in branches if (c.attrs.get("id") or "").startswith("default")]
    return default[:1] or branches


def html_to_text(src: str, skip_classes: frozenset[str] | set[str] = frozenset()) -> str:
    """Visible text of an HTML page: one line per heading, paragraph, list item or table cell.

    Page chrome (`<head>`, scripts, `<header>`, `<nav>`, `<aside>`, `<footer>`), images and `hidden` elements are
    dropped, and so is every element with a class in `skip_classes`; of a LibreOffice help switch only the branch
    a reader without context sees is kept. `<pre>` keeps its line breaks, `<br>` breaks the line.
    Standard library only (html.parser).
    """
    tree = _HtmlTree()
    tree.feed(src)
    tree.close()
    parts: list[str] = []

    def walk(node: _HtmlNode, pre: bool) -> None:
        classes = set((node.attrs.get("class") or "").split())
        if node.tag in _HTML_SKIP or classes & skip_classes:
            return
        if node.tag == "br":
            parts.append("\n")
            return
        switch = bool(classes & {"switch", "switchinline"})
        children = _switch_branches(node) if switch else node.children
        pre = pre or node.tag == "pre"
        block = node.tag in _HTML_BLOCKS
        parts.append("\n" if block else "")
        for child in children:
            if isinstance(child, str):
                parts.append(child if pre else re.sub(r"\s+", " ", child))
            elif switch or "hidden" not in child.attrs:
                walk(child, pre)
        parts.append("\n" if block else "")

    walk(tree.root, pre=False)
    lines = (re.sub(" {2,}", " ", line).strip() for line in "".join(parts).split("\n"))
    return _normalise("\n".join(line for line in lines if line))


def _is_hangul(ch: str) -> bool:
    code = ord(ch)
    return (0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F
            or 0xA960 <= code <= 0xA97F or 0xD7B0 <= code <= 0xD7FF)


_WORD = re.compile(r"[^\W\d_]+")  # a run of letters


def hangul_share(text: str) -> float:
    """Share of the words (runs of letters) of `text` that contain Hangul; 0.0 when it has no letters.

    Words, not letters: a Hangul syllable is one character where an English term is several, so a Korean
    sentence naming `stable`, `bookworm` or `LibreOffice` would otherwise look foreign. A word with a
    particle attached (`bookworm를`) counts as Korean.
    """
    words = _WORD.findall(text)
    return sum(any(map(_is_hangul, word)) for word in words) / len(words) if words else 0.0


def hangul_lines(text: str, min_share: float = 0.5) -> str:
    """The lines of `text` whose words are at least `min_share` Korean (see `hangul_share`), in order."""
    return "\n".join(line for line in text.split("\n") if hangul_share(line) >= min_share)
