"""MAE and masked patch prediction: masking, losses, targets, corruption, encoder transfer."""
import importlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint, models
from vit_jax.models import mae
from vit_jax.train import ssl_steps, trainer

TINY_DECODER = dict(decoder_width=8, decoder_layers=1, decoder_mlp_dim=16, decoder_heads=2)


def _images(n=4, size=16, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _init(model, images):
  return nn.unbox(model.init(jax.random.key(0), jnp.asarray(images))['params'])


def test_random_masking_keeps_exact_count_and_differs_per_image_and_step():
  rng = jax.random.key(7)
  keep, restore, mask = jax.device_get(
      mae.random_masking(jax.random.fold_in(rng, 0), 32, 64, 0.75))
  assert keep.shape == (32, 16) and mask.shape == (32, 64)
  np.testing.assert_array_equal(mask.sum(axis=1), np.full(32, 48))
  for row_keep, row_mask in zip(keep, mask):
    assert len(set(row_keep)) == 16 and not row_mask[row_keep].any()
  assert len({tuple(sorted(k)) for k in keep}) == 32  # every image its own mask
  # restore_idx puts a [visible; masked] sequence back into grid order: the j-th visible token
  # goes to position keep[j]; masked positions take tokens from the masked tail.
  np.testing.assert_array_equal(np.take_along_axis(restore, keep, 1),
                                np.tile(np.arange(16), (32, 1)))
  np.testing.assert_array_equal(restore >= 16, mask > 0)
  np.testing.assert_array_equal(np.sort(restore, axis=1), np.tile(np.arange(64), (32, 1)))
  _, _, next_mask = mae.random_masking(jax.random.fold_in(rng, 1), 32, 64, 0.75)
  assert (np.asarray(next_mask) != mask).any(axis=1).all()  # the next step masks differently
  with pytest.raises(ValueError, match='mask_ratio=1.0'):
    mae.random_masking(rng, 2, 4, 1.0)


def test_patchify_order_and_roundtrip():
  images = _images(2, 8)
  patches = np.asarray(mae.patchify(images, 4))
  assert patches.shape == (2, 4, 48)
  np.testing.assert_array_equal(patches[1, 1].reshape(4, 4, 3), images[1, :4, 4:8])  # row-major
  np.testing.assert_array_equal(mae.unpatchify(patches, 4, (2, 2)), images)


def test_mae_loss_scores_only_masked_patches():
  rng = np.random.RandomState(1)
  pred, target = rng.randn(3, 16, 48), rng.randn(3, 16, 48)
  mask = np.zeros((3, 16), np.float32)
  mask[:, :12] = 1.
  sums = ssl_steps.masked_mse(pred, target, mask)
  expected = ((pred - target)**2).mean(-1)[:, :12].sum(-1)
  np.testing.assert_allclose(sums['loss'], expected, rtol=1e-5)
  np.testing.assert_array_equal(sums['count'], [12, 12, 12])
  changed_visible = pred.copy()
  changed_visible[:, 12:] += 100.
  np.testing.assert_allclose(ssl_steps.masked_mse(changed_visible, target, mask)['loss'],
                             sums['loss'], rtol=1e-6)
  changed_masked = pred.copy()
  changed_masked[:, 0] += 1.
  assert (ssl_steps.masked_mse(changed_masked, target, mask)['loss'] > sums['loss']).all()


def test_norm_pix_targets_are_per_patch_standardised():
  patches = np.random.RandomState(2).randn(2, 5, 48) * 3. + 1.
  normed = np.asarray(ssl_steps.normalise_patches(patches))
  np.testing.assert_allclose(normed.mean(-1), 0., atol=1e-5)
  np.testing.assert_allclose(normed.std(-1), 1., atol=1e-4)


def test_mean_colour_classes_match_numpy():
  images = _images(3, 8, seed=3)
  images[0, :4, :4] = [-1., 1., 0.]  # a solid patch: r=0, g=7, b=4 -> 0*64 + 7*8 + 4 = 60
  classes = np.asarray(mae.mean_colour_classes(images, 4))
  mean = images.reshape(3, 2, 4, 2, 4, 3).mean(axis=(2, 4)).reshape(3, 4, 3)
  bins = np.minimum(((mean + 1.) / 2. * 8).astype(int), 7)
  np.testing.assert_array_equal(classes, bins[..., 0] * 64 + bins[..., 1] * 8 + bins[..., 2])
  assert classes[0, 0] == 60 and classes.max() < mae.NUM_COLOURS


def test_corruption_is_half_the_patches_split_80_10_10():
  b, n, d = 64, 64, 8
  x = jnp.asarray(np.random.RandomState(4).randn(b, n, d), jnp.float32)
  mask_embedding = jnp.full((1, 1, d), 9., jnp.float32)
  out, corrupted, kind = jax.device_get(
      mae.corrupt_patches(jax.random.key(5), x, mask_embedding, 0.5))
  x = np.asarray(x)
  np.testing.assert_array_equal(corrupted.sum(axis=1), np.full(b, n // 2))
  assert not kind[corrupted == 0].any()  # untouched patches are KEEP
  fractions = np.bincount(kind[corrupted > 0], minlength=3) / (b * n // 2)
  # 2048 corrupted patches: binomial std of a 0.1 share is ~0.007.
  assert fractions[mae.MASK_EMBEDDING] == pytest.approx(0.8, abs=0.03)
  assert fractions[mae.OTHER_PATCH] == pytest.approx(0.1, abs=0.025)
  assert fractions[mae.KEEP] == pytest.approx(0.1, abs=0.025)
  np.testing.assert_array_equal(out[kind == mae.KEEP], x[kind == mae.KEEP])
  np.testing.assert_array_equal(out[kind == mae.MASK_EMBEDDING], 9.)
  for i, j in zip(*np.nonzero(kind == mae.OTHER_PATCH)):
    matches = np.nonzero((x[i] == out[i, j]).all(axis=1))[0]
    assert len(matches) == 1 and matches[0] != j  # another patch of the same image


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_mae_encoder_loads_into_classifier_with_the_same_features(classifier, tmp_path):
  images = _images(2)
  pretrain = mae.get_model('mae', 'testing', classifier=classifier, mask_ratio=0., **TINY_DECODER)
  params = _init(pretrain, images)
  path = str(tmp_path / 'mae.npz')
  checkpoint.save_npz(params, path)
  classifier_model = models.get_model('testing', num_classes=5, classifier=classifier)
  target = _init(classifier_model, images)
  loaded = checkpoint.load_pretrained(path, target)
  flat = flax.traverse_util.flatten_dict(loaded, sep='/')
  assert not any(k.startswith('decoder') for k in flat) and flat['head/kernel'].shape == (16, 5)
  # With nothing masked the encoder sees every patch (in a shuffled order, which attention and
  # the class token / mean pooling do not see): its pooled features are the classifier's.
  features = models.get_model('testing', num_classes=None, classifier=classifier).apply(
      {'params': {k: v for k, v in loaded.items() if k != 'head'}}, images)
  encoded = _encoded_tokens(pretrain, params, images)
  pooled = encoded[:, 0] if classifier == 'token' else encoded.mean(axis=1)
  np.testing.assert_allclose(pooled, features, rtol=1e-4, atol=1e-5)


def _encoded_tokens(model, params, images):
  """The MAE encoder's output, as the decoder receives it."""
  _, state = model.apply({'params': params}, images, mask_rng=jax.random.key(3),
                         capture_intermediates=lambda m, _: m.name == "Transformer",
                         mutable=['intermediates'])
  # Beside it, the attention layers sow their weights there too (vit_jax.inspect reads them).
  outputs = state['intermediates']['Transformer']['__call__']
  assert len(outputs) == 1
  return np.asarray(outputs[0])


def test_loading_a_workdir_without_checkpoints_names_it(tmp_path):
  with pytest.raises(ValueError, match='without a complete training checkpoint'):
    checkpoint.load_pretrained(str(tmp_path), {})


@pytest.mark.parametrize('name', ['mae_quickstart', 'mae_i1k', 'masked_patch_quickstart'])
def test_self_supervised_configs_build_their_models(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  model = trainer.build_model(config)
  assert isinstance(model, mae.MaskedAutoencoder if config.task == 'mae' else
                    mae.MaskedPatchPredictor)
  assert config.init_from == '' and config.checkpoint_every > 0
  if name == 'mae_i1k':  # the paper's recipe: lr = 1.5e-4 * batch / 256, AdamW b2=0.95
    assert config.schedule.base_lr == pytest.approx(1.5e-4 * 4096 / 256)
    assert (config.optimizer.b2, config.optimizer.weight_decay) == (0.95, 0.05)
    assert (model.hidden_size, model.decoder_width, model.decoder_layers) == (768, 512, 8)
