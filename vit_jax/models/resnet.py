"""The hybrid's ResNet stem (BiT-style): weight-standardised convs + GroupNorm bottlenecks.

Names follow the released R50+ViT checkpoints: `conv_root`, `gn_root`,
`block{s}/unit{u}/{conv1,gn1,conv2,gn2,conv3,gn3}` and, where the shape or stride changes,
`conv_proj`/`gn_proj`. Conv and GroupNorm params are small and stay replicated.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
_REPLICATED_4D = (None, None, None, None)


class StdConv(nn.Conv):
  """Conv with weight standardisation (zero mean, unit variance per output filter)."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    param = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == 'kernel':
      mean = jnp.mean(param, axis=(0, 1, 2), keepdims=True)
      var = jnp.var(param, axis=(0, 1, 2), keepdims=True)
      param = (param - mean) / jnp.sqrt(var + 1e-5)
    return param


def _conv(features, kernel, strides, name, dtype, param_dtype):
  return StdConv(features, kernel, strides, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                 name=name, kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(), _REPLICATED_4D))


def _group_norm(name, dtype, param_dtype, zero_scale=False):
  scale = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                      name=name, scale_init=nn.with_logical_partitioning(scale, (None,)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (4x features), projection shortcut if needed."""
  features: int
  strides: tuple = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: _conv(f, k, s, name, self.dtype, self.param_dtype)  # noqa: E731
    gn = lambda name, **kw: _group_norm(name, self.dtype, self.param_dtype, **kw)  # noqa: E731
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = gn('gn_proj')(conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(x))
    y = nn.relu(gn('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(gn('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = gn('gn3', zero_scale=True)(conv(self.features * 4, (1, 1), (1, 1), 'conv3')(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`units` bottleneck units; the first one strides."""
  units: int
  features: int
  first_strides: tuple
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for u in range(self.units):
      x = ResidualUnit(self.features, self.first_strides if u == 0 else (1, 1), self.dtype,
                       self.param_dtype, name=f'unit{u + 1}')(x)
    return x


def stem(x, stage_sizes: tuple, width_factor: int, dtype, param_dtype):
  """Root conv + max-pool (stride 4), then one stage per entry (each after the first halves
  the resolution). Called inside the parent's compact method, so the names sit at its top level,
  as in the released checkpoints."""
  width = 64 * width_factor
  x = _conv(width, (7, 7), (2, 2), 'conv_root', dtype, param_dtype)(x)
  x = nn.relu(_group_norm('gn_root', dtype, param_dtype)(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for s, units in enumerate(stage_sizes):
    x = ResNetStage(units, width * 2**s, (2, 2) if s else (1, 1), dtype, param_dtype,
                    name=f'block{s + 1}')(x)
  return x
