"""The README and the docs stay navigable: every relative link resolves, every ``#anchor`` names a heading.

Checked files: README.md, every ``.md`` under docs/, and serving/README.md. A link is
``[text](target)``, ``![alt](target)`` or a reference definition ``[label]: target``, outside
fenced code and inline code. Relative targets are resolved from the linking file's folder and must
exist; an ``#anchor`` (alone: the same file) must equal the GitHub slug of a heading of the target
(lower-case, punctuation other than ``-`` and ``_`` removed, spaces to ``-``, ``-1``, ``-2``... for
repeated headings). The README also stays short enough for a newcomer.

Pure Python, no imports of the package: runs in well under a second.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_CHARS = 12_500

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, //host


def checked_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "serving" / "README.md"]
    return [path for path in files if path.is_file()]


def prose_lines(text: str, blank_inline_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked unless asked not to."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) == {fence[0]}:
                fence = None
            continue
        lines.append((number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line) if blank_inline_code else line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower-case, punctuation but - and _ removed, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "-_ ")
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    """The heading texts of a markdown file, in order (ATX ``#`` and setext underlined headings)."""
    found, previous = [], ""
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_inline_code=False):
        atx = ATX_HEADING.match(line)
        if atx:
            found.append(atx.group(2) or "")
            previous = ""
            continue
        if SETEXT_UNDERLINE.match(line) and previous.strip() and not previous.lstrip().startswith(("-", "*", "|", ">")):
            found.append(previous.strip())
            previous = ""
            continue
        previous = line
    return found


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the headings of ``path`` (repeated slugs get -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in headings(path):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        found.extend((number, match.group(1)) for match in INLINE_LINK.finditer(line))
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        where = f"{path.relative_to(ROOT)}:{number}: {target!r}"
        if not target:
            problems.append(f"{where}: empty link target")
            continue
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        if file_part.startswith("/"):
            problems.append(f"{where}: absolute path; link relative to the file instead")
            continue
        if not destination.exists():
            problems.append(f"{where}: {destination} does not exist")
            continue
        if ROOT not in destination.parents and destination != ROOT:
            problems.append(f"{where}: points outside the repository")
            continue
        if anchor:
            if destination.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into a file that is not markdown")
            elif unquote(anchor) not in anchors(destination):
                known = ", ".join(sorted(anchors(destination)))
                problems.append(
                    f"{where}: no heading of {destination.relative_to(ROOT)} has the anchor #{anchor} (known: {known})"
                )
    return problems


# ------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Quick start", "quick-start"),
        ("Training on a 4-bit base (QLoRA-style)", "training-on-a-4-bit-base-qlora-style"),
        ("`adapter: neat` (`NeatConfig`)", "adapter-neat-neatconfig"),
        ("NEAT against LoRA and PEFT's PEANuT", "neat-against-lora-and-pefts-peanut"),
        ("Multi-GPU: DeepSpeed ZeRO-2/3, FSDP, DDP", "multi-gpu-deepspeed-zero-23-fsdp-ddp"),
        ("snake_case and [a link](x.md)", "snake_case-and-a-link"),
        ("1. Install", "1-install"),
    ],
)
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_the_checker_sees_links_anchors_and_code(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "target.md").write_text(
        "# Title\n\n## Same\n\n## Same\n\n### `code: x` (`Y`)\n\nSetext\n------\n", encoding="utf-8"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "\n".join(
            [
                "# Page",
                "[ok](target.md) [ok](target.md#title) [ok](target.md#same-1) [ok](target.md#setext) [ok](#page)",
                "[ok](target.md#code-x-y) [ok](./target.md#same)",
                "![img](missing.png) [bad](target.md#nope) [bad](#nowhere) [ext](https://example.com/x.md)",
                "`[in code](missing-in-code.md)`",
                "```",
                "[in a fence](missing-in-fence.md)",
                "```",
                "[ref]: missing-ref.md",
            ]
        ),
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert len(problems) == 4, problems
    assert [p.split(": ", 2)[1] for p in problems] == [
        "'missing.png'",
        "'target.md#nope'",
        "'#nowhere'",
        "'missing-ref.md'",
    ]


# ------------------------------------------------------------------------------------- the files


def test_the_checked_files_are_there():
    names = {path.relative_to(ROOT).as_posix() for path in checked_files()}
    assert "README.md" in names and "serving/README.md" in names
    assert {"docs/architecture.md", "docs/methods/neuroada.md", "docs/methods/neat.md"} <= names


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_every_docs_page_is_reachable_from_the_readme():
    """Following relative links from README.md reaches every page under docs/."""
    reached, queue = set(), [ROOT / "README.md"]
    while queue:
        page = queue.pop()
        if page in reached:
            continue
        reached.add(page)
        for _, target in links(page):
            file_part = target.partition("#")[0]
            if file_part and not EXTERNAL.match(target):
                destination = (page.parent / unquote(file_part)).resolve()
                if destination.suffix == ".md" and destination.is_file() and ROOT in destination.parents:
                    queue.append(destination)
    unreached = sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md") if p.resolve() not in reached
    )
    assert not unreached, f"docs pages no link from README.md leads to: {unreached}"


def test_the_readme_is_short():
    size = len((ROOT / "README.md").read_text(encoding="utf-8"))
    assert size <= README_MAX_CHARS, (
        f"README.md has {size:,} characters (at most {README_MAX_CHARS:,}): move detail to docs/"
    )
