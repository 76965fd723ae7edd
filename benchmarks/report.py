"""BENCHMARKS.md is a set of "## Title" sections, each written by one benchmark script."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HEADER = ("# Benchmarks\n\nEvery table below was produced by the command written above it, on the "
          "machine it names.\n")


# What people write about a script's tables, in the same section: kept when the script
# rewrites the section (between these two lines, after the script's output)
NOTES_START = "<!-- notes: kept when the script rewrites this section -->"
NOTES_END = "<!-- /notes -->"
_NOTES = re.compile(rf"^{re.escape(NOTES_START)}\n.*?^{re.escape(NOTES_END)}\n", re.M | re.S)


def command_line(script: str, argv: list[str] | None) -> str:
    """`python benchmarks/<script> ARGS` as the benchmark was run (argv None: this process's)."""
    name = Path(script).name
    return " ".join(["python", f"benchmarks/{name}", *(argv if argv is not None
                                                       else sys.argv[1:])])


def code_version(root: Path) -> str | None:
    """The commit of the git work tree at `root` that a benchmark ran, with "+dirty" when its
    tracked files differ from that commit; None outside a git work tree. Recorded with the
    results, so a table can be told from one made by other code. None too where git is not
    installed."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=False)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
    except OSError:  # no git on this machine: the version is not known
        return None
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def replace_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the section `## {title}` of the file with `body` (which starts with
    its own `## {title}` line). The old section's notes block (`NOTES_START` … `NOTES_END`)
    follows the new body, unless the body brings its own."""
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    old = pattern.search(text)
    notes = _NOTES.search(old.group(0)) if old else None
    body = body.rstrip() + "\n\n"
    if notes and not _NOTES.search(body):
        body += notes.group(0) + "\n"
    text = pattern.sub(lambda _m: body, text) if old else text.rstrip() + "\n\n" + body
    path.write_text(text)
