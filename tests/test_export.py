"""Export to Hugging Face transformers and timm: the exported folders, loaded by the real
libraries, give our logits; what a target cannot hold is refused in one line."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import flax
import jax
import numpy as np
import pytest

from tests import programs, workdirs
from vit_jax import checkpoint, export, models
from vit_jax.weights import formats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TorchSide:
  """The PyTorch libraries, in tests/torch_worker.py's process (see there why)."""

  def __init__(self):
    self._dir = tempfile.mkdtemp(prefix='vit_jax_torch_side_')
    self._stderr = open(os.path.join(self._dir, 'stderr'), 'w+')  # pylint: disable=consider-using-with
    self._worker = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, '-m', 'tests.torch_worker'], cwd=REPO, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self._stderr, text=True)
    self._answer()  # it has imported torch, transformers and timm
    self._calls = 0

  def _answer(self):
    line = self._worker.stdout.readline()
    if not line:
      self._stderr.seek(0)
      raise RuntimeError(f'tests/torch_worker.py died:\n{self._stderr.read()[-3000:]}')
    answer = json.loads(line)
    if 'error' in answer:
      raise RuntimeError(answer['error'])

  def __call__(self, run: str, images: np.ndarray, folder: str = '') -> np.ndarray:
    self._calls += 1
    given, out = (os.path.join(self._dir, f'{self._calls}.{n}.npy') for n in ('in', 'out'))
    np.save(given, images)
    self._worker.stdin.write(json.dumps(dict(run=run, folder=folder, images=given, out=out))
                             + '\n')
    self._worker.stdin.flush()
    self._answer()
    return np.load(out)

  def close(self):
    self._worker.stdin.close()
    self._worker.wait(timeout=60)
    self._stderr.close()


@pytest.fixture(scope='module')
def torch_side():
  missing = [m for m in ('torch', 'transformers', 'timm') if importlib.util.find_spec(m) is None]
  if missing:
    pytest.skip(f'{", ".join(missing)} not installed: pip install -e ".[test]" brings torch, '
                'transformers and timm')
  side = TorchSide()
  yield side
  side.close()


def _images(size: int, n: int = 2) -> np.ndarray:
  return np.random.RandomState(size).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _ours(model, params, images) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)({'params': params}, images))


def _assert_equal_logits(theirs, ours):
  """Within 1e-4 of the largest logit (ours are far from zero: random heads)."""
  assert theirs.shape == ours.shape
  assert np.abs(ours).max() > 0.1
  assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max(), (theirs, ours)


def test_hidden_act_names_are_our_tanh_gelu(torch_side):
  x = np.linspace(-6, 6, 1001).astype(np.float32)
  ours = np.asarray(jax.nn.gelu(x, approximate=True))
  exact = np.asarray(jax.nn.gelu(x, approximate=False))
  assert np.abs(exact - ours).max() > 1e-4  # the two GELUs are told apart at this tolerance
  hf, timm = torch_side('gelu', x)
  np.testing.assert_allclose(hf, ours, atol=1e-6)
  np.testing.assert_allclose(timm, ours, atol=1e-6)


def test_token_vit_at_224_in_transformers_and_timm(tmp_path, torch_side):
  model = models.get_model('testing', num_classes=5, patch_size=16, hidden_size=32)
  params = workdirs.random_params(model, 224)
  checkpoint.save_npz(params, str(tmp_path / 'vit.npz'))
  images = _images(224)
  ours = _ours(model, params, images)
  assert checkpoint.export(str(tmp_path / 'vit.npz'), 'hf', str(tmp_path / 'hf')) == [
      'config.json', 'preprocessor_config.json', 'model.safetensors']
  _assert_equal_logits(torch_side('hf', images, str(tmp_path / 'hf')), ours)
  assert checkpoint.export(str(tmp_path / 'vit.npz'), 'timm', str(tmp_path / 'timm')) == [
      'config.json', 'model.safetensors']
  _assert_equal_logits(torch_side('timm', images, str(tmp_path / 'timm')), ours)
  # As users load them from a folder: timm's local-dir source; transformers' image processor
  # scales pixels to [-1, 1] as our models expect.
  _assert_equal_logits(torch_side('timm_local_dir', images, str(tmp_path / 'timm')), ours)
  pixels = torch_side('hf_processor', np.array([[[0, 255, 51]] * 224] * 224, np.uint8),
                      str(tmp_path / 'hf'))
  np.testing.assert_allclose(pixels[0, :, 0, 0], [-1, 1, -0.6], atol=1e-6)


