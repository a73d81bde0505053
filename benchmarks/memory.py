"""Per-device memory of one ViT train step under data=8 vs fsdp=8, from XLA's memory analysis.

    python benchmarks/memory.py [--model=ViT-B_16] [--batch_size=64] [--image_size=224]

Nothing is materialised: the train state is abstract (jax.eval_shape) and the step is only
lowered and compiled for 8 host CPU devices. FSDP should hold ~1/8 of the params and optimizer
state per device; pure data parallelism holds all of it on every device.
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools  # noqa: E402
import math  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from vit_jax import sharding  # noqa: E402
from vit_jax.train import optim, steps, trainer  # noqa: E402

_MODEL = flags.DEFINE_string('model', 'ViT-B_16', 'Model name.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global batch size.')
_IMAGE = flags.DEFINE_integer('image_size', 224, 'Image side in pixels.')

MESHES = {'data=8': dict(data=8, fsdp=1, model=1), 'fsdp=8': dict(data=1, fsdp=8, model=1)}


def _config(mesh) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      model=dict(name=_MODEL.value), num_classes=1000, image_size=_IMAGE.value,
      total_steps=1000, mesh=mesh, optimizer=dict(name='adamw', weight_decay=0.1),
      schedule=dict(base_lr=1e-3, warmup_steps=100, decay_type='cosine')))


def _per_device_bytes(abstract_tree) -> int:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
  return sum(x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape))
             for x in jax.tree.leaves(abstract_tree))


def analyse(mesh_config) -> dict:
  config = _config(mesh_config)
  mesh = sharding.make_mesh(config.mesh)
  model = trainer.build_model(config)
  tx, _ = optim.make_optimizer(config)
  _, abstract_state, state_sharding = trainer.create_state(config, model, tx, mesh,
                                                           sharding.DEFAULT_RULES)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((_BATCH.value, _IMAGE.value, _IMAGE.value, 3),
                                         jnp.float32, sharding=batch_sharding),
           'labels': jax.ShapeDtypeStruct((_BATCH.value, 1000), jnp.float32,
                                          sharding=batch_sharding)}
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   loss_fn=steps.softmax_xent, rng=jax.random.key(0)),
                 in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
  memory = step.lower(abstract_state, batch).compile().memory_analysis()
  return {'params+opt (shards)': _per_device_bytes(abstract_state),
          'arguments': memory.argument_size_in_bytes,
          'outputs': memory.output_size_in_bytes,
          'temp': memory.temp_size_in_bytes,
          'aliased': memory.alias_size_in_bytes}


def main(argv):
  del argv
  results = {name: analyse(mesh) for name, mesh in MESHES.items()}
  columns = list(next(iter(results.values())))
  print(f'{_MODEL.value}, global batch {_BATCH.value}, {_IMAGE.value}px, adamw, f32; '
        'MiB per device (8 CPU devices)')
  print(f'{"mesh":8s}' + ''.join(f'{c:>22s}' for c in columns))
  for name, row in results.items():
    print(f'{name:8s}' + ''.join(f'{row[c] / 2**20:22.1f}' for c in columns))
  base, fsdp = results['data=8'], results['fsdp=8']
  print(f'fsdp=8 / data=8: params+opt {fsdp[columns[0]] / base[columns[0]]:.3f}, '
        f'arguments {fsdp["arguments"] / base["arguments"]:.3f}')


if __name__ == '__main__':
  app.run(main)
