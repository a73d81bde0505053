"""Input: tfds / record sources, preprocessing ops, per-process pipelines."""
from vit_jax.cli import startup

# Every module here uses TensorFlow: import it once, first, without its start-up lines on stderr
# (the trainer, predict, make_records and the benchmarks all come through this package).
startup.import_tensorflow()
