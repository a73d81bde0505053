import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import ops, pipeline, sources


def test_digits_builder_splits_and_labels(tfds_data_dir):
  builder = tfds.builder('sklearn_digits', data_dir=tfds_data_dir)
  sources.prepare_tfds(builder)
  assert builder.info.splits['train'].num_examples == 1500
  assert builder.info.splits['test'].num_examples == 297
  ids, labels = {}, {}
  for split in ('train', 'test'):
    examples = list(tfds.data_source('sklearn_digits', split=split, data_dir=tfds_data_dir))
    ids[split] = {int(e['id']) for e in examples}
    labels[split] = np.array([e['label'] for e in examples])
    assert examples[0]['image'].shape == (8, 8, 1) and examples[0]['image'].dtype == np.uint8
    assert max(e['image'].max() for e in examples) == 255
  assert not ids['train'] & ids['test']
  assert len(ids['train'] | ids['test']) == 1797
  for split in labels:
    assert labels[split].min() == 0 and labels[split].max() == 9
    assert len(np.unique(labels[split])) == 10


def test_tfds_source_reads_by_index_and_refuses_tfrecord_storage(tfds_data_dir, tmp_path):
  source = sources.tfds_source('sklearn_digits', 'test', tfds_data_dir)
  read_before = source.records_read  # the source is shared by everything in this process
  examples = [source.parse(tf.constant(r)) for r in source.read(np.array([5, 0, 5]))]
  assert int(examples[0]['id']) == int(examples[2]['id']) != int(examples[1]['id'])
  assert source.num_examples == 297 and source.records_read - read_before == 3
  tfds.builder('sklearn_digits', data_dir=str(tmp_path)).download_and_prepare()  # TFRecord
  with pytest.raises(ValueError, match='tfds convert_format --dataset_dir=.*array_record'):
    sources.tfds_source('sklearn_digits', 'test', str(tmp_path))


def test_record_order_is_a_fresh_permutation_every_epoch():
  order = pipeline.record_index(seed=3, num_examples=10)
  epochs = np.array([int(order(tf.constant(k, tf.int64))) for k in range(30)]).reshape(3, 10)
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert len({tuple(e) for e in epochs}) == 3
  again = pipeline.record_index(seed=3, num_examples=10)  # a pure function of (seed, k)
  assert [int(again(tf.constant(k, tf.int64))) for k in range(10, 20)] == list(epochs[1])


def _example():
  image = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8, 1) * 4
  png = tf.io.encode_png(image)
  return {'image': png, 'label': tf.constant(3), ops.SEED_KEY: tf.constant([1, 2], tf.int64)}


def test_ops_compose_decode_resize_range_onehot():
  out = ops.get_preprocess_fn('decode|resize(16)|value_range(-1, 1)|onehot(5)')(_example())
  assert out['image'].shape == (16, 16, 3)
  assert float(tf.reduce_min(out['image'])) >= -1 and float(tf.reduce_max(out['image'])) <= 1
  np.testing.assert_array_equal(out['labels'], [0, 0, 0, 1, 0])


def test_random_ops_are_deterministic_per_seed():
  pp = ops.get_preprocess_fn('decode|random_crop(6, pad=1)|flip_lr')
  a, b = pp(_example()), pp(_example())
  np.testing.assert_array_equal(a['image'], b['image'])
  other = dict(_example(), **{ops.SEED_KEY: tf.constant([1, 3], tf.int64)})
  crops = {pp(dict(other, **{ops.SEED_KEY: tf.constant([1, s], tf.int64)}))['image'].numpy()
           .tobytes() for s in range(10)}
  assert len(crops) > 1


def test_bad_ops_fail_at_parse_time_naming_the_op():
  with pytest.raises(ValueError, match="unknown preprocessing op 'frobnicate'"):
    ops.get_preprocess_fn('decode|frobnicate(3)')
  with pytest.raises(ValueError, match="'resize'"):
    ops.get_preprocess_fn('decode|resize(16, colour=2)')
