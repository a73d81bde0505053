"""Model family: `get_model(name, **overrides)`."""
from vit_jax.models.registry import get_model, model_config, pixels_per_token

__all__ = ['get_model', 'model_config', 'pixels_per_token']
