"""Launchers: the exact commands they build (dry run), and the remote scripts run for real in bash.

gcloud, srun and scontrol are never called: dry runs print, and real-mode tests put recording
stubs first on PATH.
"""
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
import types

import jax
import pytest
from absl import flags

from launch import gpu_slurm, tpu_vm
from tests import common

LOCATION = ['--name=vit-a', '--zone=us-central2-b']
TRAINER_FLAGS = ['--config=configs/quickstart.py', '--workdir=gs://bucket/runs/a',
                 '--config.pp_train=decode|resize(16)|value_range(-1, 1)',
                 """--config.init_from=gs://b/it's "quoted" $HOME.npz"""]
GCLOUD_TPU_VM = ['gcloud', 'compute', 'tpus', 'tpu-vm']
GCLOUD_QUEUED = ['gcloud', 'compute', 'tpus', 'queued-resources']


REAL_FIT_CHECK = tpu_vm.fit_check
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


@pytest.fixture(autouse=True)
def fit_checks(monkeypatch):
  """The fit checks launches ask for; the real check compiles and is tested on its own below."""
  checks = []
  monkeypatch.setattr(tpu_vm, 'fit_check', lambda *args: checks.append(args))
  return checks


def _dry_run(capsys, *launcher_args, trainer_flags=()):
  """The printed commands as argv lists, and the note lines."""
  argv = [*launcher_args, '--dry_run']
  tpu_vm.main(argv + (['--', *trainer_flags] if trainer_flags else []))
  lines = capsys.readouterr().out.splitlines()
  return ([shlex.split(line) for line in lines if not line.startswith('#')],
          [line for line in lines if line.startswith('#')])


def _remote_script(argv):
  assert argv[:5] == GCLOUD_TPU_VM + ['ssh'] and argv[-1].startswith('--command=')
  return argv[-1][len('--command='):]


def _stub(path, body):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('#!/bin/bash\n' + body + '\n')
  path.chmod(0o755)


def _recording_stub(path, calls, then=''):
  """A program at path that appends its argv to calls (one line, NUL-terminated arguments)."""
  _stub(path, f'{{ printf "%s\\0" "$(basename "$0")" "$@"; echo; }} >> {calls}; {then}')


def _read_calls(calls):
  return [line.split('\0')[:-1] for line in calls.read_text().splitlines()]


def test_launch_creates_ships_installs_and_runs(capsys):
  commands, notes = _dry_run(capsys, *LOCATION, '--accelerator_type=v4-32',
                             trainer_flags=TRAINER_FLAGS)
  create, archive, scp, setup, run = commands
  assert len(notes) == 1 and notes[0].startswith('# pinned to what is installed here')
  assert create == GCLOUD_TPU_VM + ['create', 'vit-a', '--zone=us-central2-b',
                                    '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base']
  tarball = archive[-3][len('--output='):]
  assert archive[:-2] == ['git', '-C', tpu_vm.PROJECT_ROOT, 'archive', '--format=tar.gz',
                          f'--output={tarball}'] and archive[-1] == 'HEAD'
  assert archive[-2].startswith('--add-file=') and archive[-2].endswith('/installed_versions.txt')
  assert scp == GCLOUD_TPU_VM + ['scp', tarball, 'vit-a:vit_jax.tar.gz', '--worker=all',
                                 '--zone=us-central2-b']
  for ssh in (setup, run):
    assert ssh[:-1] == GCLOUD_TPU_VM + ['ssh', 'vit-a', '--zone=us-central2-b', '--worker=all']
  assert "-c ./vit_jax/installed_versions.txt -e ./vit_jax 'jax[tpu]==" in _remote_script(setup)
  assert '--coordinator_address' not in _remote_script(run)  # TPU hosts find each other


def test_queued_spot_slice_waits_until_active(capsys):
  commands, notes = _dry_run(capsys, 'create', *LOCATION, '--accelerator_type=v5litepod-16',
                             '--queued', '--spot')
  assert commands == [
      GCLOUD_QUEUED + ['create', 'vit-a', '--zone=us-central2-b', '--node-id=vit-a',
                       '--accelerator-type=v5litepod-16',
                       '--runtime-version=v2-alpha-tpuv5-lite', '--spot'],
      GCLOUD_QUEUED + ['describe', 'vit-a', '--zone=us-central2-b',
                       '--format=value(state.state)'],
  ]
  assert notes == ['# repeated every 30 s until it prints ACTIVE']


