"""Seconds from SIGTERM to a committed checkpoint on gs://, and to the exit, while the log
uploads are stalled: the preemption of a spot slice whose metrics.jsonl / TensorBoard uploads
hang (Cloud TPU gives ~30 s between the notice and the kill).

    python -m benchmarks.preemption_on_gcs [--stall_s=60] [--repo=PATH]

Serves a GCS emulator behind tests/gcs_proxy.py, starts the quickstart on a gs:// workdir there
(`python -m vit_jax.main`, from --repo: another checkout, to compare), waits for its first
checkpoint, then stalls every request for a log object (metrics.jsonl, TensorBoard events and
their segments; nothing else) for --stall_s seconds, sends SIGTERM once a log request is held,
and reports when the next complete checkpoint appeared in the bucket and when the process
ended. The last line is one JSON object.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

from etils import epath

from tests import gcs_emulator, gcs_proxy
from vit_jax.storage import log_file, paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the log objects' requests carry in their target or upload metadata.
LOG_OBJECTS = ('metrics.jsonl', 'tfevents', log_file.SEGMENT_PREFIX)


def _complete_steps(workdir: str) -> list:
  directory = epath.Path(workdir) / 'checkpoints'
  try:
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.name.isdigit() and (p / '_CHECKPOINT_METADATA').exists())
  except (FileNotFoundError, OSError):
    return []


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--stall_s', type=float, default=60.)
  parser.add_argument('--repo', default=REPO, help='checkout whose vit_jax.main runs')
  parser.add_argument('--checkpoint_every', type=int, default=20)
  args = parser.parse_args()

  server, emulator_url = gcs_emulator.start('bench-bucket')
  proxy = gcs_proxy.Proxy(emulator_url).start()
  os.environ[paths.EMULATOR_VARIABLE] = proxy.url
  paths.use_storage_emulator()
  workdir = f'gs://bench-bucket/run-{int(time.time())}'
  env = {k: v for k, v in os.environ.items() if not k.startswith(('TENSORSTORE_', 'GOOGLE_AUTH',
                                                                    'JAX_COMPILATION_CACHE'))}
  env |= {'PYTHONPATH': args.repo, paths.EMULATOR_VARIABLE: proxy.url}
  command = [sys.executable, '-m', 'vit_jax.main', '--config=configs/quickstart.py',
             f'--workdir={workdir}', '--config.total_steps=100000', '--config.log_every=5',
             f'--config.checkpoint_every={args.checkpoint_every}', '--config.eval_every=0']
  started = time.time()
  process = subprocess.Popen(command, cwd=args.repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  lines = []

  def read():
    for line in process.stdout:
      lines.append((time.time(), line.rstrip()))
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    while not _complete_steps(workdir):
      if process.poll() is not None:
        raise SystemExit('the run ended before its first checkpoint:\n' +
                         '\n'.join(line for _, line in lines))
      time.sleep(0.5)
    before = _complete_steps(workdir)[-1]
    faults = [proxy.add_fault(name, stall_s=args.stall_s) for name in LOG_OBJECTS]
    while not any(f.hits for f in faults):  # a log upload is held now
      time.sleep(0.05)
    sigterm = time.time()
    process.send_signal(signal.SIGTERM)
    committed = None
    while process.poll() is None or committed is None:
      steps = _complete_steps(workdir)
      if committed is None and steps and steps[-1] > before:
        committed = time.time()
      if process.poll() is not None and committed is None:
        break
      time.sleep(0.2)
    process.wait()
    exited = time.time()
    reader.join(5)
  finally:
    if process.poll() is None:
      process.kill()
    proxy.stop()
    server.stop()
  for t, line in lines[-8:]:
    print(f'[{t - sigterm:+7.1f} s] {line}')
  result = {'sigterm_to_committed_s': round(committed - sigterm, 1) if committed else None,
            'sigterm_to_exit_s': round(exited - sigterm, 1), 'exit_status': process.returncode,
            'stall_s': args.stall_s, 'start_to_sigterm_s': round(sigterm - started, 1),
            'load': os.getloadavg()[0], 'repo': args.repo}
  print(json.dumps(result))


if __name__ == '__main__':
  main()
