"""save_npz / load / load_pretrained on every kind of params tree users hold: boxed (model.init's
output) or unboxed, scanned or not, sharded jax arrays, bfloat16."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint, models
from vit_jax.train import trainer

IMAGES = np.zeros((1, 16, 16, 3), np.float32)


def _init(seed=0, **overrides):
  model = models.get_model('testing', num_classes=5, **overrides)
  return model, model.init(jax.random.key(seed), IMAGES, train=False)['params']


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
                                              or isinstance(x, nn.LogicallyPartitioned))[0]


@pytest.mark.parametrize('scan_layers', [False, True])
def test_boxed_params_round_trip_and_come_back_boxed(tmp_path, scan_layers):
  model, boxed = _init(scan_layers=scan_layers)
  path = str(tmp_path / 'model.npz')
  checkpoint.save_npz(boxed, path)
  with np.load(path, allow_pickle=False) as npz:  # plain numeric arrays, readable by anyone
    assert all(npz[k].dtype == np.float32 for k in npz.files)
    assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel' in npz.files  # unscanned
  _, target = _init(seed=1, scan_layers=scan_layers)
  merged = checkpoint.load_pretrained(path, target)
  for (key, got), (_, want), (_, init) in zip(_leaves(merged), _leaves(boxed), _leaves(target)):
    assert isinstance(got, nn.LogicallyPartitioned) and got.names == want.names, key
    expected = init if key[0].key == 'head' else want  # the head is the new model's
    np.testing.assert_array_equal(np.asarray(got.unbox()), np.asarray(expected.unbox()))
  logits = model.apply({'params': merged}, IMAGES, train=False)  # boxed trees apply as they are
  assert logits.shape == (1, 5)
  unboxed = checkpoint.load_pretrained(path, nn.unbox(target))
  assert not any(isinstance(v, nn.LogicallyPartitioned) for _, v in _leaves(unboxed))


def test_sharded_params_come_back_sharded_the_same_way(tmp_path, quickstart_config):
  quickstart_config.mesh = dict(data=2, fsdp=4, model=1)
  training = trainer.build(quickstart_config)
  params = training.init_fn(jax.random.key(0)).params
  path = str(tmp_path / 'model.npz')
  checkpoint.save_npz(params, path)
  merged = checkpoint.load_pretrained(path, params)
  for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    assert isinstance(got, jax.Array) and got.sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(merged))


def test_bfloat16_params_survive_save_and_load(tmp_path):
  _, params = _init(param_dtype='bfloat16')
  params = nn.unbox(params)
  path = str(tmp_path / 'bf16.npz')
  checkpoint.save_npz(params, path)
  loaded = checkpoint.load(path)
  kernel = params['embedding']['kernel']
  assert kernel.dtype == jnp.bfloat16 and np.any(np.asarray(kernel, np.float32) != 0)
  assert loaded['embedding']['kernel'].dtype == np.float32
  np.testing.assert_array_equal(loaded['embedding']['kernel'], np.asarray(kernel, np.float32))
  merged = checkpoint.load_pretrained(path, params)
  assert merged['embedding']['kernel'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(merged['embedding']['kernel']), np.asarray(kernel))
