"""Repository hygiene: code and docs cite only what a reader of the repository can open."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not match itself. The project's design and facts briefs
# are not part of the repository, so "(<brief> section 2.9)"-style citations point nowhere.
CITATION = re.compile("|".join([
    "REFERENCE" + "_FACTS",
    "JAX" + "_NOTES",
    r"\bDESI" + r"GN\b",
    "\u00a7",  # the section sign
]))


def _tracked_files() -> list[pathlib.Path]:
    """The repository's .py/.md/.sh sources outside tests/data: git's list in a checkout, else (an
    unpacked sdist, say) every such file below the root except hidden and virtual-env folders."""
    if shutil.which("git") is not None and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "--", "*.py", "*.md", "*.sh"], cwd=ROOT,
                             check=True, capture_output=True).stdout.decode()
        rel = [p for p in out.split("\0") if p]
    else:
        rel = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".sh")
               and not any(part.startswith(".") or part in ("venv", "build") for part in p.relative_to(ROOT).parts)]
    return [ROOT / p for p in rel if not p.startswith("tests/data/")]


def test_no_citations_of_documents_outside_the_repository() -> None:
    files = _tracked_files()
    assert files, "no sources found"
    hits = []
    for path in files:
        if not path.exists():  # deleted in the working tree, not yet committed
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if CITATION.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "state the fact instead of citing a document outside the repository:\n" + "\n".join(hits)
