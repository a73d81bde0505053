"""vit_jax.inspect: each figure's numbers against an independent computation, and the whole
command on a small checkpoint."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from tests import programs, workdirs
from vit_jax import checkpoint, inspect, models
from vit_jax.models import vit


def test_mean_attention_distance_of_a_constructed_attention():
  """2x2 patches of 10 px plus a class token; every query attends only to the bottom-right
  patch (the class token's share is left out and the rest renormalised)."""
  weights = np.zeros((1, 1, 5, 5))
  weights[..., 4] = 0.6
  weights[..., 0] = 0.4  # the class token
  expected = (np.hypot(10, 10) + 10 + 10 + 0) / 4
  got = inspect.mean_attention_distance(weights, (2, 2), patch_size=10, num_prefix=1)
  np.testing.assert_allclose(got, [expected])


def test_rollout_of_identity_attention_is_the_identity():
  eye = np.broadcast_to(np.eye(6), (2, 3, 6, 6))
  np.testing.assert_allclose(inspect.attention_rollout([eye, eye, eye]),
                             np.broadcast_to(np.eye(6), (2, 6, 6)))
  maps = inspect.rollout_maps(inspect.attention_rollout([eye]), (2, 2), num_prefix=2)
  np.testing.assert_allclose(maps, 0.)  # no patch flows into the class token


def test_sincos2d_positions_are_most_similar_to_themselves_then_their_neighbours():
  sim = inspect.position_similarity(vit.posemb_sincos_2d(6, 6, 64)[0], (6, 6))
  for i in range(6):
    for j in range(6):
      order = np.argsort(-sim[i, j].ravel())
      assert order[0] == i * 6 + j
      neighbours = {(i + di) * 6 + j + dj for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1))
                    if 0 <= i + di < 6 and 0 <= j + dj < 6}
      assert order[1] in neighbours


def test_filter_components_are_the_covariance_eigenvectors():
  kernel = np.random.RandomState(0).normal(size=(4, 4, 3, 40)) * np.linspace(0.1, 2, 48).reshape(
      4, 4, 3, 1)
  components, explained = inspect.filter_components(kernel, num=5)
  filters = kernel.reshape(48, 40).T
  eigenvalues, eigenvectors = np.linalg.eigh(np.cov(filters, rowvar=False))
  top = np.argsort(-eigenvalues)[:5]
  np.testing.assert_allclose(explained, eigenvalues[top] / eigenvalues.sum(), rtol=1e-6)
  for component, vector in zip(components, eigenvectors[:, top].T):
    assert abs(np.dot(component.ravel(), vector)) == pytest.approx(1., abs=1e-6)


def test_scanned_blocks_sow_their_attention_weights_too():
  """(Unscanned blocks sow theirs in test_inspect_writes_the_figures_and_their_numbers.)"""
  model = models.get_model('testing', num_classes=3, scan_layers=True)
  images = np.random.RandomState(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  params = model.init(jax.random.key(0), images)['params']
  weights = inspect.attention_weights(model, params, images)
  assert len(weights) == model.num_layers
  tokens = (16 // model.patch_size)**2 + model.num_prefix_tokens
  for w in weights:
    assert w.shape == (2, model.num_heads, tokens, tokens)
    np.testing.assert_allclose(w.sum(-1), 1., rtol=1e-5)
  # The spelled-out attention that sows the weights computes what the fused one does.
  sown, _ = model.apply({'params': params}, images, mutable='intermediates')
  np.testing.assert_allclose(sown, model.apply({'params': params}, images), rtol=1e-5, atol=1e-6)


def test_inspect_writes_the_figures_and_their_numbers(tmp_path):
  model = models.get_model('testing', num_classes=3)
  params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)))['params'])
  checkpoint.save_npz(params, str(tmp_path / 'w.npz'))
  image = tmp_path / 'a.png'
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (20, 24, 3), np.uint8)).save(image)
  weights = inspect.attention_weights(model, params, np.zeros((1, 16, 16, 3), np.float32))
  assert len(weights) == model.num_layers and weights[0].shape == (1, model.num_heads, 17, 17)
  result = inspect.analyse(str(tmp_path / 'w.npz'), [str(image)])
  assert result['grid'] == (4, 4) and result['rollout'].shape == (1, 4, 4)
  assert result['attention_distance'].shape == (model.num_layers, model.num_heads)
  assert result['position_similarity'].shape == (4, 4, 4, 4)
  assert list(result['top_classes']) == [str(image)]
  written = inspect.draw(result, str(tmp_path / 'out'))
  assert written == ['filters.png', 'position_similarity.png', 'attention_distance.png',
                     'rollout.png']
  for name in written:
    assert Image.open(tmp_path / 'out' / name).size[0] > 100
  numbers = json.loads(json.dumps(inspect.summary(result)))
  assert np.allclose(numbers['attention_distance'], result['attention_distance'])


@pytest.mark.parametrize('classifier', ['map', 'gap'])
def test_inspect_command_on_map_and_gap_models_names_what_it_skips(tmp_path, capsys, classifier):
  """The MAP head's attention sows weights too: only the encoder's layers are analysed."""
  model = models.get_model('testing', num_classes=3, classifier=classifier)
  params = workdirs.random_params(model, 16)
  checkpoint.save_npz(params, str(tmp_path / 'w.npz'))
  image, notes = tmp_path / 'a.png', tmp_path / 'notes.txt'
  pixels = np.random.RandomState(0).randint(0, 255, (16, 16, 3), np.uint8)
  Image.fromarray(pixels).save(image)
  notes.write_text('not an image')
  status, out, err = programs.run_main(inspect.main, [
      'inspect', f'--checkpoint={tmp_path / "w.npz"}', f'--images={image},{notes}',
      f'--out={tmp_path / "out"}'], capsys)
  assert status == 0
  assert out == f'wrote filters.png, position_similarity.png, attention_distance.png, ' \
                f'rollout.png, inspect.json to {tmp_path / "out"}\n'
  assert err.startswith(f'{notes}: skipped, not a decodable image') and err.count('\n') == 1
  numbers = json.loads((tmp_path / 'out' / 'inspect.json').read_text())
  assert numbers['images'] == [str(image)] and list(numbers['skipped']) == [str(notes)]
  assert np.array(numbers['attention_distance']).shape == (model.num_layers, model.num_heads)
  assert np.array(numbers['rollout']).shape == (1, 4, 4)
  probs = np.asarray(jax.nn.softmax(model.apply({'params': params}, pixels[None] / 127.5 - 1)))[0]
  assert [c for c, _ in numbers['top_classes'][str(image)]] == list(np.argsort(-probs)[:3])


def test_inspect_held_out_images_get_top_classes(tmp_path, tfds_data_dir):
  """Without --images, the run's held-out digits through its pp_eval, each with top classes."""
  config = workdirs.quickstart_config('model.name=testing', f'data.data_dir={tfds_data_dir}')
  model = workdirs.model_of(config)
  params = workdirs.random_params(model, 16)
  workdirs.write(str(tmp_path / 'run'), config, params)
  result = inspect.analyse(str(tmp_path / 'run'), [], num_images=3)
  assert result['images'] == ['test[0]', 'test[1]', 'test[2]']
  assert result['rollout'].shape == (3, 4, 4)
  probs = np.asarray(jax.nn.softmax(model.apply({'params': params}, result['image_pixels'])))
  for name, row in zip(result['images'], probs):
    top = result['top_classes'][name]
    assert [c for c, _ in top] == list(np.argsort(-row)[:3])
    np.testing.assert_allclose([p for _, p in top], np.sort(row)[::-1][:3], rtol=1e-5)
