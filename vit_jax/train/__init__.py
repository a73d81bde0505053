"""Training: optimizers, pure step functions, evaluators and the loop."""
