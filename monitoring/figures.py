"""Plotly figures built on the server as plain ``{"data", "layout"}`` dicts and sent to the page
as strict JSON: NaN and infinities become null, which plotly draws as gaps.

Plain dicts rather than ``plotly.graph_objects``: the figures are simple, and validating every
trace through graph objects costs more server time than the whole page is allowed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

from monitoring.selectors import (
    DRIFT_STATUS_LEVEL,
    DriftWindow,
    VersionFigures,
    WindowPoint,
)

_LAYOUT: dict[str, Any] = {
    "margin": {"l": 55, "r": 20, "t": 40, "b": 40},
    "height": 300,
    "legend": {"orientation": "h", "y": -0.25},
    "paper_bgcolor": "#fff",
    "plot_bgcolor": "#fff",
    "hovermode": "closest",
}
_GRID = {"gridcolor": "#e4e7eb", "zeroline": False}


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None and datetimes as ISO text, so that
    ``json.dumps(..., allow_nan=False)`` accepts it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return strict(value.item())
    return value


def _x(moment: datetime) -> str:
    """A window start as plotly.js reads dates: wall-clock UTC without an offset (rollup
    windows are UTC hours and days)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M")


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    layout = {**_LAYOUT, "title": {"text": title, "font": {"size": 15}}}
    layout["xaxis"] = {**_GRID, **extra.pop("xaxis", {})}
    layout["yaxis"] = {**_GRID, **extra.pop("yaxis", {})}
    layout.update(extra)
    return layout


def _label(version: int, roles: dict[int, str]) -> str:
    role = roles.get(version)
    return f"v{version} ({role})" if role and role != "not live" else f"v{version}"


def _by_version(series: Iterable[WindowPoint]) -> dict[int, list[WindowPoint]]:
    out: dict[int, list[WindowPoint]] = defaultdict(list)
    for p in series:
        out[p.version].append(p)
    return dict(sorted(out.items()))


def traffic_marks(changes: Iterable[tuple[datetime, dict[str, int]]]) -> dict[str, list]:
    """Plotly layout ``shapes`` and ``annotations`` marking each traffic change (a rollout step,
    a promotion, an abort, a rollback) as a dotted vertical line labelled with the split, e.g.
    ``v1 80% · v3 20%``. ``changes`` are (when, {"v1": 80, ...})."""
    shapes, annotations = [], []
    for when, split in changes:
        x = _x(when)
        label = " · ".join(f"{v} {w}%" for v, w in split.items()) or "nothing"
        shapes.append(
            {
                "type": "line", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1,
                "line": {"dash": "dot", "width": 1, "color": "#7b8794"},
            }
        )  # fmt: skip
        annotations.append(
            {
                "x": x, "yref": "paper", "y": 1, "yanchor": "bottom", "text": label,
                "showarrow": False, "font": {"size": 9, "color": "#52606d"},
            }
        )  # fmt: skip
    return {"shapes": shapes, "annotations": annotations}


