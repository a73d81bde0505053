"""make_records, record sources, per-process splitting, determinism, skipped images, pretrain_jft."""
import functools
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vit_jax.scale import sharding
from vit_jax.data import make_records, ops, pipeline, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [30, 230, 230],
                    [230, 30, 230]])


def write_multilabel_images(folder, n, size=24, seed=0, fmt='JPEG'):
  """n images with 1-3 coloured squares each on noise; labels = the colours present."""
  rng = np.random.RandomState(seed)
  rows = []
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    image = rng.randint(90, 160, (size, size, 3))
    labels = sorted(rng.choice(len(COLOURS), rng.randint(1, 4), replace=False))
    for k, label in enumerate(labels):
      top, left = (k // 2) * size // 2, (k % 2) * size // 2
      image[top:top + size // 2 - 2, left:left + size // 2 - 2] = COLOURS[label]
    name = f'img{i:04d}.{"jpg" if fmt == "JPEG" else "png"}'
    Image.fromarray(image.astype(np.uint8)).save(os.path.join(folder, name), fmt)
    rows.append((name, labels))
  return rows


def write_csv(path, rows):
  with open(path, 'w') as f:
    f.write('image,labels\n')
    for name, labels in rows:
      f.write(f'{name},{" ".join(map(str, labels))}\n')


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """24 good images, one missing, one truncated JPEG, one garbage file, in 4 shards."""
  root = tmp_path_factory.mktemp('records')
  images = str(root / 'images')
  rows = write_multilabel_images(images, 24)
  with open(os.path.join(images, rows[0][0]), 'rb') as f:
    jpeg = f.read()
  with open(os.path.join(images, 'truncated.jpg'), 'wb') as f:
    f.write(jpeg[:len(jpeg) // 2])
  with open(os.path.join(images, 'garbage.jpg'), 'wb') as f:
    f.write(b'not an image' * 20)
  rows = rows[:10] + [('nowhere.jpg', [1]), ('truncated.jpg', [2])] + rows[10:] + [
      ('garbage.jpg', [0])]
  write_csv(root / 'labels.csv', rows)
  log = io.StringIO()
  summary = make_records.write_records(images, str(root / 'labels.csv'), str(root / 'out'),
                                       num_shards=4, log=log)
  return str(root / 'out'), summary, log.getvalue(), rows


def test_make_records_writes_shards_and_reports_bad_rows(records):
  out, summary, log, rows = records
  assert summary['num_examples'] == 24 and summary['shard_sizes'] == [6, 6, 6, 6]
  assert (summary['skipped_missing'], summary['skipped_corrupt']) == (1, 2)
  assert 'labels.csv:12: skipping nowhere.jpg: not found' in log  # header is line 1
  assert 'labels.csv:13: skipping truncated.jpg: unreadable' in log
  assert 'wrote 24 images' in log and 'skipped 3' in log
  assert summary['num_classes'] == 6
  with open(os.path.join(out, 'train.json')) as f:
    assert json.load(f)['shard_sizes'] == [6, 6, 6, 6]
  examples = read_examples(sources.records_source(out, 'train'))
  good = [r for r in rows if r[0].startswith('img')]
  assert sorted(tuple(e['label']) for e in examples) == sorted(tuple(l) for _, l in good)
  with open(os.path.join(os.path.dirname(out), 'images', good[3][0]), 'rb') as f:
    assert f.read() in {e['image'] for e in examples}  # original bytes, not re-encoded


def test_make_records_rejects_malformed_labels_in_one_line_before_any_work(tmp_path):
  csv_path = tmp_path / 'bad1.csv'
  csv_path.write_text('image,labels\na.jpg,1 2\nb.jpg,one\n')
  done = subprocess.run([sys.executable, '-m', 'vit_jax.data.make_records',
                         f'--image_dir={tmp_path}', f'--labels={csv_path}',
                         f'--output={tmp_path / "out"}'], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 1 and done.stderr.splitlines() == [
      f"error: {csv_path}:3: labels must be space-separated class ids, got 'one'"], done.stderr
  assert not (tmp_path / 'out').exists()


def test_a_stale_index_is_named_with_its_shard_and_record(records, tmp_path):
  out = tmp_path / 'stale'
  shutil.copytree(records[0], out)
  offsets = np.load(sources.record_offsets_path(str(out), 'train'))
  offsets[2] += 5  # shard 0's record 1 as if the shard had been written again since
  sources.write_record_offsets(str(out), 'train', offsets)
  source = sources.records_source(str(out), 'train')
  assert len(source.read(np.array([0, 7, 23]))) == 3  # records the index still gets right
  with pytest.raises(ValueError, match=r'train-00000-of-00004.tfrecord: record 1 \(example 1\)'
                                       r' is framed as \d+ bytes but the offsets file says '
                                       r'\d+: the index is stale.*--index_only'):
    source.read(np.array([1]))


def read_examples(source) -> list[dict]:
  """Every example of a source, in record order, as numpy."""
  return [jax.tree.map(lambda x: x.numpy(), source.parse(tf.constant(record)))
          for record in source.read(np.arange(source.num_examples))]


# Rows each process reads: even contiguous shares, and scattered blocks as on a TPU slice,
# where a host's devices sit at scattered mesh positions (sharding.process_batch_rows).
ROW_SHARES = {'1 process': [range(8)], '2 processes': [range(4), range(4, 8)],
              '4 processes': [range(2 * p, 2 * p + 2) for p in range(4)],
              'scattered blocks': [[0, 1, 6, 7], [2, 3, 4, 5]]}


# Per-example ops only (mixup mixes within a process's rows): random crops, flips, RandAugment.
AUGMENTING = 'decode|inception_crop(16)|flip_lr|randaug(2, 5)|value_range(-1, 1)|onehot(6)'


@pytest.mark.parametrize('shares', ROW_SHARES.values(), ids=ROW_SHARES.keys())
def test_each_process_reads_its_rows_of_the_same_global_batches(records, shares):
  """Steps 0-2 are epoch 0 (24 records, batch 8): every record once; step 4 is in epoch 1."""
  config = _config(records[0], pp_train=AUGMENTING)
  steps = {step: np.zeros((8, 16, 16, 3), np.float32) for step in (0, 1, 2, 4)}
  for rows in shares:
    batches = pipeline.train_dataset(config, 0, rows).as_numpy_iterator()
    for step, batch in zip(range(5), batches):
      if step in steps:
        steps[step][list(rows)] = batch['image']
  expected = _global_batches(records[0])
  for step, images in steps.items():
    np.testing.assert_array_equal(images, expected[step], err_msg=f'step {step}')
  epoch = np.concatenate([steps[s] for s in (0, 1, 2)]).reshape(24, -1)
  assert len(np.unique(epoch, axis=0)) == 24  # a permutation of the split


@functools.cache
def _global_batches(path: str) -> dict:
  """The global batches as the data order defines them, computed example by example without
  the pipeline: row r of step s is example k = 8 s + r, record index_shuffle(k mod N) of the
  permutation seeded (seed, k div N), preprocessed with its random ops seeded (seed, k)."""
  config = _config(path, pp_train=AUGMENTING)
  src = sources.records_source(path, 'train')
  preprocess = ops.get_preprocess_fn(AUGMENTING)
  batches = {}
  for step in (0, 1, 2, 4):
    images = []
    for k in range(8 * step, 8 * step + 8):
      record = tf.random.experimental.index_shuffle(
          k % src.num_examples, [config.seed, k // src.num_examples], src.num_examples - 1)
      example = src.parse(tf.constant(src.read(np.array([int(record)]))[0]))
      example[ops.SEED_KEY] = tf.constant([config.seed, k], tf.int64)
      images.append(preprocess(example)['image'].numpy())
    batches[step] = np.stack(images)
  return batches


def test_record_sets_without_offsets_are_refused_until_indexed(records, tmp_path):
  out = tmp_path / 'copy'
  shutil.copytree(records[0], out)
  offsets = np.load(sources.record_offsets_path(str(out), 'train'))
  os.remove(sources.record_offsets_path(str(out), 'train'))
  with pytest.raises(FileNotFoundError, match='make_records --index_only'):
    sources.records_source(str(out), 'train')
  assert make_records.write_index(str(out), 'train', log=io.StringIO()) == 24
  np.testing.assert_array_equal(np.load(sources.record_offsets_path(str(out), 'train')), offsets)


def _config(path, **overrides):
  from configs import pretrain_jft  # pylint: disable=g-import-not-at-top
  config = pretrain_jft.get_config()
  config.data.path = path
  config.data.num_classes = 6
  config.image_size = 16
  config.batch_size = 8
  config.pp_train = ('decode|inception_crop(16)|flip_lr|randaug(2, 5)|value_range(-1, 1)|'
                     'onehot(6)|mixup(0.5)')
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def test_resume_yields_exactly_the_batches_of_a_fresh_run(records):
  config = _config(records[0])
  mesh = sharding.make_mesh(config.mesh)
  fresh = pipeline.train_iterator(config, mesh)
  batches = [jax.device_get(next(fresh)) for _ in range(5)]
  resumed = pipeline.train_iterator(config, mesh, start_step=3)
  for expected in batches[3:]:
    got = jax.device_get(next(resumed))
    for key in ('image', 'labels'):
      np.testing.assert_array_equal(got[key], expected[key])
  assert batches[0]['image'].shape == (8, 16, 16, 3)
  assert not np.array_equal(batches[0]['image'], batches[1]['image'])
  labels = batches[0]['labels']  # multi-hot mixed by mixup: rows sum to >= 1 class
  assert labels.shape == (8, 6) and (labels.sum(1) > 0.99).all()


def test_input_pipelines_run_without_tf_data_autotuning(records):
  """An autotuned tf.data iterator is deleted only once its model thread wakes (it sleeps in
  periods that grow to 60 s), with the GIL held: the quickstart froze 44 s at its end. Training
  and evaluation pipelines turn autotuning off and set their parallelism themselves."""
  config = _config(records[0])
  assert pipeline.train_dataset(config, 0).options().autotune.enabled is False
  assert pipeline._options().autotune.enabled is False  # eval_batches' too  pylint: disable=protected-access


def _example_map_parallelism(dataset) -> set:
  """num_parallel_calls of the maps inside the dataset's functions (the one preprocessing
  examples sits in the interleave's), read from the dataset's own graph."""
  graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())  # pylint: disable=protected-access
  calls = set()
  for function in graph.library.function:
    values = {n.name: n for n in function.node_def if n.op == 'Const'}
    calls |= {int(tf.make_ndarray(values[n.input[-1].split(':')[0]].attr['value'].tensor))
              for n in function.node_def if n.op.startswith('ParallelMapDataset')}
  return calls


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='needs 2 cores to pin to 1')
def test_a_process_pinned_to_one_core_maps_one_example_at_a_time(records):
  """Parallelism follows the cores the process may use (a pinned benchmark, a container's share),
  not the machine's count: tf.data threads beyond them only contend."""
  config = _config(records[0], pp_train='decode|resize(16)|value_range(-1, 1)|onehot(6)')
  cores = os.sched_getaffinity(0)
  assert _example_map_parallelism(pipeline.train_dataset(config, 0)) == {len(cores)}
  os.sched_setaffinity(0, {min(cores)})  # this thread only: what a pinned process reads
  try:
    pinned = pipeline.train_dataset(config, 0)
  finally:
    os.sched_setaffinity(0, cores)
  assert _example_map_parallelism(pinned) == {1}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='needs 2 cores to pin to 1')
def test_a_read_waiting_on_storage_leaves_the_one_core_preprocessing(records):
  """On one core tf.data has one thread; a read waiting on storage (tens of ms a request on
  gs://) must not hold it. The second read waits until the first batch is out, which needs
  preprocessing to go on meanwhile: with the reads on tf.data's thread it never comes."""
  config = _config(records[0], pp_train='decode|resize(16)|value_range(-1, 1)|onehot(6)')
  src = sources.records_source(records[0], 'train')
  first_batch_out, calls, waited = threading.Event(), itertools.count(1), []

  def read_many(indices):
    if next(calls) == 2:
      waited.append(first_batch_out.wait(30))
    return src._read_many(indices)  # pylint: disable=protected-access
  waiting = sources.Source(src.num_examples, read_many, src.parse, 'waits for the first batch')
  cores = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(cores)})  # this thread only: what a pinned process reads
  try:
    batches = pipeline.train_dataset(config, 0, src=waiting).as_numpy_iterator()
    first = next(batches)
  finally:
    os.sched_setaffinity(0, cores)
  first_batch_out.set()
  for _ in range(32):  # batch 32 is the second read's first (32 batches of 8 a read)
    next(batches)
  assert first['image'].shape == (8, 16, 16, 3)
  assert waited == [True]  # the second read saw the first batch out while it waited


def test_corrupt_images_at_training_time_are_skipped_and_counted(tmp_path):
  """Records written by other tools may hold bad images; they are replaced and counted."""
  good = tf.io.encode_png(np.full((8, 8, 3), 200, np.uint8)).numpy()
  os.makedirs(tmp_path / 'out')
  with tf.io.TFRecordWriter(str(tmp_path / 'out' / sources.record_file_name('train', 0, 1))) as w:
    for i in range(8):
      image = b'corrupt' if i in (2, 5) else good
      w.write(make_records._example(image, [i % 3]))  # pylint: disable=protected-access
  with open(sources.record_info_path(str(tmp_path / 'out'), 'train'), 'w') as f:
    json.dump({'shard_sizes': [8], 'num_classes': 3}, f)
  make_records.write_index(str(tmp_path / 'out'), 'train', log=io.StringIO())
  config = _config(str(tmp_path / 'out'))
  config.pp_train = 'decode|resize(8)|value_range(0, 1)|onehot(3)'
  batches = pipeline.train_iterator(config, sharding.make_mesh(config.mesh))
  batch = jax.device_get(next(batches))
  assert batches.skipped_images() == 2
  np.testing.assert_allclose(batch['image'], 200 / 255, rtol=1e-6)  # no grey stand-in left
  assert sorted(np.argmax(batch['labels'], 1)) == sorted([0, 1, 0, 1, 0, 1, 0, 1])
  next(batches)
  assert batches.skipped_images() == 4


def test_skipped_images_are_counted_by_one_process_per_row():
  """A process counts the failed rows among those it counts (sharding.process_counted_rows),
  so rows that several processes read (the model axis spanning them) are counted once."""
  failed = np.array([1, 0, 1, 0, 0, 0, 0, 1], bool)
  batch = {'image': np.zeros((8, 2, 2, 3), np.float32), 'labels': np.zeros((8, 3), np.float32),
           pipeline.SKIPPED_KEY: failed}
  dataset = tf.data.Dataset.from_tensors(batch).repeat()
  mesh = sharding.make_mesh(dict(data=-1))
  counting_half = pipeline.TrainIterator(dataset, mesh, 8, rows=range(8), counted=range(4))
  next(counting_half)
  assert counting_half.skipped_images() == 2  # rows 0 and 2; row 7 is another process's
  assert pipeline.TrainIterator(dataset, mesh, 8).skipped == 0  # nothing handed out yet


@pytest.mark.slow
def test_pretrain_jft_small_cpu_run_logs_val_prec1(tmp_path):
  from vit_jax.train import trainer  # pylint: disable=g-import-not-at-top
  for split, n, seed in (('train', 192, 0), ('val', 64, 1)):
    rows = write_multilabel_images(str(tmp_path / split), n, size=24, seed=seed)
    write_csv(tmp_path / f'{split}.csv', rows)
    make_records.write_records(str(tmp_path / split), str(tmp_path / f'{split}.csv'),
                               str(tmp_path / 'records'), 8, split=split, log=io.StringIO())
  from configs import pretrain_jft  # pylint: disable=g-import-not-at-top
  config = pretrain_jft.get_config()  # pp strings follow image_size and data.num_classes
  config.data.path = str(tmp_path / 'records')
  config.data.num_classes = 6
  config.image_size = 16
  config.total_steps, config.log_every, config.eval_every, config.checkpoint_every = 6, 2, 6, 0
  config.batch_size = 16
  config.eval_batch_size = 32
  config.model = dict(name='testing')
  config.schedule.warmup_steps = 2
  last = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    lines = [json.loads(line) for line in f]
  evals = [m for m in lines if 'val_prec@1' in m]
  # Images hold 2 of the 6 colours on average: a constant guess scores about 1/3; this run
  # measured 0.75.
  assert [m['step'] for m in evals] == [6] and evals[0]['val_prec@1'] > 0.5
  assert last['skipped_images'] == 0
  assert all(np.isfinite(m['train_loss']) for m in lines if 'train_loss' in m)
