"""JAX's persistent compilation cache under the workdir: a restarted run reads its compiled
programs back instead of compiling them again."""
import os

import jax
import jax.numpy as jnp

from vit_jax.train import compilation_cache

_HIT = '/jax/compilation_cache/cache_hits'


def test_the_cache_is_under_the_workdir_and_a_restart_reads_it(tmp_path, monkeypatch):
  session = jax.config.jax_compilation_cache_dir  # conftest's, as a user's own: left as it is
  assert session and compilation_cache.use('', str(tmp_path / 'other')) == session
  monkeypatch.setattr(compilation_cache, '_chosen_here', session)  # as if chosen by a run here
  hits = []

  def on_event(event, **unused_kwargs):
    if event == _HIT:
      hits.append(event)
  jax.monitoring.register_event_listener(on_event)
  try:
    folder = compilation_cache.use('', str(tmp_path / 'run'))
    assert folder == str(tmp_path / 'run' / 'compilation_cache')
    step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())  # conftest caches every compilation
    step(jnp.ones((8, 8))).block_until_ready()
    assert os.listdir(folder) and not hits
    jax.clear_caches()  # as in a restarted process: nothing compiled in memory
    step(jnp.ones((8, 8))).block_until_ready()
    assert hits  # read from the workdir, not compiled again
    assert compilation_cache.use('none', str(tmp_path / 'run')) is None
    assert jax.config.jax_compilation_cache_dir is None
    moved = str(tmp_path / 'shared_cache')
    assert compilation_cache.use(moved, str(tmp_path / 'run')) == moved
  finally:
    jax.monitoring.unregister_event_listener(on_event)
    compilation_cache._set(session)  # pylint: disable=protected-access
