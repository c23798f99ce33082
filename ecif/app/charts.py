"""Vega-Lite specs for the overview (plain dicts: Streamlit draws them without Altair)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

FLAG_COLORS = {"domain": ["not flagged", "flagged"], "range": ["#4c78a8", "#e45756"]}


def threshold_cut(table: pd.DataFrame) -> float | None:
    """The lowest misalign_score that is flagged (the threshold line); None when none is."""
    flagged = table.loc[table["is_misaligned"].astype(bool), "misalign_score"]
    flagged = flagged[np.isfinite(flagged.to_numpy(np.float64))]
    return float(flagged.min()) if len(flagged) else None


def histogram(values: np.ndarray, cut: float | None = None, bins: int = 50) -> pd.DataFrame:
    """Bin edges (start, end), counts, and whether a bin lies at or above the threshold."""
    v = values[np.isfinite(values)]
    if not len(v):
        return pd.DataFrame({"start": [], "end": [], "pairs": [], "flag": []})
    counts, edges = np.histogram(v, bins=bins)
    above = edges[:-1] >= cut if cut is not None else np.zeros(len(counts), dtype=bool)
    return pd.DataFrame(
        {
            "start": edges[:-1],
            "end": edges[1:],
            "pairs": counts,
            "flag": np.where(above, "flagged", "not flagged"),
        }
    )


def histogram_spec(cut: float | None, flagged: int) -> dict[str, Any]:
    """Bars on a numeric axis (horizontal labels, a few ticks) and a dashed threshold rule."""
    bars = {
        "mark": {"type": "bar", "binSpacing": 1},
        "encoding": {
            "x": {
                "field": "start",
                "type": "quantitative",
                "bin": {"binned": True},
                "title": "misalign_score (higher = more suspicious)",
                "axis": {"labelAngle": 0, "tickCount": 8, "format": "~g", "labelOverlap": True},
            },
            "x2": {"field": "end"},
            "y": {"field": "pairs", "type": "quantitative", "title": "pairs"},
            "color": {"field": "flag", "type": "nominal", "scale": FLAG_COLORS, "title": None},
            "tooltip": [
                {"field": "start", "type": "quantitative", "format": ".4g", "title": "from"},
                {"field": "end", "type": "quantitative", "format": ".4g", "title": "to"},
                {"field": "pairs", "type": "quantitative"},
            ],
        },
    }
    layers: list[dict[str, Any]] = [bars]
    if cut is not None:
        rule_data = {"values": [{"threshold": cut, "label": f"threshold: {flagged:,} flagged"}]}
        x = {"field": "threshold", "type": "quantitative"}
        layers.append(
            {
                "data": rule_data,
                "mark": {"type": "rule", "color": "#e45756", "strokeDash": [6, 4], "size": 2},
                "encoding": {"x": x},
            }
        )
        layers.append(
            {
                "data": rule_data,
                "mark": {"type": "text", "align": "left", "baseline": "top", "dx": 4, "dy": 4},
                "encoding": {"x": x, "y": {"value": 0}, "text": {"field": "label"}},
            }
        )
    return {"layer": layers, "height": 260}


def scatter_spec(x: str, y: str) -> dict[str, Any]:
    """Points coloured by flag, with the pair's id and scores as tooltip."""
    return {
        "mark": {"type": "circle", "size": 24, "opacity": 0.7},
        "encoding": {
            "x": {"field": x, "type": "quantitative", "axis": {"format": "~g", "labelAngle": 0}},
            "y": {"field": y, "type": "quantitative", "axis": {"format": "~g"}},
            "color": {"field": "flag", "type": "nominal", "scale": FLAG_COLORS, "title": None},
            "tooltip": [
                {"field": "id", "type": "nominal"},
                {"field": x, "type": "quantitative", "format": ".4g"},
                {"field": y, "type": "quantitative", "format": ".4g"},
            ],
        },
        "height": 320,
    }
