"""Markdown tables as data: tests check a results table's rows, columns and numbers, not its layout or wording."""


def tables(markdown: str) -> list:
    """Every table in `markdown`, in order: a list of rows, each {column header: cell text}."""
    found, lines = [], [line.strip() for line in markdown.splitlines()]
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: "):
            header = _cells(lines[i])
            i += 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(header, _cells(lines[i]))))
                i += 1
            found.append(rows)
        else:
            i += 1
    return found


def table_with(markdown: str, column: str) -> list:
    """The first table in `markdown` that has `column` (and a row)."""
    found = [t for t in tables(markdown) if t and column in t[0]]
    assert found, f"no table with a column '{column}' in {markdown}"
    return found[0]


def row(table: list, **match) -> dict:
    """The one row whose cells equal `match` (column header -> text); column names with spaces: row(t, **{...})."""
    hits = [r for r in table if all(r.get(k) == v for k, v in match.items())]
    assert len(hits) == 1, f"{len(hits)} rows match {match} in {table}"
    return hits[0]


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]
