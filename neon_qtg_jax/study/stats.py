"""Statistics over seeds: mean and standard deviation, and the difference to a baseline with a 95% CI.

The interval is Welch's t interval for the difference of two means with unequal variances
(scipy's t quantile): small seed counts give wide intervals, as they should.
"""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats as scipy_stats

NO_DIFFERENCE = "no measurable difference"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict[str, float] | None:
  """mean(a) - mean(b) with its Welch t interval; None when either side has fewer than two values.

  Returns {"difference", "low", "high", "df"}. With zero spread on both sides the interval
  is the point itself.
  """
  if len(a) < 2 or len(b) < 2:
    return None
  mean_a, std_a = mean_std(a)
  mean_b, std_b = mean_std(b)
  var_a, var_b = std_a ** 2 / len(a), std_b ** 2 / len(b)
  difference = mean_a - mean_b
  se = math.sqrt(var_a + var_b)
  if se == 0.0:
    return {"difference": difference, "low": difference, "high": difference, "df": float("inf")}
  df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
  half = scipy_stats.t.ppf(0.5 + confidence / 2, df) * se
  return {"difference": difference, "low": float(difference - half), "high": float(difference + half), "df": df}


def verdict(interval: dict[str, float] | None, lower_is_better: bool = True) -> str:
  """'better' / 'worse' only when the interval excludes 0; otherwise 'no measurable difference'."""
  if interval is None:
    return "too few seeds for an interval"
  if interval["low"] <= 0.0 <= interval["high"]:
    return NO_DIFFERENCE
  lower = interval["high"] < 0.0
  return "better" if lower == lower_is_better else "worse"
