"""Markdown tables from ``torchfg bench`` CSV files (standard library only).

Kept free of torch so that the documentation build (``docs/hooks/benchmarks.py``) can render the
recorded results without importing torchfg.

Example:
    >>> rows = [{"device": "cpu", "dtype": "float32", "op": "pairwise", "case": "torch.cdist", "status": "ok",
    ...          "n": "64", "d": "8", "median_ms": "0.5", "p20_ms": "0.4", "p80_ms": "0.6", "tflops": "0.01",
    ...          "floor_ratio": "3.2", "peak_extra_mib": "0.1", "flop_model": "6*N*N*D", "floor": "x @ y.T"}]
    >>> print(rows_to_markdown(rows).splitlines()[-1])
    | 64 | 8 | torch.cdist | 0.5 (0.4-0.6) | 0.01 | 3.2 | 0.1 |
    >>> _short("12.3456"), _short("0.000123456"), _short("")
    ('12.3', '0.000123', '')
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "read_rows",
    "rows_to_markdown",
    "generic_markdown",
    "csv_to_markdown",
    "results_section",
    "update_markdown",
]

HEADER = "| N | D | case | median ms (p20-p80) | TFLOP/s | x floor | peak extra MiB |"
RULE = "|---:|---:|---|---:|---:|---:|---:|"


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV written by ``torchfg bench --csv``."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _short(value: object, digits: int = 3) -> str:
    """A number to ``digits`` significant digits for display; other text unchanged."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value or "")
    return f"{number:.{digits}g}"


def _int(value: str) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _cell(value: object) -> str:
    return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")


def generic_markdown(rows: Iterable[Mapping[str, str]]) -> str:
    """Any CSV as one table: columns constant over all rows go into the caption above it.

    Example:
        >>> print(generic_markdown([{"impl": "a", "ms": "1.5", "device": "cpu"},
        ...                         {"impl": "b", "ms": "2.0", "device": "cpu"}]))
        device: cpu
        <BLANKLINE>
        | impl | ms |
        |---|---|
        | a | 1.5 |
        | b | 2.0 |
    """
    rows = list(rows)
    if not rows:
        return ""
    columns = list(rows[0].keys())
    constant = [c for c in columns if len({r.get(c) for r in rows}) == 1]
    varying = [c for c in columns if c not in constant] or columns
    caption = "; ".join(f"{c}: {_cell(rows[0][c])}" for c in constant if rows[0][c] not in ("", None))
    lines = [caption, ""] if caption else []
    lines.append("| " + " | ".join(_cell(c) for c in varying) + " |")
    lines.append("|" + "---|" * len(varying))
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in varying) + " |" for r in rows]
    return "\n".join(lines)


