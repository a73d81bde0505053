"""The training loop: init or restore, step, log, evaluate, checkpoint."""
import contextlib
import functools
import math
import sys
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vit_jax.cli import waiting
from vit_jax.scale import accelerators, flops, sharding
from vit_jax.storage import log_file
from vit_jax.weights import files, train_state
from vit_jax.data import pipeline
from vit_jax.train import (compilation_cache, metrics_log, optim, preemption, preflight,
                           steps, tasks, timeline)


def say(line: str) -> None:
  """What a user must read (resume, stop): a plain line on stderr, where Ctrl-C's are."""
  print(line, file=sys.stderr, flush=True)


def build_model(config):
  """The module `config.task` trains (see vit_jax.train.tasks)."""
  return tasks.get(config).model(config)


def _interval_hit(step: int, every: int, total: int) -> bool:
  """Every `every` steps and always at the last one: 0 = only at the last (README says so)."""
  return step == total or (every > 0 and step % every == 0)


def _check_finite(metrics: list, step: int, workdir: str, manager) -> None:
  """Stops on a NaN/Inf loss or gradient, after the checkpoints in flight (all good) are written."""
  for name in ('train_loss', 'grad_norm'):
    values = np.asarray([m[name] for m in metrics])
    if not np.all(np.isfinite(values)):
      manager.wait_until_finished()
      raise FloatingPointError(
          f'{name} is {values[~np.isfinite(values)][0]} by step {step}; stopping. The newest '
          f'complete checkpoint in {workdir}/checkpoints is untouched: lower the learning rate '
          'or enable clipping and start again.')


def _save_if_finite(manager, step: int, state, pending: list, workdir: str, log,
                    window: dict | None, skipped: int) -> None:
  """Saves `state` unless it (or the steps since the last log) holds NaN/Inf values, and the
  sums of the line in progress (`window`, then `pending`'s steps and their `skipped` images)
  for a run resumed from it.

  Checked here, not only at log time, so that a bad state never replaces a good checkpoint.
  """
  fetched = jax.device_get(pending)
  _check_finite(fetched, step, workdir, manager)
  if not bool(jax.device_get(_all_finite(state.params))):
    manager.wait_until_finished()
    raise FloatingPointError(f'parameters hold NaN/Inf after step {step}; not saving them. The '
                             f'newest complete checkpoint in {workdir}/checkpoints is untouched.')
  log.keep_window(step, metrics_log.window_sums(fetched, skipped, window))
  train_state.save_state(manager, step, state)


_all_finite = jax.jit(steps.all_finite)

# Steps this loop may dispatch ahead of the device. Unbounded, it ran up to a whole logging
# interval ahead (nothing waits on the device between lines), so a stop request (SIGTERM, Ctrl-C)
# saved only after that many more steps had run (a preemption's grace period is ~30 s), and as
# many input batches sat on the devices. Two keep the device busy.
_STEPS_AHEAD = 2

# At a checkpoint the loop waits this long at most for the lines before it to be stored (less
# when a stop is requested meanwhile).
_LOG_SYNC_S = 5.


def create_state(config, model, tx, mesh, rules):
  """(init_fn, abstract_state, state_sharding); init_fn(rng) builds a sharded TrainState."""
  image_shape = (1, config.image_size, config.image_size, 3)

  def init(rng):
    params = model.init(rng, jnp.zeros(image_shape, jnp.float32), train=False)['params']
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params))

  abstract_boxed = jax.eval_shape(init, jax.random.key(0))
  state_sharding = sharding.param_shardings(abstract_boxed, mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.unbox(abstract_boxed), state_sharding)
  init_fn = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=state_sharding)
  return init_fn, abstract_state, state_sharding


class Training(NamedTuple):
  """What training builds from a config before its first step."""
  mesh: jax.sharding.Mesh
  model: nn.Module
  tx: Any  # optax.GradientTransformation
  schedule: Callable
  init_fn: Callable  # rng -> sharded TrainState
  abstract_state: Any
  state_sharding: Any
  rules: tuple  # logical axis -> mesh axis, for parameters and activations


