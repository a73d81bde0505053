"""Weights in and out: a run's Orbax checkpoints (`train_state`), released files and transfer
(`files` over the key layouts in `formats`), the model a file holds (`model_from_weights`),
class names (`labels`), export to transformers / timm (`torch_formats`). `vit_jax.checkpoint`
is the one import users need."""
