"""The checkpoint API in one import (`from vit_jax import checkpoint`): training state (Orbax,
`vit_jax.weights.train_state`), weights files (released formats, transfer:
`vit_jax.weights.files`) and export to PyTorch libraries (`export(path, to='hf' | 'timm',
out=DIR)`: `vit_jax.weights.torch_formats`).
"""
# pylint: disable=unused-import
from vit_jax.weights.files import load, load_pretrained, resize_posemb, save_npz  # noqa: F401
from vit_jax.weights.torch_formats import export  # noqa: F401
from vit_jax.weights.train_state import (  # noqa: F401
    RUN_CONFIG, flat_shapes, latest_complete_step, make_manager, read_run_config, restore_params,
    restore_state, save_state, saved_param_shapes, write_run_config)
