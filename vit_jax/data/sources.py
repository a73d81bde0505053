"""Example sources: any tensorflow-datasets dataset (incl. the offline digits), split per process."""
import dataclasses

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

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