def test_project_and_version_reach_every_gcloud_command(capsys):
  commands, _ = _dry_run(capsys, *LOCATION, '--accelerator_type=v5p-64', '--project=my-proj',
                         '--version=custom-runtime', trainer_flags=TRAINER_FLAGS)
  gcloud_commands = [argv for argv in commands if argv[0] == 'gcloud']
  assert len(gcloud_commands) == 4
  assert all('--project=my-proj' in argv for argv in gcloud_commands)
  assert '--version=custom-runtime' in commands[0]
  assert '--spot' not in commands[0]


@pytest.mark.parametrize('accelerator_type, version', [
    ('v4-8', 'tpu-ubuntu2204-base'), ('v5p-128', 'v2-alpha-tpuv5'),
    ('v6e-16', 'v2-alpha-tpuv6e')])
def test_default_runtime_version_follows_the_generation(capsys, accelerator_type, version):
  commands, _ = _dry_run(capsys, 'create', *LOCATION, f'--accelerator_type={accelerator_type}')
  assert commands[0][-1] == f'--version={version}'


def test_unknown_generation_asks_for_version(capsys):
  with pytest.raises(SystemExit, match='--accelerator_type=v9x-8: pass --version'):
    _dry_run(capsys, 'create', *LOCATION, '--accelerator_type=v9x-8')


@pytest.mark.parametrize('launcher_args, expected', [
    (['status'], [GCLOUD_TPU_VM + ['describe', 'vit-a', '--zone=us-central2-b'], 'ssh all']),
    (['status', '--queued'],
     [GCLOUD_QUEUED + ['describe', 'vit-a', '--zone=us-central2-b'], 'ssh all']),
    (['logs', '--lines=20'], ['ssh 0: tail -n 20 vit_jax.log']),
    (['logs', '--follow'], ['ssh 0: tail -n 100 -F vit_jax.log']),
    (['stop'], ['ssh all']),
    (['delete'], [GCLOUD_TPU_VM + ['delete', 'vit-a', '--zone=us-central2-b']]),
    (['delete', '--queued'],
     [GCLOUD_QUEUED + ['delete', 'vit-a', '--zone=us-central2-b', '--force']]),
])
def test_management_commands(capsys, launcher_args, expected):
  commands, _ = _dry_run(capsys, *launcher_args, *LOCATION)
  assert len(commands) == len(expected)
  for argv, want in zip(commands, expected):
    if isinstance(want, list):
      assert argv == want
    else:
      worker, _, script = want.removeprefix('ssh ').partition(': ')
      assert argv[:-1] == GCLOUD_TPU_VM + ['ssh', 'vit-a', '--zone=us-central2-b',
                                          f'--worker={worker}']
      assert not script or _remote_script(argv) == script


@pytest.mark.parametrize('trainer_flags, message', [
    (['--config=configs/quickstart.py', '--workdir=/tmp/run'], r'--workdir=/tmp/run: .*gs://'),
    (['--config=configs/quickstart.py'], r'--workdir=None'),
    (['--workdir=gs://b/r'], r'--config'),
])
def test_trainer_flags_that_cannot_work_on_a_slice_are_refused(capsys, trainer_flags, message):
  with pytest.raises(SystemExit, match=message):
    _dry_run(capsys, *LOCATION, '--accelerator_type=v4-32', trainer_flags=trainer_flags)
  assert capsys.readouterr().out == ''


def test_usage_errors_name_the_problem(capsys):
  with pytest.raises(SystemExit):
    _dry_run(capsys, 'status', *LOCATION, trainer_flags=['--config=c.py'])
  assert 'go with launch, create or run, not status: --config=c.py' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    _dry_run(capsys, *LOCATION, trainer_flags=TRAINER_FLAGS)
  assert 'launch needs --accelerator_type' in capsys.readouterr().err


def test_real_mode_without_gcloud_fails_clearly(tmp_path, monkeypatch):
  monkeypatch.setenv('PATH', str(tmp_path))
  with pytest.raises(SystemExit, match='gcloud not found on PATH'):
    tpu_vm.main(['status', *LOCATION])


