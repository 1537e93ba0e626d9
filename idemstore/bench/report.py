"""The bench's report: a table, Markdown (for the README) or JSON (``BenchResult.to_json``)."""

from __future__ import annotations

from collections.abc import Sequence

from .harness import BenchResult, Figure

# -- output ------------------------------------------------------------------------------


def _fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"


def _fmt_us(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _fmt_ratio(figure: Figure) -> str:
    if figure.ratio is None:
        return ""
    text = f"{figure.ratio:,.0f}x" if figure.ratio >= 100 else f"{figure.ratio:.2f}"
    return text


def _fmt_target(figure: Figure) -> str:
    if figure.target is None:
        return ""
    sign = "ok" if figure.met else "MISSED"
    target = f"{figure.target:,.0f}x" if figure.target >= 100 else f"{figure.target:.2f}"
    return f">= {target} {sign}"


def format_table(result: BenchResult) -> str:
    headers = ("section", "figure", "variant", "ops/s", "p50 us", "p99 us", "ratio", "target")
    rows = [
        (
            f.section,
            f.workload,
            f.variant + ("" if f.trusted else " ?"),
            _fmt_rate(f.rate),
            _fmt_us(f.p50_us),
            _fmt_us(f.p99_us),
            _fmt_ratio(f),
            _fmt_target(f),
        )
        for f in result.figures
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    right = {3, 4, 5, 6}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_markdown(result: BenchResult) -> str:
    """The table as Markdown (for the README)."""
    headers = ("section", "figure", "variant", "ops/s", "p50 µs", "p99 µs", "ratio", "target")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * 3 + "---:|" * 4 + "---|"]
    for f in result.figures:
        cells = (
            f.section,
            f.workload,
            f.variant + ("" if f.trusted else " (too short to trust)"),
            _fmt_rate(f.rate),
            _fmt_us(f.p50_us),
            _fmt_us(f.p99_us),
            _fmt_ratio(f) + (f" vs {f.baseline}" if f.baseline and f.ratio is not None else ""),
            _fmt_target(f),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(result: BenchResult) -> str:
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
        f">= {s['min_seconds_per_round']} s; ratio = median of per-round ratios; "
        f"growth sizes {s['growth_sizes']}; {s['cpus']} CPUs; Python {s['versions']['python']}, "
        f"SQLAlchemy {s['versions']['sqlalchemy']}"
    )
    lines += ["", format_table(result), ""]
    for f in result.figures:
        for note in f.notes:
            if not note.startswith("too short to trust"):
                lines.append(f"- {f.section} / {f.workload} / {f.variant}: {note}")
    for note in result.notes:
        lines.append(f"- {note}")
    for section, reason in result.skipped.items():
        lines.append(f"- {section}: skipped: {reason}")
    targets = [f for f in result.figures if f.target is not None]
    if targets:
        met = sum(1 for f in targets if f.met)
        shaky = sum(1 for f in targets if not f.trusted)
        lines.append(
            f"targets: {met}/{len(targets)} met"
            + (f" ({shaky} of them from figures too short to trust)" if shaky else "")
        )
    return "\n".join(lines)
