"""Paste the tables of finished studies into docs/results.md (and their plots into docs/results-LANG.png).

    python scripts/paste_study_tables.py de=runs/study-de ko=runs/study-ko

Each study folder's `results.md` (run `elo study ... --out DIR` or `elo_cpt.study_runner.collect(DIR)` first) gives the
tables from its `## Main comparison` to its plot, headings demoted one level, and its `Machine:` line; they
replace the same blocks of the German or Korean section of docs/results.md. The hand-written readings stay.
"""

import re
import shutil
import sys
from pathlib import Path

TITLES = {"de": "German", "ko": "Korean"}
DOCS = Path(__file__).resolve().parent.parent / "docs"


def paste(doc: str, lang: str, folder: Path) -> str:
    src = (folder / "results.md").read_text()
    machine = re.search(r"^Machine: .*$", src, re.M).group(0)
    tables = re.sub(r"^## ", "### ", src[src.index("## Main comparison"):src.index("![")].rstrip() + "\n", flags=re.M)
    start = doc.index(f"## {TITLES[lang]}")
    m_start = doc.index("Machine: ", start)
    doc = doc[:m_start] + machine + doc[doc.index("\n", m_start):]
    t_start = doc.index("### Main comparison", start)
    doc = doc[:t_start] + tables + "\n" + doc[doc.index("![", t_start):]
    shutil.copy(folder / "results.png", DOCS / f"results-{lang}.png")
    return doc


if __name__ == "__main__":
    path = DOCS / "results.md"
    text = path.read_text()
    for arg in sys.argv[1:]:
        lang, _, folder = arg.partition("=")
        text = paste(text, lang, Path(folder))
    path.write_text(text)
