"""The predict command: top-k classes for PNG files, with labels."""
import flax.linen as nn
import jax
import numpy as np
from absl import flags
from PIL import Image

from vit_jax import checkpoint, models, predict


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

  results = predict.predict(str(tmp_path / 'model.npz'), 'testing', paths, labels=labels)
  # Independently: same pixels scaled to [-1, 1] (16x16 PNGs need no resize).
  probs = jax.nn.softmax(model.apply({'params': params}, pixels / 127.5 - 1.))
  for top, row in zip(results, np.asarray(probs)):
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
  assert printed[1].split()[-1] == labels[results[0][0][0]]
