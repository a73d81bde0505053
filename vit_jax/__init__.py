"""vit_jax: Vision Transformers in JAX/Flax."""
# Before anything reads its environment: point tensorstore / epath at a GCS emulator if one is set.
from vit_jax.storage import paths  # noqa: F401  pylint: disable=unused-import
from vit_jax.cli import startup

# JAX on the CPU alone where no TPU or GPU is attached (and the user chose no platform): else
# libtpu, installed by the [tpu] extra for compiling, probes for TPUs at the first JAX call and
# prints its failures, in plain Python as in the programs.
startup.cpu_only_without_accelerators()