def test_real_mode_runs_the_planned_commands(tmp_path, monkeypatch, capsys):
  calls = tmp_path / 'calls'
  _recording_stub(tmp_path / 'bin' / 'gcloud', calls, then='echo "${STUB_STATE:-ACTIVE}"')
  monkeypatch.setenv('PATH', f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}')
  launcher_args = ['create', *LOCATION, '--accelerator_type=v4-32', '--queued']
  planned, _ = _dry_run(capsys, *launcher_args)
  tpu_vm.main(launcher_args)
  assert _read_calls(calls) == planned
  monkeypatch.setenv('STUB_STATE', 'FAILED')
  with pytest.raises(SystemExit, match='says FAILED'):
    tpu_vm.main(launcher_args)


def test_uncommitted_files_are_named(tmp_path):
  subprocess.run(['git', 'init', '-q', str(tmp_path)], check=True)
  assert tpu_vm.uncommitted_files(str(tmp_path)) == []
  (tmp_path / 'edited.py').write_text('x = 1\n')
  assert tpu_vm.uncommitted_files(str(tmp_path)) == ['edited.py']


def _remote_scripts(capsys):
  commands, _ = _dry_run(capsys, *LOCATION, '--accelerator_type=v4-8',
                         trainer_flags=TRAINER_FLAGS)
  scripts = {'setup': _remote_script(commands[3]), 'run': _remote_script(commands[4])}
  for name in ('status', 'stop'):
    scripts[name] = _remote_script(_dry_run(capsys, name, *LOCATION)[0][-1])
  return scripts


def _on_worker(home, script):
  """Runs a remote script as gcloud's ssh would: bash, in the home directory."""
  env = dict(os.environ, HOME=str(home), PATH=f'{home / "bin"}{os.pathsep}{os.environ["PATH"]}')
  return subprocess.run(['bash', '-c', script], cwd=home, env=env, capture_output=True,
                        text=True, timeout=60)


def test_setup_script_unpacks_and_installs(tmp_path, capsys):
  scripts = _remote_scripts(capsys)
  project = tmp_path / 'project'
  (project / 'vit_jax').mkdir(parents=True)
  (project / 'vit_jax' / 'main.py').write_text('# trainer\n')
  with tarfile.open(tmp_path / 'vit_jax.tar.gz', 'w:gz') as tarball:
    tarball.add(project / 'vit_jax', arcname='vit_jax')
  calls = tmp_path / 'calls'
  for name in ('bin/python3', '.local/bin/uv'):
    _recording_stub(tmp_path / name, calls)
  result = _on_worker(tmp_path, scripts['setup'])
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'vit_jax' / 'vit_jax' / 'main.py').read_text() == '# trainer\n'
  jax_version = importlib.metadata.version('jax')
  assert _read_calls(calls) == [
      ['python3', '-m', 'pip', 'install', '--user', '--quiet', '--upgrade', 'uv'],
      ['uv', 'venv', '--quiet', '--python', tpu_vm.PYTHON_VERSION, 'vit_jax_venv'],
      ['uv', 'pip', 'install', '--quiet', '--python', 'vit_jax_venv/bin/python', '-c',
       './vit_jax/installed_versions.txt', '-e', './vit_jax', f'jax[tpu]=={jax_version}',
       f'jaxlib=={importlib.metadata.version("jaxlib")}',
       *([f'libtpu=={importlib.metadata.version("libtpu")}'] if HAS_LIBTPU else [])],
  ]


