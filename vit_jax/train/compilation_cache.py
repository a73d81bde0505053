"""JAX's persistent compilation cache, on by default under the workdir: a restarted run (a
preempted spot slice created again, a `run` after `stop`, a resume after Ctrl-C) reads its
compiled train and evaluation steps back instead of compiling them again.

`config.compilation_cache`: '' (default) = WORKDIR/compilation_cache, so on a pod it lives in the
gs:// workdir every host reads (JAX writes it from process 0 only); another folder or gs:// URL
shares one cache between runs; 'none' turns it off. A cache the user set for JAX itself
(JAX_COMPILATION_CACHE_DIR, or jax.config) is left as it is. The cache is trusted code: keep it
where only you can write.
"""
import jax
from jax.experimental.compilation_cache import compilation_cache

from vit_jax.storage import paths

OFF = 'none'
_chosen_here = None  # the folder this module set, as opposed to one the user set for JAX


def use(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache where `setting` says (see the module's docstring)
  before anything compiles; returns the folder in use (None: off)."""
  current = jax.config.jax_compilation_cache_dir
  if current and current != _chosen_here:
    return current  # the user's own
  folder = (None if setting.lower() == OFF else
            setting or str(paths.resolve(workdir) / 'compilation_cache'))
  if folder != current:
    _set(folder)
  return folder


def _set(folder: str | None) -> None:
  global _chosen_here
  jax.config.update('jax_compilation_cache_dir', folder)
  compilation_cache.reset_cache()  # a cache opened at another folder in this process is dropped
  _chosen_here = folder
