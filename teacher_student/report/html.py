"""HTML primitives of the reports: inline CSS, escaping, table cells, embedded PNGs, the page.

Why self-contained: a report is mailed, archived and opened on machines without network (hospital
workstations). Figures are PNGs embedded as base64 ``data:`` URIs, the CSS is inline, and there is
no script at all. Every value that reaches the page goes through :func:`esc`.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#666}nav a{margin-right:12px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td.s{text-align:left}.note{background:#fff8e1;border-left:4px solid #f0ad4e;padding:6px 10px}
.v-trust{background:#d7f5dd}.v-review{background:#fff3cd}.v-do-not-use{background:#f8d7da}.v-none-kept{background:#eee}
img.fig{max-width:100%;display:block;margin:6px 0}.grid{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:120px;font-size:11px;color:#444}figure img{width:112px;height:112px;image-rendering:auto}
figcaption{word-break:break-all}.row-label{font-weight:600;margin:8px 0 2px}
.headline{border:2px solid #444;border-radius:6px;padding:10px 14px;margin:12px 0;background:#fafafa}
.headline .sentence{font-size:16px;font-weight:600;margin:4px 0 8px}.headline .status{color:#555;font-style:italic}
ul.flags{margin:6px 0;padding-left:20px}ul.flags li{color:#b00020;font-weight:600}
ul.checks{margin:4px 0;padding-left:20px}ul.checks li{color:#7a5200}.checks-title{margin:6px 0 0;font-weight:600}
td.c-rule{min-width:260px;font-size:12px}div.wide{overflow-x:auto}td.flag{background:#f8d7da;color:#b00020;font-weight:600}p.collapsed{color:#555}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    """A table cell: floats rounded, NaN/None as a dash, infinity as 'never' (threshold unreachable)."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        return "never" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def html_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """A small escaped HTML table; a 'verdict' column is coloured by its value."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cls = ("s " if isinstance(value, str) else "") + "c-" + "".join(ch if ch.isalnum() else "-" for ch in str(c))
            if c == "verdict":
                cls += " v-" + str(value).replace(" ", "-")
            if isinstance(value, str) and value.startswith("weak"):
                cls += " flag"
            cells.append(f'<td class="{cls.strip()}">{esc(fmt(value))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div class='wide'><table><tr>{head}</tr>{''.join(body)}</table></div>"


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure_html(fig, alt: str) -> str:
    """Render a matplotlib Figure to an embedded PNG <img> (the figure is discarded afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)  # constrained layout already fits the labels
    return f'<img class="fig" alt="{esc(alt)}" src="{png_uri(buf.getvalue())}">'


def clean_json(value):
    """JSON-safe copy: NaN/inf become None, numpy scalars plain numbers, frames lists of records."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, pd.DataFrame):
        return clean_json(value.to_dict("records"))
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


@dataclass
class Report:
    """The HTML parts and the JSON numbers of a report, built section by section."""

    parts: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    sections: list[tuple[str, str]] = field(default_factory=list)

    def section(self, anchor: str, title: str) -> None:
        self.sections.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{esc(title)}</h2>')

    def add(self, *parts: str) -> None:
        self.parts.extend(parts)

    def para(self, text: str, cls: str = "") -> None:
        self.parts.append(f'<p class="{cls}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>")


def page(title: str, header: str, r: Report) -> str:
    """The whole page: inline CSS, a navigation bar over the sections, no script."""
    nav = " ".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in r.sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{header}<nav>{nav}</nav>{''.join(r.parts)}</body></html>")


def tile(uri: str | None, caption: str) -> str:
    """One captioned thumbnail of a sample grid; a grey square when the image could not be loaded."""
    img = f'<img alt="thumbnail" src="{uri}">' if uri else '<div style="width:112px;height:112px;background:#eee"></div>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"
