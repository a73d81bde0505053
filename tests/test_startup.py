"""What every program does first: on a machine without TPUs or GPUs, JAX starts on the CPU
without libtpu's probe (installed by the [tpu] extra, as CI installs it) printing its failures."""
import os
import subprocess
import sys

from vit_jax.cli import startup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What libtpu writes when JAX probes for TPUs on a machine without them.
LIBTPU_PROBE = ('Failed to find host bounds', 'TPU_WORKER_HOSTNAMES', 'libtpu', 'jellyfish',
                "Unable to initialize backend 'tpu'")


def test_a_program_starts_quietly_where_there_is_no_accelerator():
  assert not startup.has_accelerators()  # this machine, and CI's: CPUs only
  child = ('from vit_jax.cli import startup\n'
           'startup.begin(xla_flags=False)\n'
           'import jax\n'
           'print(os.environ["JAX_PLATFORMS"], jax.devices()[0].platform)\n')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}  # as a user's shell has it
  env['VIT_JAX_HOST_TUNING'] = '0'  # no re-execution: this is about the platform alone
  result = subprocess.run([sys.executable, '-c', 'import os\n' + child], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['cpu', 'cpu']
  assert not any(line in result.stderr for line in LIBTPU_PROBE), result.stderr


def test_a_platform_the_user_chose_is_kept(monkeypatch):
  environ = {'JAX_PLATFORMS': 'cuda'}
  startup.cpu_only_without_accelerators(environ)
  assert environ == {'JAX_PLATFORMS': 'cuda'}
  environ = {'JAX_FORCE_TPU_INIT': '1'}
  startup.cpu_only_without_accelerators(environ)
  assert 'JAX_PLATFORMS' not in environ
