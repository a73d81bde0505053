"""Few-shot linear evaluation on frozen features (as big_vision runs during pretraining).

For k shots per class, a regularised least-squares map from centred features to {-1, 1}^K
targets is solved in closed form; test accuracy is averaged over several random draws of the
k examples.
"""
import numpy as np


def select_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """Indices of `shots` random examples of every class present in `labels`."""
  rng = np.random.RandomState(seed)
  picked = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      raise ValueError(f'few-shot: class {c} has {len(members)} examples, fewer than {shots} shots')
    picked.append(rng.choice(members, shots, replace=False))
  return np.sort(np.concatenate(picked))


def fit_linear(features: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float):
  """(W, b) minimising |X W + b - T|^2 + l2_reg |W|^2 with T = 2 * onehot - 1.

  The bias is left unregularised by centring: b = mean(T) - mean(X) W.
  """
  x = features.astype(np.float64)
  targets = 2. * np.eye(num_classes)[labels] - 1.
  x_mean, t_mean = x.mean(0), targets.mean(0)
  xc = x - x_mean
  gram = xc.T @ xc + l2_reg * np.eye(x.shape[1])
  w = np.linalg.solve(gram, xc.T @ (targets - t_mean))
  return w, t_mean - x_mean @ w


def fewshot_accuracy(train_features, train_labels, test_features, test_labels, *,
                     num_classes: int, l2_reg: float) -> float:
  w, b = fit_linear(train_features, train_labels, num_classes, l2_reg)
  predictions = np.argmax(test_features.astype(np.float64) @ w + b, axis=1)
  return float(np.mean(predictions == test_labels))
