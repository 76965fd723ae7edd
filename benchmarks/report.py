"""BENCHMARKS.md is a set of "## Title" sections, each written by one benchmark script."""

from __future__ import annotations

import re
from pathlib import Path

HEADER = ("# Benchmarks\n\nEvery table below was produced by the command written above it, on the "
          "machine it names.\n")


def replace_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the section `## {title}` of the file with `body` (which starts with
    its own `## {title}` line)."""
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    body = body.rstrip() + "\n\n"
    text = pattern.sub(lambda _m: body, text) if pattern.search(text) else (
        text.rstrip() + "\n\n" + body)
    path.write_text(text)
