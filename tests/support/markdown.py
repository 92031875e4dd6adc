"""Reading the measured figures of README.md and docs/*.md back: sections, tables, code blocks."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def result(name: str) -> dict:
    """A committed result file under bench/results/ (NaN in the file reads as nan)."""
    return json.loads((RESULTS / name).read_text())


def section(path: str, heading: str) -> str:
    """The text under the heading line `heading` (e.g. "## Measured") of a file of the repository, up to the next
    heading of the same or a higher level."""
    text = (ROOT / path).read_text()
    level = heading.split(" ", 1)[0]
    start = text.index("\n" + heading + "\n") + len(heading) + 2
    end = re.search(rf"^#{{1,{len(level)}}} ", text[start:], re.M)
    return text[start:start + end.start()] if end else text[start:]


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text`: a list of rows (header first, the separator row left out), each a list of
    its cells, stripped."""
    out: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines() + [""]:
        if re.fullmatch(r"\|[-:| ]+\|", line.strip()):
            continue
        if line.startswith("|"):
            current.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif current:
            out.append(current)
            current = []
    return out


def code_blocks(text: str) -> list[str]:
    """The fenced code blocks of `text`, without the fences."""
    return re.findall(r"^```[a-z]*\n(.*?)^```$", text, re.M | re.S)
