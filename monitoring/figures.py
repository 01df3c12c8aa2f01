"""Plotly figures built on the server and sent to the page as JSON (NaN becomes null, a gap)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import plotly.graph_objects as go

_LAYOUT = dict(
    margin=dict(l=50, r=20, t=40, b=40),
    height=300,
    legend=dict(orientation="h", y=-0.25),
    template="plotly_white",
)


def _as_json(fig: go.Figure) -> dict[str, Any]:
    return json.loads(fig.to_json())


def endpoint_figures(series: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The endpoint dashboard's charts: requests, latency p50/p95 and accuracy over time, one
    trace per version. ``series`` is ``monitoring.selectors.time_series`` output."""
    requests, latency, accuracy = go.Figure(), go.Figure(), go.Figure()
    for version, group in series.groupby("version", sort=True):
        name = f"v{version}"
        x = group["window"]
        requests.add_trace(go.Bar(x=x, y=group["requests"], name=name))
        latency.add_trace(go.Scatter(x=x, y=group["p50"], name=f"{name} p50", mode="lines+markers"))
        latency.add_trace(
            go.Scatter(
                x=x, y=group["p95"], name=f"{name} p95", mode="lines+markers", line=dict(dash="dot")
            )
        )
        accuracy.add_trace(
            go.Scatter(
                x=x,
                y=group["accuracy"],
                name=name,
                mode="lines+markers",
                customdata=group["labeled"],
                hovertemplate="%{y:.3f} on %{customdata} labeled rows",
            )
        )
    requests.update_layout(title="Requests", barmode="stack", **_LAYOUT)
    latency.update_layout(title="Latency (ms)", **_LAYOUT)
    accuracy.update_layout(title="Accuracy (labeled rows)", yaxis=dict(range=[0, 1.02]), **_LAYOUT)
    return {
        "requests": _as_json(requests),
        "latency": _as_json(latency),
        "accuracy": _as_json(accuracy),
    }
