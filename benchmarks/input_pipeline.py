"""Input pipeline speed: images/sec on one core for the training preprocessing of real JPEGs,
and what a resumed run reads before its first batch.

    python -m benchmarks.input_pipeline [--num_images=200 --repeats=5 --resume_at=10,100000]

Generates natural-looking 500x375 JPEGs (smooth colour fields, edges, noise; ImageNet's typical
size and quality), then times, on one thread each, in the same run:
  bare decode       tf.io.decode_jpeg, the floor every pipeline pays;
  decode+crop+flip  'decode|inception_crop(224)|flip_lr' (fused: only the crop is decoded);
  unfused           the same with the whole image decoded before cropping;
  training wrapper  the fused ops inside the pipeline's skip-and-count wrapper;
  whole pipeline    the same JPEGs written by make_records, read by index through
                    `pipeline.train_dataset` (order, parse, preprocess, batch) on one thread.
Prints the median images/sec of each and its median ratio to bare decode within a round
(robust to the load of other processes). Then, for each --resume_at step, starts a fresh
process that builds the training input at that step (batch --resume_batch) and takes one batch:
seconds from process start to that batch and records read. Ends with one JSON line.

With --gcs_latency_ms=L, the whole pipeline also reads the same records (--gcs_images of them)
from a bucket of the local GCS emulator behind tests/gcs_proxy.py, which adds L ms to every
request (`pip install -e '.[test]'` brings the emulator). The harness (emulator + proxy) runs in
its own process on the other cores, the pipeline in a fresh process on one core (TensorFlow with
8 inter-op threads, so that a read waiting on the network does not idle it); local and gcs
passes alternate. It prints the harness's own rate without latency (what it can serve), then
`gcs` images/s, `ratio_to_local` (median of the rounds' ratios) and the requests in flight and
connections the proxy saw, with the machine's load.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import tensorflow as tf

from vit_jax.data import make_records, ops, pipeline

_PP = 'decode|inception_crop(224)|flip_lr'


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


def write_records(jpegs: list[bytes], folder: str, num_shards: int = 4) -> str:
  """The JPEGs as a make_records record set (one class each); returns its data.path."""
  os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
  rows = []
  for i, jpeg in enumerate(jpegs):
    with open(os.path.join(folder, 'images', f'{i}.jpg'), 'wb') as f:
      f.write(jpeg)
    rows.append(f'{i}.jpg,{i % 10}')
  with open(os.path.join(folder, 'labels.csv'), 'w') as f:
    f.write('image,labels\n' + '\n'.join(rows) + '\n')
  out = os.path.join(folder, 'records')
  make_records.write_records(os.path.join(folder, 'images'), os.path.join(folder, 'labels.csv'),
                             out, num_shards=num_shards, log=io.StringIO())
  return out


def _config(records: str, batch_size: int):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=batch_size, pp_train=_PP + '|value_range(-1, 1)',
      data=dict(path=records, train_split='train', prefetch=2)))


def first_batch(records: str, step: int, batch_size: int) -> dict:
  """Runs in a fresh process: one batch of the training input at `step`; what it took."""
  src = pipeline.source(_config(records, batch_size).data, 'train')
  batch = next(pipeline.train_dataset(_config(records, batch_size), step, range(batch_size), src)
               .as_numpy_iterator())
  assert batch['image'].shape[0] == batch_size
  return {'records_read': src.records_read}


def resume_costs(records: str, steps: list[int], batch_size: int) -> dict:
  costs = {}
  for step in steps:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, '-c', 'import json, sys; from benchmarks import input_pipeline as b; '
         f'print(json.dumps(b.first_batch({records!r}, {step}, {batch_size})))'],
        capture_output=True, text=True, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    costs[step] = dict(json.loads(out.stdout.strip().splitlines()[-1]),
                       seconds=round(time.perf_counter() - start, 2))
    print(f'resume at step {step:>7} (batch {batch_size}): first batch {costs[step]["seconds"]:.2f} s '
          f'after process start, {costs[step]["records_read"]} records read')
  return costs


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


_BUCKET = 'bench-bucket'
_HOST_CORES = 8


def _proxy_control(url: str, **query) -> dict:
  with urllib.request.urlopen(f'{url}/_proxy/stats?' + '&'.join(
      f'{k}={v}' for k, v in query.items())) as response:
    return json.loads(response.read())


def _pipeline_rate(config, src, batches: int) -> tuple[float, float]:
  """(images/s, CPU ms per image: all of the process's threads) of the whole pipeline as
  training runs it, but for tf.data's autotuning budget: that of a host with _HOST_CORES cores
  (it caps parallel reads at the cores it sees)."""
  options = tf.data.Options()
  options.autotune.cpu_budget = _HOST_CORES
  ds = pipeline.train_dataset(config, 0, range(config.batch_size), src).take(batches)
  ds = ds.with_options(options)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in ds:
    pass
  images = batches * config.batch_size
  return images / (time.perf_counter() - start), (time.process_time() - cpu) / images * 1e3


def gcs_worker(records: str, proxy_url: str, latency_ms: float, rounds: int) -> dict:
  """Runs in a fresh process on one core, STORAGE_EMULATOR_HOST set to the proxy: uploads the
  records, measures the harness's rate, then local and gcs passes of the whole pipeline."""
  from vit_jax import paths  # pylint: disable=g-import-not-at-top
  paths.gcs().put(records, f'{_BUCKET}/records', recursive=True)
  remote = f'gs://{_BUCKET}/records'
  configs = {'local': _config(records, 25), 'gcs': _config(remote, 25)}
  sources = {k: pipeline.source(c.data, 'train') for k, c in configs.items()}
  files = [f for f in sorted(os.listdir(records)) if f.endswith('.tfrecord')]
  sizes = [os.path.getsize(os.path.join(records, f)) for f in files]
  rng = np.random.RandomState(0)
  ranges = [(f'{remote}/{files[i]}', int(s), int(s) + 40_000) for i in rng.randint(len(files), size=2000)
            for s in [rng.randint(0, sizes[i] - 40_000)]]
  _proxy_control(proxy_url, latency_ms=0, reset=1)
  start = time.perf_counter()
  paths.RangeReader().read(ranges)
  harness = len(ranges) / (time.perf_counter() - start)
  _proxy_control(proxy_url, latency_ms=latency_ms)
  batches = sources['local'].num_examples // 25
  for name in configs:  # warm-up: tf.data's functions traced, connections opened
    _pipeline_rate(configs[name], sources[name], 2)
  rates, cpu, proxy = {'local': [], 'gcs': []}, {'local': [], 'gcs': []}, []
  for _ in range(rounds):
    for name in configs:
      _proxy_control(proxy_url, reset=1)
      rate, cpu_ms = _pipeline_rate(configs[name], sources[name], batches)
      rates[name].append(rate)
      cpu[name].append(cpu_ms)
      if name == 'gcs':
        proxy.append(_proxy_control(proxy_url))
  ratios = np.array(rates['gcs']) / np.array(rates['local'])
  return {'latency_ms': latency_ms, 'images_per_sec': round(float(np.median(rates['gcs'])), 1),
          'local_images_per_sec': round(float(np.median(rates['local'])), 1),
          'ratio_to_local': round(float(np.median(ratios)), 3),
          'cpu_ms_per_image': round(float(np.median(cpu['gcs'])), 3),
          'local_cpu_ms_per_image': round(float(np.median(cpu['local'])), 3),
          'requests_in_flight_mean': float(np.median([p['mean_in_flight'] for p in proxy])),
          'requests_in_flight_max': max(p['max_in_flight'] for p in proxy),
          'connections_max': max(p['max_connections'] for p in proxy),
          'harness_reads_per_sec': round(harness, 1), 'images_per_pass': batches * 25}


def gcs_comparison(jpegs: list[bytes], num_images: int, latency_ms: float, rounds: int) -> dict:
  """The same records local and in the emulator's bucket at `latency_ms`: see the docstring."""
  # Small shards: the emulator copies a whole object to answer each range read of it.
  records = write_records([jpegs[i % len(jpegs)] for i in range(num_images)],
                          tempfile.mkdtemp(prefix='input_pipeline_gcs_'), num_shards=32)
  cores = sorted(os.sched_getaffinity(0))
  pipeline_core, harness_cores = cores[:1], cores[1:] or cores
  harness = subprocess.Popen([sys.executable, '-m', 'tests.gcs_proxy', f'--bucket={_BUCKET}'],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    os.sched_setaffinity(harness.pid, harness_cores)
    proxy_url = harness.stdout.readline().strip()
    code = ('import json, os, sys; os.sched_setaffinity(0, {core}); '
            'from benchmarks import input_pipeline as b; '
            'b.tf.config.threading.set_inter_op_parallelism_threads(b._HOST_CORES); '
            'print(json.dumps(b.gcs_worker({records!r}, {url!r}, {latency}, {rounds})))').format(
                core=set(pipeline_core), records=records, url=proxy_url, latency=latency_ms,
                rounds=rounds)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy_url, TF_CPP_MIN_LOG_LEVEL='3')
    for variable in ('TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING'):
      env.pop(variable, None)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True, env=env)
  finally:
    harness.stdin.close()
    harness.wait(timeout=30)
  gcs = dict(json.loads(out.stdout.strip().splitlines()[-1]),
             load_average=[round(x, 2) for x in os.getloadavg()])
  print(f'gcs harness (emulator + proxy, cores {harness_cores}): '
        f'{gcs["harness_reads_per_sec"]:.0f} range reads/s without latency')
  print(f'local records    {gcs["local_images_per_sec"]:8.1f} images/sec (core {pipeline_core}, '
        f'median of {rounds} passes of {gcs["images_per_pass"]})')
  print(f'gcs {latency_ms:g} ms/request {gcs["images_per_sec"]:8.1f} images/sec   ratio_to_local '
        f'{gcs["ratio_to_local"]:.2f}   requests in flight: mean {gcs["requests_in_flight_mean"]:g},'
        f' max {gcs["requests_in_flight_max"]}; connections max {gcs["connections_max"]}   '
        f'(load average {gcs["load_average"]})')
  # On a loaded machine the core's share left to the pipeline swings between passes; the CPU
  # it spends per image does not: the reader's own cost, whatever the load.
  print(f'CPU per image: gcs {gcs["cpu_ms_per_image"]:.2f} ms, local '
        f'{gcs["local_cpu_ms_per_image"]:.2f} ms')
  return gcs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=200)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--resume_at', default='10,100000', help='steps, comma-separated')
  parser.add_argument('--resume_batch', type=int, default=512)
  parser.add_argument('--gcs_latency_ms', type=float, default=None,
                      help='also read the records from the local GCS emulator at this latency '
                      'per request (see the docstring)')
  parser.add_argument('--gcs_images', type=int, default=1000,
                      help='records in the gcs comparison (the JPEGs repeated)')
  parser.add_argument('--gcs_rounds', type=int, default=3, help='local/gcs passes, alternating')
  args = parser.parse_args()
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  jpegs = natural_jpegs(args.num_images)
  print(f'{len(jpegs)} JPEGs 500x375, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB')

  def examples():
    seeds = tf.stack([tf.zeros(len(jpegs), tf.int64), tf.range(len(jpegs), dtype=tf.int64)], 1)
    return tf.data.Dataset.from_tensor_slices({'image': jpegs, ops.SEED_KEY: seeds})

  fused = ops.get_preprocess_fn(_PP)
  records = write_records(jpegs, tempfile.mkdtemp(prefix='input_pipeline_'))
  batch = 25  # divides --num_images: every case passes over the same number of images
  whole = pipeline.train_dataset(_config(records, batch), 0, range(batch)).take(
      len(jpegs) // batch)
  decode, crop, flip = (ops.get_op(s) for s in ('decode', 'inception_crop(224)', 'flip_lr'))
  cases = {
      'bare decode': examples().map(lambda ex: tf.io.decode_jpeg(ex['image'], channels=3)),
      'decode+crop+flip': examples().map(fused),
      'unfused': examples().map(lambda ex: flip(crop(decode(dict(ex))))),
      'training wrapper': examples().apply(pipeline._skip_failures(fused)),  # pylint: disable=protected-access
      'whole pipeline': whole,
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
  summary['resume'] = resume_costs(records, [int(s) for s in args.resume_at.split(',')],
                                   args.resume_batch)
  if args.gcs_latency_ms is not None:
    summary['gcs'] = gcs_comparison(jpegs, args.gcs_images, args.gcs_latency_ms,
                                    args.gcs_rounds)
  print(json.dumps(summary))

if __name__ == '__main__':
  main()
