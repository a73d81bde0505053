"""The predict command: top-k classes for PNG files, with labels."""
import json
import re

import flax.linen as nn
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from tests import programs, workdirs
from vit_jax import checkpoint, models, predict
from vit_jax.weights import labels, model_from_weights
from vit_jax.data import ops
from vit_jax.models import mae


def test_predict_top5_matches_the_model_on_pngs(tmp_path, capsys):
  model = models.get_model('testing', num_classes=7, representation_size=8)
  params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)))['params'])
  rng = np.random.RandomState(0)
  params['head'] = {'kernel': rng.standard_normal((8, 7)).astype(np.float32),
                    'bias': rng.standard_normal(7).astype(np.float32)}
  checkpoint.save_npz(params, str(tmp_path / 'model.npz'))
  pixels = rng.randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  paths = []
  for i, image in enumerate(pixels):
    paths.append(str(tmp_path / f'img{i}.png'))
    Image.fromarray(image).save(paths[-1])
  labels = [f'class_{c}' for c in range(7)]
  (tmp_path / 'labels.txt').write_text('\n'.join(labels) + '\n')

  results, skipped = predict.predict(str(tmp_path / 'model.npz'), 'testing', paths,
                                     labels=labels)
  assert not skipped
  # Independently: same pixels scaled to [-1, 1] (16x16 PNGs need no resize).
  probs = jax.nn.softmax(model.apply({'params': params}, pixels / 127.5 - 1.))
  for top, row in zip(results.values(), np.asarray(probs)):
    expected = np.argsort(-row)[:5]
    assert [c for c, _, _ in top] == list(expected)
    np.testing.assert_allclose([p for _, p, _ in top], row[expected], rtol=1e-4)
    assert [name for _, _, name in top] == [labels[c] for c in expected]

  flags.FLAGS.unparse_flags()
  argv = flags.FLAGS(['predict', f'--checkpoint={tmp_path / "model.npz"}', '--model=testing',
                      f'--labels={tmp_path / "labels.txt"}', '--top_k=2'] + paths)
  predict.main(argv)
  printed = capsys.readouterr().out.splitlines()
  assert printed[0] == paths[0] and len(printed) == 6
  assert printed[1].split()[-1] == labels[results[paths[0]][0][0]]


def _run(argv, capsys):
  """`python -m vit_jax.predict ARGV` in this process: (exit status, stdout, stderr)."""
  return programs.run_main(predict.main, ['predict'] + argv, capsys)


def _pngs(tmp_path, n=2):
  pixels = np.random.RandomState(1).randint(0, 256, (n, 16, 16, 3)).astype(np.uint8)
  paths = [str(tmp_path / f'digit{i}.png') for i in range(n)]
  for path, image in zip(paths, pixels):
    Image.fromarray(image).save(path)
  return pixels, paths


def test_predict_resizes_position_embeddings_to_image_size(tmp_path):
  model = models.get_model('testing', num_classes=4)
  params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)))['params'])
  checkpoint.save_npz(params, str(tmp_path / 'model.npz'))
  built, resized, size = model_from_weights.build(str(tmp_path / 'model.npz'), image_size=24)
  assert size == 24 and built.num_layers == 2 and built.hidden_size == 16
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(resized['Transformer']['posembed_input']['pos_embedding'],
                             checkpoint.resize_posemb(posemb, 37))  # 6x6 patches + class token


def test_predict_says_what_is_wrong_with_its_inputs(tmp_path, capsys):
  encoder = mae.get_model('mae', 'testing')
  mae_params = nn.unbox(encoder.init(jax.random.key(0), np.zeros((1, 16, 16, 3)))['params'])
  checkpoint.save_npz(mae_params, str(tmp_path / 'mae.npz'))
  _, paths = _pngs(tmp_path, 1)
  status, _, err = _run([f'--checkpoint={tmp_path / "mae.npz"}', paths[0]], capsys)
  assert status == 1 and 'has no classifier head' in err
  assert 'self-supervised' in err and f'--config.init_from={tmp_path / "mae.npz"}' in err

  status, _, err = _run([f'--checkpoint={tmp_path}', paths[0]], capsys)
  assert status == 1
  assert err.startswith(f'error: {tmp_path} is a directory without a complete')

  missing = tmp_path / 'labels.txt'
  status, _, err = _run([f'--checkpoint={tmp_path / "mae.npz"}', f'--labels={missing}',
                         paths[0]], capsys)
  assert (status, err) == (
      1, f'error: --labels={missing}: no such file, and no tfds dataset of that name\n')

  status, _, err = _run([f'--checkpoint={tmp_path / "mae.npz"}', '--top_k=0', paths[0]], capsys)
  assert (status, err) == (1, 'error: --top_k=0: show at least one class\n')
  status, _, err = _run([f'--checkpoint={tmp_path / "gone.npz"}', paths[0]], capsys)
  assert (status, err) == (1, f'error: {tmp_path / "gone.npz"}: no such file or directory\n')
  (tmp_path / 'two.txt').write_text('cat\ndog\n')
  classifier = models.get_model('testing', num_classes=7)
  checkpoint.save_npz(workdirs.random_params(classifier, 16), str(tmp_path / 'model.npz'))
  status, _, err = _run([f'--checkpoint={tmp_path / "model.npz"}',
                         f'--labels={tmp_path / "two.txt"}', paths[0]], capsys)
  assert (status, err) == (1, 'error: --labels gives 2 names for its 7-class head\n')


