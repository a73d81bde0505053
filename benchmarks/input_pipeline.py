"""Input pipeline speed: images/sec on one core for the training preprocessing of real JPEGs.

    python -m benchmarks.input_pipeline [--num_images=200 --repeats=5]

Generates natural-looking 500x375 JPEGs (smooth colour fields, edges, noise; ImageNet's typical
size and quality), then times, on one thread each, in the same run:
  bare decode       tf.io.decode_jpeg, the floor every pipeline pays;
  decode+crop+flip  'decode|inception_crop(224)|flip_lr' (fused: only the crop is decoded);
  unfused           the same with the whole image decoded before cropping;
  training wrapper  the fused ops inside the pipeline's skip-and-count wrapper.
Prints the median images/sec of each and its median ratio to bare decode within a round
(robust to the load of other processes), then one JSON line.
"""
import argparse
import json
import time

import numpy as np
import tensorflow as tf

from vit_jax.data import ops, pipeline


def natural_jpegs(num_images: int, seed: int = 0) -> list[bytes]:
  rng = np.random.RandomState(seed)
  h, w = 375, 500
  y, x = np.mgrid[:h, :w] / w
  images = []
  for _ in range(num_images):
    freq = rng.uniform(1, 8, (3, 2))
    phase = rng.uniform(0, 2 * np.pi, 3)
    image = np.stack([np.sin(freq[c, 0] * 2 * x + phase[c]) * np.cos(freq[c, 1] * 2 * y)
                      for c in range(3)], -1) * 80 + 128
    for _ in range(4):  # a few hard-edged objects
      top, left = rng.randint(0, h - 60), rng.randint(0, w - 60)
      image[top:top + rng.randint(30, 150), left:left + rng.randint(30, 150)] = rng.randint(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    array = np.clip(image, 0, 255).astype(np.uint8)
    images.append(tf.io.encode_jpeg(array, quality=90).numpy())
  return images


def _one_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  return ds.with_options(options)


def images_per_sec(cases: dict, count: int, repeats: int) -> dict:
  """{case: [images/sec per pass]} over `repeats` full passes (after one warm-up pass each),
  the cases taking turns so that load from other processes hits them alike."""
  iterables = {name: _one_thread(ds) for name, ds in cases.items()}
  rates = {name: [] for name in cases}
  for i in range(repeats + 1):
    for name, ds in iterables.items():
      start = time.perf_counter()
      for _ in ds:
        pass
      if i:
        rates[name].append(count / (time.perf_counter() - start))
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=200)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  jpegs = natural_jpegs(args.num_images)
  print(f'{len(jpegs)} JPEGs 500x375, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB')

  def examples():
    seeds = tf.stack([tf.zeros(len(jpegs), tf.int64), tf.range(len(jpegs), dtype=tf.int64)], 1)
    return tf.data.Dataset.from_tensor_slices({'image': jpegs, ops.SEED_KEY: seeds})

  fused = ops.get_preprocess_fn('decode|inception_crop(224)|flip_lr')
  decode, crop, flip = (ops.get_op(s) for s in ('decode', 'inception_crop(224)', 'flip_lr'))
  cases = {
      'bare decode': examples().map(lambda ex: tf.io.decode_jpeg(ex['image'], channels=3)),
      'decode+crop+flip': examples().map(fused),
      'unfused': examples().map(lambda ex: flip(crop(decode(dict(ex))))),
      'training wrapper': examples().apply(pipeline._skip_failures(fused)),  # pylint: disable=protected-access
  }
  rates = images_per_sec(cases, len(jpegs), args.repeats)
  bare = np.array(rates['bare decode'])
  summary = {}
  for name, per_pass in rates.items():
    # Ratios within a round (passes run back to back) cancel most of the shared-CPU drift.
    ratio = float(np.median(np.array(per_pass) / bare))
    summary[name] = {'images_per_sec': round(float(np.median(per_pass)), 1),
                     'ratio_to_bare_decode': round(ratio, 3)}
    print(f'{name:18s} {np.median(per_pass):8.1f} images/sec/core (median of {len(per_pass)})'
          f'   ratio to bare decode {ratio:.2f}')
  print(json.dumps(summary))

if __name__ == '__main__':
  main()