def test_the_workers_install_what_the_fit_check_compiled_with(capsys, tmp_path, monkeypatch):
  """jax, jaxlib, libtpu and every package the project needs, at the versions installed here:
  on the install command, and in the constraints file the tarball carries."""
  versions = tpu_vm.installed_versions()
  for name in ('jax', 'jaxlib', 'flax', 'orbax-checkpoint', 'tensorflow-cpu',  # direct
               'ml-dtypes', 'opt-einsum', 'tensorstore', 'protobuf'):  # needed by those
    assert versions[name] == importlib.metadata.version(name), name
  assert ('libtpu' in versions) == HAS_LIBTPU  # the [tpu] extra's, through jax[tpu]
  assert not {'pytest', 'torch', 'matplotlib', 'vit-jax'} & set(versions)  # other extras
  monkeypatch.setattr(tempfile, 'gettempdir', lambda: str(tmp_path))
  commands, notes = _dry_run(capsys, 'setup', *LOCATION)
  archive, _, setup = commands
  pins = tmp_path / 'vit_jax-vit-a' / 'installed_versions.txt'
  assert archive[-2] == f'--add-file={pins}'  # at the tarball's root, beside pyproject.toml
  assert pins.read_text().splitlines() == [f'{n}=={v}' for n, v in versions.items()]
  install = shlex.split(_remote_script(setup).split(' && ')[-1])
  assert install[-4 - HAS_LIBTPU:] == [
      '-e', './vit_jax', f'jax[tpu]=={versions["jax"]}', f'jaxlib=={versions["jaxlib"]}',
      *([f'libtpu=={versions["libtpu"]}'] if HAS_LIBTPU else [])]
  assert notes == [
      f'# pinned to what is installed here, which the fit check compiles with: '
      f'jax=={versions["jax"]} jaxlib=={versions["jaxlib"]}'
      + (f' libtpu=={versions["libtpu"]}' if HAS_LIBTPU else '') +
      f', and {len(versions) - 2 - HAS_LIBTPU} more packages the project needs (uv '
      'constraints: installed_versions.txt, shipped in the tarball)'
      + ('' if HAS_LIBTPU else '; libtpu not installed here: jax[tpu] chooses')]


def test_run_status_stop_scripts_manage_a_detached_trainer(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(tpu_vm, 'STOP_GRACE_S', 6)  # bounds the wait if the stub ignored SIGTERM
  scripts = _remote_scripts(capsys)
  (tmp_path / 'vit_jax').mkdir()
  argv_file = tmp_path / 'trainer_argv'
  _stub(tmp_path / 'vit_jax_venv' / 'bin' / 'python',
        f'trap "kill \\$!; touch {tmp_path}/got_sigterm; exit 0" TERM; '
        f'printf "%s\\0" "$PWD" "$@" > {argv_file}.tmp; mv {argv_file}.tmp {argv_file}; '
        'echo training output; sleep 60 & wait')
  result = _on_worker(tmp_path, scripts['run'])
  pid = int((tmp_path / 'vit_jax.pid').read_text())
  try:
    assert result.returncode == 0, result.stderr
    for _ in range(400):
      if argv_file.exists():
        break
      time.sleep(0.05)
    cwd, *argv = argv_file.read_text().split('\0')[:-1]
    assert cwd == str(tmp_path / 'vit_jax')
    assert argv == ['-m', 'vit_jax.main', *TRAINER_FLAGS, '--distributed']
    assert 'training output' in (tmp_path / 'vit_jax.log').read_text()
    assert 'training, pid' in _on_worker(tmp_path, scripts['status']).stdout
    second = _on_worker(tmp_path, scripts['run'])
    assert second.returncode == 1 and 'already training' in second.stderr
    stopped = _on_worker(tmp_path, scripts['stop'])
    assert stopped.stdout.strip().endswith('not training')
    assert (tmp_path / 'got_sigterm').exists()  # a checkpointing exit, not SIGKILL
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
    assert 'not training' in _on_worker(tmp_path, scripts['status']).stdout
  finally:
    try:
      os.kill(pid, 9)
    except ProcessLookupError:
      pass


@pytest.mark.parametrize('launcher_flags, data_dir, message', [
    ([], 'gs://b/tensorflow_datasets', r'--data_bucket=gs://b .*--config.data.data_dir=/gcs/b/'
     r'tensorflow_datasets'),
    ([], '/gcs/b/tensorflow_datasets', r'is on a mount: pass --data_bucket=gs://b'),
    (['--data_bucket=gs://b/tensorflow_datasets'], '/gcs/b/tfds', r'gs://BUCKET \(no folder\)'),
])
def test_tfds_data_in_a_bucket_needs_the_mount(capsys, launcher_flags, data_dir, message):
  with pytest.raises(SystemExit) as exit_:
    _dry_run(capsys, *LOCATION, '--accelerator_type=v4-32', *launcher_flags,
             trainer_flags=TRAINER_FLAGS[:2] + [f'--config.data.data_dir={data_dir}'])
  output = capsys.readouterr()
  assert output.out == '' and re.search(message, f'{exit_.value} {output.err}')


def test_data_bucket_is_mounted_on_every_worker_before_the_trainer_starts(tmp_path, capsys):
  flags_ = TRAINER_FLAGS[:2] + ['--config.data.data_dir=/gcs/my-data/tensorflow_datasets']
  commands, _ = _dry_run(capsys, 'run', *LOCATION, '--data_bucket=gs://my-data',
                         trainer_flags=flags_)
  script = _remote_script(commands[-1])
  calls = tmp_path / 'calls'
  (tmp_path / 'vit_jax').mkdir()
  for name in ('mountpoint', 'sudo', 'vit_jax_venv/bin/python'):
    _recording_stub(tmp_path / ('bin/' + name if '/' not in name else name), calls,
                    then='exit 1' if name == 'mountpoint' else '')
  _recording_stub(tmp_path / 'bin' / 'gcsfuse', calls, then='exit "${GCSFUSE_FAILS:-0}"')
  result = _on_worker(tmp_path, script)
  assert result.returncode == 0, result.stderr
  for _ in range(400):  # the trainer starts in the background
    if len(_read_calls(calls)) == 5:
      break
    time.sleep(0.05)
  assert _read_calls(calls) == [
      ['mountpoint', '-q', '/gcs/my-data'], ['sudo', 'mkdir', '-p', '/gcs/my-data'],
      ['sudo', 'chown', os.environ.get('USER', ''), '/gcs/my-data'],
      ['gcsfuse', '-o', 'ro', '--implicit-dirs', 'my-data', '/gcs/my-data'],
      ['python', '-m', 'vit_jax.main', *flags_, '--distributed']]
  calls.unlink()
  (tmp_path / 'vit_jax.pid').unlink()
  failed = subprocess.run(['bash', '-c', script], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, HOME=str(tmp_path), GCSFUSE_FAILS='1',
                                   PATH=f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}'))
  assert failed.returncode == 1 and 'could not mount gs://my-data at /gcs/my-data' in failed.stderr
  assert not any(c[0] == 'python' for c in _read_calls(calls))  # no trainer without its data


def test_distributed_flag_starts_jax_distributed_auto_detected(monkeypatch):
  from vit_jax import main as vit_main  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  trainer = types.ModuleType('vit_jax.train.trainer')  # the real one imports TF: slow here
  trainer.train_and_evaluate = lambda config, workdir, started: calls.append(workdir)
  monkeypatch.setitem(sys.modules, 'vit_jax.train.trainer', trainer)
  monkeypatch.delattr('vit_jax.train.trainer', raising=False)
  flags.FLAGS(['prog', '--config=configs/quickstart.py', '--workdir=/tmp/w', '--distributed'])
  try:
    vit_main.main(['prog'])
  finally:
    flags.FLAGS.unparse_flags()
  assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None), '/tmp/w']


