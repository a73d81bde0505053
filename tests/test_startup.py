"""What every program (and `import vit_jax`) does first: on a machine without TPUs or GPUs, JAX
starts on the CPU without libtpu's probe (installed by the [tpu] extra, as CI installs it)
printing its failures."""
import os
import subprocess
import sys

from vit_jax.cli import startup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What libtpu writes when JAX probes for TPUs on a machine without them.
LIBTPU_PROBE = ('Failed to find host bounds', 'TPU_WORKER_HOSTNAMES', 'libtpu', 'jellyfish',
                "Unable to initialize backend 'tpu'")


def test_plain_python_and_programs_start_quietly_where_there_is_no_accelerator():
  assert not startup.has_accelerators()  # this machine, and CI's: CPUs only
  # README's Python API as a user runs it: jax first, then vit_jax, then a first computation.
  child = ('import jax, jax.numpy as jnp\n'
           'from vit_jax import models\n'
           'jnp.zeros(2).block_until_ready()\n'
           'print(os.environ["JAX_PLATFORMS"], jax.devices()[0].platform)\n')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}  # as a user's shell has it
  result = subprocess.run([sys.executable, '-c', 'import os\n' + child], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['cpu', 'cpu']
  assert not any(line in result.stderr for line in LIBTPU_PROBE), result.stderr


def _pci_device(root, slot: str, vendor: str, device: str) -> None:
  folder = root / 'sys' / 'bus' / 'pci' / 'devices' / slot
  folder.mkdir(parents=True)
  (folder / 'vendor').write_text(vendor + '\n')
  (folder / 'device').write_text(device + '\n')


def test_a_tpu_is_found_by_its_device_not_by_google_s_vendor_id(tmp_path):
  # A CPU-only GCE VM: gVNIC and NVMe carry Google's vendor id; an Intel host bridge beside.
  _pci_device(tmp_path, '0000:00:00.0', '0x8086', '0x1237')
  _pci_device(tmp_path, '0000:00:04.0', '0x1ae0', '0x0042')  # gVNIC
  _pci_device(tmp_path, '0000:00:05.0', '0x1ae0', '0x001f')  # NVMe
  (tmp_path / 'dev' / 'vfio').mkdir(parents=True)
  (tmp_path / 'dev' / 'vfio' / 'vfio').write_text('')  # the VFIO container: no device behind it
  assert not startup.has_accelerators(str(tmp_path))
  _pci_device(tmp_path, '0000:00:06.0', '0x1ae0', '0x0063')  # a TPU v5e chip
  assert startup.has_accelerators(str(tmp_path))
  for device_file in ('accel0', 'vfio/0', 'nvidia0'):  # without /sys: the drivers' files
    root = tmp_path / device_file.replace('/', '_')
    (root / 'dev' / device_file).parent.mkdir(parents=True)
    (root / 'dev' / device_file).write_text('')
    assert startup.has_accelerators(str(root)), device_file


def test_a_platform_the_user_chose_is_kept(monkeypatch):
  environ = {'JAX_PLATFORMS': 'cuda'}
  startup.cpu_only_without_accelerators(environ)
  assert environ == {'JAX_PLATFORMS': 'cuda'}
  environ = {'JAX_FORCE_TPU_INIT': '1'}
  startup.cpu_only_without_accelerators(environ)
  assert 'JAX_PLATFORMS' not in environ
