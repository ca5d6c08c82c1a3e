"""Reading the tables of a ``report.md`` back, for tests that compare them with ``report.json``."""

from __future__ import annotations


def markdown_table(markdown: str, heading: str) -> list[list[str]]:
    """Rows (header first) of the table under ``## heading``."""
    lines = markdown.splitlines()
    rows = []
    for line in lines[lines.index(f"## {heading}") + 1 :]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if set("".join(cells)) != {"-"}:
                rows.append(cells)
        elif rows:
            break
    return rows
