"""Input pipeline speed per core: ours against a plain streaming pipeline and timm's transform on
the same JPEGs, on 1 and 2 cores, quiet or busy; where each image's CPU goes; what a resumed run
reads before its first batch; reading from gs:// at real latency.

    python -m benchmarks.input_pipeline [--num_images=200 --repeats=3 --cores=1,2 --busy=0,1]
        [--sets=synthetic,photos,large] [--cases=...] [--profile] [--resume_at=10,100000]
        [--gcs_latency_ms=50] [--quick]

Three sets of JPEGs at quality 90, each written by make_records; two at 500x375 (ImageNet's
typical size):
  synthetic  generated: smooth colour fields, hard-edged objects, noise;
  photos     500x375 crops of the two camera photos scikit-learn ships (china.jpg, flower.jpg,
             640x427) at random offsets, half of them mirrored, re-encoded;
and large, the synthetic ones at 1500x1000: camera-size pictures, where crops are large enough
for fast_decode to decode at a reduced scale (on 500x375 no crop reaches twice 224 on both
sides, so there fast_decode decodes as without it). timm is left out on the large set.
Cases, timed in turns within each round (each on an iterator already through one pass over the
images, its buffers full as in training, and dropped after its turn so that no readahead runs
while another case is timed):
  bare decode        tf.io.decode_jpeg of every JPEG in memory: the floor every pipeline pays;
  streaming peer     a plain big_vision-style pipeline over the same record files:
                     TFRecordDataset, a shuffle buffer, parse, sample_distorted_bounding_box
                     (area 0.05-1, aspect 3/4-4/3) + decode_and_crop_jpeg + bilinear resize to
                     224 (cast back to uint8) + random flip + value_range(-1, 1), batches of 25,
                     tf.data's defaults (autotuned parallelism). It cannot start at a step
                     without reading what comes before it;
  ours               `pipeline.train_dataset` as training runs it (order, read by index, parse,
                     'decode|inception_crop(224)|flip_lr|value_range(-1, 1)', batches of 25);
  ours fast_decode   the same with inception_crop(224, fast_decode=True);
  timm               timm's training transform (PIL decode, RandomResizedCrop to 224 bilinear with
                     area 0.05-1, flip, ToTensor, Normalize; no colour jitter) on the JPEGs in
                     memory, one thread per core, batches of 25 stacked (needs `.[timm]`).
Each core count runs in a fresh process pinned to that many cores (os.sched_setaffinity); each
--busy level B adds B processes per core spinning on those same cores while it runs (the load a
trainer's threads or other jobs put on a host; 0: nothing added). Prints per case and set the
median images/s, the CPU per image (all of the process's threads: the figure other processes'
load moves least), the cores used (their product: the share of the pinned cores the case got
during its turns) and the medians of the within-round ratios to the streaming peer and to bare
decode, by images/s (with the lowest and highest round's) and by CPU, with the load average
(1 min, os.getloadavg) over the rounds.

--profile samples the CPU of the streaming peer and ours (and the fast decode) on one core with
Linux `perf` and prints where each image's CPU goes, stage by stage (ms per image).

Then, for each --resume_at step, a fresh process builds the training input at that step (batch
--resume_batch) and takes one batch: seconds from process start to that batch and records read.
Ends with one JSON line. Temporary files go when it ends. The defaults take about 25 min on 2
shared cores at load 7-11; --quick (one set, one core, one quiet round, no resume) about 2.

With --gcs_latency_ms=L, the whole pipeline also reads the same records (--gcs_images of them)
from a bucket of the local GCS emulator behind tests/gcs_proxy.py, which adds L ms to every
request and answers range reads from its own copy of each object, as GCS does at its own speed
(benchmarks/gcs_harness.py; `pip install -e '.[test]'` brings the emulator). The harness runs in
its own process on the other cores, the pipeline in a fresh process on one core, as training
runs it, once per --busy level (spinning processes on the pipeline's core); local and gcs
passes alternate. It prints the harness's own rate without latency (what it can serve), then
`gcs` images/s, `ratio_to_local` (median of the rounds' ratios) and the requests in flight and
connections the proxy saw, with the machine's load.
"""
import argparse
import collections
import concurrent.futures
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from vit_jax.cli import startup

