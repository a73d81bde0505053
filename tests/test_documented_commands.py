"""Every command README.md documents: its imports are declared, and it starts.

A missing dependency used to surface only when a command reached its import (matplotlib, after 17
minutes of transfer_demo.py); here every program's imports are checked against pyproject.toml and
every documented program is started (--help), and README's quickstart -> predict runs as written,
with small overrides.
"""
import ast
import glob
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tomllib

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_PARTY = {'vit_jax', 'configs', 'launch', 'benchmarks', 'tests'}


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
    'vit_jax.data.make_records': 'test_quiet_programs',
    'vit_jax.benchmark': 'test_benchmark',
}


def test_every_documented_program_starts():
  programs = _documented_programs()
  assert ['-m', 'vit_jax.main'] in programs and ['benchmarks/transfer_demo.py'] in programs
  assert {p[-1] for p in programs} >= set(RUN_AS_PROGRAMS_ELSEWHERE)
  env = os.environ | {'VIT_JAX_HOST_TUNING': '0'}  # no re-execution: only the start matters
  running = [(p, subprocess.Popen([sys.executable, *p, '--help'], cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
             for p in programs if p[-1] not in RUN_AS_PROGRAMS_ELSEWHERE]
  for program, process in running:
    output = process.communicate(timeout=300)[0]
    # absl's --help exits 1, argparse's 0; either way after printing the flags.
    assert process.returncode in (0, 1) and '--' in output, (program, output[-3000:])
    assert 'Traceback' not in output and 'Error' not in output, (program, output[-3000:])


def _readme_command(starts_with: str) -> list[str]:
  """The first README bash command line starting with `starts_with`, continuations joined."""
  for block in re.findall(r'^```bash\n(.*?)^```', _readme(), flags=re.M | re.S):
    for command in block.replace('\\\n', ' ').splitlines():
      for part in command.split('&&'):
        part = part.split('#')[0].strip()
        if part.startswith(starts_with):
          return shlex.split(part)
  raise AssertionError(f'README has no bash command starting with {starts_with!r}')


def test_readme_quickstart_then_predict_run_with_small_overrides(tmp_path, tfds_data_dir):
  workdir = str(tmp_path / 'vit_quickstart')
  quickstart = _readme_command('python -m vit_jax.main --config=configs/quickstart.py')
  quickstart = [a.replace('/tmp/vit_quickstart', workdir) for a in quickstart[1:]] + [
      '--config.total_steps=2', '--config.model.name=testing', '--config.eval_every=0',
      f'--config.data.data_dir={tfds_data_dir}']
  done = subprocess.run([sys.executable, *quickstart], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'step 2/2 | train_loss' in done.stdout

  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'digit.png')
  predict = _readme_command('python -m vit_jax.predict --checkpoint=/tmp/vit_quickstart')
  predict = [a.replace('/tmp/vit_quickstart', workdir).replace('digit.png',
                                                                str(tmp_path / 'digit.png'))
             for a in predict[1:]]
  env = os.environ | {'TFDS_DATA_DIR': tfds_data_dir}  # where the quickstart put the digits
  done = subprocess.run([sys.executable, *predict], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert lines[0] == str(tmp_path / 'digit.png') and len(lines) == 6
  assert re.fullmatch(r' +\d+\.\d\d% +\d +\d', lines[1]), lines  # sklearn_digits' names: 0-9
