"""Input: tfds / record sources, preprocessing ops, per-process pipelines."""
