"""XLA flags that make training faster on CPU (measured in benchmarks/README.md).

XLA reads XLA_FLAGS once, when JAX starts its first backend, so `apply()` must run before any
JAX computation. The flags only change how the CPU backend compiles; GPU/TPU runs ignore them.
A flag the user already put in XLA_FLAGS wins over ours.
"""
import os

from absl import logging
from jax._src import xla_bridge  # backends_are_initialized() has no public spelling

# name -> value. See benchmarks/README.md for the step-time effect of each.
CPU_XLA_FLAGS = {
}


def apply() -> str:
  """Adds CPU_XLA_FLAGS missing from os.environ['XLA_FLAGS']; returns the resulting value.

  Too late (a warning, nothing changed) once JAX has started a backend.
  """
  current = os.environ.get('XLA_FLAGS', '')
  if xla_bridge.backends_are_initialized():  # e.g. main() called inside a test session
    logging.warning('JAX backend already started: vit_jax CPU XLA flags not applied')
    return current
  present = {item.split('=', 1)[0].lstrip('-') for item in current.split()}
  added = [f'--{name}={value}' for name, value in CPU_XLA_FLAGS.items() if name not in present]
  os.environ['XLA_FLAGS'] = ' '.join([current] + added).strip()
  return os.environ['XLA_FLAGS']
