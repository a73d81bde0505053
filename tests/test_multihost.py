"""2 processes x 4 CPU devices (jax.distributed over loopback, gloo collectives) = 1 x 8, through
the real input pipeline and trainer: the same losses, and a 1-process checkpoint resumed on 2.
The processes' devices are interleaved in the mesh as on a TPU slice (tests/multihost_worker.py),
so each reads scattered rows of every batch, some of them read by both."""
import json
import os
import shutil
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests import test_sharding
from vit_jax import checkpoint, models
from vit_jax.data import sources
from vit_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def trainer_config(data_dir: str):
  """4 logged steps of the quickstart's pipeline on a (data=2, fsdp=2, model=2) mesh over both
  processes' devices, checkpointed at step 2 and evaluated at the end."""
  config = test_sharding._config()  # pylint: disable=protected-access
  config.data.data_dir = data_dir
  config.update(dict(total_steps=4, batch_size=16, log_every=1, eval_every=0, checkpoint_every=2))
  config.data.eval_split = 'test[:64]'  # 4 evaluation batches: enough to compare
  config.mesh = test_sharding.MIXED
  return config


def _logged(workdir, key: str) -> dict:
  """{step: value} of metrics.jsonl (a run's first step is not logged: it holds the compile)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {m['step']: m[key] for m in map(json.loads, f) if key in m}


def fine_tune_config(config, init_from: str):
  """One fine-tuning step with the parameters sharded over all 8 devices (both processes').

  At learning rate 0 the exported weights are exactly what init_from gave the run: the merge of
  the loaded weights into the sharded state and the export are compared, not the training."""
  config = config.copy_and_resolve_references()
  config.mesh = dict(data=1, fsdp=8, model=1)
  config.schedule = dict(base_lr=0., warmup_steps=0, decay_type='constant')
  config.update(dict(total_steps=1, checkpoint_every=1, init_from=init_from))
  config.data.eval_split = ''
  return config


def fine_tune_and_export(config, workdir: str, export: str) -> bool:
  """Trains `config` in `workdir` and exports its params; True if they spanned processes."""
  trainer.train_and_evaluate(config, workdir)
  state = checkpoint.restore_state(checkpoint.make_manager(workdir),
                                   trainer.build(config).abstract_state)
  checkpoint.save_npz(state.params, export)
  return not any(x.is_fully_addressable for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoint_together(tmp_path, tfds_data_dir):
  sources.prepare_tfds(tfds.builder('sklearn_digits', data_dir=tfds_data_dir))  # once, here
  model = models.get_model('testing', num_classes=10)
  # One process x 8 devices, uninterrupted; its step-2 checkpoint is what 2 processes resume.
  trainer.train_and_evaluate(trainer_config(tfds_data_dir), str(tmp_path / 'one_process'))
  shutil.copytree(tmp_path / 'one_process' / 'checkpoints' / '2',
                  tmp_path / 'resumed' / 'checkpoints' / '2')
  address = f'127.0.0.1:{_free_port()}'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  workers = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'), address, '2', str(i),
       str(tmp_path), str(tmp_path / 'tfds')], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=600)[0])
  finally:
    for worker in workers:  # never leave a process waiting for its peer
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  assert [w.returncode for w in workers] == [0, 0], '\n\n'.join(outputs)
  # Process 0 names the slowest host at the logging step after its first timed one (step 3).
  assert 'slowest host up to step 3: process ' in outputs[0], outputs[0]
  assert 'slowest host' not in outputs[1]
  results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
  reference = _logged(tmp_path / 'one_process', 'train_loss')
  assert sorted(reference) == [1, 2, 3, 4] and len(set(reference.values())) == 4
  two_processes = _logged(tmp_path / 'trainer', 'train_loss')
  np.testing.assert_allclose([two_processes[s] for s in (1, 2, 3, 4)],
                             [reference[s] for s in (1, 2, 3, 4)], rtol=1e-5)
  # Resumed on 2 processes from the 1-process checkpoint at step 2: the same step 4 and the same
  # evaluation after it as the uninterrupted run.
  for key in ('train_loss', 'val_loss'):
    np.testing.assert_allclose(_logged(tmp_path / 'resumed', key)[4],
                               _logged(tmp_path / 'one_process', key)[4], rtol=1e-5, err_msg=key)
  for result in results:
    assert result['process_count'] == 2
  # What the interleaved mesh gives each process to read (batch 16 in 4 blocks of 4 rows).
  assert results[0]['rows'] == [*range(8), *range(12, 16)]
  assert results[1]['rows'] == list(range(4, 16))
  # The digits were not prepared in the workers' data_dir: process 0 prepared them, alone.
  assert [r['prepared_here'] for r in results] == [['sklearn_digits'], []]
  # Both processes report the same (global) training loss and evaluation accuracy.
  assert results[0]['trainer_loss'] == results[1]['trainer_loss']
  assert results[0]['trainer_val_accuracy'] == results[1]['trainer_val_accuracy']
  with open(tmp_path / 'trainer' / 'metrics.jsonl') as f:  # written by process 0 only
    lines = [json.loads(line) for line in f]
  assert [m['step'] for m in lines if 'val_accuracy' in m] == [4]
  assert sorted(os.listdir(tmp_path / 'trainer' / 'checkpoints')) == ['2', '4']

  # Fine-tuning with FSDP spanning both processes from the 2-process run's workdir exports what
  # one process makes of the same weights (load_pretrained on the host; .npz sources go through
  # the same merge, tests/test_transfer.py).
  assert results[0]['fine_tuned_params_span_processes'] is True
  init_params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)),
                                    train=False)['params'])
  expected = checkpoint.load_pretrained(str(tmp_path / 'trainer'), init_params)
  exported = checkpoint.load(str(tmp_path / 'from_workdir.npz'))
  assert jax.tree.structure(exported) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(exported)[0],
                          jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
