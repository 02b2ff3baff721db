"""The README and docs/ cannot rot: their Python examples run, and their links resolve.

* Every ```python block of README.md runs as written (in a temporary directory, on tiny presets),
  and the blocks under "A first model" and "A plugin" do what the text around them says.
* Every relative link in README.md and docs/*.md names an existing file, and an ``#anchor`` names
  a heading of the page it points to.
* Code comments cite docs/ pages (``docs/memory.md, "Section"``) that exist, with sections that
  exist, and never the design notes outside the repository that users do not have.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from pathlib import Path

import pytest
import torch
from torch import nn

import memforge

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
SOURCE_DIRS = ("memforge", "plugins", "tests", "benchmarks", "examples")

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*$", re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_CITATION = re.compile(r'docs/([\w-]+\.md)(?:,\s*"([^"]+)")?')


def _without_code(text: str) -> str:
    """``text`` with fenced code blocks blanked out (links and headings there are not real)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _python_blocks(text: str) -> list[tuple[str, str]]:
    """``(section heading, code)`` of every ```python block, in order."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match.group(1) == "python":
            headings = _HEADING.findall(_without_code(text[: match.start()]))
            blocks.append((headings[-1][1] if headings else "", match.group(2)))
    return blocks


def _headings(path: Path) -> list[str]:
    """The heading titles of a Markdown page, as written."""
    return [title for _, title in _HEADING.findall(_without_code(path.read_text(encoding="utf-8")))]


def _slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


README_BLOCKS = _python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_the_examples_it_promises() -> None:
    sections = [section for section, _ in README_BLOCKS]
    assert "A first model" in sections
    assert "A plugin" in sections


@pytest.mark.parametrize(("section", "code"), README_BLOCKS, ids=[s for s, _ in README_BLOCKS])
def test_readme_python_block_runs(section: str, code: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block runs on its own, in a fresh namespace, as a user would paste it."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md ({section})", "exec"), namespace)  # noqa: S102 - our own README
    if section == "A first model":
        spec, out = namespace["spec"], namespace["out"]
        assert out.logits.shape == (2, 128, spec.vocab_size)
        assert namespace["more"].logits.shape == (2, 64, spec.vocab_size)
        assert namespace["more"].state.position == 128 + 64
        assert namespace["text"].shape == (2, 16 + 32)
        assert memforge.load_spec(tmp_path / "my_model.toml") == spec
    if section == "A plugin":
        assert "mylab.gelu_mlp" in memforge.available("feedforward")
        model = namespace["model"]
        assert all(isinstance(block.feedforward, nn.Sequential) for block in model.blocks)
        tokens = torch.randint(0, model.vocab_size, (2, 9))
        assert torch.isfinite(model(tokens).logits).all()


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in map(_slug, _headings(linked)):
            broken.append(f"{target} (no heading #{anchor} in {linked.name})")
    assert broken == [], f"{page.name}: broken links {broken}"


def _source_files() -> list[Path]:
    files = [path for folder in SOURCE_DIRS for path in (ROOT / folder).rglob("*.py")]
    return sorted(path for path in files if path != Path(__file__).resolve())


def test_code_cites_existing_docs_sections() -> None:
    bad = []
    for path in _source_files():
        text = path.read_text(encoding="utf-8")
        for match in _CITATION.finditer(text):
            page = ROOT / "docs" / match.group(1)
            where = f"{path.relative_to(ROOT)}: docs/{match.group(1)}"
            if not page.exists():
                bad.append(f"{where} does not exist")
                continue
            # A citation may wrap onto the next comment line.
            section = match.group(2) and " ".join(re.sub(r"\n\s*#?", " ", match.group(2)).split())
            if section and section not in _headings(page):
                bad.append(f'{where} has no section "{section}"')
    assert bad == []


def _beside_the_repository(path: Path, reference: str) -> bool:
    """Whether ``reference`` (a path relative to a parent folder), read from ``path``'s folder or
    from the repository root, lands next to the checkout rather than in it: notes a user's copy
    does not have."""
    for start in (path.parent, ROOT):
        target = (start / reference).resolve()
        if target.is_relative_to(ROOT.parent) and not target.is_relative_to(ROOT):
            return True
    return False


def _prose(path: Path) -> list[tuple[int, str]]:
    """The comments and docstrings of a Python file, with their first line numbers."""
    source = path.read_text(encoding="utf-8")
    found = [(token.start[0], token.string)
             for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            found.append((body[0].lineno, body[0].value.value))
    return found


#: A path that climbs out of its folder: parent-directory segments, then a name.
CLIMBING_PATH = re.compile(rf"(?:{re.escape(os.pardir + '/')})+[\w.-]+")
#: A numbered section of a design spec, which lives beside the checkout, not in it.
SPEC_SECTION = re.compile(r"\bspec \N{SECTION SIGN}")


def test_code_never_cites_notes_outside_the_repository() -> None:
    hits = [f"{path.relative_to(ROOT)}:{number}"
            for path in _source_files()
            for number, text in _prose(path)
            if SPEC_SECTION.search(text)
            or any(_beside_the_repository(path, ref) for ref in CLIMBING_PATH.findall(text))]
    assert hits == [], "cite docs/ pages instead: " + ", ".join(hits)
