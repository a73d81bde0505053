"""Mean and spread of a demo's results over seeds (numpy only: the demos' --help stays fast)."""
import numpy as np


def mean_and_spread(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.
