"""metrics.jsonl + TensorBoard events (process 0 only) and the console progress line."""
import json
import time

import jax

from vit_jax.cli.waiting import duration
from vit_jax.storage import log_file, paths
from vit_jax.train import tb_events


def _step(line: str) -> int | None:
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):  # a line cut short by a kill, or not ours
    return None


def drop_lines_after(path, step: int) -> None:
  """Keeps the lines of a metrics.jsonl up to `step` (a resumed run logs the rest again)."""
  path = paths.resolve(path)
  if not path.exists():
    return
  text = path.read_text()
  kept = ''.join(line for line in text.splitlines(keepends=True)
                 if line.endswith('\n') and (s := _step(line)) is not None and s <= step)
  if kept != text:
    log_file.replace(path, kept.encode('utf-8'))


# The metrics a training line averages over its steps.
AVERAGED = ('train_loss', 'grad_norm')


def window_sums(step_metrics: list, skipped_images: int, carried: dict | None = None) -> dict:
  """{'steps', 'skipped_images', and a float64 sum per AVERAGED metric} over the steps of a
  training line, added in step order after `carried` (the part of the line's steps that a
  checkpoint taken mid-line holds): the same sums, bit for bit, whether or not the run stopped
  in between."""
  sums = dict(carried or {'steps': 0, 'skipped_images': 0, **{name: 0. for name in AVERAGED}})
  sums['skipped_images'] += skipped_images
  for metrics in step_metrics:
    sums['steps'] += 1
    for name in AVERAGED:
      sums[name] += float(metrics[name])
  return sums


# Beside metrics.jsonl: the sums of the line in progress at each recent checkpoint.
WINDOWS = 'metrics_windows.json'
_WINDOWS_KEPT = 16


class MetricsLog:
  """Writes one JSON object per line to WORKDIR/metrics.jsonl, and the same scalars to TB,
  in the background (`vit_jax.storage.log_file`: the step loop never waits on storage).

  A run starting at `start_step` (a resume from that checkpoint) first drops what an earlier
  run logged after it, and its first line continues the one the checkpoint was taken in
  (`carried`), so that both logs read as if the run had never stopped: the same lines, each
  step once.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.is_writer = jax.process_index() == 0
    self.path = paths.resolve(workdir) / 'metrics.jsonl'
    self._windows_path = paths.resolve(workdir) / WINDOWS
    self._windows = (json.loads(self._windows_path.read_text())
                     if start_step and self._windows_path.exists() else {})
    self.carried = self._windows.get(str(start_step))  # read by every process alike
    if self.is_writer:
      drop_lines_after(self.path, start_step)
      self._file = log_file.LogFile(self.path)
      self._tb = tb_events.EventWriter(paths.resolve(workdir) / 'tensorboard', start_step)

  def keep_window(self, step: int, sums: dict) -> None:
    """Records the sums of the line in progress at `step`, which is being checkpointed."""
    if not self.is_writer or not sums['steps']:
      return
    self._windows[str(step)] = sums
    for old in sorted(self._windows, key=int)[:-_WINDOWS_KEPT]:
      del self._windows[old]
    self._windows_path.write_text(json.dumps(self._windows))

  def write(self, step: int, metrics: dict) -> None:
    if not self.is_writer:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._file.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._file.flush()
    self._tb.write_scalars(int(step), scalars)

  def flush(self) -> None:
    """Waits until all lines written so far are stored. Call it before a checkpoint is saved:
    a run resumed from that checkpoint then finds every line up to its step."""
    if self.is_writer:
      self._file.sync()
      self._tb.sync()

  def close(self) -> None:
    if self.is_writer:
      self._file.close()
      self._tb.close()


class Progress:
  """Console line: step/total, loss, images/sec and ETA from the recent rate."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self.start_time = self.clock_time = time.time()
    self.clock_step = start_step

  def restart_clock(self, step: int) -> None:
    """The ETA's rate counts from here: called once the first step (compilation) is done."""
    self.clock_time, self.clock_step = time.time(), step

  def line(self, step: int, metrics: dict) -> str:
    now = time.time()
    elapsed = now - self.start_time
    steps_done = max(step - self.clock_step, 1)
    eta = (now - self.clock_time) / steps_done * (self.total_steps - step)
    parts = [f'step {step}/{self.total_steps}']
    parts += [f'{k} {v:.4g}' for k, v in metrics.items()]
    parts.append(f'elapsed {duration(elapsed)}, ETA {duration(eta)}')
    return ' | '.join(parts)

  def log(self, step: int, metrics: dict) -> None:
    if jax.process_index() == 0:
      print(self.line(step, metrics), flush=True)


class Throughput:
  """How fast training went over the steps since the last line: images/sec; `input_wait_s`, the
  seconds the step loop waited for its next batch (near 0: the input keeps up; near the
  interval's length: the devices wait for input); and `mfu`, model FLOPs per second (3 x the
  forward pass's matmuls, as `vit_jax.benchmark` counts them) over the devices' peak bf16 rate,
  where that peak is known.
  Time spent elsewhere (evaluations, checkpoints) is left out; the steps run before an
  evaluation still count, with the time they took."""

  def __init__(self, batch_size: int, step: int, clock=time.time,
               flops_per_step: float | None = None, peak_flops: float | None = None):
    self.batch_size, self.clock = batch_size, clock
    self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
    self.restart(step)

  def restart(self, step: int) -> None:
    self.start, self.step, self.excluded, self.input_wait = self.clock(), step, 0., 0.

  def exclude(self, seconds: float) -> None:
    self.excluded += seconds

  def waited_for_input(self, seconds: float) -> None:
    self.input_wait += seconds

  def rate(self, step: int) -> float | None:
    """images/sec since the last restart (or rate), then restarts at `step`; None when no step
    was timed (a line right after the compiling first step)."""
    return self.figures(step)['images_per_sec']

  def figures(self, step: int) -> dict:
    """{'images_per_sec', 'input_wait_s', 'mfu'} since the last restart, then restarts at
    `step`; a figure that cannot be told is None (no step timed, or no known peak)."""
    seconds = max(self.clock() - self.start - self.excluded, 1e-9)
    steps = step - self.step
    figures = {'images_per_sec': steps * self.batch_size / seconds if steps else None,
               'input_wait_s': self.input_wait if steps else None,
               'mfu': (self.flops_per_step * steps / seconds / self.peak_flops
                       if steps and self.flops_per_step and self.peak_flops else None)}
    self.restart(step)
    return figures
