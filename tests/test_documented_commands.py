"""Every command README.md documents: its imports are declared, and it starts.

A missing dependency used to surface only when a command reached its import (matplotlib, after 17
minutes of transfer_demo.py); here every program's imports are checked against pyproject.toml and
every documented program's module is imported in a fresh interpreter (what its start imports),
and README's quickstart -> predict, make_records and TPU (dry-run) commands run as written, with
small overrides.
"""
import ast
import glob
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib

import jax
import numpy as np
import tensorflow as tf
from PIL import Image

from tests import programs
from vit_jax import checkpoint, export, models
from vit_jax.weights import formats
from vit_jax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {'vit_jax', 'configs', 'launch', 'benchmarks', 'tests'}
# Lines users saw and could do nothing about: JAX's backend probe, TensorFlow's import,
# libtpu's probe where it is installed without a TPU, decoders' own complaints.
CHATTER = ("Unable to initialize backend 'tpu'", 'oneDNN custom operations',
           'absl::InitializeLog()', 'Failed to find host bounds', 'Improper call to JPEG library',
           'Input file read error', 'local_rendezvous', 'Metadata file does not exist')


def _readme() -> str:
  with open(os.path.join(REPO, 'README.md')) as f:
    return f.read()


def _normal(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def _requirement_names(requirements) -> set:
  return {_normal(re.match(r'[A-Za-z0-9._-]+', r)[0]) for r in requirements}


def _third_party_imports() -> dict:
  """{top-level module: a file importing it} over the package, launchers, benchmarks, configs."""
  found = {}
  for path in sorted(glob.glob(os.path.join(REPO, '*', '**', '*.py'), recursive=True)):
    if os.path.relpath(path, REPO).split(os.sep)[0] not in FIRST_PARTY - {'tests'}:
      continue
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
      for name in names:
        top = name.split('.')[0]
        if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
          found.setdefault(top, os.path.relpath(path, REPO))
  return found


def test_every_import_is_declared_and_every_extra_installed_by_readme():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  declared = _requirement_names(project['dependencies'])
  extras = project['optional-dependencies']
  for requirements in extras.values():
    declared |= _requirement_names(requirements)
  distributions = importlib.metadata.packages_distributions()  # import name -> distribution
  imports = _third_party_imports()
  assert {'jax', 'absl', 'matplotlib', 'torch'} <= set(imports)
  undeclared = {module: path for module, path in imports.items()
                if not {_normal(d) for d in distributions.get(module, [module])} & declared}
  assert not undeclared, f'imported but not in pyproject.toml: {undeclared}'
  readme = _readme()
  for extra in extras:
    assert extra == 'test' or f"pip install -e '.[{extra}]'" in readme, extra


def _documented_programs() -> list[list[str]]:
  """`python -m MODULE` / `python SCRIPT.py` of every command README shows, once each."""
  programs = re.findall(r'python (-m [\w.]+|benchmarks/\w+\.py)', _readme())
  return [p.split() for p in dict.fromkeys(programs) if p != '-m pytest']


# Documented programs that other tests already run as programs, further than --help would.
RUN_AS_PROGRAMS_ELSEWHERE = {
    'vit_jax.main': 'test_readme_quickstart_then_predict_run_with_small_overrides, test_resume',
    'vit_jax.predict': 'test_readme_quickstart_then_predict_run_with_small_overrides',
    'vit_jax.export': 'test_readme_quickstart_then_predict_run_with_small_overrides',
    'vit_jax.data.make_records':
        'test_readme_make_records_commands_report_skipped_files_after_the_progress_bar',
    'vit_jax.benchmark': 'test_benchmark',
    'vit_jax.goodput': 'test_goodput',
}


# Imports each program as its start does (a script under another __name__, so its main does
# not run), in one fresh interpreter: JAX and TensorFlow load once, not once per program. Flags
# a program defines are dropped after it, as two programs may define the same flag name.
_IMPORT_PROGRAMS = """
import importlib, runpy, sys
from absl import flags
for program in sys.argv[1:]:
  before = set(flags.FLAGS)
  if program.endswith('.py'):
    runpy.run_path(program, run_name='documented_program')
  else:
    importlib.import_module(program)
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  print('imported', program)
"""


def test_every_documented_program_imports_what_it_needs():
  programs = _documented_programs()
  assert ['-m', 'vit_jax.main'] in programs and ['benchmarks/transfer_demo.py'] in programs
  assert {p[-1] for p in programs} >= set(RUN_AS_PROGRAMS_ELSEWHERE)
  names = [p[-1] for p in programs if p[-1] not in RUN_AS_PROGRAMS_ELSEWHERE]
  done = subprocess.run([sys.executable, '-c', _IMPORT_PROGRAMS, *names], cwd=REPO, text=True,
                        capture_output=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines() == [f'imported {name}' for name in names]


def _readme_commands(starts_with: str) -> list[list[str]]:
  """README's bash command lines starting with `starts_with` (continuations joined), as argv."""
  found = []
  for block in re.findall(r'^```bash\n(.*?)^```', _readme(), flags=re.M | re.S):
    for command in block.replace('\\\n', ' ').splitlines():
      for part in command.split('&&'):
        part = part.split('#')[0].strip()
        if part.startswith(starts_with):
          found.append(shlex.split(part))
  assert found, f'README has no bash command starting with {starts_with!r}'
  return found


def _readme_command(starts_with: str) -> list[str]:
  return _readme_commands(starts_with)[0]


def test_readme_quickstart_then_predict_run_with_small_overrides(tmp_path, tfds_data_dir,
                                                                capsys):
  # Overrides: a small, quick model whose depth (3) and fixed position embeddings no model name
  # tells predict.
  workdir = str(tmp_path / 'vit_quickstart')
  quickstart = _readme_command('python -m vit_jax.main --config=configs/quickstart.py')
  quickstart = [a.replace('/tmp/vit_quickstart', workdir) for a in quickstart[1:]] + [
      '--config.total_steps=2', '--config.model.name=testing', '--config.model.num_layers=3',
      '--config.model.posemb=sincos2d', '--config.eval_every=0',
      f'--config.data.data_dir={tfds_data_dir}']
  done = subprocess.run([sys.executable, *quickstart], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'step 2/2 | train_loss' in done.stdout
  assert not [c for c in CHATTER if c in done.stderr], done.stderr

  # README's digit.png, written where the user pastes the commands, then predict as written.
  make_digit = _readme_command('python -c "from sklearn.datasets import load_digits')
  subprocess.run([sys.executable, *make_digit[1:]], cwd=tmp_path, check=True, timeout=120)
  (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  predict = _readme_command('python -m vit_jax.predict --checkpoint=/tmp/vit_quickstart')
  predict = [a.replace('/tmp/vit_quickstart', workdir) for a in predict[1:]] + ['broken.jpg']
  # Where the quickstart put the digits; TensorFlow's C++ warnings shown, as users see them
  # (offline, --labels=sklearn_digits once printed a Google-auth warning from tfds' listing).
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  env['TFDS_DATA_DIR'] = tfds_data_dir
  done = subprocess.run([sys.executable, *predict], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600, env=env)
  assert done.returncode == 1  # one file was skipped, the other classified
  # Nothing else on stderr: no start-up chatter, no Orbax metadata warning reading the workdir.
  assert done.stderr.splitlines() == [
      'broken.jpg: skipped, not a decodable image (Unknown image file format. One of JPEG, JPEG '
      'XL, PNG, GIF, BMP, WebP required.)']
  lines = done.stdout.splitlines()
  assert lines[0] == 'digit.png' and len(lines) == 6
  # The same model rebuilt here, on the digit as the run's pp_eval makes it: grey to RGB,
  # bilinear to 16px (the run's image size) with uint8 values kept, then [-1, 1].
  digit = np.asarray(Image.open(tmp_path / 'digit.png'))
  assert digit.shape == (8, 8) and digit.max() > 200  # a digit, not a blank
  image = tf.image.resize(np.repeat(digit[None, ..., None], 3, -1).astype(np.float32), (16, 16))
  image = np.clip(np.round(image.numpy()), 0, 255) / 127.5 - 1
  model = models.get_model('testing', num_classes=10, num_layers=3, posemb='sincos2d')
  probs = np.asarray(jax.nn.softmax(model.apply({'params': checkpoint.load(workdir)},
                                                image.astype(np.float32))))[0]
  top = int(np.argmax(probs))
  assert lines[1].split() == [f'{probs[top]:.2%}', str(top), str(top)]  # digit names are 0-9

  # README's export commands on the same run (tests/test_export.py loads such folders in
  # transformers and timm and compares logits): the first as a program, whose stderr stays
  # empty, the second in this process (the same code without a second start-up).
  hf_command, timm_command = [
      [a.replace('/tmp/vit_quickstart', workdir).replace('/tmp/vit_hf', str(tmp_path / 'vit_hf'))
       .replace('/tmp/vit_timm', str(tmp_path / 'vit_timm')) for a in command[1:]]
      for command in _readme_commands('python -m vit_jax.export')]
  done = subprocess.run([sys.executable, *hf_command], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=env)
  assert done.returncode == 0 and not done.stderr, done.stderr
  status, _, err = programs.run_main(export.main, ['export'] + timm_command[2:], capsys)
  assert status == 0, err
  with open(tmp_path / 'vit_hf' / 'config.json') as f:
    hf = json.load(f)
  assert hf['id2label'] == {str(i): str(i) for i in range(10)} and hf['num_hidden_layers'] == 3
  with open(tmp_path / 'vit_timm' / 'config.json') as f:
    timm = json.load(f)
  assert timm['model_args']['depth'] == 3 and timm['model_args']['img_size'] == 16
  # The run's fixed sin-cos position embeddings, as a table of the same values.
  table = formats.read_flat(str(tmp_path / 'vit_timm' / 'model.safetensors'))['pos_embed']
  np.testing.assert_allclose(table[0, 1:], vit.posemb_sincos_2d(4, 4, 16)[0], atol=1e-7)


def test_readme_tpu_commands_print_their_plans():
  """Every launch.tpu_vm command README shows, with --dry_run (no gcloud needed)."""
  commands = _readme_commands('python -m launch.tpu_vm')
  assert len(commands) >= 8
  for command in commands:
    command = [a.replace('$ZONE', 'us-central2-b').replace('$BUCKET', 'my-bucket')
               for a in command[1:]]
    split = command.index('--') if '--' in command else len(command)
    if '--dry_run' not in command:
      command.insert(split, '--dry_run')
    # Each would compile its config for the slice first (minutes for pretrain_i21k on a v4-64):
    # tests/test_launch.py runs that check.
    command.insert(split, '--skip_fit_check')
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (command, done.stderr)
    plan = done.stdout.splitlines()
    assert plan and all(line.startswith(('gcloud ', 'git ', '#')) for line in plan), plan
    if '--workdir=gs://my-bucket/vit/smoke' in command:
      assert '--workdir=gs://my-bucket/vit/smoke' in plan[-1] and '--distributed' in plan[-1]


def test_readme_make_records_commands_report_skipped_files_after_the_progress_bar(tmp_path):
  images = tmp_path / 'DIR'
  images.mkdir()
  rows = ['image,labels']
  for i in range(6):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f'{i}.jpg')
    rows.append(f'{i}.jpg,{i % 2}')
  (images / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  rows[3:3] = ['bad.jpg,1', 'gone.jpg,0']
  (tmp_path / 'train.csv').write_text('\n'.join(rows) + '\n')
  (tmp_path / 'val.csv').write_text('\n'.join(rows[:3]) + '\n')
  outputs = []
  for command in _readme_commands('python -m vit_jax.data.make_records'):
    command = [a.replace('=DIR', f'={images}').replace('=RECORDS', f'={tmp_path / "RECORDS"}')
               .replace('=train.csv', f'={tmp_path / "train.csv"}')
               .replace('=val.csv', f'={tmp_path / "val.csv"}') for a in command[1:]]
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert not [c for c in CHATTER if c in done.stderr], done.stderr
    outputs.append(done.stderr)
  assert (tmp_path / 'RECORDS' / 'train.json').exists()
  assert (tmp_path / 'RECORDS' / 'val.json').exists()
  lines = [line for line in outputs[0].replace('\r', '\n').splitlines() if line.strip()]
  bar = [i for i, line in enumerate(lines) if line.startswith('train records:')]
  assert bar == list(range(len(bar))), lines  # nothing was written through the bar
  assert '100%' in lines[bar[-1]] and '8/8' in lines[bar[-1]]
  assert lines[len(bar):] == [
      f'{tmp_path / "train.csv"}:4: skipping bad.jpg: unreadable (jpeg::Uncompress failed. '
      'Invalid JPEG data or crop window.)',
      f'{tmp_path / "train.csv"}:5: skipping gone.jpg: not found in {images}',
      f'wrote 6 images to {tmp_path / "RECORDS"}/train-*-of-00064.tfrecord; skipped 2 (1 '
      'missing, 1 corrupt); classes: 2 seen, num_classes=2']
