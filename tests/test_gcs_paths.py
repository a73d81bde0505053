"""gs:// paths against a GCS emulator on loopback: one road whatever is installed, logs that
resume and upload linearly, checkpoints, weights, record files."""
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from tests import common, test_records
from vit_jax import checkpoint, models
from vit_jax.cli import errors
from vit_jax.storage import paths
from vit_jax.data import sources
from vit_jax.train import metrics_log, preflight, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh process with TensorFlow imported first and nothing else set but the emulator's
# address, as on a TPU VM (where epath would take TensorFlow's gfile if left to itself).
_TENSORFLOW_FIRST = '''
import tensorflow as tf
import io, json, sys
from etils import epath
from etils.epath import backend
from vit_jax.data import make_records, sources
bucket = sys.argv[1]
assert epath.Path(bucket)._backend is backend.fsspec_backend  # pylint: disable=protected-access
summary = make_records.write_records(f'{bucket}/images', f'{bucket}/labels.csv',
                                     f'{bucket}/records', num_shards=2, log=io.StringIO())
source = sources.records_source(f'{bucket}/records', 'train')
labels = [sorted(source.parse(tf.constant(r))['label'].numpy().tolist())
          for r in source.read(list(range(source.num_examples)))]
offsets = epath.Path(sources.record_offsets_path(f'{bucket}/records', 'train')).read_bytes()
make_records.write_index(f'{bucket}/records', 'train', log=io.StringIO())
again = epath.Path(sources.record_offsets_path(f'{bucket}/records', 'train')).read_bytes()
print(json.dumps({'summary': summary, 'labels': labels, 'index_again': offsets == again}))
'''


def test_one_road_with_tensorflow_imported_first(gcs_bucket, tmp_path):
  rows = test_records.write_multilabel_images(tmp_path / 'images', 5)
  for name, _ in rows:  # the image folder and the CSV live in the bucket too
    epath.Path(f'{gcs_bucket}/tf_first/images/{name}').write_bytes(
        (tmp_path / 'images' / name).read_bytes())
  test_records.write_csv(tmp_path / 'labels.csv', rows)
  epath.Path(f'{gcs_bucket}/tf_first/labels.csv').write_text(
      (tmp_path / 'labels.csv').read_text())
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('EPATH_', 'GCSFS_', 'TENSORSTORE_', 'GOOGLE_AUTH'))}
  done = subprocess.run([sys.executable, '-c', _TENSORFLOW_FIRST, f'{gcs_bucket}/tf_first'],
                        cwd=tmp_path, env=env | {'PYTHONPATH': REPO}, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['summary']['shard_sizes'] == [3, 2]
  # Records are dealt round-robin: example k sits in shard k % 2.
  in_record_order = [rows[k] for k in (0, 2, 4, 1, 3)]
  assert result['labels'] == [sorted(labels) for _, labels in in_record_order]
  assert result['index_again']  # --index_only reads the headers back to the same offsets
  assert not (tmp_path / 'gs:').exists()


@pytest.mark.parametrize('where', ['local', 'gcs'])
def test_a_resumed_run_logs_each_step_once(where, gcs_bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a `gs:` folder would appear here if a URL were taken as local
  workdir = f'{gcs_bucket}/resumed_logs' if where == 'gcs' else str(tmp_path / 'run')
  log = metrics_log.MetricsLog(workdir)
  for step in range(1, 6):  # steps 4 and 5 will be orphaned: the run resumes from step 3
    log.write(step, {'train_loss': step / 10})
  log.close()
  log = metrics_log.MetricsLog(workdir, start_step=3)
  for step in range(4, 7):
    log.write(step, {'train_loss': step})
  log.close()
  expected = [(1, .1), (2, .2), (3, .3), (4, 4.), (5, 5.), (6, 6.)]
  lines = [json.loads(x) for x in epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  assert [(m['step'], m['train_loss']) for m in lines] == expected
  files = list(epath.Path(workdir, 'tensorboard').iterdir())
  assert files and all('tfevents' in f.name for f in files)  # no segment left behind
  shown = common.tensorboard_scalars(epath.Path(workdir, 'tensorboard'))
  assert [(step, round(value, 6)) for step, value in shown] == expected
  assert not (tmp_path / 'gs:').exists()


def test_bytes_uploaded_per_byte_stored_stay_flat_as_runs_grow(gcs_bucket, gcs_proxy):
  """A line every step, written out every 5 lines (each sync an upload, as checkpoints and the
  upload interval make them): what goes up over what is stored must not grow with the run. A
  writer that rewrote the whole object at each upload would send about uploads / 2 times what is
  stored: 5, 10 and 20 here."""
  sent_per_stored = []
  for lines in (50, 100, 200):
    workdir = f'{gcs_bucket}/lines_{lines}'
    log = metrics_log.MetricsLog(workdir)
    gcs_proxy.reset_stats()
    for step in range(1, lines + 1):
      log.write(step, {'train_loss': 1 / step, 'learning_rate': 1e-3, 'images_per_sec': 1234.5,
                       'grad_norm': 0.5, 'skipped_images': 0})
      if step % 5 == 0:
        log.flush()  # waits until stored: one upload of each log
    log.close()
    sent = gcs_proxy.stats()['bytes_uploaded']
    stored = sum(f.stat().length for f in [epath.Path(workdir, 'metrics.jsonl'),
                                            *epath.Path(workdir, 'tensorboard').iterdir()])
    sent_per_stored.append(sent / stored)
  print('bytes sent per byte stored, 50 / 100 / 200 lines:', sent_per_stored)
  # Each byte goes up once, plus each upload's metadata (the compose request); nothing grows.
  assert all(ratio < 2 for ratio in sent_per_stored), sent_per_stored
  assert sent_per_stored[-1] <= sent_per_stored[0] * 1.1, sent_per_stored


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


def test_tfds_data_on_gcs_stops_at_start_up_naming_the_mount(quickstart_config, tmp_path):
  config = quickstart_config
  config.data.data_dir = 'gs://my-bucket/tensorflow_datasets'
  training = trainer.build(config)
  with pytest.raises(preflight.PreflightError,
                     match=r'^data.data_dir=gs://my-bucket/tensorflow_datasets: .* '
                     r'--data_bucket=gs://my-bucket` mounts it at /gcs/my-bucket .*, then pass '
                     r'--config.data.data_dir=/gcs/my-bucket/tensorflow_datasets$'):
    preflight.check(config, str(tmp_path / 'run'), training.model, training.mesh)


def test_a_start_up_read_that_does_not_answer_is_named(gcs_bucket, gcs_proxy, monkeypatch):
  monkeypatch.setattr(paths, 'STARTUP_READ_DEADLINE_S', 0.5)
  gcs_proxy.latency_s = 5.  # a storage that does not answer in time
  try:
    with pytest.raises(errors.UserError, match=rf'^reading record set {gcs_bucket}/records '
                       r'\(split train\): no answer after 0.5 s; check that this machine '
                       'reaches that storage'):
      sources.read_record_info(f'{gcs_bucket}/records', 'train')
  finally:
    gcs_proxy.latency_s = 0.