SLURM_ENV = {'SLURM_JOB_NODELIST': 'gpu[07-08]', 'SLURM_NTASKS': '2', 'SLURM_JOB_NUM_NODES': '2',
             'SLURM_PROCID': '1', 'SLURM_JOB_ID': '4242'}


@pytest.fixture
def slurm(tmp_path, monkeypatch):
  """SLURM's variables, and an scontrol on PATH that expands gpu[07-08] and records its argv."""
  for name, value in SLURM_ENV.items():
    monkeypatch.setenv(name, value)
  calls = tmp_path / 'scontrol_calls'
  _recording_stub(tmp_path / 'bin' / 'scontrol', calls, then='printf "gpu07\\ngpu08\\n"')
  monkeypatch.setenv('PATH', f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}')
  return calls


def test_slurm_task_gets_coordinator_flags(slurm, capsys):
  gpu_slurm.main(['--dry_run', '--', *TRAINER_FLAGS])
  assert shlex.split(capsys.readouterr().out) == [
      sys.executable, '-m', 'vit_jax.main', *TRAINER_FLAGS,
      f'--coordinator_address=gpu07:{20000 + 4242}', '--num_processes=2', '--process_id=1']
  assert _read_calls(slurm) == [['scontrol', 'show', 'hostnames', 'gpu[07-08]']]


