"""The quickstart on a gs:// workdir (GCS emulator): killed, restarted, fine-tuned, predicted."""
import io
import json
import os
import sys

import numpy as np
import pytest
from etils import epath
from PIL import Image

from tests import test_resume
from vit_jax import checkpoint, predict
from vit_jax.train import trainer


def _complete_step(workdir):
  try:
    return checkpoint.latest_complete_step(checkpoint.make_manager(workdir))
  except (OSError, ValueError):  # not there yet
    return None


@pytest.mark.slow
def test_quickstart_on_gcs_survives_sigkill_then_fine_tunes_and_predicts(
    gcs_bucket, quickstart_config, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = quickstart_config
  config.total_steps, config.log_every, config.checkpoint_every, config.eval_every = 24, 4, 4, 24
  workdir = f'{gcs_bucket}/run'
  command = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
             f'--config={test_resume._write_config(config, tmp_path / "config.py")}']  # pylint: disable=protected-access
  process = test_resume._start(command)  # pylint: disable=protected-access
  test_resume._wait(process, lambda: _complete_step(workdir))  # pylint: disable=protected-access
  process.kill()
  rc, output = test_resume._finish(process)  # pylint: disable=protected-access
  killed_at = _complete_step(workdir)
  assert rc == -9 and killed_at is not None and killed_at < config.total_steps, output

  rc, output = test_resume._finish(test_resume._start(command))  # pylint: disable=protected-access
  assert rc == 0, output
  assert _complete_step(workdir) == config.total_steps
  lines = [json.loads(x) for x in epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  assert lines[-1]['step'] == config.total_steps and 'val_accuracy' in lines[-1]
  assert max(m['step'] for m in lines if 'train_loss' in m) == config.total_steps
  events = list(epath.Path(workdir, 'tensorboard').iterdir())
  assert len(events) == 2 and all(e.stat().length > 0 for e in events)  # one per start
  for folder in (tmp_path, test_resume.REPO):
    assert not os.path.exists(os.path.join(folder, 'gs:')), folder

  config.init_from, config.total_steps, config.eval_every = workdir, 2, 0
  config.data.eval_split = ''
  trainer.train_and_evaluate(config, f'{gcs_bucket}/fine_tuned')
  image = f'{gcs_bucket}/images/digit.png'
  with io.BytesIO() as png:
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(png, format='PNG')
    epath.Path(image).write_bytes(png.getvalue())
  results, skipped = predict.predict(f'{gcs_bucket}/fine_tuned', 'testing', [image], top_k=3)
  top = results[image]
  assert not skipped and len(top) == 3 and 0 < sum(p for _, p, _ in top) <= 1 + 1e-6
