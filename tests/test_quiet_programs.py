"""The programs as users start them print what they did, not their libraries' start-up chatter."""
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from vit_jax import checkpoint, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lines users saw and could do nothing about: JAX's backend probe, TensorFlow's import,
# libtpu's probe where it is installed without a TPU, decoders' own complaints.
CHATTER = ("Unable to initialize backend 'tpu'", 'oneDNN custom operations',
           'absl::InitializeLog()', 'Failed to find host bounds', 'Improper call to JPEG library',
           'Input file read error', 'local_rendezvous')


def _program(*argv, cwd=REPO):
  done = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                        timeout=300)
  assert not [c for c in CHATTER if c in done.stderr], done.stderr
  return done


def test_predict_prints_only_its_answer(tmp_path):
  model = models.get_model('testing', num_classes=3)
  checkpoint.save_npz(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)))['params'],
                      str(tmp_path / 'model.npz'))
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / 'a.png')
  done = _program('-m', 'vit_jax.predict', f'--checkpoint={tmp_path / "model.npz"}',
                  str(tmp_path / 'a.png'))
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[0] == str(tmp_path / 'a.png')
  assert done.stderr == ''


def test_make_records_reports_skipped_files_after_its_progress_bar(tmp_path):
  (tmp_path / 'img').mkdir()
  rows = ['image,labels']
  for i in range(6):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / 'img' / f'{i}.jpg')
    rows.append(f'{i}.jpg,{i % 2}')
  (tmp_path / 'img' / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  rows[3:3] = ['bad.jpg,1', 'gone.jpg,0']
  (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
  done = _program('-m', 'vit_jax.data.make_records', f'--image_dir={tmp_path / "img"}',
                  f'--labels={tmp_path / "train.csv"}', f'--output={tmp_path / "out"}')
  assert done.returncode == 0, done.stderr
  lines = [line for line in done.stderr.replace('\r', '\n').splitlines() if line.strip()]
  bar = [i for i, line in enumerate(lines) if line.startswith('train records:')]
  assert bar == list(range(len(bar))), lines  # nothing was written through the bar
  assert '100%' in lines[bar[-1]] and '8/8' in lines[bar[-1]]
  assert lines[len(bar):] == [
      f'{tmp_path / "train.csv"}:4: skipping bad.jpg: unreadable (jpeg::Uncompress failed. '
      'Invalid JPEG data or crop window.)',
      f'{tmp_path / "train.csv"}:5: skipping gone.jpg: not found in {tmp_path / "img"}',
      f'wrote 6 images to {tmp_path / "out"}/train-*-of-00001.tfrecord; skipped 2 (1 missing, '
      '1 corrupt); classes: 2 seen, num_classes=2']