def test_slurm_real_mode_replaces_itself_with_the_trainer(slurm, monkeypatch):
  executed = []
  monkeypatch.setattr(os, 'execv', lambda path, argv: executed.append((path, argv)))
  gpu_slurm.main(['--port=1234', '--', '--config=c.py', '--workdir=/shared/w'])
  assert executed == [(sys.executable, [
      sys.executable, '-m', 'vit_jax.main', '--config=c.py', '--workdir=/shared/w',
      '--coordinator_address=gpu07:1234', '--num_processes=2', '--process_id=1'])]


def test_slurm_errors_name_the_variable(slurm, monkeypatch):
  monkeypatch.setenv('SLURM_NTASKS', '16')
  with pytest.raises(SystemExit, match='SLURM_NTASKS=16 but SLURM_JOB_NUM_NODES=2'):
    gpu_slurm.trainer_command(os.environ, [])
  monkeypatch.delenv('SLURM_NTASKS')
  monkeypatch.delenv('SLURM_PROCID')
  with pytest.raises(SystemExit, match='SLURM_NTASKS, SLURM_PROCID not set'):
    gpu_slurm.trainer_command(os.environ, [])


def test_slurm_dry_run_outside_slurm_shows_an_example_job(monkeypatch, capsys):
  for name in gpu_slurm.SLURM_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('PATH', '')  # no scontrol either, as on a laptop
  gpu_slurm.main(['--dry_run', '--', *TRAINER_FLAGS])
  out, err = capsys.readouterr()
  assert 'not inside a SLURM allocation' in err
  assert shlex.split(out)[3:] == [*TRAINER_FLAGS, '--coordinator_address=node01:32345',
                                  '--num_processes=2', '--process_id=0']


def test_sbatch_script_hands_trainer_flags_to_one_task_per_node(tmp_path):
  script = os.path.join(tpu_vm.PROJECT_ROOT, 'launch', 'gpu_slurm.sbatch')
  directives = [line.split()[1] for line in open(script) if line.startswith('#SBATCH')]
  assert {'--ntasks-per-node=1', '--signal=TERM@120'} <= set(directives)
  calls = tmp_path / 'srun_calls'
  _recording_stub(tmp_path / 'bin' / 'srun', calls)
  env = dict(os.environ, PATH=f'{tmp_path / "bin"}{os.pathsep}{os.environ["PATH"]}')
  subprocess.run(['bash', script, *TRAINER_FLAGS], env=env, check=True, timeout=60)
  assert _read_calls(calls) == [
      ['srun', '--kill-on-bad-exit=1', 'python', '-m', 'launch.gpu_slurm', '--', *TRAINER_FLAGS]]


def test_launch_create_and_run_check_the_fit_first(capsys, fit_checks):
  _dry_run(capsys, *LOCATION, '--accelerator_type=v4-32', trainer_flags=TRAINER_FLAGS)
  _dry_run(capsys, 'create', *LOCATION, '--accelerator_type=v4-32', trainer_flags=TRAINER_FLAGS)
  _dry_run(capsys, 'run', *LOCATION, '--accelerator_type=v4-32', trainer_flags=TRAINER_FLAGS)
  _dry_run(capsys, *LOCATION, '--accelerator_type=v4-32', '--skip_fit_check',
           trainer_flags=TRAINER_FLAGS)
  _dry_run(capsys, 'run', *LOCATION, trainer_flags=TRAINER_FLAGS)  # no slice named: no check
  assert fit_checks == [('v4-32', TRAINER_FLAGS, 1)] * 3


GCLOUD_QUEUED_NODES = ['--node=all', '--worker=all']