def build(config, devices=None) -> Training:
  """Mesh, model, optimizer, schedule and state layout from `config`, without running a step:
  the loop, the benchmark, the AOT check and the tests all start here. devices: the mesh's
  devices (default jax.devices(); the AOT check passes a TPU or GPU topology's)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build_model(config)
  tx, schedule = optim.make_optimizer(config)
  rules = sharding.rules_from_config(config)
  init_fn, abstract_state, state_sharding = create_state(config, model, tx, mesh, rules)
  return Training(mesh, model, tx, schedule, init_fn, abstract_state, state_sharding, rules)


def jit_train_step(step_fn, training: Training):
  """A (state, batch) step jitted with the shardings training uses; the benchmark times this."""
  mesh = training.mesh
  return sharding.jit_with_rules(
      step_fn, mesh, training.rules,
      in_shardings=(training.state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(training.state_sharding, sharding.replicated(mesh)),
      donate_argnums=0)


def make_train_step(config, training: Training, rng):
  """The task's pure (state, batch) -> (state, metrics) step; jit it with jit_train_step."""
  batch_loss = tasks.get(config).batch_loss(config, training.model)
  return functools.partial(steps.train_step, tx=training.tx, batch_loss=batch_loss, rng=rng,
                           accum_steps=config.get('accum_steps', 1))


def abstract_batch(config, mesh, batch_size: int | None = None) -> dict:
  """Shapes and shardings of the global training batch the input pipeline yields."""
  batch_size = batch_size or config.batch_size
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, config.image_size, config.image_size, 3),
                                         jnp.float32, sharding=batch_sharding)}
  if tasks.get(config).has_labels:
    batch['labels'] = jax.ShapeDtypeStruct((batch_size, config.num_classes), jnp.float32,
                                           sharding=batch_sharding)
  return batch


def pretrained_params(config, abstract_params):
  """`config.init_from`'s weights in this model's tree, as numpy; the leaves it does not give (a
  new head) stay abstract, for fresh parameters to fill. Read on every process (under FSDP
  across hosts each then places only its own devices' slices). A file that is not weights, or
  holds another architecture, stops the run here in two lines."""
  logging.info('reading init_from=%s', config.init_from)
  try:
    return files.load_pretrained(config.init_from, abstract_params)
  except (ValueError, OSError) as e:
    problems = str(e).splitlines()
    more = (f' (and {len(problems) - 2} more: does config.model match the file\'s model?)'
            if len(problems) > 2 else '')
    raise preflight.PreflightError(f'config.init_from: {problems[0]}'
                                   f'{" " + problems[1].strip() if len(problems) > 1 else ""}'
                                   f'{more}') from None


def initial_state(config, workdir: str, training: Training, manager, init_rng,
                  pretrained=None):
  """The state to start from: the newest complete checkpoint in WORKDIR (resume), else fresh
  parameters, with `config.init_from`'s weights merged in when it is set (transfer; `pretrained`
  when they were read already)."""
  abstract_state, state_sharding = training.abstract_state, training.state_sharding
  resume_step = train_state.latest_complete_step(manager)
  if resume_step is not None:
    preflight.check_workdir_model(manager, resume_step, abstract_state.params, workdir)
    # A plain line (absl's format is for logs): a user must see that this run is not a fresh one.
    say(f'resuming from {workdir}/checkpoints/{resume_step} (step {resume_step} of '
        f'{config.total_steps})')
    return train_state.restore_state(manager, abstract_state, resume_step)
  state = training.init_fn(init_rng)
  if not config.init_from:
    return state
  if pretrained is None:
    pretrained = pretrained_params(config, abstract_state.params)
  fresh = sharding.to_host(state.params)
  params = jax.tree.map(lambda p, f: f if isinstance(p, jax.ShapeDtypeStruct) else p,
                        pretrained, fresh)
  params = sharding.to_global(params, state_sharding.params)
  tx = training.tx
  return jax.jit(lambda p: steps.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)),
                 out_shardings=state_sharding)(params)


def _log_training(step: int, pending: list, window: dict, throughput, schedule, skipped: int,
                  manager, workdir: str) -> dict:
  """The training line of `step`: means over its steps (those a checkpoint carried into this
  run, `window`, then `pending`); stops on NaN/Inf. Every value but the measured ones
  (images_per_sec, input_wait_s, mfu) is a function of the steps alone, so a resumed run logs
  the lines an uninterrupted one does."""
  fetched = jax.device_get(pending)
  _check_finite(fetched, step, workdir, manager)
  sums = metrics_log.window_sums(fetched, skipped, window)
  line = {'train_loss': sums['train_loss'] / sums['steps'],
          'learning_rate': float(schedule(step - 1)),
          **throughput.figures(step),  # images_per_sec, input_wait_s, mfu
          'grad_norm': sums['grad_norm'] / sums['steps'],
          'skipped_images': sums['skipped_images']}  # failed to decode in these steps
  return {k: v for k, v in line.items() if v is not None}


