"""Write one benchmark's section of a Markdown page between markers, leaving the other sections intact.

Each benchmark script owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``, so re-running one
script replaces its own figures only.
"""

from __future__ import annotations

import os
from pathlib import Path

from influence.errors import BadDataError


def write_section(name: str, markdown: str, doc: str | os.PathLike[str]) -> None:
    """Replace the section ``name`` of ``doc`` with ``markdown`` (appended when the page has no such section)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    path = Path(doc)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if (begin in text) != (end in text):
        raise BadDataError(f"{path} has only one of the markers {begin!r} / {end!r}; restore the other before writing")
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