def test_several_slices_are_one_queued_resource_reaching_every_host(capsys, fit_checks):
  commands, notes = _dry_run(capsys, *LOCATION, '--accelerator_type=v5litepod-16',
                             '--num_slices=2', '--spot', trainer_flags=TRAINER_FLAGS)
  create, describe, archive, scp, setup, run = commands
  assert create == GCLOUD_QUEUED + [
      'create', 'vit-a', '--zone=us-central2-b', '--node-count=2', '--node-prefix=vit-a',
      '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-tpuv5-lite', '--spot']
  assert describe[:5] == GCLOUD_QUEUED + ['describe'] and notes
  assert scp == GCLOUD_QUEUED + ['scp', archive[-3][len('--output='):], 'vit-a:vit_jax.tar.gz',
                                 *GCLOUD_QUEUED_NODES, '--zone=us-central2-b']
  for ssh in (setup, run):
    assert ssh[:-1] == GCLOUD_QUEUED + ['ssh', 'vit-a', '--zone=us-central2-b',
                                        *GCLOUD_QUEUED_NODES]
  sliced = [*TRAINER_FLAGS, '--config.mesh.dcn_data=2']  # data parallel across the slices
  assert shlex.join(['-m', 'vit_jax.main', *sliced, '--distributed']) in run[-1]
  assert fit_checks == [('v5litepod-16', sliced, 2)]
  logs, = _dry_run(capsys, 'logs', *LOCATION, '--num_slices=2')[0]
  assert logs[:-1] == GCLOUD_QUEUED + ['ssh', 'vit-a', '--zone=us-central2-b', '--node=0',
                                       '--worker=0']
  delete, = _dry_run(capsys, 'delete', *LOCATION, '--num_slices=2')[0]
  assert delete == GCLOUD_QUEUED + ['delete', 'vit-a', '--zone=us-central2-b', '--force']
  with pytest.raises(SystemExit, match='dcn_data=1 but --num_slices=2'):
    _dry_run(capsys, *LOCATION, '--accelerator_type=v5litepod-16', '--num_slices=2',
             trainer_flags=[*TRAINER_FLAGS, '--config.mesh.dcn_data=1'])


def test_fit_check_result_is_kept_per_flags_slice_and_code(tmp_path, monkeypatch, capsys):
  runs = []
  report = {'fits': True, 'required_gib': 1.5, 'device_memory_gib': 30.75}

  def aot(command, **kwargs):
    runs.append(command)
    return types.SimpleNamespace(returncode=0, stdout='figures\n' + json.dumps(report),
                                 stderr='')
  monkeypatch.setattr(tpu_vm, '_run_relaying_stderr', aot)
  monkeypatch.setattr(tpu_vm, 'FIT_CHECK_CACHE', str(tmp_path / 'cache'))
  (tmp_path / 'vit_jax').mkdir()
  (tmp_path / 'vit_jax' / 'model.py').write_text('width = 1\n')
  monkeypatch.setattr(tpu_vm, 'PROJECT_ROOT', str(tmp_path))
  flags_ = ['--config=configs/quickstart.py', '--config.batch_size=32']
  assert REAL_FIT_CHECK('v4-8', flags_) == report
  assert REAL_FIT_CHECK('v4-8', flags_) == report  # the same check: not compiled again
  assert len(runs) == 1 and 'kept from an earlier identical check' in capsys.readouterr().err
  REAL_FIT_CHECK('v4-8', flags_ + ['--config.model.name=ViT-S_16'])  # other overrides
  REAL_FIT_CHECK('v4-8', flags_, 2)  # two slices
  (tmp_path / 'vit_jax' / 'model.py').write_text('width = 2\n')  # other code
  REAL_FIT_CHECK('v4-8', flags_)
  assert len(runs) == 4 and '--num_slices=2' in runs[2]


def test_only_config_flags_reach_the_fit_check():
  assert tpu_vm._config_flags(['--workdir=gs://b/r', '--config', 'configs/quickstart.py',
                               '--config.batch_size=8', '--distributed',
                               '--config.model.name', 'ViT-B_16']) == [
      '--config', 'configs/quickstart.py', '--config.batch_size=8', '--config.model.name',
      'ViT-B_16']


@common.needs_libtpu
def test_fit_check_compiles_the_trainer_config_for_the_slice(capsys, tmp_path, monkeypatch):
  """`python -m vit_jax.aot`, as the launcher runs it: a report, what it compiles shown while it
  does, and bad names refused."""
  monkeypatch.setattr(tpu_vm, 'FIT_CHECK_CACHE', str(tmp_path))  # compiles, whatever ran before
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))  # aot's compile times
  report = REAL_FIT_CHECK('v4-8', ['--config=configs/quickstart.py', '--workdir=gs://b/r',
                                   '--config.batch_size=32'])
  assert {'topology', 'devices', 'device_memory_gib', 'required_gib', 'fits', 'compile_s',
          'flops_per_step', 'ideal_step_s', 'collectives'} <= set(report)
  assert report['fits'] and (report['devices'], report['batch_size']) == (4, 32)
  said = capsys.readouterr().err
  assert 'GiB of 30.75 GiB: fits' in said
  assert ('\n  compiling the train step of ViT-Ti_4 (global batch 32) for v4-8, 4 devices (no '
          'earlier compile of it here') in said
  with pytest.raises(SystemExit, match=r'fit check failed .*v4-6.*TensorCores'):
    REAL_FIT_CHECK('v4-6', ['--config=configs/quickstart.py'])


