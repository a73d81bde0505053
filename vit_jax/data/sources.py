"""Example sources, split per process: any tensorflow-datasets dataset (incl. the offline digits)
and the sharded TFRecord files that `python -m vit_jax.data.make_records` writes."""
import dataclasses
import json
import os

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import paths, records_io
from vit_jax.data import digits, shapes  # noqa: F401  (register sklearn_digits, synthetic_shapes)


@dataclasses.dataclass
class Source:
  """One process's share of a split."""
  dataset: tf.data.Dataset  # examples as dicts; images still encoded bytes
  num_examples: int  # in this process's share
  num_examples_max: int  # largest share over processes: every process runs that many eval steps
  num_classes: int | None


def tfds_source(name: str, split: str, data_dir: str | None = None,
                process_index: int | None = None, process_count: int | None = None) -> Source:
  """Reads this process's even share of a tfds split, images left encoded for the `decode` op.

  The dataset is prepared on first use (for builders that need no manual download, like
  sklearn_digits); reading is deterministic so that training resumes exactly.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare()
  shares = tfds.even_splits(split, n=process_count, drop_remainder=False)
  sizes = [builder.info.splits[s].num_examples for s in shares]
  decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  read_config = tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1,
                                add_tfds_id=False)
  ds = builder.as_dataset(split=shares[process_index], shuffle_files=False,
                          decoders=decoders, read_config=read_config)
  label = builder.info.features.get('label') if hasattr(builder.info.features, 'get') else None
  num_classes = getattr(label, 'num_classes', None)
  return Source(ds, sizes[process_index], max(sizes), num_classes)


# tf.train.Example features of the record files; `labels` is read into the example's 'label'
# (a vector of class ids), so the same `onehot(K)` serves tfds and record sources.
RECORD_FEATURES = {
    'image': tf.io.FixedLenFeature([], tf.string),
    'labels': tf.io.VarLenFeature(tf.int64),
}


def record_file_name(split: str, shard: int, num_shards: int) -> str:
  return f'{split}-{shard:05d}-of-{num_shards:05d}.tfrecord'


def record_info_path(path: str, split: str) -> str:
  return str(paths.resolve(path) / f'{split}.json')


def read_record_info(path: str, split: str) -> dict:
  """The summary make_records writes beside the files: shard sizes, classes, skipped images."""
  info_path = record_info_path(path, split)
  if not paths.resolve(info_path).exists():
    raise FileNotFoundError(
        f'no records for split {split!r} in {path} ({info_path} is missing); write them with '
        f'python -m vit_jax.data.make_records --output={path} --split={split} ...')
  info = json.loads(paths.resolve(info_path).read_text())
  num_shards = len(info['shard_sizes'])
  files = [str(paths.resolve(path) / record_file_name(split, i, num_shards))
           for i in range(num_shards)]
  missing = [f for f in files if not paths.resolve(f).exists()]
  if missing:
    raise FileNotFoundError(f'{info_path} lists {num_shards} shards but {missing[0]} is missing '
                            f'({len(missing)} missing in all)')
  info['files'] = files
  return info


def _record_reader(path: str):
  """file name tensor -> its records: TensorFlow's reader, or for gs:// under a GCS emulator
  (which TensorFlow's GCS filesystem cannot reach) the same records read through epath."""
  if not (paths.is_remote(path) and os.environ.get(paths.EMULATOR_VARIABLE)):
    return tf.data.TFRecordDataset
  return lambda file: tf.data.Dataset.from_generator(
      lambda name: records_io.read(name.decode()), args=(file,),
      output_signature=tf.TensorSpec([], tf.string))


def _parse_record(serialized):
  example = tf.io.parse_single_example(serialized, RECORD_FEATURES)
  return {'image': example['image'], 'label': tf.sparse.to_dense(example['labels'])}


def records_source(path: str, split: str, process_index: int | None = None,
                   process_count: int | None = None) -> Source:
  """This process's share of a split written by make_records, images left encoded.

  With at least as many files as processes, process i reads files i, i+P, i+2P, ... (each host
  reads only its own files; make num_shards a multiple of the process count for even shares).
  With fewer files, every process reads all of them and keeps every P-th example.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  info = read_record_info(path, split)
  files, sizes = info['files'], info['shard_sizes']
  if len(files) >= process_count:
    mine = files[process_index::process_count]
    shares = [sum(sizes[i::process_count]) for i in range(process_count)]
    ds = tf.data.Dataset.from_tensor_slices(mine).interleave(
        _record_reader(path), cycle_length=min(len(mine), 16), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    total = sum(sizes)
    shares = [len(range(i, total, process_count)) for i in range(process_count)]
    ds = tf.data.Dataset.from_tensor_slices(files).flat_map(_record_reader(path)).shard(
        process_count, process_index)
  ds = ds.map(_parse_record, num_parallel_calls=tf.data.AUTOTUNE)
  return Source(ds, shares[process_index], max(shares), info.get('num_classes'))
