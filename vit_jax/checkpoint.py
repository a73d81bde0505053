"""The checkpoint API in one import (`from vit_jax import checkpoint`): training state
(Orbax, `vit_jax.train_state`), weights files (released formats, transfer: `vit_jax.weights`)
and export to PyTorch libraries (`export(path, to='hf' | 'timm', out=DIR)`:
`vit_jax.torch_formats`).
"""
# pylint: disable=unused-import
from vit_jax.torch_formats import export  # noqa: F401
from vit_jax.train_state import (RUN_CONFIG, flat_shapes, latest_complete_step,  # noqa: F401
                                 make_manager, read_run_config, restore_params, restore_state,
                                 save_state, saved_param_shapes, write_run_config)
from vit_jax.weights import load, load_pretrained, resize_posemb, save_npz  # noqa: F401