def endpoint_figures(
    versions: list[VersionFigures],
    series: list[WindowPoint],
    x_range: tuple[datetime, datetime] | None = None,
    changes: Iterable[tuple[datetime, dict[str, int]]] = (),
) -> dict[str, dict[str, Any]]:
    """The version charts of the endpoint dashboard, one trace (or two) per version:

    * ``quality``: accuracy (classifiers) or RMSE (regressors, right axis) and label coverage
      per window, stable and canary on one chart;
    * ``latency``: p50/p95/p99 per window (ms);
    * ``traffic``: each version's share of the window's answered requests;
    * ``errors``: error rate per window.

    ``x_range`` (the dashboard's range) fixes the time axis, so that one window is drawn as one
    window of the range rather than zoomed to milliseconds. ``changes`` (the endpoint's traffic
    history in the range) are marked on every chart (:func:`traffic_marks`).
    """
    roles = {v.version: v.role for v in versions}
    regressors = {v.version for v in versions if v.is_regression}
    quality, latency, traffic, errors = [], [], [], []
    for version, points in _by_version(series).items():
        name = _label(version, roles)
        x = [_x(p.window_start) for p in points]
        labeled = [[p.labeled, p.rows] for p in points]
        if version in regressors:
            quality.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": f"{name} RMSE",
                    "x": x,
                    "y": [p.rmse for p in points],
                    "yaxis": "y2",
                    "customdata": labeled,
                    "hovertemplate": "RMSE %{y:.4g} on %{customdata[0]} labeled rows<extra></extra>",
                }
            )
        else:
            quality.append(
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": f"{name} accuracy",
                    "x": x,
                    "y": [p.accuracy for p in points],
                    "customdata": labeled,
                    "hovertemplate": "accuracy %{y:.3f} on %{customdata[0]} labeled of "
                    "%{customdata[1]} rows<extra></extra>",
                }
            )
        quality.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"{name} label coverage",
                "x": x,
                "y": [p.label_coverage for p in points],
                "line": {"dash": "dot"},
                "customdata": labeled,
                "hovertemplate": "coverage %{y:.1%} (%{customdata[0]} of %{customdata[1]} rows)"
                "<extra></extra>",
            }
        )
        for q, dash in (("p50", "solid"), ("p95", "dash"), ("p99", "dot")):
            latency.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": f"{name} {q}",
                    "x": x,
                    "y": [getattr(p, f"latency_{q}_ms") for p in points],
                    "line": {"dash": dash},
                }
            )
        traffic.append(
            {
                "type": "bar",
                "name": name,
                "x": x,
                "y": [p.traffic_share for p in points],
                "customdata": [p.requests for p in points],
                "hovertemplate": "%{y:.1%} (%{customdata} requests)<extra></extra>",
            }
        )
        errors.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": name,
                "x": x,
                "y": [p.error_rate for p in points],
                "customdata": [p.errors for p in points],
                "hovertemplate": "%{y:.2%} (%{customdata} errors)<extra></extra>",
            }
        )
    xaxis: dict[str, Any] = {"type": "date"}
    if x_range is not None:
        xaxis["range"] = [_x(x_range[0]), _x(x_range[1])]
    quality_layout = _layout(
        "Accuracy and label coverage",
        xaxis=xaxis,
        yaxis={"range": [0, 1.02], "tickformat": ".0%"},
    )
    if regressors:
        quality_layout["yaxis2"] = {"title": {"text": "RMSE"}, "overlaying": "y", "side": "right"}
    marks = strict(traffic_marks(changes))
    result = strict(
        {
            "quality": {"data": quality, "layout": quality_layout},
            "latency": {
                "data": latency,
                "layout": _layout("Latency (ms)", xaxis=xaxis, yaxis={"rangemode": "tozero"}),
            },
            "traffic": {
                "data": traffic,
                "layout": _layout(
                    "Traffic share",
                    barmode="stack",
                    xaxis=xaxis,
                    yaxis={"range": [0, 1], "tickformat": ".0%"},
                ),
            },
            "errors": {
                "data": errors,
                "layout": _layout(
                    "Error rate", xaxis=xaxis, yaxis={"rangemode": "tozero", "tickformat": ".1%"}
                ),
            },
        }
    )
    if marks["shapes"]:
        for figure in result.values():
            figure["layout"] = {**figure["layout"], **marks}
    return result


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _feature_hover(f: dict[str, Any] | None) -> str:
    if not f:
        return "no result for this window"
    text = str(f.get("status", ""))
    psi, js = f.get("psi"), f.get("jensen_shannon")
    if _finite(psi):
        text += f" · PSI {psi:.3g}"
    elif _finite(js):
        text += f" · JS {js:.3g}"
    if f.get("status") != "ok" and f.get("reason"):
        text += f" · {f['reason']}"
    return text


