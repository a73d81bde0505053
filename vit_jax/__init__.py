"""vit_jax: Vision Transformers in JAX/Flax."""
