"""What the command-line programs do first: quiet logging, and TensorFlow without its start-up lines.

TensorFlow's C++ runtime writes lines such as "oneDNN custom operations are on ..." to the
process's stderr when it is imported (twice: two of its libraries each log it), before and
regardless of TF_CPP_MIN_LOG_LEVEL. `import_tensorflow` imports it with stderr captured and
passes on every line that is not one of those.
"""
import os
import sys
import tempfile

from absl import flags, logging

# Lines TensorFlow's import writes that tell a user nothing they can act on.
_START_UP_NOISE = (
    'oneDNN custom operations are on',
    'All log messages before absl::InitializeLog() is called are written to STDERR',
    'cpu_feature_guard.cc',
    'This TensorFlow binary is optimized to use available CPU instructions',
    'To enable the following instructions:',
)


def quiet_logging() -> None:
  """WARNING and above unless --verbosity/-v was given: JAX, Orbax and TF log a lot at INFO
  (e.g. JAX's "Unable to initialize backend 'tpu'" on every machine without one)."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def import_tensorflow():
  """`import tensorflow`, with its start-up lines left out of stderr; the module."""
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)  # C++ writes to the descriptor, not to sys.stderr
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not any(noise in line for noise in _START_UP_NOISE):
          sys.stderr.write(line)
      sys.stderr.flush()
  return tf
