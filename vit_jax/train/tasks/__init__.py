"""Training tasks, chosen once by `config.task`: what a run optimises and how it is judged.

A task is one object with the four things the trainer asks of it (`Task` below); each lives in
its own module here and registers itself by name, so a new objective is one new file (and one
import line below). The trainer, the benchmark, the AOT check and the start-up checks all go
through `get(config)`; none of them branches on the task's name.
"""
from typing import Callable

from vit_jax.cli import errors


class Task:
  """What the trainer needs from a training objective.

  has_labels: batches carry 'labels' (num_classes-hot) besides 'image'.
  """
  name: str = ''
  has_labels: bool = False

  def model(self, config):
    """The flax module this task trains, from config.model (and config.num_classes)."""
    raise NotImplementedError

  def batch_loss(self, config, model) -> Callable:
    """(params, batch, rng) -> the batch's mean loss: what `steps.train_step` differentiates,
    with gradient accumulation and the optimizer step shared by every task."""
    raise NotImplementedError

  def evaluators(self, config, model, mesh, params_sharding, workdir: str) -> list:
    """The evaluators to run every `eval_every` steps (each `.run(params, step) -> dict`)."""
    raise NotImplementedError


_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
  if task.name in _TASKS:
    raise ValueError(f'task {task.name!r} is registered twice')
  _TASKS[task.name] = task
  return task


def names() -> list[str]:
  return sorted(_TASKS)


def get(config) -> Task:
  """The task `config.task` names (default 'classification'); unknown names list the known."""
  name = config.get('task', 'classification')
  if name not in _TASKS:
    raise errors.UserError(f'unknown task={name!r}; choose one of {names()}')
  return _TASKS[name]


# Each module registers its task on import.
from vit_jax.train.tasks import classification, mae, masked_patch  # noqa: E402,F401  pylint: disable=g-import-not-at-top,wrong-import-position
