"""Cloud TPU VM launcher: from a config to the trainer running on every host of a slice.

  python -m launch.tpu_vm [COMMAND] --name=N --zone=Z [--accelerator_type=v4-32] [--project=P]
      [--spot] [--queued] [--num_slices=S] [--version=RUNTIME] [--data_bucket=gs://B]
      [--dry_run] [-- TRAINER FLAGS]

COMMAND (default: launch)
  launch  create, then setup, then run
  create  create the slice (`tpu-vm create`), or with --queued a queued resource, and wait for it
  setup   ship the committed tree (`git archive HEAD`) to every worker; install it with jax[tpu]
          (jax, jaxlib, libtpu and every dependency at the versions installed here)
  run     start `python -m vit_jax.main TRAINER FLAGS` on all workers at once, detached (nohup),
          appending to ~/vit_jax.log; refuses to start a second copy
  status  the slice's state, and whether each worker is training
  logs    the tail of worker 0's log (--lines, --follow)
  stop    SIGTERM the trainer on every worker (it checkpoints, then exits); the slice stays up
  delete  delete the slice (the queued resource with --queued); gcloud asks to confirm

Multi-host needs no coordinator flags: the trainer gets --distributed, and JAX finds the slice's
hosts itself. The workdir must be gs://: every host writes its checkpoint shards there, and the
VMs' disks go with the slice.
--data_bucket=gs://B mounts the bucket read-only at /gcs/B on every worker (gcsfuse, installed
if missing) before `run` starts the trainer: tfds datasets are read as local files there
(--config.data.data_dir=/gcs/B/tensorflow_datasets); record files (data.path) read gs://
directly. A gs:// data_dir, or one under /gcs/B without --data_bucket, is refused.

--num_slices=S (S > 1): S slices of --accelerator_type as one queued resource (--node-count=S;
nodes NAME-0 .. NAME-<S-1>), every command reaching every host of every slice, data parallel
across slices: the trainer gets --config.mesh.dcn_data=S (unless its flags set mesh.dcn_data),
and the fit check compiles for S slices. Give --num_slices to status, logs, stop and delete too.

With --dry_run each command is printed (one per line, shell-quoted; lines starting with # are
notes) and nothing runs.

Before launch, create or run (dry runs included) with trainer flags and an --accelerator_type,
the trainer's config is compiled for that slice on this machine (`python -m vit_jax.aot`, needs
`pip install -e '.[tpu]'`): its per-device memory is printed, and a config that does not fit is
refused with the shortfall and a change that fits. --skip_fit_check skips it. Its result is kept
(~/.cache/vit_jax/fit_checks) per config flags, slice and version of the code and libraries,
so the same dry run again answers at once. A compile takes seconds for small models and minutes
for large ones: what it compiles, how long that took before and that it is alive are shown as it
runs; Ctrl-C or SIGTERM stop it (and the launcher) with one line.

What the workers run is what was checked: setup installs jax[tpu], jaxlib and libtpu at the
versions installed here (named on the install command), and every other package the project
needs at its version here (uv constraints, installed_versions.txt in the tarball).
"""
import json
import argparse
import dataclasses
import hashlib
import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ('launch', 'create', 'setup', 'run', 'status', 'logs', 'stop', 'delete')
# Paths on every worker, relative to the home directory that ssh starts in.
REMOTE_TARBALL = 'vit_jax.tar.gz'
REMOTE_DIR = 'vit_jax'
REMOTE_VENV = 'vit_jax_venv'
REMOTE_LOG = 'vit_jax.log'
REMOTE_PID = 'vit_jax.pid'
# This Python's version (pyproject requires 3.11 or later): TPU VM images ship an older python3,
# so uv fetches this one, as the fit check ran on it.
PYTHON_VERSION = f'{sys.version_info.major}.{sys.version_info.minor}'
# The versions installed here of every package the project needs, which the fit check compiled
# with: shipped in the tarball (at its root) as uv's constraints for the workers' install.
PINS_FILE = 'installed_versions.txt'
# Pinned on the install command itself, where the dry run shows them: what compiles and runs.
COMPILER_PACKAGES = ('jax', 'jaxlib', 'libtpu')
# Cloud TPU's recommended software version for JAX, by accelerator generation.
RUNTIME_VERSIONS = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}
QUEUED_POLL_S = 30
QUEUED_FAILED_STATES = ('FAILED', 'SUSPENDING', 'SUSPENDED')
STOP_GRACE_S = 300  # time the trainer gets to write its SIGTERM checkpoint before SIGKILL
GCS_MOUNT_ROOT = '/gcs'  # --data_bucket=gs://B is mounted at /gcs/B, as MaxText does
_IS_TRAINING = f'test -f {REMOTE_PID} && kill -0 "$(cat {REMOTE_PID})" 2>/dev/null'


