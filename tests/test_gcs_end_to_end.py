"""The quickstart on a gs:// workdir (GCS emulator behind a proxy that adds latency and refuses
some requests): killed, restarted, fine-tuned, predicted."""
import io
import json
import os
import sys

import numpy as np
import pytest
from etils import epath
from PIL import Image

from tests import common, test_resume
from vit_jax import checkpoint, predict
from vit_jax.train import trainer


def _complete_step(workdir):
  try:
    return checkpoint.latest_complete_step(checkpoint.make_manager(workdir))
  except (OSError, ValueError):  # not there yet
    return None


@pytest.mark.slow
def test_quickstart_on_gcs_survives_sigkill_and_refusals_then_fine_tunes_and_predicts(
    gcs_bucket, gcs_proxy, quickstart_config, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = quickstart_config
  config.total_steps, config.log_every, config.checkpoint_every, config.eval_every = 24, 4, 4, 24
  workdir = f'{gcs_bucket}/run'
  command = [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}',
             f'--config={test_resume._write_config(config, tmp_path / "config.py")}']  # pylint: disable=protected-access
  # GCS under load: every request of the runs waits, and some are refused (503, 429, the
  # connection dropped) before they reach the emulator; checkpoints, logs and start-up reads
  # retry them.
  gcs_proxy.latency_s, gcs_proxy.refuse_share = 0.002, 0.02
  gcs_proxy.reset_stats()
  try:
    process = test_resume._start(command)  # pylint: disable=protected-access
    test_resume._wait(process, lambda: _complete_step(workdir))  # pylint: disable=protected-access
    process.kill()
    rc, output = test_resume._finish(process)  # pylint: disable=protected-access
    killed_at = _complete_step(workdir)
    assert rc == -9 and killed_at is not None and killed_at < config.total_steps, output
    rc, output = test_resume._finish(test_resume._start(command))  # pylint: disable=protected-access
    refused = sum(gcs_proxy.stats()['refused'].values())
  finally:
    gcs_proxy.latency_s, gcs_proxy.refuse_share = 0., 0.
  assert rc == 0, output
  assert refused > 10, gcs_proxy.stats()  # the runs met refusals and went through them
  manager = checkpoint.make_manager(workdir)
  assert sorted(manager.all_steps()) == [16, 20, 24]  # keep_checkpoints=3, all complete
  assert _complete_step(workdir) == config.total_steps
  # Every line once, in order, though the first run was killed past its last checkpoint.
  lines = [json.loads(x) for x in epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  train = [(m['step'], m['train_loss']) for m in lines if 'train_loss' in m]
  assert [step for step, _ in train] == list(range(4, 25, 4))
  assert [m['step'] for m in lines if 'val_accuracy' in m] == [config.total_steps]
  shown = common.tensorboard_scalars(f'{workdir}/tensorboard')  # one run, the same values
  assert [step for step, _ in shown] == [step for step, _ in train]
  np.testing.assert_allclose([v for _, v in shown], [v for _, v in train], rtol=1e-6)
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