def test_imagenet_labels_are_class_names_not_wordnet_ids(tmp_path, monkeypatch):
  # The class index as keras publishes it, already fetched into the cache.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  (tmp_path / 'vit_jax').mkdir()
  (tmp_path / 'vit_jax' / 'imagenet_class_index.json').write_text(json.dumps(
      {'0': ['n01440764', 'tench'], '1': ['n01443537', 'goldfish'],
       '999': ['n15075141', 'toilet_tissue']}))
  names = labels.read_labels('imagenet2012')
  assert len(names) == 1000
  assert (names[0], names[1], names[999]) == ('tench', 'goldfish', 'toilet tissue')


def test_class_names_tfds_does_not_know_yet_are_refused_not_made_up(tmp_path, monkeypatch,
                                                                   capsys):
  """Offline, tfds learns cifar10's class names when it prepares the dataset; until then it
  gives the indices '0'..'9' as names, which predict printed as class names."""
  data_dir = tmp_path / 'tensorflow_datasets'  # nothing prepared there
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', str(data_dir))
  model = models.get_model('testing', num_classes=10)
  checkpoint.save_npz(workdirs.random_params(model, 16), str(tmp_path / 'model.npz'))
  _, paths = _pngs(tmp_path, 1)
  status, out, err = _run([f'--checkpoint={tmp_path / "model.npz"}', '--labels=cifar10',
                           *paths], capsys)
  assert (status, out) == (1, '')
  assert re.fullmatch(
      rf'error: --labels=cifar10: tfds knows the class names of cifar10 only once it is '
      rf'prepared, and it is not in {data_dir}/cifar10/[\d.]+: prepare it \(tfds build cifar10\) '
      r'or give a text file with one name per line\n', err), err


def test_a_folder_stands_for_its_images_and_the_rest_are_named(tmp_path, capsys):
  model = models.get_model('testing', num_classes=3)
  checkpoint.save_npz(workdirs.random_params(model, 16), str(tmp_path / 'model.npz'))
  (tmp_path / 'photos').mkdir()
  pixels, _ = _pngs(tmp_path / 'photos', 2)
  (tmp_path / 'photos' / 'notes.txt').write_text('not an image')
  status, out, err = _run([f'--checkpoint={tmp_path / "model.npz"}', '--top_k=1',
                           str(tmp_path / 'photos')], capsys)
  assert status == 1  # one file skipped, the others classified
  assert out.splitlines()[::2] == [str(tmp_path / 'photos' / f'digit{i}.png') for i in range(2)]
  assert err.startswith(f'{tmp_path / "photos" / "notes.txt"}: skipped, not a decodable image')
  assert err.count('\n') == 1
  expected = np.argmax(model.apply({'params': checkpoint.load(str(tmp_path / 'model.npz'))},
                                   pixels / 127.5 - 1.), axis=-1)
  assert [int(line.split()[1]) for line in out.splitlines()[1::2]] == list(expected)


def test_a_runs_pp_eval_and_sigmoid_scores(tmp_path):
  """A multi-label run whose pp_eval crops: predict preprocesses as the run evaluated (label
  ops left out) and scores each class by its sigmoid."""
  pp_eval = 'decode|resize_small(16)|central_crop(16)|value_range(-1, 1)|onehot(10)'
  config = workdirs.quickstart_config('model.name=testing', 'loss=sigmoid_xent',
                                      f'pp_eval={pp_eval}')
  model = workdirs.model_of(config)
  params = workdirs.random_params(model, 16)
  workdirs.write(str(tmp_path / 'run'), config, params)
  image = str(tmp_path / 'wide.png')
  Image.fromarray(np.random.RandomState(2).randint(0, 256, (16, 28, 3), np.uint8)).save(image)

  results, skipped = predict.predict(str(tmp_path / 'run'), None, [image], top_k=10)
  assert not skipped
  def preprocessed(pp):
    with open(image, 'rb') as f:
      data = ops.get_preprocess_fn(pp)({'image': tf.constant(f.read())})
    return data['image'].numpy()[None]
  cropped = preprocessed(pp_eval.replace('|onehot(10)', ''))
  logits = model.apply({'params': params}, cropped)[0]
  scores = np.asarray(jax.nn.sigmoid(logits))
  got = {c: p for c, p, _ in results[image]}
  np.testing.assert_allclose([got[c] for c in range(10)], scores, rtol=1e-5)
  assert abs(sum(got.values()) - 1) > 0.1  # not a softmax
  squashed = model.apply({'params': params}, preprocessed('decode|resize(16)|value_range(-1, 1)'))
  assert np.abs(np.asarray(jax.nn.sigmoid(squashed[0])) - scores).max() > 1e-3