@dataclasses.dataclass(frozen=True)
class Command:
  """One local command; `wait_until_active` reruns it until it prints ACTIVE; `note` is said
  after it (a dry run prints it as a # line)."""
  argv: list[str]
  wait_until_active: bool = False
  note: str = ''


def _location(args):
  return [f'--zone={args.zone}'] + ([f'--project={args.project}'] if args.project else [])


def _gcloud_tpus(args, *words):
  """`gcloud compute tpus WORDS NAME --zone=Z [--project=P]`."""
  return ['gcloud', 'compute', 'tpus', *words, args.name, *_location(args)]


def _spot(args):
  return ['--spot'] if args.spot else []


def _multislice(args) -> bool:
  return args.num_slices > 1


def _hosts(args, worker: str) -> list:
  """--worker (and, across slices, --node: the same workers of every slice, or slice 0's)."""
  return ([f'--node={"all" if worker == "all" else 0}'] if _multislice(args) else []) + [
      f'--worker={worker}']


def _ssh(args, remote_command, worker='all'):
  kind = 'queued-resources' if _multislice(args) else 'tpu-vm'
  return Command(_gcloud_tpus(args, kind, 'ssh') + _hosts(args, worker) +
                 [f'--command={remote_command}'])


def runtime_version(args):
  """--version, else Cloud TPU's recommended JAX runtime for the accelerator's generation."""
  if args.version:
    return args.version
  generation = args.accelerator_type.rsplit('-', 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise SystemExit(f'no default TPU software version for --accelerator_type='
                     f'{args.accelerator_type}: pass --version (known generations: '
                     f'{", ".join(RUNTIME_VERSIONS)})')
  return RUNTIME_VERSIONS[generation]


def create_commands(args):
  if args.queued:
    nodes = ([f'--node-count={args.num_slices}', f'--node-prefix={args.name}']
             if _multislice(args) else [f'--node-id={args.name}'])
    create = _gcloud_tpus(args, 'queued-resources', 'create') + nodes + [
        f'--accelerator-type={args.accelerator_type}',
        f'--runtime-version={runtime_version(args)}']
    describe = _gcloud_tpus(args, 'queued-resources', 'describe') + [
        '--format=value(state.state)']
    return [Command(create + _spot(args)),
            Command(describe, wait_until_active=True)]
  create = _gcloud_tpus(args, 'tpu-vm', 'create') + [
      f'--accelerator-type={args.accelerator_type}', f'--version={runtime_version(args)}']
  return [Command(create + _spot(args))]


def _normal(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def _requirement(text: str) -> tuple[str, set, str]:
  """(name, extras, marker) of a requirement such as 'etils[epath]>=1.7; extra == "x"'."""
  spec, _, marker = text.partition(';')
  match = re.match(r'\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?', spec)
  return match[1], {e.strip() for e in (match[2] or '').split(',') if e.strip()}, marker


def installed_versions(extras=('tpu',)) -> dict:
  """{distribution: version} installed here of every package the project needs: pyproject's
  dependencies and `extras`, and theirs, recursively (a requirement's own extras followed, its
  other markers not evaluated). What is not installed here is left out."""
  try:
    with open(os.path.join(PROJECT_ROOT, 'pyproject.toml'), 'rb') as f:
      project = tomllib.load(f)['project']
  except FileNotFoundError:  # not the project's checkout: nothing to pin
    return {}
  todo = list(project['dependencies']) + [
      r for extra in extras for r in project.get('optional-dependencies', {}).get(extra, [])]
  versions, seen = {}, set()
  while todo:
    name, wanted, _ = _requirement(todo.pop())
    if (_normal(name), frozenset(wanted)) in seen:
      continue
    seen.add((_normal(name), frozenset(wanted)))
    try:
      distribution = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    versions[_normal(name)] = distribution.version
    for requirement in distribution.requires or ():
      extra = re.search(r'extra\s*==\s*[\'"]([^\'"]+)', _requirement(requirement)[2])
      if extra is None or _normal(extra[1]) in {_normal(e) for e in wanted}:
        todo.append(requirement)
  return dict(sorted(versions.items()))


def pinned_install(versions: dict) -> tuple[list, str]:
  """(the packages named on the workers' install command, the note saying what is pinned):
  jax[tpu], jaxlib and libtpu at the versions installed here."""
  pinned = [f'{name}=={versions[name]}' for name in COMPILER_PACKAGES if name in versions]
  if 'jax' not in versions:
    return ['jax[tpu]'], ('# NOT pinned: jax is not installed here (pip install -e \'.[tpu]\'), '
                          'so the workers install the newest jax[tpu]')
  packages = [f'jax[tpu]=={versions["jax"]}'] + pinned[1:]
  missing = [name for name in COMPILER_PACKAGES if name not in versions]
  return packages, (
      f'# pinned to what is installed here, which the fit check compiles with: '
      f'{" ".join(pinned)}, and {len(versions) - len(pinned)} more packages the project needs '
      f'(uv constraints: {PINS_FILE}, shipped in the tarball)'
      + (f'; {", ".join(missing)} not installed here: jax[tpu] chooses' if missing else ''))


def setup_commands(args, tarball):
  pins = os.path.join(os.path.dirname(tarball), f'vit_jax-{args.name}', PINS_FILE)
  versions = installed_versions()
  os.makedirs(os.path.dirname(pins), exist_ok=True)
  with open(pins, 'w') as f:  # written for the dry run too: its commands can be run by hand
    f.write(''.join(f'{name}=={version}\n' for name, version in versions.items()))
  packages, note = pinned_install(versions)
  install = ' && '.join([
      f'rm -rf {REMOTE_DIR} {REMOTE_VENV}',
      f'mkdir {REMOTE_DIR}',
      f'tar xzf {REMOTE_TARBALL} -C {REMOTE_DIR}',
      'python3 -m pip install --user --quiet --upgrade uv',
      f'~/.local/bin/uv venv --quiet --python {PYTHON_VERSION} {REMOTE_VENV}',
      f'~/.local/bin/uv pip install --quiet --python {REMOTE_VENV}/bin/python '
      f'-c ./{REMOTE_DIR}/{PINS_FILE} -e ./{REMOTE_DIR} {shlex.join(packages)}',
  ])
  remote = (f'if {_IS_TRAINING}; then echo "$(hostname): training; stop it before setup" >&2; '
            f'exit 1; fi; {install}')
  ssh = _ssh(args, remote)
  return [
      Command(['git', '-C', PROJECT_ROOT, 'archive', '--format=tar.gz', f'--output={tarball}',
               f'--add-file={pins}', 'HEAD']),
      Command(['gcloud', 'compute', 'tpus', 'queued-resources' if _multislice(args) else 'tpu-vm',
               'scp', tarball, f'{args.name}:{REMOTE_TARBALL}', *_hosts(args, 'all'),
               *_location(args)]),
      dataclasses.replace(ssh, note=note),
  ]


def mount_point(bucket_url):
  """Where --data_bucket=gs://B is mounted on every worker: /gcs/B."""
  return f'{GCS_MOUNT_ROOT}/{bucket_url[len("gs://"):]}'


def _mount_script(bucket_url):
  """Installs gcsfuse if missing and mounts the bucket read-only, unless it is mounted already
  (after a reboot, a `run` mounts it again)."""
  bucket, folder = bucket_url[len('gs://'):], mount_point(bucket_url)
  install = ' && '.join([
      'sudo curl -fsSL -o /usr/share/keyrings/cloud.google.asc '
      'https://packages.cloud.google.com/apt/doc/apt-key.gpg',
      'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
      'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '
      '| sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null',
      'sudo apt-get update -qq', 'sudo apt-get install -y -qq fuse gcsfuse'])
  mount = ' && '.join([f'sudo mkdir -p {folder}', f'sudo chown "$USER" {folder}',
                       f'gcsfuse -o ro --implicit-dirs {bucket} {folder}'])
  return (f'if ! mountpoint -q {folder}; then {{ command -v gcsfuse > /dev/null || {{ {install}; '
          f'}}; }} && {mount} || {{ echo "$(hostname): could not mount {bucket_url} at '
          f'{folder}" >&2; exit 1; }}; fi; ')


def run_commands(args, trainer_flags):
  trainer = shlex.join([f'../{REMOTE_VENV}/bin/python', '-m', 'vit_jax.main', *trainer_flags,
                        '--distributed'])
  remote = (f'if {_IS_TRAINING}; then echo "$(hostname): already training, pid '
            f'$(cat {REMOTE_PID})" >&2; exit 1; fi; '
            + (_mount_script(args.data_bucket) if args.data_bucket else '') +
            f'cd {REMOTE_DIR} || exit 1; '
            f'echo "=== $(date -u): starting the trainer" >> ../{REMOTE_LOG}; '
            f'nohup {trainer} >> ../{REMOTE_LOG} 2>&1 < /dev/null & '
            f'echo $! > ../{REMOTE_PID}')
  return [_ssh(args, remote)]


def status_commands(args):
  kind = 'queued-resources' if args.queued else 'tpu-vm'
  remote = (f'if {_IS_TRAINING}; then echo "$(hostname): training, pid $(cat {REMOTE_PID})"; '
            f'else echo "$(hostname): not training"; fi')
  return [Command(_gcloud_tpus(args, kind, 'describe')), _ssh(args, remote)]


def logs_commands(args):
  follow = ' -F' if args.follow else ''
  return [_ssh(args, f'tail -n {args.lines}{follow} {REMOTE_LOG}', worker='0')]


def stop_commands(args):
  polls = STOP_GRACE_S // 2
  remote = (f'if {_IS_TRAINING}; then pid=$(cat {REMOTE_PID}); kill -TERM "$pid"; '
            f'for _ in $(seq {polls}); do kill -0 "$pid" 2>/dev/null || break; sleep 2; done; '
            f'kill -KILL "$pid" 2>/dev/null; fi; echo "$(hostname): not training"')
  return [_ssh(args, remote)]


def delete_commands(args):
  if args.queued:
    return [Command(_gcloud_tpus(args, 'queued-resources', 'delete') + ['--force'])]
  return [Command(_gcloud_tpus(args, 'tpu-vm', 'delete'))]


def _flag_value(trainer_flags, name):
  """The value of --name=V / --name V (absl also takes one dash), or None."""
  for i, flag in enumerate(trainer_flags):
    for prefix in (f'--{name}', f'-{name}'):
      if flag.startswith(prefix + '='):
        return flag[len(prefix) + 1:]
      if flag == prefix and i + 1 < len(trainer_flags):
        return trainer_flags[i + 1]
  return None


def check_trainer_flags(trainer_flags, data_bucket=None):
  """Fails before any slice is paid for on flags that cannot work on a TPU VM slice."""
  if _flag_value(trainer_flags, 'config') is None:
    raise SystemExit('trainer flags after -- need --config=configs/....py')
  workdir = _flag_value(trainer_flags, 'workdir')
  if workdir is None or not workdir.startswith('gs://'):
    raise SystemExit(f'trainer flag --workdir={workdir}: on a TPU VM slice the workdir must be a '
                     'gs:// path (every host writes checkpoints there; VM disks go with the slice)')
  data_dir = _flag_value(trainer_flags, 'config.data.data_dir') or ''
  if data_dir.startswith('gs://'):  # tfds reads local files only (vit_jax.data.sources)
    bucket, _, rest = data_dir[len('gs://'):].partition('/')
    folder = mount_point(f'gs://{bucket}')
    raise SystemExit(f'trainer flag --config.data.data_dir={data_dir}: tfds datasets are read '
                     f'from local files; pass --data_bucket=gs://{bucket} (mounted at {folder} '
                     f'on every worker) and --config.data.data_dir={f"{folder}/{rest}".rstrip("/")}')
  mounted = data_bucket and data_dir.startswith(mount_point(data_bucket) + '/')
  if data_dir.startswith(GCS_MOUNT_ROOT + '/') and not mounted:
    bucket = data_dir[len(GCS_MOUNT_ROOT) + 1:].split('/')[0]
    raise SystemExit(f'trainer flag --config.data.data_dir={data_dir} is on a mount: pass '
                     f'--data_bucket=gs://{bucket} to mount it on every worker')


def _config_flags(trainer_flags):
  """The trainer flags that choose and override its config (--config=..., --config.KEY=...)."""
  chosen, take_next = [], False
  for flag in trainer_flags:
    if take_next or flag.lstrip('-').split('=')[0].split('.')[0] == 'config':
      chosen.append(flag)
      take_next = not take_next and '=' not in flag
    else:
      take_next = False
  return chosen


# Where fit checks are kept, by what decides their result.
FIT_CHECK_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'vit_jax', 'fit_checks')
# The code a fit check compiles: a change in any of these files is a new version.
_CODE_FOLDERS = ('vit_jax', 'configs')


def _fit_check_key(command: list) -> str:
  """A hash of the aot command (config flags, topology, slices), the config file and every
  source file it may import, and the versions of the libraries that compile."""
  digest = hashlib.sha256(json.dumps(command[2:]).encode())
  config = _flag_value(command, 'config') or ''
  files = [os.path.join(PROJECT_ROOT, config.split(':')[0])] if config else []
  for folder in _CODE_FOLDERS:
    for root, _, names in os.walk(os.path.join(PROJECT_ROOT, folder)):
      files += [os.path.join(root, n) for n in names if n.endswith('.py')]
  for path in sorted(files):
    if os.path.exists(path):
      with open(path, 'rb') as f:
        digest.update(path.encode() + f.read())
  for package in ('jax', 'jaxlib', 'libtpu', 'flax', 'optax'):
    try:
      digest.update(f'{package} {importlib.metadata.version(package)}'.encode())
    except importlib.metadata.PackageNotFoundError:
      pass
  return digest.hexdigest()


# The fit check's exit statuses when Ctrl-C or SIGTERM stopped it (vit_jax.cli.waiting).
_STOPPED_BY = {130: 'Ctrl-C', 143: 'SIGTERM'}


class _Stopped(Exception):
  """SIGTERM reached the launcher during the fit check."""


def _run_relaying_stderr(command: list) -> subprocess.CompletedProcess:
  """Runs the fit check: its stdout (the report) kept, its stderr (what it compiles, how long
  that should take, lines showing it is alive) shown as it comes and kept. Ctrl-C reaches it
  with the launcher (one process group); SIGTERM to the launcher is passed on to it. Either
  ends the launcher (status 130 / 143) once the check has said so and stopped."""
  said, process, relaying = [], None, None

  def relay():
    for line in process.stderr:
      said.append(line)
      sys.stderr.write('  ' + line)
      sys.stderr.flush()

  def stop(signum, frame):
    del signum, frame
    raise _Stopped()
  previous = signal.signal(signal.SIGTERM, stop)  # before the check starts: none is missed
  try:
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    relaying = threading.Thread(target=relay, daemon=True)
    relaying.start()
    stdout = process.stdout.read()
    process.wait()
    relaying.join()
  except (KeyboardInterrupt, _Stopped) as e:
    signal.signal(signal.SIGTERM, previous)
    interrupted = isinstance(e, KeyboardInterrupt)
    if process is not None:
      if not interrupted:
        process.terminate()  # the check says it stopped, in one line, and exits at once
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        process.kill()
      if relaying is not None:
        relaying.join(timeout=5)
    print(f'stopped by {"Ctrl-C" if interrupted else "SIGTERM"} during the fit check: nothing '
          'was created or started', file=sys.stderr, flush=True)
    raise SystemExit(130 if interrupted else 143) from None
  finally:
    signal.signal(signal.SIGTERM, previous)
  return subprocess.CompletedProcess(command, process.returncode, stdout, ''.join(said))


def _compiled_report(command: list) -> tuple[list, dict]:
  """(the printed lines, the JSON report) of `python -m vit_jax.aot`, kept on disk by
  _fit_check_key: a repeated dry run does not compile again."""
  cached = os.path.join(FIT_CHECK_CACHE, _fit_check_key(command) + '.json')
  if os.path.exists(cached):
    with open(cached) as f:
      kept = json.load(f)
    return kept['lines'] + [f'(kept from an earlier identical check: {cached})'], kept['report']
  result = _run_relaying_stderr(command)
  *lines, last = result.stdout.strip().splitlines() or ['']
  if result.returncode in _STOPPED_BY:  # Ctrl-C or SIGTERM reached the check alone: it said so
    print(f'stopped by {_STOPPED_BY[result.returncode]} during the fit check: nothing was '
          'created or started', file=sys.stderr, flush=True)
    raise SystemExit(result.returncode)
  if result.returncode:
    error = result.stderr.strip().splitlines()[-1:] or ['(no output)']
    raise SystemExit(f'fit check failed ({shlex.join(command)}): {error[0]}\n'
                     '(--skip_fit_check launches without it)')
  report = json.loads(last)
  os.makedirs(FIT_CHECK_CACHE, exist_ok=True)
  with open(cached + '.tmp', 'w') as f:
    json.dump({'command': command[2:], 'lines': lines, 'report': report}, f)
  os.replace(cached + '.tmp', cached)
  return lines, report


def fit_check(accelerator_type, trainer_flags, num_slices=1):
  """Compiles the trainer's config for the slice(s) (vit_jax.aot, in its own process: it loads
  libtpu), or reads the result of the same check made before; prints its figures to stderr,
  stops on a config that does not fit."""
  command = [sys.executable, '-m', 'vit_jax.aot', f'--topology={accelerator_type}',
             *([f'--num_slices={num_slices}'] if num_slices > 1 else []),
             *_config_flags(trainer_flags)]
  print(f'checking that the config fits on {accelerator_type}'
        f'{f" x {num_slices} slices" if num_slices > 1 else ""} (XLA compiles its train step '
        'here: seconds for small models, minutes for large ones; --skip_fit_check skips it, and '
        f'the same check again is answered from {FIT_CHECK_CACHE}): {shlex.join(command)}',
        file=sys.stderr, flush=True)
  lines, report = _compiled_report(command)
  print('\n'.join(lines), file=sys.stderr, flush=True)
  if not report['fits']:
    fix = report.get('fix')
    raise SystemExit(
        f'the config does not fit on {accelerator_type}: it needs {report["required_gib"]:.2f} '
        f'GiB per device, {report["device_memory_gib"]:.2f} GiB are available. ' +
        (f'It fits with: {" ".join(f"--config.{k}={v}" for k, v in fix.items())}' if fix else
         'Neither full remat, fsdp over all devices nor accum_steps up to 8 make it fit: use a '
         'larger slice or a smaller model'))
  return report


def slice_flags(args, trainer_flags) -> list:
  """The trainer flags with data parallelism across --num_slices slices (mesh.dcn_data)."""
  if not _multislice(args):
    return trainer_flags
  given = _flag_value(trainer_flags, 'config.mesh.dcn_data')
  if given is None:
    return [*trainer_flags, f'--config.mesh.dcn_data={args.num_slices}']
  if given not in ('-1', str(args.num_slices)):
    raise SystemExit(f'--config.mesh.dcn_data={given} but --num_slices={args.num_slices}: data '
                     f'parallelism across slices must span them all (-1 or {args.num_slices})')
  return trainer_flags


def plan(args, trainer_flags):
  """The commands `args.command` runs, in order."""
  tarball = os.path.join(tempfile.gettempdir(), f'vit_jax-{args.name}.tar.gz')
  steps = {
      'create': lambda: create_commands(args),
      'setup': lambda: setup_commands(args, tarball),
      'run': lambda: run_commands(args, trainer_flags),
      'status': lambda: status_commands(args),
      'logs': lambda: logs_commands(args),
      'stop': lambda: stop_commands(args),
      'delete': lambda: delete_commands(args),
  }
  names = ('create', 'setup', 'run') if args.command == 'launch' else (args.command,)
  return [command for name in names for command in steps[name]()]


def uncommitted_files(root):
  """Paths `git status` reports in root: edits that `git archive HEAD` would not ship."""
  status = subprocess.run(['git', '-C', root, 'status', '--porcelain'], capture_output=True,
                          text=True)
  if status.returncode:
    raise SystemExit(f'setup ships the git HEAD of {root}, but git says: {status.stderr.strip()}')
  return [line[3:] for line in status.stdout.splitlines()]


def _wait_until_active(argv):
  """Polls a queued resource until it holds its slice; capacity can take minutes to hours."""
  while True:
    state = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
    print(f'queued resource state: {state}', file=sys.stderr)
    if state == 'ACTIVE':
      return
    if state in QUEUED_FAILED_STATES:
      raise SystemExit(f'{shlex.join(argv)} says {state}: delete the queued resource and try '
                       'again (or another zone)')
    time.sleep(QUEUED_POLL_S)


def execute(commands):
  for command in commands:
    print('+ ' + shlex.join(command.argv), file=sys.stderr, flush=True)
    try:
      if command.wait_until_active:
        _wait_until_active(command.argv)
      else:
        subprocess.run(command.argv, check=True)
      if command.note:
        print(command.note, file=sys.stderr, flush=True)
    except subprocess.CalledProcessError as error:
      raise SystemExit(f'command failed with exit status {error.returncode}: '
                       f'{shlex.join(command.argv)}') from None


def parse_args(argv):
  """Splits argv at the first `--`: launcher flags before, trainer flags after."""
  split = argv.index('--') if '--' in argv else len(argv)
  launcher_argv, trainer_flags = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(prog='python -m launch.tpu_vm', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('command', nargs='?', default='launch', choices=COMMANDS)
  parser.add_argument('--name', required=True, help='TPU VM (and queued resource) name')
  parser.add_argument('--zone', required=True, help='e.g. us-central2-b')
  parser.add_argument('--accelerator_type', help='e.g. v4-32, v5litepod-16, v5p-64, v6e-16')
  parser.add_argument('--project', help='GCP project (default: gcloud config)')
  parser.add_argument('--spot', action='store_true', help='Spot (preemptible) capacity')
  parser.add_argument('--queued', action='store_true',
                      help='request a queued resource; waits until it is ACTIVE')
  parser.add_argument('--num_slices', type=int, default=1,
                      help='S slices of --accelerator_type, data parallel across them (a queued '
                      'resource of S nodes; implies --queued)')
  parser.add_argument('--version', help='TPU software version (default: by accelerator type)')
  parser.add_argument('--lines', type=int, default=100, help='logs: lines to show')
  parser.add_argument('--follow', action='store_true', help='logs: keep following')
  parser.add_argument('--data_bucket',
                      help='gs://BUCKET to mount read-only at /gcs/BUCKET on every worker '
                      '(gcsfuse, installed if missing) before the trainer starts: tfds data '
                      'there is read as local files, --config.data.data_dir=/gcs/BUCKET/...')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  parser.add_argument('--skip_fit_check', action='store_true',
                      help='do not compile the config for the slice before starting')
  args = parser.parse_args(launcher_argv)
  if args.num_slices < 1:
    parser.error(f'--num_slices={args.num_slices}: give 1 or more slices')
  args.queued = args.queued or _multislice(args)  # several slices are one queued resource
  if args.command in ('launch', 'create') and not args.accelerator_type:
    parser.error(f'{args.command} needs --accelerator_type (e.g. v4-32)')
  if args.data_bucket and not re.fullmatch(r'gs://[a-z0-9][a-z0-9._-]*', args.data_bucket):
    parser.error(f'--data_bucket={args.data_bucket}: give a bucket as gs://BUCKET (no folder)')
  if args.command in ('launch', 'run'):
    check_trainer_flags(trainer_flags, args.data_bucket)
  elif trainer_flags and args.command != 'create':  # create: for the fit check only
    parser.error(f'trainer flags after -- go with launch, create or run, not {args.command}: '
                 f'{shlex.join(trainer_flags)}')
  return args, slice_flags(args, trainer_flags)


def main(argv=None):
  args, trainer_flags = parse_args(sys.argv[1:] if argv is None else argv)
  commands = plan(args, trainer_flags)
  ships = args.command in ('launch', 'setup')
  checks_fit = (args.command in ('launch', 'create', 'run') and trainer_flags
                and args.accelerator_type and not args.skip_fit_check)
  if args.dry_run:
    # The plan is only worth reading if the real run will go through: say now what it refuses.
    try:
      dirty = uncommitted_files(PROJECT_ROOT) if ships else []
    except SystemExit as e:  # not a git checkout: the real run stops there too
      print(f'warning: {e}', file=sys.stderr)
      dirty = []
    if dirty:
      print(f'warning: uncommitted changes in {PROJECT_ROOT}: the real run will refuse to ship '
            f'them (setup ships git HEAD); commit or stash {", ".join(dirty)}', file=sys.stderr)
    if checks_fit:
      fit_check(args.accelerator_type, trainer_flags, args.num_slices)
    for command in commands:
      print(shlex.join(command.argv))
      if command.wait_until_active:
        print(f'# repeated every {QUEUED_POLL_S} s until it prints ACTIVE')
      if command.note:
        print(command.note)
    return
  if shutil.which('gcloud') is None:
    raise SystemExit('gcloud not found on PATH: install the Google Cloud CLI '
                     '(https://cloud.google.com/sdk/docs/install), run `gcloud auth login`, '
                     'or pass --dry_run to print the commands instead')
  if ships and (dirty := uncommitted_files(PROJECT_ROOT)):
    raise SystemExit(f'uncommitted changes in {PROJECT_ROOT} would not reach the workers '
                     f'(setup ships git HEAD): commit or stash {", ".join(dirty)}')
  if checks_fit:  # after the quick refusals above: it compiles for a minute or more
    fit_check(args.accelerator_type, trainer_flags, args.num_slices)
  execute(commands)


if __name__ == '__main__':
  main()
