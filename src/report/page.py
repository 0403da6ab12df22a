"""The page every report shares: a title, a body of HTML, its data as JSON, and the inlined styles and scripts
that draw it (uPlot for line charts, assets/report.js for the rest). Nothing is fetched when it opens: MLflow's
artifact viewer shows it in a sandbox, and a report must still open offline years later."""
from __future__ import annotations

import html
import json
import math
from functools import cache
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).parent / "assets"


@cache
def _asset(name: str) -> str:
    return (ASSETS / name).read_text()


class Raw(str):
    """JSON text already written (a long number array), put into the page's data as it is."""


def numbers(values) -> Raw:
    """A JSON array of `values` at 4 significant digits, NaN and ±Inf as null (JSON has neither). Written by
    hand because json.dumps gives 17 digits per float, four times the bytes for nothing a reader can see."""
    return Raw("[" + ",".join(f"{v:.4g}" if math.isfinite(v) else "null"
                              for v in np.asarray(values, dtype=np.float64).ravel().tolist()) + "]")


def rows(matrix) -> Raw:
    """A JSON array of the rows of a 2-D array, each as `numbers`."""
    return Raw("[" + ",".join(numbers(r) for r in np.asarray(matrix)) + "]")


def to_json(data) -> str:
    """`data` as JSON with each Raw inserted verbatim; safe inside a <script> element."""
    raws: list[str] = []

    def hold(o):
        if isinstance(o, Raw):
            raws.append(o)
            return f"\x00{len(raws) - 1}\x00"
        if isinstance(o, dict):
            return {k: hold(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [hold(v) for v in o]
        return o

    text = json.dumps(hold(data), separators=(",", ":"), allow_nan=False)
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000{i}\\u0000"', raw, 1)
    return text.replace("</", "<\\/")


def document(title: str, body: str, data: dict) -> str:
    """The whole page; uPlot (50 KB) only where `data` has line charts."""
    charts = bool(data.get("charts"))
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_asset('uPlot.min.css') if charts else ''}\n"
            f"{_asset('report.css')}</style></head><body>{body}"
            f"<script type='application/json' id='gradflow-data'>{to_json(data)}</script>"
            + (f"<script>{_asset('uPlot.iife.min.js')}</script>" if charts else "")
            + f"<script>{_asset('report.js')}</script></body></html>")


def esc(value) -> str:
    return html.escape(str(value))


def fmt(v) -> str:
    """A number as a person reads it: 3 significant digits, exponent outside [1e-3, 1e4)."""
    if isinstance(v, str):
        return v
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.2e}" if v != 0 and not 1e-3 <= abs(v) < 1e4 else f"{v:.3g}"


def table(header: list[str], body: list[list], cls: str = "") -> str:
    """An HTML table; a cell given as (text, value) sorts by value."""
    def cell(c):
        if isinstance(c, tuple):
            text, value = c
            v = "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
            return f"<td data-v='{esc(v)}'>{text}</td>"
        return f"<td>{c}</td>"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    rows_ = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in body)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{rows_}</tbody></table>"


def chart(into: str, title: str, x, series: list[tuple[str, object]], log: bool, group: str = "",
          xlabel: str = "step", span: bool = False, points: tuple[str, ...] = ()) -> dict:
    """A line chart for report.js, drawn into the element `into`. `span`: lines bridge the x a series has no
    value at; `points`: series drawn with markers."""
    return {"into": into, "title": title, "x": numbers(x), "xlabel": xlabel, "log": log, "group": group,
            "span": span, "series": [{"label": label, "y": numbers(y), "points": label in points}
                                     for label, y in series]}