def test_quickstart_workdir_with_class_names(tmp_path, torch_side):
  config = workdirs.quickstart_config()
  model = workdirs.model_of(config)
  params = workdirs.random_params(model, config.image_size)
  workdirs.write(str(tmp_path / 'run'), config, params)
  images = _images(16)
  ours = _ours(model, params, images)
  for to in ('hf', 'timm'):
    checkpoint.export(str(tmp_path / 'run'), to, str(tmp_path / to))
    _assert_equal_logits(torch_side(to, images, str(tmp_path / to)), ours)
  with open(tmp_path / 'hf' / 'config.json') as f:
    hf = json.load(f)
  assert hf['id2label'] == {str(i): str(i) for i in range(10)}  # sklearn_digits' names
  assert (hf['image_size'], hf['patch_size'], hf['num_hidden_layers']) == (16, 4, 4)
  assert hf['hidden_act'] == 'gelu_pytorch_tanh' and hf['layer_norm_eps'] == 1e-6
  with open(tmp_path / 'timm' / 'config.json') as f:
    assert json.load(f)['label_names'] == [str(i) for i in range(10)]


@pytest.mark.parametrize('options', [
    dict(classifier='gap'),
    dict(classifier='map', posemb='sincos2d'),
    dict(classifier='token', posemb='learn2d'),
], ids=lambda o: '-'.join(o.values()))
def test_gap_map_and_fixed_position_models_in_timm(tmp_path, torch_side, options):
  """GAP and MAP heads go to timm; transformers' ViT (class token only) refuses them, naming
  the option and timm. Fixed and 2D position embeddings become a table of the same values
  (sin-cos ones, which the weights do not show, need posemb and image_size, as in predict)."""
  model = models.get_model('testing', num_classes=4, **options)
  params = workdirs.random_params(model, 24)
  checkpoint.save_npz(params, str(tmp_path / 'w.npz'))
  images = _images(24)
  ours = _ours(model, params, images)
  posemb = 'sincos2d' if options.get('posemb') == 'sincos2d' else ''
  export_options = dict(posemb=posemb, image_size=24)
  checkpoint.export(str(tmp_path / 'w.npz'), 'timm', str(tmp_path / 'timm'), **export_options)
  _assert_equal_logits(torch_side('timm', images, str(tmp_path / 'timm')), ours)
  if options['classifier'] == 'token':
    checkpoint.export(str(tmp_path / 'w.npz'), 'hf', str(tmp_path / 'hf'), **export_options)
    _assert_equal_logits(torch_side('hf', images, str(tmp_path / 'hf')), ours)
  else:
    with pytest.raises(ValueError, match=rf"^--to=hf cannot hold .*w.npz: classifier="
                       rf"'{options['classifier']}' \(.*\): .* classifies the class token only; "
                       r'--to=timm holds it$'):
      checkpoint.export(str(tmp_path / 'w.npz'), 'hf', str(tmp_path / 'hf'), **export_options)
    assert not (tmp_path / 'hf').exists()  # refused before anything was written


def test_qk_norm_goes_to_timm_and_transformers_refuses_it(tmp_path, torch_side):
  """ViT-22B's LayerNorm on queries and keys is timm's qk_norm (q_norm, k_norm over the head's
  features); the file reads back into the same parameters."""
  model = models.get_model('testing', num_classes=4, qk_norm=True)
  params = workdirs.random_params(model, 16)
  checkpoint.save_npz(params, str(tmp_path / 'w.npz'))
  images = _images(16)
  checkpoint.export(str(tmp_path / 'w.npz'), 'timm', str(tmp_path / 'timm'))
  _assert_equal_logits(torch_side('timm', images, str(tmp_path / 'timm')), _ours(model, params,
                                                                               images))
  loaded = checkpoint.load(str(tmp_path / 'timm' / 'model.safetensors'), num_heads=2)
  np.testing.assert_array_equal(
      loaded['Transformer']['encoderblock_1']['MultiHeadDotProductAttention_1']['key_norm'][
          'bias'],
      params['Transformer']['encoderblock_1']['MultiHeadDotProductAttention_1']['key_norm'][
          'bias'])
  with pytest.raises(ValueError, match=r"qk_norm=True \(LayerNorm on queries and keys\): "
                     r"transformers' .* has none; --to=timm holds it$"):
    checkpoint.export(str(tmp_path / 'w.npz'), 'hf', str(tmp_path / 'hf'))


