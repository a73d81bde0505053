"""Logs on gs:// exactly once, with GCS's faults put in front of the emulator (tests/gcs_proxy.py):
a compose whose answer is lost, a 503 on compose, uploads that hang; segments cleaned up."""
import json
import math
import os

from etils import epath
import pytest

from vit_jax.storage import log_file
from vit_jax.train import metrics_log


def _segments(folder) -> list:
  return [p.name for p in epath.Path(folder).iterdir() if p.name.startswith(log_file.SEGMENT_PREFIX)]


def test_a_compose_sent_again_after_a_lost_answer_or_a_503_appends_once(gcs_bucket, gcs_proxy):
  folder = f'{gcs_bucket}/exactly_once'
  # The first upload (which makes the log) is stored, but its answer never comes back.
  created = gcs_proxy.add_fault('name=exactly_once/metrics.jsonl', lose_response=True, times=1)
  log = log_file.LogFile(f'{folder}/metrics.jsonl')
  log.write('1\n')
  assert log.sync(60) and created.hits == 1
  lost = gcs_proxy.add_fault('exactly_once/metrics.jsonl/compose', lose_response=True, times=1)
  log.write('2\n')
  assert log.sync(60) and lost.hits == 1  # the client sent it again, and was refused (412)
  refused = gcs_proxy.add_fault('exactly_once/metrics.jsonl/compose', status=503, times=1)
  log.write('3\n')
  assert log.sync(60) and refused.hits == 1  # the client's own retry
  log.write('4\n')
  log.close()
  assert epath.Path(folder, 'metrics.jsonl').read_text() == '1\n2\n3\n4\n'
  assert not _segments(folder)  # each removed once joined


def test_a_close_that_cannot_store_keeps_the_lines_in_a_named_local_file(gcs_bucket, gcs_proxy):
  folder = f'{gcs_bucket}/unstored'
  log = log_file.LogFile(f'{folder}/metrics.jsonl')
  log.write('{"step": 1}\n')
  assert log.sync(60)
  hang = gcs_proxy.add_fault('unstored/metrics.jsonl/compose', stall_s=math.inf)
  try:
    log.write('{"step": 2}\n')
    assert not log.sync(timeout=0.2)  # bounded: it says the lines are not stored yet
    with pytest.raises(log_file.NotStored) as e:
      log.close(timeout=0.2)
    assert not hang.removed  # close did not wait for the hung request
  finally:
    hang.remove()
  local = str(e.value).rsplit('they are in ', 1)[1]
  assert f'{folder}/metrics.jsonl' in str(e.value) and len(str(e.value).splitlines()) == 1
  with open(local, encoding='utf-8') as f:
    assert f.read() == '{"step": 2}\n'
  os.remove(local)


def test_a_restart_removes_the_segments_a_killed_run_left(gcs_bucket):
  workdir = f'{gcs_bucket}/orphans'
  for folder in (workdir, f'{workdir}/tensorboard'):
    epath.Path(folder, f'{log_file.SEGMENT_PREFIX}0123-abcd-7').write_bytes(b'lost')
  log = metrics_log.MetricsLog(workdir)
  log.write(1, {'train_loss': 1.})
  log.close()
  assert not _segments(workdir) and not _segments(f'{workdir}/tensorboard')
  # Two writers of one log name never share a segment, nor two event files a name.
  first, second = (log_file.LogFile(f'{workdir}/shared.log') for _ in range(2))
  assert first._segment_prefix != second._segment_prefix  # pylint: disable=protected-access
  first.close()
  second.close()


def test_a_windows_file_cut_short_by_an_older_version_does_not_stop_the_resume(tmp_path):
  (tmp_path / metrics_log.WINDOWS).write_text('{"3": {"steps": 2, "train_lo')  # killed mid-write
  log = metrics_log.MetricsLog(str(tmp_path), start_step=3)
  assert log.carried is None  # the line in progress starts afresh
  log.keep_window(6, {'steps': 1, 'skipped_images': 0, 'train_loss': 0.5, 'grad_norm': 1.})
  log.close()
  assert json.loads((tmp_path / metrics_log.WINDOWS).read_text())['6']['steps'] == 1
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', metrics_log.WINDOWS, 'tensorboard']