def test_sigterm_during_the_fit_check_stops_it_and_the_launcher(capsys):
  # A stand-in for the aot check: says what it compiles, sends the launcher SIGTERM (as a
  # scheduler would), and says it stopped when the launcher passes the signal on.
  check = ('import os, signal, sys, time\n'
           'def stopped(signum, frame):\n'
           '  print("stopped by SIGTERM while compiling X", file=sys.stderr)\n'
           '  sys.exit(143)\n'
           'signal.signal(signal.SIGTERM, stopped)\n'
           'print("compiling X", file=sys.stderr, flush=True)\n'
           'os.kill(os.getppid(), signal.SIGTERM)\n'
           'time.sleep(60)\n')
  with pytest.raises(SystemExit) as stopped:
    tpu_vm._run_relaying_stderr([sys.executable, '-c', check])  # pylint: disable=protected-access
  assert stopped.value.code == 143
  assert capsys.readouterr().err.splitlines() == [
      '  compiling X', '  stopped by SIGTERM while compiling X',
      'stopped by SIGTERM during the fit check: nothing was created or started']


def test_a_fit_check_stopped_by_ctrl_c_stops_the_launcher(monkeypatch, tmp_path, capsys):
  """Ctrl-C reached the check (it exits 130) before the launcher saw it: stopped, not failed."""
  monkeypatch.setattr(tpu_vm, 'FIT_CHECK_CACHE', str(tmp_path))
  monkeypatch.setattr(tpu_vm, '_run_relaying_stderr', lambda command: types.SimpleNamespace(
      returncode=130, stdout='', stderr='\nstopped by Ctrl-C while compiling X\n'))
  with pytest.raises(SystemExit) as stopped:
    REAL_FIT_CHECK('v4-8', ['--config=configs/quickstart.py'])
  assert stopped.value.code == 130 and capsys.readouterr().err.endswith(
      'stopped by Ctrl-C during the fit check: nothing was created or started\n')
  assert not os.listdir(tmp_path)  # nothing kept: the same check runs again next time


def test_fit_check_refuses_naming_the_shortfall_and_a_fix(monkeypatch):
  report = {'fits': False, 'required_gib': 46.71, 'device_memory_gib': 30.75,
            'fix': {'model.remat_policy': 'full', 'accum_steps': 2}}
  monkeypatch.setattr(tpu_vm, '_run_relaying_stderr', lambda command: types.SimpleNamespace(
      returncode=0, stdout='figures\n' + json.dumps(report), stderr=''))
  with pytest.raises(SystemExit) as refused:
    REAL_FIT_CHECK('v4-8', ['--config=configs/quickstart.py'])
  assert str(refused.value) == (
      'the config does not fit on v4-8: it needs 46.71 GiB per device, 30.75 GiB are available. '
      'It fits with: --config.model.remat_policy=full --config.accum_steps=2')


def test_dry_run_warns_that_the_real_run_refuses_uncommitted_files(tmp_path, monkeypatch, capsys):
  subprocess.run(['git', 'init', '-q', str(tmp_path)], check=True)
  monkeypatch.setattr(tpu_vm, 'PROJECT_ROOT', str(tmp_path))
  tpu_vm.main([*LOCATION, '--accelerator_type=v4-8', '--dry_run', '--', *TRAINER_FLAGS])
  assert 'warning' not in capsys.readouterr().err
  (tmp_path / 'edited.py').write_text('x = 1\n')
  tpu_vm.main([*LOCATION, '--accelerator_type=v4-8', '--dry_run', '--', *TRAINER_FLAGS])
  printed = capsys.readouterr()
  assert 'gcloud compute tpus tpu-vm create' in printed.out  # the plan is still shown
  assert (f'warning: uncommitted changes in {tmp_path}: the real run will refuse to ship them '
          '(setup ships git HEAD); commit or stash edited.py') in printed.err
