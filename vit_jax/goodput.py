"""Where did the run's time go? Its goodput by cause, across every restart.

    python -m vit_jax.goodput WORKDIR

Reads WORKDIR/goodput.jsonl (local or gs://; written by process 0 of every run as it goes,
see vit_jax/train/goodput.py) and prints a table of the runs, then a table of causes, and ends
with one JSON line: {"wall_s", "productive_s", "badput_s": {cause: seconds}, "restarts",
"steps_redone", "goodput"}. Productive plus every badput is the wall time: the sum of the
runs' lifetimes, each from its process's start to its last record.
"""
import json
import sys
import time

from absl import app

from vit_jax.cli import errors
from vit_jax.train import goodput

# What each cause holds, for the table.
MEANING = {
    'startup': 'imports, data preparation, restoring',
    'compile': 'a run\'s first step',
    'input': 'waiting for a batch',
    'eval': 'evaluations',
    'checkpoint': 'blocking checkpoint saves',
    'profile': 'writing profiler traces',
    'shutdown': 'last step to exit',
    'lost': 'steps redone after a restart',
}
ENDS = {'end': 'ended', 'error': 'failed', 'hang': 'hung, then killed or exited'}


def _when(seconds: float) -> str:
  return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(seconds))


def table(report: dict) -> str:
  """The runs, one per row, then the causes with their share of the wall time."""
  rows = [f'{"run":>3}  {"started":19}  {"steps":>13}  {"wall":>9}  {"lost":>8}  end']
  for i, run in enumerate(report['runs'], 1):
    first, last = run['steps']
    end = ENDS.get(run['end'], f'killed (last record {_when(run["ended"])})')
    redone = f'; {run["steps_redone"]} steps redone' if run['steps_redone'] else ''
    rows.append(f'{i:>3}  {_when(run["started"])}  {f"{first} -> {last}":>13}  '
                f'{goodput.duration(run["wall_s"]):>9}  {goodput.duration(run["lost_s"]):>8}  '
                f'{end}{redone}')
  wall = report['wall_s'] or 1.
  rows += ['', f'{"cause":12} {"seconds":>10} {"share":>7}',
           f'{"training":12} {report["productive_s"]:10.1f} {report["productive_s"] / wall:7.1%}'
           '  productive']
  for cause, seconds in report['badput_s'].items():
    rows.append(f'{cause:12} {seconds:10.1f} {seconds / wall:7.1%}  {MEANING[cause]}')
  rows.append(f'{"wall":12} {report["wall_s"]:10.1f} {1:7.1%}  sum of the runs\' lifetimes')
  return '\n'.join(rows)


def _rounded(value):
  if isinstance(value, dict):
    return {k: _rounded(v) for k, v in value.items()}
  return round(value, 3) if isinstance(value, float) else value


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('give one WORKDIR: python -m vit_jax.goodput WORKDIR')
  with errors.reported_as_one_line():
    try:
      runs = goodput.read_runs(argv[1])
    except FileNotFoundError as e:
      raise errors.UserError(str(e)) from None
    if not runs:
      raise errors.UserError(f'{argv[1]}/{goodput.RECORDS} holds no records yet')
    report = goodput.account(runs)
  print(table(report))
  print(json.dumps(_rounded({k: v for k, v in report.items() if k != 'runs'})))


if __name__ == '__main__':
  app.run(main)
