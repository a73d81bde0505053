"""vit_jax: Vision Transformers in JAX/Flax."""
# Before anything reads its environment: point tensorstore / epath at a GCS emulator if one is set.
from vit_jax.storage import paths  # noqa: F401  pylint: disable=unused-import
