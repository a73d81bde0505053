import jax
import numpy as np
import pytest

from vit_jax.data import pipeline
from vit_jax.train import evaluators, fewshot, trainer


def test_fit_matches_independent_least_squares():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(40, 6))
  y = rng.randint(0, 4, 40)
  l2 = 3.0
  w, b = fewshot.fit_linear(x, y, 4, l2)
  # Independent solution: an unregularised bias column, ridge rows for the weights only.
  targets = 2. * np.eye(4)[y] - 1.
  a = np.block([[x, np.ones((40, 1))], [np.sqrt(l2) * np.eye(6), np.zeros((6, 1))]])
  t = np.concatenate([targets, np.zeros((6, 4))])
  solution = np.linalg.lstsq(a, t, rcond=None)[0]
  np.testing.assert_allclose(w, solution[:6], rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(b, solution[6], rtol=1e-8, atol=1e-10)


def test_separable_features_give_perfect_fewshot_accuracy():
  rng = np.random.RandomState(1)
  centres = 10. * np.eye(5)
  labels = rng.randint(0, 5, 200)
  features = centres[labels] + rng.normal(scale=0.1, size=(200, 5))
  idx = fewshot.select_shots(labels, 2, seed=0)
  assert len(idx) == 10 and sorted(np.bincount(labels[idx])) == [2] * 5
  assert fewshot.fewshot_accuracy(features[idx], labels[idx], features, labels,
                                  num_classes=5, l2_reg=1e-3) == 1.0
  with pytest.raises(ValueError, match='fewer than 500 shots'):
    fewshot.select_shots(labels, 500, seed=0)


def test_fewshot_evaluator_on_digits(quickstart_config):
  config = quickstart_config
  config.fewshot = dict(dataset='sklearn_digits', name='digits', train_split='train',
                        test_split='test[:100]', shots=[1, 5], seeds=2, l2_reg=1.0,
                        pp='decode|resize(16)|value_range(-1, 1)|onehot(10)')
  training = trainer.build(config)
  state = training.init_fn(jax.random.key(0))
  evals = evaluators.build(config, training.model, training.mesh, training.state_sharding.params)
  assert [type(e).__name__ for e in evals] == ['ClassificationEvaluator', 'FewShotEvaluator']
  results = evals[1].run(state.params)
  # The features stay split over the batch on the devices (each holds its own rows), not
  # all-gathered onto every one of the 8.
  _, batches = pipeline.eval_batches(evals[1].data_config, training.mesh, 'test[:100]')
  features, _, _ = evals[1]._features(state.params, next(iter(batches)))
  assert not features.sharding.is_fully_replicated
  assert features.addressable_shards[0].data.shape[0] == features.shape[0] // 8
  assert set(results) == {'fewshot_digits_1shot', 'fewshot_digits_5shot'}
  # Even random features of a ViT separate digits well above chance (0.1) with 5 shots.
  assert 0.2 < results['fewshot_digits_5shot'] <= 1.0
