"""SVG charts of a statistics document (gateway/stats.py), drawn with pygal.

Every chart is a standalone ``<svg>`` element with its style inside it and no script or font
from elsewhere (pygal's tooltip script is switched off), so it can be pasted inline into an HTML
page that must work offline, or nested into one SVG document (:func:`compose_svg`).
pygal is imported here only: the gateway's ``run`` never pays for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import pygal
from pygal.style import Style

__all__ = ["WIDTH", "compose_svg", "stats_charts"]

WIDTH = 900
_STYLE = Style(
    background="white",
    plot_background="white",
    foreground="#222",
    foreground_strong="#111",
    foreground_subtle="#888",
    font_family='"DejaVu Sans", Arial, sans-serif',
    colors=("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"),
    title_font_size=15,
    label_font_size=11,
    major_label_font_size=11,
    legend_font_size=12,
    value_font_size=10,
)
_DOT_STYLE = Style(**{**_STYLE.to_dict(), "colors": ("#d62728",) * 7})
_COMMON: dict[str, Any] = {
    "style": _STYLE,
    "js": [],  # no script from a CDN: the page must work on a LAN without internet
    "disable_xml_declaration": True,
    "width": WIDTH,
    "explicit_size": True,
    "legend_at_bottom": True,
    "truncate_legend": -1,
    "print_values": False,
}
_DAY_SHORT = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _render(chart: Any) -> str:
    svg: str = chart.render(is_unicode=True)
    # pygal writes its config as an inline script for its (unused) tooltip script, and links to
    # its home page in comments: neither belongs in a page for a LAN without internet.
    svg = re.sub(r"<script\b.*?</script>", "", svg, flags=re.S)
    return re.sub(r"<!--.*?-->", "", svg, flags=re.S)


def utilisation_chart(doc: Mapping[str, Any]) -> str:
    chargers = list(doc["chargers"])
    chart = pygal.HorizontalStackedBar(
        height=max(160, 70 + 38 * len(chargers)),
        title="Utilisation per charger (% of the period)",
        range=(0, 100),
        value_formatter=lambda v: f"{v:.1f} %",
        **_COMMON,
    )
    chart.x_labels = chargers
    for label, key in (("charging", "charging"), ("idle while connected", "idle_connected")):
        chart.add(label, [round(doc["chargers"][c]["utilisation"][key] * 100, 2) for c in chargers])
    return _render(chart)


def heatmap_chart(doc: Mapping[str, Any], metric: str) -> str:
    """A punch card: one row per weekday, one column per hour, dot size = value."""
    heat = doc["heatmap"][metric]
    unit = "kWh" if metric == "energy_kwh" else "sessions started"
    one_colour = {**_COMMON, "style": _DOT_STYLE}
    chart = pygal.Dot(
        height=330,
        title=f"{'Energy' if metric == 'energy_kwh' else 'Sessions started'} by weekday and "
        f"hour of day ({unit})",
        show_legend=False,
        x_label_rotation=0,
        **one_colour,
    )
    chart.x_labels = [f"{h:02d}" for h in range(24)]
    for w, day in enumerate(_DAY_SHORT):
        chart.add(day, [v if v else None for v in heat[w]])
    return _render(chart)


def daily_chart(doc: Mapping[str, Any]) -> str:
    days = doc["daily"]
    chart = pygal.Bar(
        height=300,
        title="Energy per day (kWh)",
        show_legend=False,
        x_label_rotation=45,
        show_minor_x_labels=len(days) <= 16,
        x_labels_major_every=max(1, len(days) // 8),
        **_COMMON,
    )
    chart.x_labels = [d["date"][5:] for d in days]
    chart.add("kWh", [d["energy_kwh"] for d in days])
    return _render(chart)


def power_chart(doc: Mapping[str, Any]) -> str | None:
    hourly = doc["site_power"]["hourly"]
    if not hourly:
        return None
    chart = pygal.Line(
        height=300,
        title="Site power, chargers (kW, per hour)",
        show_dots=len(hourly) <= 48,
        x_label_rotation=45,
        show_minor_x_labels=len(hourly) <= 24,
        x_labels_major_every=max(1, len(hourly) // 12),
        fill=False,
        include_x_axis=True,
        **_COMMON,
    )
    chart.x_labels = [h["hour"][5:16].replace("T", " ") for h in hourly]
    chart.add("max of 1-min means", [round(h["max_w"] / 1000, 2) for h in hourly])
    chart.add("mean", [round(h["mean_w"] / 1000, 2) for h in hourly])
    return _render(chart)


def stats_charts(doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(title, svg) of each chart of ``doc``."""
    charts = [
        ("Utilisation", utilisation_chart(doc)),
        ("Peak hours: energy", heatmap_chart(doc, "energy_kwh")),
        ("Peak hours: sessions", heatmap_chart(doc, "sessions")),
        ("Daily energy", daily_chart(doc)),
    ]
    power = power_chart(doc)
    if power is not None:
        charts.append(("Site power", power))
    return charts


_SIZE = re.compile(r'<svg\b[^>]*?\bheight="(\d+(?:\.\d+)?)"')


def compose_svg(charts: Sequence[tuple[str, str]]) -> str:
    """One SVG document with the charts stacked, each nested as its own ``<svg>``."""
    parts = []
    y = 0.0
    for _, svg in charts:
        m = _SIZE.search(svg)
        height = float(m.group(1)) if m else 300.0
        parts.append(re.sub(r"^<svg\b", f'<svg x="0" y="{y:g}"', svg, count=1))
        y += height + 10
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y:g}" '
        f'viewBox="0 0 {WIDTH} {y:g}">'
        f'<rect width="100%" height="100%" fill="white"/>' + "".join(parts) + "</svg>\n"
    )
