"""Small line charts as inline SVG, with an interval whisker on each point where one is known.

Gradio's native plots draw lines but not intervals, and an approval rate without its interval invites reading
noise as progress; a plotting library would be a large dependency for two charts. This module only draws: it
knows nothing about adapters or runs.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d")
WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 52, 150, 28, 36


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Series:
    name: str
    points: list[Point]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high == low:
        return [low]
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def line_chart(title: str, series: list[Series], x_labels: dict[float, str] | None = None,
               y_range: tuple[float, float] | None = None, empty: str = "no data yet") -> str:
    """An SVG chart of ``series``; ``x_labels`` names x positions (dates), else x values are printed."""
    points = [p for s in series for p in s.points if math.isfinite(p.y)]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" ' \
           f'height="{HEIGHT}" style="max-width: 100%; height: auto" role="img">' \
           f'<title>{html.escape(title)}</title>' \
           f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>'
    if not points:
        return head + f'<text x="{LEFT}" y="{HEIGHT // 2}" font-size="12" fill="#666">{html.escape(empty)}</text></svg>'
    xs = [p.x for p in points]
    if y_range is None:
        values = [v for p in points for v in (p.y, p.low, p.high) if v is not None and math.isfinite(v)]
        low, high = min(values), max(values)
        pad = (high - low) * 0.1 or abs(high) * 0.1 or 1.0
        y_range = (low - pad, high + pad)
    x0, x1 = min(xs), max(xs)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (plot_w / 2 if x1 == x0 else (x - x0) / (x1 - x0) * plot_w)

    def sy(y: float) -> float:
        y = min(max(y, y_range[0]), y_range[1])
        return TOP + plot_h - (y - y_range[0]) / (y_range[1] - y_range[0]) * plot_h

    parts = [head]
    for tick in _ticks(*y_range):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" '
                     f'stroke="#e5e7eb"/><text x="{LEFT - 6}" y="{sy(tick) + 4:.1f}" font-size="10" '
                     f'text-anchor="end">{_fmt(tick)}</text>')
    x_positions = sorted(set(xs))
    every = max(1, len(x_positions) // 8)  # at most ~8 labels so they do not overlap
    for x in x_positions[::every]:
        label = (x_labels or {}).get(x, _fmt(x) if x != int(x) else str(int(x)))
        parts.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - BOTTOM + 16}" font-size="10" '
                     f'text-anchor="middle">{html.escape(label)}</text>')
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        shown = sorted((p for p in s.points if math.isfinite(p.y)), key=lambda p: p.x)
        if len(shown) > 1:
            path = " ".join(f"{sx(p.x):.1f},{sy(p.y):.1f}" for p in shown)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for p in shown:
            if p.low is not None and p.high is not None:
                parts.append(f'<line x1="{sx(p.x):.1f}" x2="{sx(p.x):.1f}" y1="{sy(p.low):.1f}" '
                             f'y2="{sy(p.high):.1f}" stroke="{color}" stroke-opacity="0.45" stroke-width="6"/>')
            parts.append(f'<circle cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="3" fill="{color}"/>')
        legend_y = TOP + 14 + i * 16
        parts.append(f'<rect x="{WIDTH - RIGHT + 12}" y="{legend_y - 9}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{WIDTH - RIGHT + 28}" y="{legend_y}" font-size="11">{html.escape(s.name)}</text>')
    return "".join(parts) + "</svg>"
