"""How numbers read in the report: percentages, points, p-values, ratios, intervals, values with units, and text made
safe for Markdown. Every section formats through these, so one number always reads the same way."""

from __future__ import annotations

import math
import re

import pandas as pd


def finite(x) -> bool:
    try:
        return x is not None and not pd.isna(x) and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt_percent(fraction, decimals: int = 2) -> str:
    """An accuracy fraction as percent: 0.89437 -> '89.44'."""
    return f"{float(fraction) * 100:.{decimals}f}" if finite(fraction) else "–"


def fmt_points(fraction_difference, decimals: int = 2) -> str:
    """A difference of accuracy fractions in percentage points, signed: 0.0123 -> '+1.23'."""
    if not finite(fraction_difference):
        return "–"
    text = f"{float(fraction_difference) * 100:+.{decimals}f}"
    return "±0." + "0" * decimals if text.lstrip("+-") == "0." + "0" * decimals else text.replace("-", "−")


def fmt_p(p) -> str:
    """p-values with three significant digits, or '< 0.001'."""
    if not finite(p):
        return "–"
    p = float(p)
    return "< 0.001" if p < 0.001 else f"{p:.3g}"


def p_phrase(p) -> str:
    """'p = 0.0246' or 'p < 0.001' for running text."""
    text = fmt_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def fmt_signed(x, digits: int = 2) -> str:
    """A signed number with a true minus sign: -1.614 -> '−1.61'."""
    return f"{float(x):+.{digits}f}".replace("-", "−") if finite(x) else "–"


def fmt_size(x, accuracy: bool) -> str:
    """An unsigned size of a difference (e.g. the smallest detectable one): points with one decimal for accuracy
    (0.0327 -> '3.3'), three significant digits in the metric's own unit otherwise."""
    if not finite(x):
        return "–"
    return f"{float(x) * 100:.1f}" if accuracy else f"{float(x):.3g}"


def fmt_count(n) -> str:
    return f"{int(round(float(n))):,}" if finite(n) else "–"


# Unit -> how a value of it reads (value, significant digits); any other unit: the digits and the unit. "GiB" is the
# unit of published memory figures (lora_bench.report.reference); ours are "bytes".
UNIT_FORMATS = {
    "fraction": lambda value, digits: f"{value * 100:.2f}\u00a0%",
    "bytes": lambda value, digits: f"{value / 2**30:.{digits}g} GiB",
    "count": lambda value, digits: fmt_count(value),
    "relative": lambda value, digits: f"{value * 100:+.1f} %".replace("-", "−"),
    "GiB": lambda value, digits: f"{value:.2f} GiB",
}


def fmt_value(value, unit: str, decimals: int = 3) -> str:
    """A metric value in a readable unit (bytes as GiB, fractions as %): the one formatter of values with units."""
    if not finite(value):
        return "–"
    formatter = UNIT_FORMATS.get(unit)
    if formatter is not None:
        return formatter(float(value), decimals)
    return f"{float(value):.{decimals}g} {unit}".strip()


def fmt_interval(low, high, formatter) -> str:
    if not (finite(low) and finite(high)):
        return "–"
    # A no-break space keeps an interval on one line in narrow table cells.
    return f"[{formatter(low)},\u00a0{formatter(high)}]"


def md_text(text) -> str:
    """Text from the tables made safe inside Markdown (tables, emphasis) and the HTML made from it."""
    text = " ".join(str(text if text is not None else "").split())
    # '<' and '>' would open raw HTML; a bare '&' is left alone (Markdown renders it as is).
    text = text.replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def fmt_ratio(x) -> str:
    """A ratio as a multiple: 0.6021 -> '0.60×', 0.0042 -> '0.0042×'."""
    if not finite(x):
        return "–"
    x = float(x)
    return f"{x:.2f}×" if abs(x) >= 0.1 else f"{x:.2g}×"


def fmt_scaled(value, scale: float) -> str:
    """``value / scale`` with three significant digits (whole numbers from 100 on)."""
    if not finite(value):
        return "–"
    x = float(value) / scale
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def mean_and_interval(mean, low, high, scale: float) -> str:
    text = fmt_scaled(mean, scale)
    if finite(low) and finite(high) and float(low) == float(high):
        return text  # identical in every run: an interval [x, x] says nothing
    interval = fmt_interval(low, high, lambda x: fmt_scaled(x, scale))
    return f"{text} {interval}" if interval != "–" else text


def points_interval(test) -> str:
    return fmt_interval(test["diff_ci_low"], test["diff_ci_high"], fmt_points)


def fmt_relative(x) -> str:
    return fmt_value(x, "relative")


def ratio_and_interval(mean, low, high) -> str:
    interval = fmt_interval(low, high, fmt_ratio) if finite(low) and finite(high) and low != high else "–"
    return fmt_ratio(mean) + (f" {interval}" if interval != "–" else "")


def pct_ci(value, low, high, decimals: int = 2) -> str:
    shown = fmt_percent(value, decimals)
    interval = fmt_interval(low, high, lambda x: fmt_percent(x, decimals))
    return shown if interval == "–" else f"{shown} {interval}"


def points_ci(value, low, high) -> str:
    interval = fmt_interval(low, high, fmt_points)
    return fmt_points(value) if interval == "–" else f"{fmt_points(value)} {interval}"


def fmt_seeds(value) -> str:
    if value is not None and not pd.isna(value) and math.isinf(float(value)):
        return "∞"
    return fmt_count(value)


GIB, MIB = 2.0**30, 2.0**20


KIB = 2.0**10
