"""The README and docs/ hold together: offline, no rendering.

- every relative link or image in README.md and docs/*.md points at a file or folder that
  exists; a link `file.md#anchor` (or `#anchor` in the same file) names a heading of that
  file, by GitHub's slug of the heading;
- the README still shows the two commands, byte for byte: `.ci/run` runs the test command
  verbatim (it holds a copy of it), so the two must stay the same.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUN_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q -c constraints.txt -e . "
    "&& dvc repro"
)

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the target ends at whitespace or ')'
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    found = []
    for n, line in prose_lines(path.read_text(encoding="utf-8")):
        bare = CODE_SPAN.sub("", line)
        found += [(n, m.group(1)) for m in INLINE_LINK.finditer(bare)]
        ref = REF_DEF.match(bare)
        if ref:
            found.append((n, ref.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped
    (letters, digits, '_' and '-' kept), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links, images -> their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def test_slug_matches_github():
    assert slug("LAION / open_clip checkpoints") == "laion--open_clip-checkpoints"
    assert slug("Downloads, GPUs and scale-out") == "downloads-gpus-and-scale-out"
    assert slug("The decoder objective (issue 19, first seed only)") == (
        "the-decoder-objective-issue-19-first-seed-only"
    )
    assert slug("`train_caption`") == "train_caption"


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert len(DOCS) > 1, "docs/*.md missing"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for n, target in links(doc):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        where = f"{doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}:{n}: {target}"
        if not dest.exists():
            broken.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{where}: no heading with that anchor in {dest.name}")
    assert not broken, "\n".join(broken)


def bash_blocks(text: str) -> list[str]:
    """The lines of every ```bash fenced block."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        if line.startswith("```"):
            inside = line.strip() == "```bash" if not inside else False
            continue
        if inside:
            out.append(line)
    return out


def ci_command() -> str:
    """The command .ci/run runs: its one line that is not a comment, `set` or `cd`."""
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_keeps_the_two_commands():
    readme = bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert RUN_COMMAND in readme, "the README's run command changed"
    assert ci_command() in readme, "the README's test command is not the one .ci/run runs"
