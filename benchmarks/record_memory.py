"""Memory of record files at dataset scale: make_records' peak RSS over growing numbers of images,
and what a process holds for the record index of a split of 1M and 30M records.

    python -m benchmarks.record_memory [--images=10000,100000] [--index_records=1000000,30000000]

make_records: N small JPEGs (16x16, ~700 bytes) and their CSV in a temporary folder, written as
64 shards by `python -m vit_jax.data.make_records` in a fresh process; its peak RSS (the
kernel's, for the child). Record index: a split's offsets file (1024 shards) made of random
record sizes, then, in a fresh process, `sources.RecordIndex` opened and 10,000 random records
looked up (both ends of each, as the reader does): the process's RSS before and after, and for
comparison what loading the whole array costs (`np.load`, as before). Ends with one JSON line.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

_SHARDS = 1024
_LOOKUPS = 10_000


def _rss_mb() -> float:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def make_records_peak_mb(num_images: int, folder: str) -> float:
  images = os.path.join(folder, f'images_{num_images}')
  os.makedirs(images)
  rng = np.random.RandomState(0)
  with open(os.path.join(folder, f'labels_{num_images}.csv'), 'w') as f:
    f.write('image,labels\n')
    for i in range(num_images):
      Image.fromarray(rng.randint(0, 255, (16, 16, 3), np.uint8)).save(
          os.path.join(images, f'{i}.jpg'), quality=90)
      f.write(f'{i}.jpg,{i % 1000}\n')
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  subprocess.run([sys.executable, '-m', 'vit_jax.data.make_records', f'--image_dir={images}',
                  f'--labels={os.path.join(folder, f"labels_{num_images}.csv")}',
                  f'--output={os.path.join(folder, f"records_{num_images}")}', '--num_shards=64'],
                 check=True, capture_output=True)
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, largest child so far
  if peak <= before:
    print(f'  (peak RSS of this child not above an earlier child\'s {before / 1024:.0f} MB)')
  return round(peak / 1024, 1)


def write_index(num_records: int, path: str) -> None:
  """An offsets file for `num_records` records in _SHARDS shards (random sizes ~100 kB)."""
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  sizes = [num_records // _SHARDS + (s < num_records % _SHARDS) for s in range(_SHARDS)]
  rng = np.random.RandomState(0)
  with open(path, 'wb') as f:
    f.write(sources.offsets_header(num_records + _SHARDS))
    for size in sizes:
      starts = np.concatenate([[0], np.cumsum(rng.randint(50_000, 150_000, size))])
      f.write(starts.astype('<i8').tobytes())


def index_memory(path: str, num_entries: int) -> dict:
  """Runs in a fresh process: RSS for the paged index after _LOOKUPS lookups, and np.load's."""
  from vit_jax.storage import paths  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(1)
  before = _rss_mb()
  index = sources.RecordIndex(path, num_entries, paths.RangeReader(), fix='')
  for _ in range(_LOOKUPS // 128):
    entries = rng.randint(0, num_entries - 1, 128)
    index[np.concatenate([entries, entries + 1])]
  paged = _rss_mb() - before
  before = _rss_mb()
  whole = np.load(path)
  return {'paged_index_mb': round(paged, 1), 'whole_array_mb': round(_rss_mb() - before, 1),
          'offsets_file_mb': round(os.path.getsize(path) / 2**20, 1), 'checksum': int(whole[-1])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', default='10000,100000', help='make_records runs, comma-separated')
  parser.add_argument('--index_records', default='1000000,30000000',
                      help='records in the index of each split, comma-separated')
  args = parser.parse_args()
  summary = {'make_records_peak_rss_mb': {}, 'index': {}}
  with tempfile.TemporaryDirectory(prefix='record_memory_') as folder:
    for n in [int(x) for x in args.images.split(',') if x]:
      summary['make_records_peak_rss_mb'][n] = make_records_peak_mb(n, folder)
      print(f'make_records, {n:>9} images: peak RSS {summary["make_records_peak_rss_mb"][n]} MB',
            flush=True)
    for n in [int(x) for x in args.index_records.split(',') if x]:
      path = os.path.join(folder, f'train_{n}.offsets.npy')
      write_index(n, path)
      out = subprocess.run(
          [sys.executable, '-c', 'import json; from benchmarks import record_memory as m; '
           f'print(json.dumps(m.index_memory({path!r}, {n + _SHARDS})))'],
          check=True, capture_output=True, text=True)
      summary['index'][n] = json.loads(out.stdout.strip().splitlines()[-1])
      r = summary['index'][n]
      print(f'record index, {n:>9} records ({r["offsets_file_mb"]} MB file): '
            f'{r["paged_index_mb"]} MB after {_LOOKUPS} random lookups (paged, bounded cache); '
            f'whole array loaded: {r["whole_array_mb"]} MB', flush=True)
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