def rows_to_markdown(rows: Iterable[Mapping[str, str]]) -> str:
    """One markdown table per (device, dtype, op, params, commit, threads) of the rows.

    Measured rows (status ``ok``) fill the table; a failed one (out of memory, over its time
    limit) is a row with its status in place of the numbers, so a baseline that could not run at
    a size says so. Rows that are not in ``torchfg bench``'s format (another script's CSV) go
    through :func:`generic_markdown` instead. ``launches`` and ``tensor peak MiB`` columns appear
    when rows carry them.
    """
    rows = list(rows)
    if rows and not {"case", "n", "median_ms"} <= set(rows[0]):
        return generic_markdown(rows)
    # Rows of another commit or thread count measure other code or another machine share: a table
    # of their own, its caption naming both, so that no row reads as comparable when it is not.
    groups: dict[tuple[str, str, str, str, str, str], list[Mapping[str, str]]] = defaultdict(list)
    for row in rows:
        if row.get("status", "ok").startswith("skipped"):
            continue
        key = (row.get("device", "?"), row.get("dtype", "?"), row.get("op", "?"), row.get("params") or "",
               row.get("commit") or "", row.get("threads") or "")
        groups[key].append(row)
    parts: list[str] = []
    for (device, dtype, op, params, commit, threads), group in groups.items():
        group = sorted(group, key=lambda r: (_int(r.get("n", "0")), _int(r.get("m", "0")), _int(r.get("d", "0"))))
        first = group[0]
        setting = f"**{op}** on {device}, {dtype}"
        if params:
            setting += f", {params.replace(';', ', ')}"
        if threads:
            setting += f", {threads} thread(s)"
        if commit:
            setting += f", commit {commit}"
        floor = (first.get("floor") or "n/a").split(" (")[0]
        line = f"{setting}. FLOP model: `{first.get('flop_model') or 'n/a'}`; floor: `{floor}`."
        loads = sorted({r.get("load_avg", "") for r in group} - {""}, key=float)
        if loads:
            line += f" 1-minute load average: {loads[0] if len(loads) == 1 else f'{loads[0]} to {loads[-1]}'}."
        parts.append(line)
        notes = sorted({r.get("note", "") for r in group} - {""})
        if notes:
            parts.append("")
            parts.append("Note: " + "; ".join(notes))
        launches = any(r.get("launches") for r in group)
        tensor_peak = any(r.get("tensor_peak_mib") for r in group)
        # Rows of N against M candidates (cross-batch memory: a batch against a memory) show M too.
        with_m = any(r.get("m") not in (None, "", r.get("n")) for r in group)
        header, rule = HEADER, RULE
        if with_m:
            header, rule = header.replace("| N |", "| N | M |", 1), rule.replace("|---:|", "|---:|---:|", 1)
        parts.append("")
        parts.append(header + (" launches / step |" if launches else "") + (" tensor peak MiB |" if tensor_peak else ""))
        parts.append(rule + ("---:|" if launches else "") + ("---:|" if tensor_peak else ""))
        for r in group:
            status = r.get("status", "ok")
            sizes = [r.get("n", "")] + ([r.get("m", "")] if with_m else []) + [r.get("d", "")]
            if status != "ok":
                cells = [*sizes, r.get("case", ""), _cell(status), "-", "-", "-"]
            else:
                timing = f"{_short(r.get('median_ms'))} ({_short(r.get('p20_ms'))}-{_short(r.get('p80_ms'))})"
                cells = [*sizes, r.get("case", ""), timing,
                         _short(r.get("tflops")) or "-", _short(r.get("floor_ratio")) or "-",
                         _short(r.get("peak_extra_mib")) or "-"]
            if launches:
                cells.append(r.get("launches") or "-")
            if tensor_peak:
                cells.append(_short(r.get("tensor_peak_mib")) or "-")
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def csv_to_markdown(path: str | Path) -> str:
    """:func:`rows_to_markdown` of a CSV file."""
    return rows_to_markdown(read_rows(path))


START, END = "<!-- results:start -->", "<!-- results:end -->"


def results_section(paths: Sequence[str | Path], link_prefix: str = "results/") -> str:
    """A section per CSV (its PNG when one sits next to it, a link to it, its tables), then lone PNGs.

    ``paths``: CSV and PNG files; ``link_prefix``: where the page that shows the section finds
    them (a relative link).
    """
    files = sorted({Path(p) for p in paths})
    csvs = [p for p in files if p.suffix == ".csv"]
    paired = {p.with_suffix(".png") for p in csvs}
    parts: list[str] = []
    for path in csvs:
        parts.append(f"### `{path.name}`")
        parts.append("")
        if path.with_suffix(".png").exists():
            parts.append(f"![{path.stem}]({link_prefix}{path.with_suffix('.png').name})")
            parts.append("")
        parts.append(f"Raw rows: [{path.name}]({link_prefix}{path.name})")
        parts.append("")
        parts.append(csv_to_markdown(path) or "No measured rows.")
        parts.append("")
    for path in files:
        if path.suffix == ".png" and path not in paired:
            parts += [f"### `{path.name}`", "", f"![{path.stem}]({link_prefix}{path.name})", ""]
    return "\n".join(parts).rstrip("\n") if parts else "No recorded results yet."


def update_markdown(page: str | Path, paths: Sequence[str | Path]) -> None:
    """Replace the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in ``page``."""
    page = Path(page)
    text = page.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise ValueError(f"{page} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{START}\n{results_section(paths)}\n{END}{tail}", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m torchfg.bench.tables [--update PAGE.md] FILE...``: print or splice the tables."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m torchfg.bench.tables", description=main.__doc__)
    parser.add_argument("files", nargs="+", help="CSV files written by torchfg bench (or any CSV) and PNG charts")
    parser.add_argument("--update", metavar="PAGE", help="rewrite the marked results section of this markdown page")
    args = parser.parse_args(argv)
    if args.update:
        update_markdown(args.update, args.files)
    else:
        print(results_section(args.files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
