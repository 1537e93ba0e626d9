"""The bench's report: a table, Markdown (for the README) or JSON (``BenchResult.to_json``).

It reads as a measurement: rates, latencies and ratios, each ratio with the baseline it is
taken to and what that baseline is, and notes on the figures (numbered in the table). It
judges nothing: the project's targets are in the README's Performance section, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .harness import BenchResult, Figure

HEADERS = ("section", "figure", "variant", "ops/s", "p50 us", "p99 us", "ratio", "vs", "note")
#: Columns aligned to the right (numbers).
NUMERIC = frozenset({3, 4, 5, 6})


def _fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"


def _fmt_us(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _fmt_ratio(figure: Figure) -> str:
    if figure.ratio is None:
        return ""
    return f"{figure.ratio:,.0f}x" if figure.ratio >= 100 else f"{figure.ratio:.2f}"


def _numbered_notes(result: BenchResult) -> tuple[list[str], list[str]]:
    """Per figure its note mark (``[n]``, or empty), and the numbered notes' lines."""
    marks: list[str] = []
    lines: list[str] = []
    for f in result.figures:
        if f.notes:
            n = len(lines) + 1
            marks.append(f"[{n}]")
            lines.append(f"[{n}] {f.workload}, {f.variant}: " + "; ".join(f.notes))
        else:
            marks.append("")
    return marks, lines


def _rows(result: BenchResult, marks: Sequence[str]) -> list[tuple[str, ...]]:
    return [
        (
            f.section,
            f.workload,
            f.variant,
            _fmt_rate(f.rate),
            _fmt_us(f.p50_us),
            _fmt_us(f.p99_us),
            _fmt_ratio(f),
            f.baseline if f.ratio is not None and f.baseline else "",
            mark,
        )
        for f, mark in zip(result.figures, marks, strict=True)
    ]


def format_table(result: BenchResult) -> str:
    """The figures as an aligned text table (note marks refer to :func:`format_report`'s
    notes)."""
    rows = _rows(result, _numbered_notes(result)[0])
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(HEADERS)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in NUMERIC else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    return "\n".join([line(HEADERS), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_markdown(result: BenchResult) -> str:
    """The table as Markdown (for the README), the notes under it."""
    marks, notes = _numbered_notes(result)
    headers = [h.replace(" us", " µs") for h in HEADERS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * 3 + "---:|" * 4 + "---|" * 2]
    lines += ["| " + " | ".join(cells) + " |" for cells in _rows(result, marks)]
    if notes:
        lines += ["", *(f"{note}  " for note in notes)]
    return "\n".join(lines)


def format_report(result: BenchResult) -> str:
    """The whole report: settings, the table, what each baseline is, the notes."""
    s = result.settings
    lines = [f"idemstore bench: {s['database']}"]
    if "sqlite" in s:
        q = s["sqlite"]
        lines.append(
            f"settings: SQLite {s['versions']['sqlite']}, journal_mode={q['journal_mode']}, "
            f"synchronous={q['synchronous']}, busy_timeout={q['busy_timeout_ms']} ms, "
            f"files in {q['files_in']}"
        )
    if "postgresql" in s:
        q = s["postgresql"]
        lines.append(
            "settings: PostgreSQL "
            + ", ".join(f"{k}={v}" for k, v in q.items())
            + "; JSON emulation files in the system temp directory"
        )
    lines.append(
        f"run: {s['rounds']} interleaved rounds, each >= {s['ops_per_round_min']} ops and "
        f">= {s['min_seconds_per_round']} s; ratio = the variant's rate / the rate of the "
        f"baseline it is shown vs, median of per-round ratios; growth sizes "
        f"{s['growth_sizes']}; {s['cpus']} CPUs; Python {s['versions']['python']}, "
        f"SQLAlchemy {s['versions']['sqlalchemy']}"
    )
    lines += ["", format_table(result)]
    baselines = result.baselines()
    if baselines:
        lines += ["", "baselines (what each ratio is taken to):"]
        lines += [
            f"  {name}: {what or 'the variant of that name in the table'}"
            for name, what in baselines.items()
        ]
    _, notes = _numbered_notes(result)
    skipped = (f"{section}: skipped: {why}" for section, why in result.skipped.items())
    general = [*result.notes, *skipped]
    if notes or general:
        lines += ["", "notes:"]
        lines += [f"  {note}" for note in notes]
        lines += [f"  - {note}" for note in general]
    return "\n".join(lines)