def train_and_evaluate(config, workdir: str, started: float | None = None) -> dict:
  """Trains per `config`, writing WORKDIR/{metrics.jsonl, checkpoints/}; returns last metrics.
  started: when the run began, for its goodput (the program gives its process's start; default
  now)."""
  started = time.time() if started is None else started
  timeline_options = timeline.options(config)
  training = build(config)
  mesh, model, _, _, _, abstract_state, state_sharding, _ = training
  logging.info('mesh %s; model %s with %.2fM parameters', dict(mesh.shape), config.model.name,
               sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)) / 1e6)

  preflight.check(config, workdir, model, mesh)  # before anything compiles
  compilation_cache.use(config.get('compilation_cache', ''), workdir)  # once it is reachable
  pretrained = None
  if config.init_from and not train_state.has_checkpoints(workdir):
    pretrained = pretrained_params(config, abstract_state.params)  # before anything is written
  manager = train_state.make_manager(workdir, max_to_keep=config.get('keep_checkpoints', 3))
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  state = initial_state(config, workdir, training, manager, init_rng, pretrained)
  start_step = int(state.step)
  evals = tasks.get(config).evaluators(config, model, mesh, state_sharding.params, workdir)
  # A stop request that ended the evaluation of the checkpointed step: it is run first.
  unevaluated = bool(evals and start_step and _interval_hit(start_step, config.eval_every,
                                                              config.total_steps)
                     and not metrics_log.has_evaluation(workdir, start_step))
  if start_step >= config.total_steps and not unevaluated:
    say(f'{workdir} is already at step {start_step} of {config.total_steps}: nothing to train '
        '(raise total_steps to continue)')
    manager.close()
    return {}
  train_state.write_run_config(workdir, config)  # the config of the run that trains on

  train_step = jit_train_step(make_train_step(config, training, dropout_rng), training)
  log = metrics_log.MetricsLog(workdir, start_step)  # drops lines an earlier run left past it
  progress = metrics_log.Progress(config.total_steps, start_step)
  batches = pipeline.train_iterator(config, mesh, start_step)
  run = timeline.Timeline(timeline_options, workdir, start_step, config.log_every, started)
  watch = preemption.PreemptionWatch()
  try:
    last = {}
    if unevaluated:
      run.phase('eval', start_step)
      last = _evaluate(evals, state, start_step, log, progress, watch)
    last.update(_train_loop(config, workdir, state, start_step, training, train_step, evals,
                            log, progress, batches, watch, manager, run))
  except BaseException:
    _shut_down(batches, manager, log, watch, run, failed=True)
    raise
  _shut_down(batches, manager, log, watch, run, failed=False)
  return last


def _shut_down(batches, manager, log, watch, run, failed: bool) -> None:
  """Ends the run's input, checkpoint writes and logs; only the checkpoints in flight are
  waited for without a bound. Raises log_file.NotStored (naming the local files that hold
  them) when lines could not be stored, unless the run `failed` already (then it is logged).
  The run's record ends last, with the goodput line."""
  run.phase('shutdown')
  unstored, deadline = [], None
  try:
    batches.close()  # no input thread may outlive the run (it would hold the process at exit)
    manager.wait_until_finished()
    manager.close()
    # Every log of the run shares one bound (log_file.CLOSE_TIMEOUT_S), goodput.jsonl included.
    deadline = time.monotonic() + log_file.CLOSE_TIMEOUT_S
    _kept_if_not_stored(lambda: log.close(deadline - time.monotonic()), unstored)
  finally:
    watch.close()  # a second Ctrl-C while the final save is written still exits at once
    ended_by = sys.exc_info()[1]  # what ended the run, if anything
    left = None if deadline is None else max(deadline - time.monotonic(), 0.)
    _kept_if_not_stored(lambda: run.close(ended_by, left), unstored)  # prints the goodput line
  if unstored:
    not_stored = log_file.NotStored('; '.join(str(e) for e in unstored))
    if not failed:
      raise not_stored
    logging.error('%s', not_stored)


def _kept_if_not_stored(close: Callable[[], Any], unstored: list) -> None:
  """close(), with a log_file.NotStored it raises kept in `unstored`: every log gets its turn."""
  try:
    close()
  except log_file.NotStored as e:
    unstored.append(e)


