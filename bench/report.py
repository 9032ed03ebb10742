"""The outputs: one table on stdout, JSON (latest + timestamped) and a PNG chart of ratios vs targets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .scenarios import SCENARIOS, Row, ScenarioResult

COLUMNS = ("direct", "nginx", "gateway", "bare")


def _number(value: float | None, decimals: int | None) -> str:
    if value is None:
        return "-"
    if decimals is None:
        decimals = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{decimals}f}"


def _cells(scenario: ScenarioResult, row: Row | None) -> list[str]:
    label = f"{scenario.id} {SCENARIOS[scenario.id].title}" if scenario.id in SCENARIOS else scenario.id
    if row is None:
        return [label, scenario.status, *("-" for _ in COLUMNS), "", "", scenario.status]
    values = [
        "FAILED" if name in row.failed and name in row.values else _number(row.values.get(name), row.decimals)
        for name in COLUMNS
    ]
    ratios = "  ".join(f"{k} {_number(v, 2)}" for k, v in row.ratios.items())
    return [label, row.metric, *values, ratios, row.target, row.verdict]


def table(results: list[ScenarioResult]) -> str:
    header = ["scenario", "metric", *COLUMNS, "ratios", "target", "met?"]
    lines: list[list[str]] = []
    for scenario in results:
        if not scenario.rows:
            lines.append(_cells(scenario, None))
        for index, row in enumerate(scenario.rows):
            cells = _cells(scenario, row)
            if index:
                cells[0] = ""
            lines.append(cells)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    right = {2, 3, 4, 5}

    def render(cells: list[str]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded).rstrip()

    rule = "-" * max(len(render(c)) for c in [header, *lines])
    return "\n".join([render(header), rule, *(render(c) for c in lines), rule])


def problems(results: list[ScenarioResult]) -> list[str]:
    found = []
    for scenario in results:
        for check in scenario.checks:
            if not check.ok:
                found.append(f"[{scenario.id}] check {check.phase} {check.target}: {check.what}: {check.detail}")
        for name, runs in scenario.runs.items():
            for run in runs:
                for problem in run.problems:
                    found.append(f"[{scenario.id}] wrk {name} round {run.round}: {problem}")
        if scenario.status == "error":
            found.extend(f"[{scenario.id}] {note}" for note in scenario.notes)
    return found


def write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def chart(results: list[ScenarioResult], path: Path, title: str) -> None:
    """One bar group per scenario: its ratios, each with its target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5.5), dpi=110)
    x = 0.0
    centers, names = [], []
    top = 1.2
    for scenario in results:
        start = x
        if not scenario.bars:
            ax.text(x + 0.4, 0.05, scenario.status, rotation=90, ha="center", va="bottom", fontsize=8, color="grey")
            x += 0.8
        for bar in scenario.bars:
            value = bar.value or 0.0
            if bar.failed:
                color, hatch = "#9e9e9e", "//"
            elif bar.met is None:
                color, hatch = "#90a4ae", None
            else:
                color, hatch = ("#43a047" if bar.met else "#e53935"), None
            ax.bar(x + 0.4, value, width=0.7, color=color, hatch=hatch, edgecolor="black", linewidth=0.5)
            text = "FAILED" if bar.failed else ("n/a" if bar.value is None else f"{value:.2f}")
            ax.text(x + 0.4, value + 0.02, text, ha="center", va="bottom", fontsize=8)
            if bar.target is not None:
                ax.hlines(bar.target, x + 0.02, x + 0.78, colors="black", linewidth=2)
                sign = "\u2265" if bar.op == ">=" else "\u2264"
                ax.text(x + 0.78, bar.target, f" {sign}{bar.target:g}", va="center", fontsize=7)
            ax.text(x + 0.4, -0.04, bar.label, rotation=30, ha="right", va="top", fontsize=7)
            top = max(top, value + 0.2, (bar.target or 0) + 0.2)
            x += 1.0
        centers.append((start + x) / 2)
        names.append(f"{scenario.id}: {SCENARIOS[scenario.id].title if scenario.id in SCENARIOS else ''}")
        x += 0.8
    ax.set_xlim(-0.4, x)
    ax.set_xticks(centers, names, fontsize=8)
    ax.tick_params(axis="x", pad=70, length=0)
    ax.set_ylim(0, top)
    ax.set_ylabel("ratio (gateway / reference), or measured / budget")
    ax.set_title(title, fontsize=10)
    ax.axhline(1.0, color="grey", linewidth=0.5, linestyle=":")
    fig.tight_layout()
    temporary = path.with_name(path.name + ".tmp")
    fig.savefig(temporary, format="png")
    plt.close(fig)
    os.replace(temporary, path)
