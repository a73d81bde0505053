"""gs:// paths against a GCS emulator on loopback: logs, checkpoints, weights, record files."""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vit_jax import checkpoint, models, paths, records_io
from vit_jax.data import make_records, sources
from vit_jax.train import metrics_log


def test_metrics_and_events_append_across_restarts(gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a `gs:` folder would appear here if a URL were taken as local
  workdir = f'{gcs_bucket}/metrics_run'
  for steps in ([1, 2], [3]):  # a restart opens the same files again
    log = metrics_log.MetricsLog(workdir)
    for step in steps:
      log.write(step, {'train_loss': step / 10})
    log.close()
  lines = [json.loads(x) for x in epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  assert [m['step'] for m in lines] == [1, 2, 3]
  events = list(epath.Path(workdir, 'tensorboard').iterdir())
  assert events and all(e.name.startswith('events.out.tfevents.') for e in events)
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = [event_pb2.Event.FromString(r).step for e in events for r in records_io.read(e)
           if event_pb2.Event.FromString(r).summary.value]
  assert sorted(steps) == [1, 2, 3]
  assert not os.listdir(tmp_path)


def test_checkpoint_and_npz_roundtrip(gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = f'{gcs_bucket}/ckpt_run'
  model = models.get_model('testing', num_classes=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  state = {'params': flax.linen.unbox(params)}
  manager = checkpoint.make_manager(workdir, async_save=False)
  checkpoint.save_state(manager, 7, state)
  manager.close()
  assert checkpoint.latest_complete_step(checkpoint.make_manager(workdir)) == 7
  expected = jax.device_get(state['params'])
  loaded = checkpoint.load(workdir)  # init_from / predict --checkpoint on a gs:// workdir
  checkpoint.save_npz(expected, f'{gcs_bucket}/export/model.npz')
  again = checkpoint.load(f'{gcs_bucket}/export/model.npz')
  for tree in (loaded, again):
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
  assert not os.listdir(tmp_path)
  assert paths.is_remote(workdir) and not paths.is_remote(str(tmp_path))


def test_make_records_on_gcs_and_read_them_back(gcs_bucket, tmp_path):
  from tests import test_records  # pylint: disable=g-import-not-at-top
  rows = test_records.write_multilabel_images(tmp_path / 'images', 3)
  for name, _ in rows:  # the image folder and the CSV live in the bucket too
    epath.Path(f'{gcs_bucket}/images/{name}').write_bytes((tmp_path / 'images' / name).read_bytes())
  test_records.write_csv(tmp_path / 'labels.csv', rows)
  epath.Path(f'{gcs_bucket}/labels.csv').write_text((tmp_path / 'labels.csv').read_text())
  summary = make_records.write_records(f'{gcs_bucket}/images', f'{gcs_bucket}/labels.csv',
                                       f'{gcs_bucket}/records', num_shards=2)
  assert summary['num_examples'] == 3
  source = sources.records_source(f'{gcs_bucket}/records', 'train')
  labels = sorted(tuple(ex['label'].tolist()) for ex in test_records.read_examples(source))
  assert labels == sorted(tuple(l) for _, l in rows)