def _mfu_terms(config, training: Training) -> dict:
  """Model FLOPs per step (3 x the forward pass's matmuls, the benchmark's MFU convention: no
  recomputation counted) and the mesh's peak bf16 FLOP/s, where the devices' peak is known
  (TPUs, H100s); {} elsewhere (CPUs: no mfu in the lines)."""
  peak = accelerators.PEAK_BF16_FLOPS.get(training.mesh.devices.flat[0].device_kind)
  if not peak:
    return {}
  forward = flops.forward_flops_per_image(training.model, training.abstract_state.params,
                                          config.image_size)
  return {'flops_per_step': 3 * forward * config.batch_size,
          'peak_flops': peak * training.mesh.devices.size}


def _evaluate(evals, state, step: int, log, progress, watch) -> dict:
  """Runs the evaluators at `step` and logs their lines; a stop request ends it within a
  batch, unlogged (the run resumed from this step's checkpoint evaluates it first)."""
  results = {}
  try:
    with watch.evaluation():
      for evaluator in evals:
        result = evaluator.run(state.params, step)
        log.write(step, result)
        progress.log(step, result)
        results.update(result)
  except preemption.StopRequested:
    say(f'stop requested during the evaluation at step {step}: left unfinished (the run resumed '
        f'from step {step} evaluates it first)')
  return results


def _train_loop(config, workdir, state, start_step, training, train_step, evals, log, progress,
                batches, watch, manager, run) -> dict:
  """Steps from start_step + 1 to total_steps (or a stop request); returns the last metrics."""
  # The line in progress: the steps of it a checkpoint carried over, then those run here.
  last, skipped_before, window, pending = {}, 0, log.carried, []
  throughput = metrics_log.Throughput(config.batch_size, start_step,
                                      **_mfu_terms(config, training))
  for step in range(start_step + 1, config.total_steps + 1):
    run.next_step(step, state)
    waiting_since = time.time()
    batch = next(batches)
    throughput.waited_for_input(time.time() - waiting_since)
    run.phase('train')
    with (waiting.said_if_long(f'compiling the training step (step {step})')
          if step == start_step + 1 and jax.process_index() == 0 else contextlib.nullcontext()):
      state, metrics = train_step(state, batch)
    pending.append(metrics)
    if len(pending) > _STEPS_AHEAD:
      jax.block_until_ready(pending[-1 - _STEPS_AHEAD])
    if step == start_step + 1 and step < config.total_steps:
      # Leave compilation out of images_per_sec and the ETA (the step's loss still counts: a
      # resumed run logs the same means as one never stopped); a run of one step (nothing else
      # to measure) logs it with compilation included.
      jax.block_until_ready(state)
      throughput.restart(step)
      progress.restart_clock(step)
    if pending and _interval_hit(step, config.log_every, config.total_steps):
      skipped = batches.skipped_images()  # since this run started (a collective)
      last = _log_training(step, pending, window, throughput, training.schedule,
                           skipped - skipped_before, manager, workdir)
      skipped_before = skipped
      log.write(step, last)
      progress.log(step, last)
      window, pending = None, []
    if evals and _interval_hit(step, config.eval_every, config.total_steps):
      jax.block_until_ready(state)  # the steps dispatched so far count as training time
      run.phase('eval', step)
      eval_start = time.time()
      last.update(_evaluate(evals, state, step, log, progress, watch))
      throughput.exclude(time.time() - eval_start)  # evaluation is not training throughput
    stopping = watch.reached(step)
    if stopping or _interval_hit(step, config.checkpoint_every, config.total_steps):
      run.phase('checkpoint', step)
      # A run resumed from this checkpoint finds every line up to its step; but storage that
      # does not answer holds neither training nor, on a stop request, the save (the lines
      # are stored, or kept locally, at the end: MetricsLog.close).
      if (not stopping and not log.flush(_LOG_SYNC_S, give_up=lambda: watch.requested)
          and not watch.requested):
        logging.warning('metrics.jsonl / TensorBoard lines up to step %d are not stored after '
                        '%g s; saving the checkpoint without waiting longer', step, _LOG_SYNC_S)
      _save_if_finite(manager, step, state, pending, workdir, log, window,
                      batches.skipped_images() - skipped_before)  # a collective
    if stopping:
      manager.wait_until_finished()  # committed: what the line below says
      reason = 'Ctrl-C' if watch.interrupted else 'SIGTERM (preemption notice)'
      say(f'{reason}: saved step {step} to {workdir}/checkpoints; stopping (run the same command '
          'again to resume)')
      break
  return last