def drift_heatmaps(windows: list[DriftWindow], roles: dict[int, str]) -> list[dict[str, Any]]:
    """One heatmap per version: features (and the prediction, last) × windows, colour = status
    (0 ok, 1 warning, 2 drift); insufficient data and windows without a result are null, drawn
    as grey gaps that still show their reason on hover. ``customdata`` of a cell is the id of
    its drift rollup, so that a click can load that cell's histograms; ``text`` its hover.

    Built JSON-safe (ints, None and text only) rather than passed through :func:`strict`: a
    90-day range of 30 features has thousands of cells.
    """
    by_version: dict[int, list[DriftWindow]] = defaultdict(list)
    for w in windows:
        by_version[w.version].append(w)
    out = []
    for version, rows in sorted(by_version.items()):
        names: list[str] = []
        seen: set[str] = set()
        for w in rows:
            for f in w.features:
                if f["name"] not in seen:
                    seen.add(f["name"])
                    names.append(f["name"])
        has_prediction = any(w.prediction for w in rows)
        y = names + (["prediction"] if has_prediction else [])
        x = [_x(w.window_start) for w in rows]
        ids = [w.id for w in rows]
        lookups = [{f["name"]: f for f in w.features} for w in rows]
        z: list[list[int | None]] = []
        text: list[list[str]] = []
        for name in y:
            if name == "prediction" and has_prediction:
                cells = [w.prediction for w in rows]
            else:
                cells = [lookup.get(name) for lookup in lookups]
            z.append([DRIFT_STATUS_LEVEL.get((f or {}).get("status")) for f in cells])
            text.append([_feature_hover(f) for f in cells])
        out.append(
            {
                "version": version,
                "data": [
                    {
                        "type": "heatmap",
                        "x": x,
                        "y": y,
                        "z": z,
                        "text": text,
                        "customdata": [ids] * len(y),
                        "zmin": 0,
                        "zmax": 2,
                        "xgap": 1,
                        "ygap": 1,
                        "hoverongaps": True,
                        "colorscale": [
                            [0.0, "#c1eac5"],
                            [0.33, "#c1eac5"],
                            [0.34, "#ffd66b"],
                            [0.66, "#ffd66b"],
                            [0.67, "#e12d39"],
                            [1.0, "#e12d39"],
                        ],
                        "colorbar": {
                            "tickvals": [0.33, 1, 1.67],
                            "ticktext": ["ok", "warning", "drift"],
                            "len": 0.6,
                        },
                        "hovertemplate": "%{y} · %{x}<br>%{text}<extra></extra>",
                    }
                ],
                "layout": _layout(
                    f"Drift of {_label(version, roles)} (click a cell for its histograms)",
                    height=max(300, 22 * len(y) + 120),
                    margin={"l": 180, "r": 20, "t": 40, "b": 80},
                    plot_bgcolor="#d9dde3",  # gaps (insufficient data) show grey
                    xaxis={"type": "category", "tickangle": -45},
                    yaxis={"autorange": "reversed", "automargin": True},
                ),
            }
        )
    return out


def drift_histogram_figure(detail: dict[str, Any]) -> dict[str, Any]:
    """Reference-vs-current shares of one feature in one window (``selectors.drift_histogram``
    output): two bar traces named ``reference`` and ``current``."""
    hist = detail["histogram"]
    if hist.get("kind") == "numeric":
        edges = hist["edges"]
        x = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        width = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        hover = [f"{a:.4g} – {b:.4g}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    else:
        x = [str(c) for c in hist.get("categories", [])]
        width = None
        hover = x
    data = []
    for name, colour in (("reference", "#7b93db"), ("current", "#e8833a")):
        trace = {
            "type": "bar",
            "name": name,
            "x": x,
            "y": hist.get(name, []),
            "marker": {"color": colour},
            "opacity": 0.65,
            "customdata": hover,
            "hovertemplate": f"{name}: %{{y:.1%}} in %{{customdata}}<extra></extra>",
        }
        if width is not None:
            trace["width"] = width
        data.append(trace)
    window_start = detail["window_start"]
    when = window_start.strftime("%Y-%m-%d %H:00" if detail["window"] == "hour" else "%Y-%m-%d")
    return strict(
        {
            "data": data,
            "layout": _layout(
                f"{detail['feature']} · v{detail['version']} · {when}",
                barmode="overlay",
                yaxis={"tickformat": ".0%", "title": {"text": "share of rows"}},
            ),
        }
    )
