"""Every reference to a file points to a file that exists: the relative links in the Markdown
files, and the `*.md` names in the comments and docstrings of code and config files."""

import ast
import io
import os
import re
import tokenize
from pathlib import Path

import pytest
from helpers import ROOT

SKIP_DIRS = {"__pycache__", "mlruns", "multirun", "outputs"}  # besides hidden ones (.git, .venv, ...)
# Names that are MLflow artifacts of a run, not files in the checkout.
ARTIFACT_NAMES = {"sweep.md"}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)  # [id]: target
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
MD_NAME = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")


def repo_files(*suffixes: str) -> list[Path]:
    """The checkout's files ending in `suffixes` (".sh" also takes scripts with a #! line and no suffix)."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info") and d[0] != "." or d == ".ci"]
        for name in files:
            path = Path(folder, name)
            if path.suffix in suffixes or (".sh" in suffixes and not path.suffix and path.read_bytes()[:2] == b"#!"):
                found.append(path)
    return sorted(found)


def links(markdown: str) -> list[str]:
    """Relative link targets, anchors dropped; links inside code are not links."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    targets = LINK.findall(text) + REFERENCE.findall(text)
    relative = [t for t in targets if not re.match(r"^[a-zA-Z][\w+.-]*:", t) and not t.startswith("#")]
    return [t.split("#")[0] for t in relative]


def python_comments(source: str) -> str:
    """The comments and docstrings of a Python file."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = [token.string for token in tokens if token.type == tokenize.COMMENT]
    documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    docs = [ast.get_docstring(node) or "" for node in ast.walk(ast.parse(source)) if isinstance(node, documented)]
    return "\n".join(comments + docs)


def hash_comments(source: str) -> str:
    """The comments of a YAML, TOML or shell file: what follows a `#` at a line's start or after a space."""
    return "\n".join(m.group(1) for m in re.finditer(r"(?:^|\s)#(.*)$", source, re.M))


def exists(name: str, mentioned_in: Path, basenames: set[str]) -> bool:
    if (ROOT / name).is_file() or (mentioned_in.parent / name).is_file():
        return True
    return "/" not in name and (name in basenames or name in ARTIFACT_NAMES)


@pytest.mark.parametrize("page", repo_files(".md"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_in_a_markdown_file_resolves(page):
    missing = [t for t in links(page.read_text()) if t and not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_every_md_file_named_in_comments_and_docstrings_exists():
    basenames = {p.name for p in repo_files(".md")}
    missing = []
    for path in repo_files(".py", ".yaml", ".yml", ".toml", ".sh"):
        source = path.read_text()
        comments = python_comments(source) if path.suffix == ".py" else hash_comments(source)
        for name in MD_NAME.findall(comments):
            if not exists(name, path, basenames):
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_the_checks_see_links_and_names_and_skip_code_and_urls():
    page = (
        'See [the docs](docs/a.md#part), ![plot](img.png "title") and [web](https://x.org/b.md).\n'
        "[ref]: other.md\n`[not](code.md)`\n```\n[not](fenced.md)\n```\n[anchor](#here)\n"
    )
    assert links(page) == ["docs/a.md", "img.png", "other.md"]
    source = '"""Module, see A.md."""\nx = "B.md"  # see docs/C.md\n\n\ndef f():\n    """D.md"""\n'
    assert MD_NAME.findall(python_comments(source)) == ["docs/C.md", "A.md", "D.md"]
    assert MD_NAME.findall(hash_comments('key: "E.md"  # F.md\n# G.md\nurl: a#b.md\n')) == ["F.md", "G.md"]