tf = startup.import_tensorflow()  # without TensorFlow's start-up lines
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from vit_jax.data import make_records, pipeline, sources  # noqa: E402

_PP = 'decode|inception_crop(224)|flip_lr|value_range(-1, 1)'
_PP_FAST = 'decode|inception_crop(224, fast_decode=True)|flip_lr|value_range(-1, 1)'
_BATCH = 25
_SIZE, _AREA, _ASPECT = 224, (0.05, 1.), (3 / 4, 4 / 3)
CASES = ('bare decode', 'streaming peer', 'ours', 'ours fast_decode', 'timm')
SETS = ('synthetic', 'photos', 'large')
# timm on camera-size pictures: ~15 s a turn, and the peers' comparison is on the others.
_LEFT_OUT = {('large', 'timm')}


def natural_jpegs(num_images: int, seed: int = 0, h: int = 375, w: int = 500) -> list[bytes]:
  rng = np.random.RandomState(seed)
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


def photo_jpegs(num_images: int, seed: int = 0) -> list[bytes]:
  """500x375 crops of scikit-learn's two sample photos (640x427) at random offsets, half of them
  mirrored, re-encoded at quality 90: camera pictures, with their textures and noise."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  photos = load_sample_images().images
  rng = np.random.RandomState(seed)
  images = []
  for i in range(num_images):
    photo = photos[i % len(photos)]
    top, left = rng.randint(0, photo.shape[0] - 375 + 1), rng.randint(0, photo.shape[1] - 500 + 1)
    crop = photo[top:top + 375, left:left + 500]
    if rng.rand() < 0.5:
      crop = crop[:, ::-1]
    images.append(tf.io.encode_jpeg(np.ascontiguousarray(crop), quality=90).numpy())
  return images


IMAGE_SETS = {'synthetic': natural_jpegs, 'photos': photo_jpegs,
              'large': lambda n: natural_jpegs(n, h=1000, w=1500)}
# --quick: a smoke run of every case (1.7 min at load 8): one set, one core, one quiet round.
QUICK = dict(sets='synthetic', cores='1', busy='0', repeats=1, resume_at='')


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


def _config(records: str, batch_size: int, pp: str = _PP):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=batch_size, pp_train=pp,
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


def streaming_peer(records: str) -> tf.data.Dataset:
  """The plain streaming pipeline of the docstring over the record files, big_vision's way:
  stateful random ops, tf.data's default options (autotuning on)."""
  def preprocess(record):
    image = tf.io.parse_single_example(record, sources.RECORD_FEATURES)['image']
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.io.extract_jpeg_shape(image), tf.zeros([1, 0, 4]), min_object_covered=0.,
        aspect_ratio_range=_ASPECT, area_range=_AREA, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = tf.io.decode_and_crop_jpeg(
        image, tf.stack([begin[0], begin[1], size[0], size[1]]), channels=3)
    image = tf.cast(tf.clip_by_value(tf.image.resize(image, (_SIZE, _SIZE)), 0, 255), tf.uint8)
    image = tf.image.random_flip_left_right(image)
    return {'image': tf.cast(image, tf.float32) * (2 / 255) - 1}
  info = sources.read_record_info(records, 'train')
  return (tf.data.TFRecordDataset(info['files']).repeat().shuffle(info['num_examples'])
          .map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(_BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


class TimmTransform:
  """timm's training transform on JPEG bytes (see the docstring), `threads` images at a time,
  batches stacked: what a torch DataLoader with that many workers hands out."""

  def __init__(self, jpegs: list[bytes], threads: int):
    import torch  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from timm.data import create_transform  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(1)
    transform = create_transform(_SIZE, is_training=True, color_jitter=None, scale=_AREA,
                                 ratio=_ASPECT, interpolation='bilinear')
    self._one = lambda jpeg: transform(Image.open(io.BytesIO(jpeg)).convert('RGB'))
    self._stack, self._jpegs, self._at = torch.stack, jpegs, 0
    self._pool = concurrent.futures.ThreadPoolExecutor(threads)
    self._pending = collections.deque(self._submit() for _ in range(2 * _BATCH))

  def _submit(self):
    jpeg, self._at = self._jpegs[self._at], (self._at + 1) % len(self._jpegs)
    return self._pool.submit(self._one, jpeg)

  def __next__(self):
    images = []
    for _ in range(_BATCH):
      images.append(self._pending.popleft().result())
      self._pending.append(self._submit())
    return self._stack(images)

  def close(self):
    self._pool.shutdown(cancel_futures=True)


def _read_jpegs(records: str) -> list[bytes]:
  images = os.path.join(os.path.dirname(records), 'images')
  return [open(os.path.join(images, f'{i}.jpg'), 'rb').read()  # pylint: disable=consider-using-with
          for i in range(len(os.listdir(images)))]


def _case(name: str, records: str, jpegs: list[bytes]):
  """(a function starting a fresh iterator of the case, images per element)."""
  options = pipeline._options()  # pylint: disable=protected-access
  if name == 'bare decode':
    ds = (tf.data.Dataset.from_tensor_slices(jpegs).repeat()
          .map(lambda jpeg: tf.io.decode_jpeg(jpeg, channels=3),
               num_parallel_calls=pipeline._usable_cores())  # pylint: disable=protected-access
          .with_options(options))
    return lambda: iter(ds), 1
  if name == 'streaming peer':
    ds = streaming_peer(records)
    return lambda: iter(ds), _BATCH
  if name in ('ours', 'ours fast_decode'):
    ds = pipeline.train_dataset(_config(records, _BATCH, _PP if name == 'ours' else _PP_FAST),
                                0, range(_BATCH))
    return lambda: iter(ds), _BATCH
  if name == 'timm':
    cores = pipeline._usable_cores()  # pylint: disable=protected-access
    return lambda: TimmTransform(jpegs, cores), _BATCH
  raise ValueError(f'unknown case {name!r}; choose from {", ".join(CASES)}')


def _cpu_seconds() -> float:
  return time.process_time()  # every thread of the process


def _timed(make, per_element: int, count: int, passes: int) -> tuple[float, float]:
  """(images/s, CPU ms per image) of `passes` passes over `count` images, on an iterator
  already through one pass; the iterator is dropped afterwards (its threads stop)."""
  iterator = make()
  for _ in range(count // per_element):  # warm-up pass: traced, buffers filled
    next(iterator)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(passes * count // per_element):
    next(iterator)
  rate = passes * count / (time.perf_counter() - start)
  cpu_ms = (_cpu_seconds() - cpu) / (passes * count) * 1e3
  if hasattr(iterator, 'close'):
    iterator.close()
  del iterator  # stops its threads before the next case is timed
  return rate, cpu_ms


def local_rates(records: dict, rounds: int, cases: list[str], passes: int = 2) -> dict:
  """Runs in a fresh process pinned to the cores to measure: {set: {case: [(images/s, CPU ms
  per image, load average)]}} over `rounds` rounds in which every case of every set takes a
  turn, so that load from other processes hits them alike."""
  made, counts = {}, {}
  for set_name, path in records.items():
    jpegs = _read_jpegs(path)
    counts[set_name] = len(jpegs) // _BATCH * _BATCH  # every case passes over as many images
    made[set_name] = {name: _case(name, path, jpegs[:counts[set_name]]) for name in cases
                      if (set_name, name) not in _LEFT_OUT}
  rates = {s: {name: [] for name in made[s]} for s in records}
  for _ in range(rounds):
    for set_name, set_cases in made.items():
      for name, (make, per_element) in set_cases.items():
        rate, cpu_ms = _timed(make, per_element, counts[set_name], passes)
        rates[set_name][name].append((rate, cpu_ms, os.getloadavg()[0]))
  return rates


def _spin(cores: set, count: int) -> list[subprocess.Popen]:
  """`count` processes spinning on `cores` (a busy host); stop them with _stop."""
  spinners = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(count)]
  for p in spinners:
    os.sched_setaffinity(p.pid, cores)
  return spinners


def _stop(processes: list[subprocess.Popen]) -> None:
  for p in processes:
    p.kill()
    p.wait()


def _in_worker(cores: int, call: str, with_timm: bool = False):
  """Runs `benchmarks.input_pipeline.<call>` in a fresh process pinned to cores 0..cores-1;
  returns what it prints last, as JSON. with_timm: timm (and torchvision) are imported first:
  torchvision imported after TensorFlow crashes the process (segmentation fault)."""
  code = (f'import json, os; os.sched_setaffinity(0, {set(range(cores))}); '
          + ('import timm.data; ' if with_timm else '') +
          'from benchmarks import input_pipeline as b; '
          f'print(json.dumps(b.{call}))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  if out.returncode:
    raise RuntimeError(f'benchmark worker failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def on_cores(records: dict, cores: int, busy: int, rounds: int, cases: list[str]) -> dict:
  """local_rates in a fresh process on `cores` cores, with `busy` spinning processes per core
  on them: per set and case, median images/s, CPU ms per image, cores used and load, and the
  medians of the within-round ratios to the streaming peer and to bare decode, by images/s and
  by CPU."""
  spinners = _spin(set(range(cores)), busy * cores)
  try:
    measured = _in_worker(cores, f'local_rates({records!r}, {rounds}, {cases!r})',
                          with_timm='timm' in cases)
  finally:
    _stop(spinners)
  return summarize(measured)


def summarize(measured: dict) -> dict:
  """on_cores' summary of local_rates' {set: {case: [(images/s, CPU ms per image, load)]}}."""
  summary = {}
  for set_name, by_case in measured.items():
    by_case = {name: np.array(v) for name, v in by_case.items()}
    summary[set_name] = results = {}
    for name, r in by_case.items():
      results[name] = {'images_per_sec': round(float(np.median(r[:, 0])), 1),
                       'cpu_ms_per_image': round(float(np.median(r[:, 1])), 3),
                       # of the pinned cores, what the case's threads got while it ran
                       'cores_used': round(float(np.median(r[:, 0] * r[:, 1])) / 1e3, 2),
                       'load_average': [round(float(r[:, 2].min()), 2),
                                        round(float(r[:, 2].max()), 2)]}
      for ref in ('streaming peer', 'bare decode'):
        if ref in by_case:
          key = ref.split()[-1]
          ratios = r[:, 0] / by_case[ref][:, 0]
          results[name][f'ratio_to_{key}'] = round(float(np.median(ratios)), 3)
          results[name][f'ratio_to_{key}_range'] = [round(float(ratios.min()), 3),
                                                    round(float(ratios.max()), 3)]
          results[name][f'cpu_ratio_to_{key}'] = round(
              float(np.median(by_case[ref][:, 1] / r[:, 1])), 3)
  return summary


def print_rates(summary: dict, cores: int, busy: int, rounds: int) -> None:
  print(f'-- {cores} core{"s" * (cores > 1)}, {busy or "no"} spinning process'
        f'{"es" * (busy != 1)} per core added; medians of {rounds} rounds: images/s, CPU ms per '
        'image, cores used; ratio to the streaming peer by images/s [lowest-highest round] (by '
        'CPU); the same to bare decode; load average over the rounds')
  for set_name, results in summary.items():
    print(f'   {set_name}')
    for name, r in results.items():
      ratios = '   '.join(
          f'{r[f"ratio_to_{k}"]:4.2f} [{r[f"ratio_to_{k}_range"][0]:4.2f}-'
          f'{r[f"ratio_to_{k}_range"][1]:4.2f}] ({r[f"cpu_ratio_to_{k}"]:4.2f})'
          for k in ('peer', 'decode') if f'ratio_to_{k}' in r)
      print(f'   {name:18s} {r["images_per_sec"]:7.1f}/s {r["cpu_ms_per_image"]:6.3f} ms   '
            f'{r["cores_used"]:4.2f} cores   {ratios}   '
            f'load {r["load_average"][0]:.1f}-{r["load_average"][1]:.1f}')




def _perf_report(pid: int, seconds_fn) -> tuple[list[tuple[float, str, str]], float]:
  """Samples process `pid`'s CPU with `perf record` while seconds_fn() runs; returns
  ([(share of samples, library, symbol)], what seconds_fn returned)."""
  with tempfile.TemporaryDirectory(prefix='input_pipeline_perf_') as folder:
    data = os.path.join(folder, 'perf.data')
    perf = subprocess.Popen(['perf', 'record', '-q', '-e', 'cpu-clock', '-F', '1999', '-p',
                             str(pid), '-o', data], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.)  # attached
    try:
      result = seconds_fn()
    finally:
      perf.send_signal(signal.SIGINT)
      _, err = perf.communicate(timeout=60)
    report = subprocess.run(['perf', 'report', '-i', data, '--stdio', '--no-children',
                             '--sort', 'dso,sym', '--percent-limit', '0', '-t', '\t'],
                            capture_output=True, text=True)
    if report.returncode:
      raise RuntimeError(f'perf failed: {err[-1000:]}{report.stderr[-1000:]}')
  rows = []
  for line in report.stdout.splitlines():
    parts = [p.strip() for p in line.split('\t')]
    if line.startswith('#') or len(parts) < 3 or not parts[0].endswith('%'):
      continue
    rows.append((float(parts[0].rstrip('%')) / 100, parts[1], parts[2].split('] ', 1)[-1]))
  return rows, result


def profile_case(records: str, name: str, passes: int = 6) -> dict:
  """Runs in a fresh process pinned to one core: {'cpu_ms_per_image', 'symbols': [(ms per
  image, library, symbol)]} of `name`'s timed passes, sampled by perf."""
  jpegs = _read_jpegs(records)
  count = len(jpegs) // _BATCH * _BATCH
  make, per_element = _case(name, records, jpegs[:count])
  iterator = make()
  for _ in range(count // per_element):
    next(iterator)

  def timed():
    cpu = _cpu_seconds()
    for _ in range(passes * count // per_element):
      next(iterator)
    return (_cpu_seconds() - cpu) / (passes * count) * 1e3
  rows, cpu_ms = _perf_report(os.getpid(), timed)
  return {'cpu_ms_per_image': cpu_ms,
          'symbols': [(share * cpu_ms, lib, sym) for share, lib, sym in rows]}


# Where each image's CPU goes: stages by the function perf found running (its library, symbol),
# first match wins.
_STAGES = (
    ('JPEG entropy decoding (Huffman)', r'decode_mcu|jpeg_fill_bit_buffer|jpeg_huff_decode|'
                                        r'jpeg_make_d_derived_tbl'),
    ('JPEG IDCT, upsampling, colour', r'^jsimd_|^jpeg_|idct|upsample|ycc|decompress_|'
                                      r'process_data|read_markers|jpeg::|DecodeImage|Jpeg'),
    ('bilinear resize', r'resize_image|ResizeBilinear|interpolation_weights'),
    ('flip', r'Reverse'),
    ('value_range, casts, rounding', r'Eigen::internal::(TensorExecutor|EvalRange)|'
                                     r'TensorExecutor'),
    ('copies into batches', r'^__mem(move|cpy|set)'),
    ('read, parse, order (Python, protobuf, CRC)', r'libpython|_multiarray|Example|protobuf|'
                                                   r'CRC32|RecordReader|index_shuffle|PyFunc'),
    ('random numbers', r'Philox|[Rr]andom|BoundingBox'),
    ('memory allocation', r'malloc|_int_free|cfree|unlink_chunk|Allocat|operator (new|delete)'),
    ('kernel (thread switches, syscalls, faults)', r'kernel\.kallsyms|^syscall$|vdso'),
    ('tf.data, executor, threads', r''),
)


def stages(symbols: list) -> dict:
  """{stage: ms per image} from profile_case's [(ms per image, library, symbol)]."""
  patterns = [(name, re.compile(p)) for name, p in _STAGES]
  out = {name: 0. for name, _ in _STAGES}
  for ms, lib, sym in symbols:
    name = next(n for n, p in patterns if p.search(sym) or p.search(lib))
    out[name] += ms
  return out


_BUCKET = 'bench-bucket'


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
        stats = _proxy_control(proxy_url)
        # Little's law: requests in flight = arrival rate x time each spends in the harness.
        stats['seconds_per_request'] = (stats['mean_in_flight'] * batches * 25 / rate
                                        / max(stats['requests'], 1))
        proxy.append(stats)
  ratios = np.array(rates['gcs']) / np.array(rates['local'])
  return {'latency_ms': latency_ms, 'images_per_sec': round(float(np.median(rates['gcs'])), 1),
          'local_images_per_sec': round(float(np.median(rates['local'])), 1),
          'ratio_to_local': round(float(np.median(ratios)), 3),
          'cpu_ms_per_image': round(float(np.median(cpu['gcs'])), 3),
          'local_cpu_ms_per_image': round(float(np.median(cpu['local'])), 3),
          'requests_in_flight_mean': float(np.median([p['mean_in_flight'] for p in proxy])),
          'requests_in_flight_max': max(p['max_in_flight'] for p in proxy),
          'seconds_per_request': round(float(np.median([p['seconds_per_request']
                                                        for p in proxy])), 3),
          'connections_max': max(p['max_connections'] for p in proxy),
          'harness_reads_per_sec': round(harness, 1), 'images_per_pass': batches * 25}


def gcs_comparison(jpegs: list[bytes], num_images: int, latency_ms: float, rounds: int,
                   busy_levels: list[int]) -> dict:
  """The same records local and in the emulator's bucket at `latency_ms`, at each busy level:
  see the docstring."""
  with tempfile.TemporaryDirectory(prefix='input_pipeline_gcs_') as folder:
    records = write_records([jpegs[i % len(jpegs)] for i in range(num_images)], folder,
                            num_shards=32)
    return {f'busy_{busy}': _gcs_comparison(records, latency_ms, rounds, busy)
            for busy in busy_levels}


def _gcs_comparison(records: str, latency_ms: float, rounds: int, busy: int) -> dict:
  cores = sorted(os.sched_getaffinity(0))
  pipeline_core, harness_cores = cores[:1], cores[1:] or cores
  harness = subprocess.Popen([sys.executable, '-m', 'benchmarks.gcs_harness',
                              f'--bucket={_BUCKET}'],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  spinners = _spin(set(pipeline_core), busy)
  try:
    os.sched_setaffinity(harness.pid, harness_cores)
    proxy_url = harness.stdout.readline().strip()
    code = ('import json, os, sys; os.sched_setaffinity(0, {core}); '
            'from benchmarks import input_pipeline as b; '
            'print(json.dumps(b.gcs_worker({records!r}, {url!r}, {latency}, {rounds})))').format(
                core=set(pipeline_core), records=records, url=proxy_url, latency=latency_ms,
                rounds=rounds)
    env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy_url, TF_CPP_MIN_LOG_LEVEL='3')
    for variable in ('TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING'):
      env.pop(variable, None)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         check=True, env=env)
  finally:
    _stop(spinners)
    harness.stdin.close()
    harness.wait(timeout=30)
  gcs = dict(json.loads(out.stdout.strip().splitlines()[-1]),
             load_average=[round(x, 2) for x in os.getloadavg()])
  print(f'-- gcs comparison, {busy} spinning processes on the pipeline\'s core')
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
        f'{gcs["local_cpu_ms_per_image"]:.2f} ms; a request spent {gcs["seconds_per_request"]:.3f}'
        f' s in the harness on average ({latency_ms / 1e3:g} s of it the added latency)')
  return gcs


def profile(records: dict, cases: list[str]) -> dict:
  """{set: {case: {stage: ms per image}}} of the cases on one core, each in a fresh process."""
  if not shutil.which('perf'):
    print('--profile needs Linux perf (e.g. apt-get install linux-tools-generic); skipped')
    return {}
  out = {}
  for set_name, path in records.items():
    out[set_name] = {}
    for name in cases:
      measured = _in_worker(1, f'profile_case({path!r}, {name!r})')
      out[set_name][name] = dict(stages(measured['symbols']),
                                 total=measured['cpu_ms_per_image'])
  return out


def print_profile(by_set: dict) -> None:
  for set_name, by_case in by_set.items():
    names = list(by_case)
    print(f'-- where each image\'s CPU goes, {set_name}, one core (perf samples; CPU ms per image)')
    print(f'   {"stage":45s}' + ''.join(f'{n:>20s}' for n in names))
    for stage in [s for s, _ in _STAGES] + ['total']:
      print(f'   {stage:45s}' + ''.join(f'{by_case[n][stage]:20.3f}' for n in names))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num_images', type=int, default=200,
                      help='JPEGs per set (at least 200, a multiple of 25: the pipelines\' batch)')
  parser.add_argument('--repeats', type=int, default=3,
                      help='rounds: timed turns per case, set, core count and busy level')
  parser.add_argument('--cores', default='1,2',
                      help='core counts to pin the measuring process to, comma-separated '
                      '(empty: none)')
  parser.add_argument('--busy', default='0,1',
                      help='spinning processes per measured core, comma-separated levels: '
                      '0 quiet, 1 each core shared with one busy process, ...')
  parser.add_argument('--sets', default=','.join(SETS),
                      help=f'image sets, comma-separated, of {", ".join(IMAGE_SETS)}')
  parser.add_argument('--cases', default=','.join(CASES), help='cases, comma-separated')
  parser.add_argument('--profile', action='store_true',
                      help='also where each image\'s CPU goes, stage by stage (Linux perf)')
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
  parser.add_argument('--quick', action='store_true',
                      help='a smoke run: ' + ' '.join(f'--{k}={v}' for k, v in QUICK.items()))
  args = parser.parse_args()
  if args.quick:
    vars(args).update(QUICK)
  if args.num_images < 200 or args.num_images % _BATCH:
    # Fewer, and a pass would not outlast the pipelines' readahead (several batches).
    parser.error('--num_images: at least 200 and a multiple of 25')
  available = len(os.sched_getaffinity(0))
  core_counts = [int(c) for c in args.cores.split(',') if c and int(c) <= available]
  busy_levels = [int(b) for b in args.busy.split(',')]
  cases = [c.strip() for c in args.cases.split(',') if c.strip()]
  for case in cases:
    if case not in CASES:
      parser.error(f'--cases: unknown case {case!r}; choose from {", ".join(CASES)}')
  if 'timm' in cases and importlib.util.find_spec('timm') is None:
    print("timm is not installed (pip install -e '.[timm]'): the timm case is skipped")
    cases.remove('timm')
  summary = {}
  with tempfile.TemporaryDirectory(prefix='input_pipeline_') as folder:
    records, jpegs = {}, {}
    for set_name in args.sets.split(','):
      if set_name not in IMAGE_SETS:
        parser.error(f'--sets: unknown set {set_name!r}; choose from {", ".join(SETS)}')
      jpegs[set_name] = IMAGE_SETS[set_name](args.num_images)
      records[set_name] = write_records(jpegs[set_name], os.path.join(folder, set_name))
      h, w = tf.io.extract_jpeg_shape(jpegs[set_name][0]).numpy()[:2]
      print(f'{set_name}: {len(jpegs[set_name])} JPEGs {w}x{h}, quality 90, mean '
            f'{np.mean([len(j) for j in jpegs[set_name]]) / 1e3:.0f} kB')
    print(f'load average before {[round(x, 2) for x in os.getloadavg()]}')
    for cores in core_counts:
      for busy in busy_levels:
        summary[f'{cores}_cores_busy_{busy}'] = results = on_cores(records, cores, busy,
                                                                   args.repeats, cases)
        print_rates(results, cores, busy, args.repeats)
    if args.profile:
      summary['profile'] = profile(records, [c for c in ('streaming peer', 'ours',
                                                         'ours fast_decode') if c in cases])
      print_profile(summary['profile'])
    if args.resume_at:
      summary['resume'] = resume_costs(next(iter(records.values())),
                                       [int(s) for s in args.resume_at.split(',')],
                                       args.resume_batch)
  if args.gcs_latency_ms is not None:
    summary['gcs'] = gcs_comparison(next(iter(jpegs.values())), args.gcs_images,
                                    args.gcs_latency_ms, args.gcs_rounds, busy_levels)
  summary['load_average'] = [round(x, 2) for x in os.getloadavg()]
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
