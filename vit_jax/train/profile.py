"""A JAX profiler trace of chosen steps (`config.profile_steps='START:END'`), written where
TensorBoard's profile plugin and XProf look: WORKDIR/plugins/profile/steps_START-END/
HOST.xplane.pb (and HOST.trace.json.gz, the same timeline for Perfetto).

The profiler writes through TensorFlow's file systems, which do not take vit_jax's road to
gs:// (nor a GCS emulator): the trace goes to a local temporary folder and is copied to the
workdir through `vit_jax.storage`, local or gs:// alike.
"""
import shutil
import tempfile

import jax

from vit_jax.cli import errors
from vit_jax.storage import paths


def parse_steps(spec: str) -> tuple[int, int] | None:
  """'START:END' (both included) or 'STEP' -> (START, END); '' -> None."""
  if not spec:
    return None
  try:
    first, _, last = spec.partition(':')
    first, last = int(first), int(last or first)
  except ValueError:
    first = last = 0
  if not 1 <= first <= last:
    raise errors.UserError(f'profile_steps={spec!r}: give START:END, the first and last step '
                           'to trace (1 <= START <= END), e.g. profile_steps=10:12')
  return first, last


def _size(n: int) -> str:
  return f'{n / 1e6:.1f} MB' if n >= 1e5 else f'{n / 1e3:.1f} kB'


class StepProfile:
  """`before(step)` starts the trace at its first step; `after(step, state)` ends it once
  `step` is the last (after waiting for `state`, that step's result) and writes it out."""

  def __init__(self, steps: tuple[int, int], workdir: str, start_step: int):
    self.first, self.last = max(steps[0], start_step + 1), steps[1]
    self.folder = paths.resolve(workdir) / 'plugins' / 'profile' / f'steps_{steps[0]}-{steps[1]}'
    self.tracing = False
    self._local = None
    self.written = []  # paths written to the workdir

  def before(self, step: int) -> None:
    if step == self.first and step <= self.last:
      self._local = tempfile.mkdtemp(prefix='vit_jax_profile_')
      jax.profiler.start_trace(self._local)
      self.tracing = True

  def after(self, step: int, state) -> bool:
    """True when the trace ended here (and was written to the workdir)."""
    if not self.tracing or step < self.last:
      return False
    jax.block_until_ready(state)
    self.stop()
    return True

  def stop(self) -> None:
    """Ends the trace and copies it to the workdir (also when the run stops inside it)."""
    if not self.tracing:
      return
    jax.profiler.stop_trace()
    self.tracing = False
    try:
      self.folder.mkdir(parents=True, exist_ok=True)
      for file in sorted(paths.resolve(self._local).glob('plugins/profile/*/*')):
        data = file.read_bytes()
        (self.folder / file.name).write_bytes(data)
        self.written.append((self.folder / file.name, len(data)))
    finally:
      shutil.rmtree(self._local, ignore_errors=True)
    files = ', '.join(f'{p.name} {_size(n)}' for p, n in self.written)
    print(f'profile of steps {self.first}-{self.last} written to {self.folder} ({files}); '
          'open it with XProf or TensorBoard (README: "Where did my pod\'s time go?")',
          flush=True)
