"""Long waits (compiles for a slice): what runs and for how long it should is said first, lines
show it alive, Ctrl-C / SIGTERM end it with one line. No clocks: the lines are driven by the
work itself."""
import os
import subprocess
import sys
import threading

import pytest

from vit_jax.cli import waiting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Lines:
  """A stream that lets `release` go once `count` lines were written to it."""

  def __init__(self, count: int):
    self.lines, self.count, self.release = [], count, threading.Event()

  def write(self, text: str) -> None:
    self.lines += text.splitlines()
    if len(self.lines) >= self.count:
      self.release.set()

  def flush(self) -> None:
    pass


def test_a_long_wait_says_what_and_how_long_then_shows_it_is_alive():
  out = _Lines(3)  # the first line and two beats: then the work may end
  result = waiting.run_alive(lambda: out.release.wait(60) and 'compiled', 'compiling X', 505.,
                             'an earlier compile took that', every_s=0.01, out=out,
                             clock=lambda: 75.)  # a frozen clock: every beat says 0m00s
  assert result == 'compiled'
  assert out.lines[0] == 'compiling X, about 8m25s expected (an earlier compile took that)'
  assert out.lines[1:3] == ['  ... 0m00s so far, about 8m25s expected'] * 2
  with pytest.raises(ZeroDivisionError):  # the work's own error, in the caller
    waiting.run_alive(lambda: 1 / 0, 'dividing', out=_Lines(1))


@pytest.mark.parametrize('signal_name, status, said', [('SIGTERM', 143, 'SIGTERM'),
                                                       ('SIGINT', 130, 'Ctrl-C')])
def test_sigterm_and_ctrl_c_end_the_wait_with_one_line(signal_name, status, said):
  # The work signals its own process (as a shell or a scheduler would), then would run on.
  child = ('import os, signal, time\n'
           'from vit_jax.cli import waiting\n'
           f'waiting.run_alive(lambda: (os.kill(os.getpid(), signal.{signal_name}), '
           'time.sleep(60)), "compiling X")\n')
  done = subprocess.run([sys.executable, '-c', child], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == status
  assert done.stderr.split('\n') == ['compiling X', '', f'stopped by {said} while compiling X',
                                     '']
