"""What the command-line programs do first: quiet logging, TensorFlow and JAX without chatter.

`begin()` comes first in every program's `__main__`: on a machine without accelerators JAX is
told to use the CPU alone, so that libtpu (which the [tpu] extra installs for compiling) does not
probe for TPUs and print its failures; then the CPU host defaults (`vit_jax.cli.host_tuning`).

TensorFlow's C++ runtime writes lines such as "oneDNN custom operations are on ..." to the
process's stderr when it is imported (twice: two of its libraries each log it), before and
regardless of TF_CPP_MIN_LOG_LEVEL. `import_tensorflow` imports it with stderr captured and
passes on every line that is not one of those; `start_jax` does the same for libtpu's probe on
machines without TPUs. Both use `native_stderr_captured`, which make_records also uses to keep
decoders' messages from cutting through its progress bar.
"""
import contextlib
import glob
import os
import sys
import tempfile

from absl import flags, logging

from vit_jax.cli import host_tuning

# Lines TensorFlow's import writes that tell a user nothing they can act on.
_START_UP_NOISE = (
    'oneDNN custom operations are on',
    'All log messages before absl::InitializeLog() is called are written to STDERR',
    'cpu_feature_guard.cc',
    'This TensorFlow binary is optimized to use available CPU instructions',
    'To enable the following instructions:',
)


def begin(xla_flags: bool = True) -> None:
  """First thing in a program's `__main__`, before JAX starts a backend (see the docstring)."""
  cpu_only_without_accelerators()
  host_tuning.apply(xla_flags=xla_flags)


# A TPU chip on the PCI bus: Google's vendor id with one of the TPU device ids (JAX's own list,
# jax/_src/hardware_utils.py: v2/v3, v4 lite, v4, v5p, v5e, v6e, TPU7x). The vendor id alone
# is not enough: every GCE VM's gVNIC network card and NVMe disks carry it too.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = ('0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076')
# Device files of TPU drivers (v2-v4: /dev/accel*; v5e and later: VFIO groups, where /sys
# hides the PCI bus, as in some containers), NVIDIA's and AMD's.
_ACCELERATOR_DEVICE_FILES = ('dev/accel*', 'dev/vfio/[0-9]*', 'dev/nvidia*', 'dev/kfd')


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return ''


def has_accelerators(root: str = '/') -> bool:
  """Whether a TPU chip (by its PCI vendor and device ids, as JAX looks for them) or a GPU is
  attached. Read from /sys and /dev (under `root`), without importing JAX (programs print
  --help fast)."""
  for device in glob.glob(os.path.join(root, 'sys/bus/pci/devices/*')):
    if (_read(os.path.join(device, 'vendor')) == _GOOGLE_PCI_VENDOR
        and _read(os.path.join(device, 'device')) in _TPU_PCI_DEVICES):
      return True
  return any(glob.glob(os.path.join(root, pattern)) for pattern in _ACCELERATOR_DEVICE_FILES)


def cpu_only_without_accelerators(environ=os.environ) -> None:
  """JAX_PLATFORMS=cpu where no TPU chip and no GPU is attached and the user chose no
  platforms. Elsewhere nothing changes: a TPU VM's chips, or a GPU, are found as before. Set in
  the environment, it holds for child processes too."""
  if environ.get('JAX_PLATFORMS') or 'JAX_FORCE_TPU_INIT' in environ or has_accelerators():
    return
  environ['JAX_PLATFORMS'] = 'cpu'
  if 'jax' in sys.modules:  # jax reads its environment when it is imported
    sys.modules['jax'].config.update('jax_platforms', 'cpu')


def inference_program(argv: list[str], takes_arguments: bool = False) -> None:
  """What predict, inspect and export do first in `main`: refuse stray arguments, then quiet
  logging, TensorFlow and JAX started without their chatter."""
  if len(argv) > 1 and not takes_arguments:
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_logging()
  import_tensorflow()
  start_jax()


def quiet_logging() -> None:
  """WARNING and above unless --verbosity/-v was given: JAX, Orbax and TF log a lot at INFO
  (e.g. JAX's "Unable to initialize backend 'tpu'" on every machine without one)."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


class NativeStderr:
  """What C++ libraries wrote to file descriptor 2 inside `native_stderr_captured()`."""

  def __init__(self, terminal):
    self.terminal = terminal  # a text stream on the real stderr, for progress bars meanwhile
    self.text = ''

  def replay(self, noise=()) -> None:
    """Writes the captured lines to stderr, leaving out those containing any of `noise`."""
    for line in self.text.splitlines(keepends=True):
      if not any(n in line for n in noise):
        sys.stderr.write(line)
    sys.stderr.flush()


@contextlib.contextmanager
def native_stderr_captured():
  """Sends file descriptor 2 (where TensorFlow's C++ code and libjpeg write, bypassing
  sys.stderr) to a temporary file; the yielded NativeStderr holds it afterwards."""
  sys.stderr.flush()
  saved = os.dup(2)
  captured = NativeStderr(os.fdopen(os.dup(saved), 'w'))
  with tempfile.TemporaryFile() as f:
    os.dup2(f.fileno(), 2)
    try:
      yield captured
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.terminal.close()
      f.seek(0)
      captured.text = f.read().decode(errors='replace')


def import_tensorflow():
  """`import tensorflow`, with its start-up lines left out of stderr; the module."""
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  # TF's C++ INFO lines (e.g. tf.data's "The default buffer size is ...") are not for users.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  captured = None
  try:
    with native_stderr_captured() as captured:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
  finally:
    if captured is not None:
      captured.replay(noise=_START_UP_NOISE)
  return tf


# What libtpu writes when it is installed (jax[tpu]) on a machine without TPUs, as JAX probes it.
_NO_TPU_PROBE = (
    'Failed to find host bounds for accelerator type',
    'WARNING: Logging before InitGoogle() is written to STDERR',
    'TPU_WORKER_HOSTNAMES',
    '=== Source Location Trace: ===',
    'libtpu_init_utils.cc',
)


def start_jax():
  """Starts JAX's backends now (jax.devices()); where libtpu is installed but there is no TPU,
  its failed probe's lines are left out of stderr. On a TPU everything it says is shown."""
  import jax  # pylint: disable=g-import-not-at-top
  captured, devices = None, []
  try:
    with native_stderr_captured() as captured:
      devices = jax.devices()
  finally:
    if captured is not None:
      on_tpu = any(d.platform == 'tpu' for d in devices)
      captured.replay(noise=() if on_tpu else _NO_TPU_PROBE)
  return jax
