"""What several test files share: the libtpu marker and TensorBoard's own reading of a run."""
import importlib.util
import os
import tempfile

import pytest
from etils import epath
from tensorboard.backend.event_processing import event_accumulator

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='needs libtpu: pip install -e ".[tpu]"')


def tensorboard_scalars(logdir, tag: str = 'train_loss') -> list:
  """[(step, value)] of `tag` as TensorBoard's own reader shows the event files in `logdir`
  (local or gs://: TensorBoard reads gs:// through TensorFlow, which the emulator does not serve,
  so those are copied here first), orphaned steps of a restart purged as it purges them."""
  with tempfile.TemporaryDirectory() as local:
    if '://' in os.fspath(logdir):
      for event_file in epath.Path(logdir).iterdir():
        (epath.Path(local) / event_file.name).write_bytes(event_file.read_bytes())
      logdir = local
    accumulator = event_accumulator.EventAccumulator(os.fspath(logdir))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]