def _run_export(argv, capsys):
  return programs.run_main(export.main, ['export'] + argv, capsys)


def test_scanned_bf16_workdir_through_the_command(tmp_path, capsys, torch_side):
  """A run with scanned layers and bfloat16 params, exported by the command: float32 files
  (bfloat16 values are exact in float32) computing what our model computes from them."""
  config = workdirs.quickstart_config('model.name=testing', 'model.scan_layers=True',
                                      'model.param_dtype=bfloat16')
  scanned = workdirs.model_of(config)
  params = workdirs.random_params(scanned, 16)
  assert 'encoderblock' in params['Transformer']
  assert params['embedding']['kernel'].dtype == jax.numpy.bfloat16
  workdirs.write(str(tmp_path / 'run'), config, params)
  unscanned = flax.traverse_util.unflatten_dict(formats.unscan(
      flax.traverse_util.flatten_dict(jax.tree.map(lambda x: np.asarray(x, np.float32), params),
                                      sep='/')), sep='/')
  images = _images(16)
  ours = _ours(workdirs.model_of(config, scan_layers=False, param_dtype='float32'), unscanned,
               images)
  for to in ('hf', 'timm'):
    status, out, err = _run_export([f'--checkpoint={tmp_path / "run"}', f'--to={to}',
                                    f'--out={tmp_path / to}'], capsys)
    assert status == 0, err
    assert out.startswith('wrote config.json') and out.strip().endswith(str(tmp_path / to))
    _assert_equal_logits(torch_side(to, images, str(tmp_path / to)), ours)
  # The files hold our weights: read back through checkpoint.load, the same float32 params.
  for to in ('hf', 'timm'):
    loaded = checkpoint.load(str(tmp_path / to / 'model.safetensors'), num_heads=2)
    for key, value in flax.traverse_util.flatten_dict(unscanned, sep='/').items():
      np.testing.assert_array_equal(
          flax.traverse_util.flatten_dict(loaded, sep='/')[key], value, err_msg=(to, key))


@pytest.mark.parametrize('options,expected', [
    (dict(posemb='relative'), "posemb='relative' (a learned bias per 2D offset in every layer): "
     "neither transformers' ViTForImageClassification nor timm's VisionTransformer has one"),
    (dict(representation_size=8), "representation_size=8 (a tanh pre-logits layer): neither "
     "transformers' ViTForImageClassification nor timm's "
     'VisionTransformer has one; fine-tune without it (init_from drops it) and export that '
     'model'),
    (dict(parallel_block=True), 'parallel_block=True (attention and MLP side by side from one '
     "LayerNorm, as ViT-22B): neither transformers' ViTForImageClassification nor timm's "
     'VisionTransformer has one'),
    (dict(use_bias=False), 'use_bias=False (LayerNorms without bias and centering, no '
     "query/key/value biases, as ViT-22B): neither transformers' ViTForImageClassification nor "
     "timm's VisionTransformer has one"),
])
def test_what_no_target_holds_is_one_line(tmp_path, capsys, options, expected):
  model = models.get_model('testing', num_classes=3, **options)
  checkpoint.save_npz(workdirs.random_params(model, 16), str(tmp_path / 'w.npz'))
  status, out, err = _run_export([f'--checkpoint={tmp_path / "w.npz"}', '--to=timm',
                                  f'--out={tmp_path / "out"}'], capsys)
  assert (status, out) == (1, '')
  assert err == f'error: --to=timm cannot hold {tmp_path / "w.npz"}: {expected}\n'
  assert not (tmp_path / 'out').exists()


def test_command_errors_are_one_line(tmp_path, capsys):
  (tmp_path / 'notes.txt').write_text('not weights\n')
  status, _, err = _run_export([f'--checkpoint={tmp_path / "notes.txt"}', '--to=hf',
                                f'--out={tmp_path / "out"}'], capsys)
  assert status == 1 and err.count('\n') == 1 and err.startswith(
      f'error: {tmp_path / "notes.txt"} is not a weights file')
  status, _, err = _run_export([f'--checkpoint={tmp_path / "gone.npz"}', '--to=hf',
                                f'--out={tmp_path / "out"}'], capsys)
  assert (status, err) == (1, f'error: {tmp_path / "gone.npz"}: no such file or directory\n')
