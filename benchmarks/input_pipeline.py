"""Input pipeline speed: images per second and CPU per image of the training preprocessing of
real JPEGs, on 1 and 2 cores, against bare decoding; and what a resumed run reads before its
first batch.

    python -m benchmarks.input_pipeline [--num_images=200 --repeats=5 --cores=1,2]
        [--resume_at=10,100000] [--gcs_latency_ms=50]

Generates natural-looking 500x375 JPEGs (smooth colour fields, edges, noise; ImageNet's typical
size and quality) and writes them with make_records. Then, in a fresh process pinned to N cores
(os.sched_setaffinity) for each N of --cores, with tf.data threading as training has it, times in
turns:
  bare decode     tf.io.decode_jpeg of every JPEG, the floor every pipeline pays;
  ops alone       the training preprocessing 'decode|inception_crop(224)|flip_lr|value_range'
                  on the JPEGs in memory (the crop fused into the decode);
  whole pipeline  the records read by index through `pipeline.train_dataset`, as training reads
                  them (order, read, parse, preprocess, batch).
Prints each case's median images/sec, its CPU per image (all of the process's threads: robust
to the load of other processes, and what "per core" means) and the median ratio to bare decode
within a round, by both measures, with the machine's load. Then, for each --resume_at step,
starts a fresh process that builds the training input at that step (batch --resume_batch) and
takes one batch: seconds from process start to that batch and records read. Ends with one JSON
line. Temporary files go when it ends.

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

from vit_jax.cli import startup

tf = startup.import_tensorflow()  # without TensorFlow's start-up lines
from vit_jax.data import make_records, ops, pipeline  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

_PP = 'decode|inception_crop(224)|flip_lr|value_range(-1, 1)'


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
      seed=0, batch_size=batch_size, pp_train=_PP,
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


def _cpu_seconds() -> float:
  return time.process_time()  # every thread of the process


def local_rates(records: str, repeats: int, batch: int = 25, passes: int = 3) -> dict:
  """Runs in a fresh process pinned to the cores to measure: {case: [(images/s, CPU ms per
  image)]} over `repeats` rounds, the cases taking turns so that load from other processes hits
  them alike. A round times `passes` passes over the images on an iterator already through one
  pass (its buffers full, as in training, at both ends of the timing), and then drops the
  iterator, so that no case's readahead runs while another is timed."""
  images = os.path.join(os.path.dirname(records), 'images')
  jpegs = [open(os.path.join(images, f'{i}.jpg'), 'rb').read()  # pylint: disable=consider-using-with
           for i in range(len(os.listdir(images)))]
  count = len(jpegs) // batch * batch  # every case passes over the same number of images
  seeds = tf.stack([tf.zeros(count, tf.int64), tf.range(count, dtype=tf.int64)], 1)
  examples = tf.data.Dataset.from_tensor_slices(
      {'image': jpegs[:count], ops.SEED_KEY: seeds}).repeat()
  cases = {  # (dataset, images per element)
      'bare decode': (examples.map(lambda ex: tf.io.decode_jpeg(ex['image'], channels=3),
                                   num_parallel_calls=tf.data.AUTOTUNE), 1),
      'ops alone': (examples.map(ops.get_preprocess_fn(_PP),
                                 num_parallel_calls=tf.data.AUTOTUNE), 1),
      'whole pipeline': (pipeline.train_dataset(_config(records, batch), 0, range(batch)), batch),
  }
  rates = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (ds, per_element) in cases.items():
      iterator = iter(ds.with_options(pipeline._options()))  # pylint: disable=protected-access
      for _ in range(count // per_element):  # warm-up pass: traced, buffers filled
        next(iterator)
      start, cpu = time.perf_counter(), _cpu_seconds()
      for _ in range(passes * count // per_element):
        next(iterator)
      rates[name].append((passes * count / (time.perf_counter() - start),
                          (_cpu_seconds() - cpu) / (passes * count) * 1e3))
      del iterator  # stops its threads before the next case is timed
  return rates


def on_cores(records: str, cores: int, repeats: int) -> dict:
  """local_rates in a fresh process on `cores` cores: per case, median images/s and CPU ms per
  image, and the medians of the within-round ratios to bare decode by both."""
  code = (f'import json, os; os.sched_setaffinity(0, {set(range(cores))}); '
          'from benchmarks import input_pipeline as b; '
          f'print(json.dumps(b.local_rates({records!r}, {repeats})))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  rates = {name: np.array(v) for name, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
  bare = rates['bare decode']
  return {name: {'images_per_sec': round(float(np.median(r[:, 0])), 1),
                 'cpu_ms_per_image': round(float(np.median(r[:, 1])), 3),
                 'ratio_to_bare_decode': round(float(np.median(r[:, 0] / bare[:, 0])), 3),
                 'cpu_ratio_to_bare_decode': round(float(np.median(bare[:, 1] / r[:, 1])), 3)}
          for name, r in rates.items()}


_BUCKET = 'bench-bucket'
# TensorFlow's inter-op threads in the gcs worker: a read waiting on the network holds one.
_INTER_OP_THREADS = 8


def _proxy_control(url: str, **query) -> dict:
  with urllib.request.urlopen(f'{url}/_proxy/stats?' + '&'.join(
      f'{k}={v}' for k, v in query.items())) as response:
    return json.loads(response.read())


def _pipeline_rate(config, src, batches: int) -> tuple[float, float]:
  """(images/s, CPU ms per image: all of the process's threads) of the whole pipeline as
  training runs it."""
  ds = pipeline.train_dataset(config, 0, range(config.batch_size), src).take(batches)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in ds:
    pass
  images = batches * config.batch_size
  return images / (time.perf_counter() - start), (time.process_time() - cpu) / images * 1e3


def gcs_worker(records: str, proxy_url: str, latency_ms: float, rounds: int) -> dict:
  """Runs in a fresh process on one core, STORAGE_EMULATOR_HOST set to the proxy: uploads the
  records, measures the harness's rate, then local and gcs passes of the whole pipeline."""
  from vit_jax.storage import paths  # pylint: disable=g-import-not-at-top
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
  with tempfile.TemporaryDirectory(prefix='input_pipeline_gcs_') as folder:
    # Small shards: the emulator copies a whole object to answer each range read of it.
    records = write_records([jpegs[i % len(jpegs)] for i in range(num_images)], folder,
                            num_shards=32)
    return _gcs_comparison(records, latency_ms, rounds)


def _gcs_comparison(records: str, latency_ms: float, rounds: int) -> dict:
  cores = sorted(os.sched_getaffinity(0))
  pipeline_core, harness_cores = cores[:1], cores[1:] or cores
  harness = subprocess.Popen([sys.executable, '-m', 'tests.gcs_proxy', f'--bucket={_BUCKET}'],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    os.sched_setaffinity(harness.pid, harness_cores)
    proxy_url = harness.stdout.readline().strip()
    code = ('import json, os, sys; os.sched_setaffinity(0, {core}); '
            'from benchmarks import input_pipeline as b; '
            'b.tf.config.threading.set_inter_op_parallelism_threads(b._INTER_OP_THREADS); '
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
  parser.add_argument('--num_images', type=int, default=200,
                      help='JPEGs generated (a multiple of 25, the whole pipeline\'s batch)')
  parser.add_argument('--repeats', type=int, default=5, help='timed passes per case and core count')
  parser.add_argument('--cores', default='1,2',
                      help='core counts to pin the measuring process to, comma-separated')
  parser.add_argument('--resume_at', default='10,100000',
                      help='steps to resume the input at in a fresh process, comma-separated '
                      '(empty: none)')
  parser.add_argument('--resume_batch', type=int, default=512,
                      help='global batch of the resumed input')
  parser.add_argument('--gcs_latency_ms', type=float, default=None,
                      help='also read the records from the local GCS emulator at this latency '
                      'per request (see the docstring)')
  parser.add_argument('--gcs_images', type=int, default=1000,
                      help='records in the gcs comparison (the JPEGs repeated)')
  parser.add_argument('--gcs_rounds', type=int, default=3, help='local/gcs passes, alternating')
  args = parser.parse_args()
  available = len(os.sched_getaffinity(0))
  core_counts = [int(c) for c in args.cores.split(',') if int(c) <= available]
  jpegs = natural_jpegs(args.num_images)
  print(f'{len(jpegs)} JPEGs 500x375, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB; '
        f'load average before {[round(x, 2) for x in os.getloadavg()]}')
  summary = {}
  with tempfile.TemporaryDirectory(prefix='input_pipeline_') as folder:
    records = write_records(jpegs, folder)
    for cores in core_counts:
      summary[f'{cores}_cores'] = results = on_cores(records, cores, args.repeats)
      print(f'-- on {cores} core{"s" * (cores > 1)} (median of {args.repeats} passes; load '
            f'average {[round(x, 2) for x in os.getloadavg()]})')
      for name, r in results.items():
        print(f'{name:16s} {r["images_per_sec"]:8.1f} images/sec  {r["cpu_ms_per_image"]:6.3f} '
              f'CPU ms/image ({1e3 / r["cpu_ms_per_image"]:6.1f} per core-second)   ratio to '
              f'bare decode {r["ratio_to_bare_decode"]:.2f} '
              f'(by CPU {r["cpu_ratio_to_bare_decode"]:.2f})')
    if args.resume_at:
      summary['resume'] = resume_costs(records, [int(s) for s in args.resume_at.split(',')],
                                       args.resume_batch)
  if args.gcs_latency_ms is not None:
    summary['gcs'] = gcs_comparison(jpegs, args.gcs_images, args.gcs_latency_ms,
                                    args.gcs_rounds)
  summary['load_average'] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
