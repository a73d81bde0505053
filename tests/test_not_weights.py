"""Files that are not weights: each error names the file, what was expected and what was found."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint, models
from vit_jax.train import preflight, trainer

# Never a hint to unpickle (numpy's own message suggests loading "unsafely" when trusted).
UNSAFE_HINTS = ('allow_pickle', 'unsafe', 'trust')


def _error(path) -> str:
  with pytest.raises(ValueError) as info:
    checkpoint.load(str(path))
  message = str(info.value)
  assert str(path) in message
  assert not any(hint in message for hint in UNSAFE_HINTS), message
  return message


def test_text_and_random_bytes_say_what_was_expected_and_found(tmp_path):
  (tmp_path / 'notes.npz').write_text('these are my notes\nline two\n')
  message = _error(tmp_path / 'notes.npz')
  assert 'expected a .npz of named arrays' in message
  assert "found text starting 'these are my notes'" in message
  (tmp_path / 'noise.bin').write_bytes(bytes(range(200, 256)) * 4)
  assert 'found binary data starting' in _error(tmp_path / 'noise.bin')
  (tmp_path / 'empty.npz').write_bytes(b'')
  assert 'found an empty file' in _error(tmp_path / 'empty.npz')


def test_garbage_safetensors_and_a_single_npy(tmp_path):
  (tmp_path / 'model.safetensors').write_bytes(b'\xff' * 100)
  assert 'is not a valid .safetensors file' in _error(tmp_path / 'model.safetensors')
  np.save(tmp_path / 'kernel.npy', np.zeros(3))
  assert 'is a single .npy array; expected a .npz' in _error(tmp_path / 'kernel.npy')


def test_pickled_entries_are_refused_by_name_and_missing_keys_listed(tmp_path):
  np.savez(tmp_path / 'objects.npz', **{'embedding/kernel': np.array([{'a': 1}], dtype=object)})
  message = _error(tmp_path / 'objects.npz')
  assert "entry 'embedding/kernel' is not a numeric array" in message
  np.savez(tmp_path / 'partial.npz', **{'embedding/kernel': np.zeros((4, 4, 3, 8)),
                                        'Transformer/encoderblock_0/LayerNorm_0/scale': np.ones(8)})
  message = _error(tmp_path / 'partial.npz')
  assert 'is not a ViT or BiT checkpoint in a known layout' in message
  assert "'Transformer/encoder_norm/scale'" in message
  assert "'Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel'" in message


def test_a_directory_without_a_checkpoint_is_named(tmp_path):
  message = _error(tmp_path)
  assert 'is a directory without a complete training checkpoint' in message
  assert 'init_from' not in message  # the flag that was used is the caller's to say


def test_init_from_names_the_config_key_and_the_file(quickstart_config, tmp_path):
  (tmp_path / 'notes.txt').write_text('not weights\n')
  quickstart_config.init_from = str(tmp_path / 'notes.txt')
  with pytest.raises(preflight.PreflightError) as info:
    trainer.train_and_evaluate(quickstart_config, str(tmp_path / 'run'))
  assert str(info.value).startswith(f'config.init_from: {tmp_path / "notes.txt"} is not a '
                                    'weights file: expected a .npz of named arrays')
  assert not (tmp_path / 'run').exists()  # stopped before anything was written


def test_init_from_of_another_architecture_is_said_in_two_lines(quickstart_config, tmp_path):
  other = models.get_model('ViT-Ti_16', num_classes=10)
  params = other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  checkpoint.save_npz(params, str(tmp_path / 'model.npz'))
  quickstart_config.init_from = str(tmp_path / 'model.npz')
  with pytest.raises(preflight.PreflightError) as info:
    trainer.train_and_evaluate(quickstart_config, str(tmp_path / 'run'))
  lines = str(info.value).splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'config.init_from: cannot load {tmp_path / "model.npz"} into '
                             'this model: shape mismatch for ')
  assert 'more: does config.model match' in lines[0]
  assert not (tmp_path / 'run').exists()
