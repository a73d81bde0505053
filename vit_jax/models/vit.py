"""Vision Transformer (Dosovitskiy et al. 2021) in Flax linen.

Module and parameter names follow the released vit_jax checkpoints
(`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/kernel`, ...), so those
weights load without renaming. Every parameter carries logical axis names; `vit_jax.sharding`
maps them to mesh axes.
"""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Logical axis names used on parameters (see vit_jax/sharding.py for the rules).
EMBED, MLP, HEADS, KV, CLASSES = 'embed', 'mlp', 'heads', 'kv', 'classes'


def _param_init(init: Callable, axes: tuple) -> Callable:
  return nn.with_logical_partitioning(init, axes)


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2D sin-cos position embeddings, (1, h*w, dim): y and x each get dim/2 channels."""
  if dim % 4:
    raise ValueError(f'sincos2d position embeddings need a width divisible by 4, got {dim}')
  y, x = np.mgrid[:h, :w]
  omega = 1. / temperature**(np.arange(dim // 4) / (dim // 4 - 1 or 1))
  y = np.einsum('m,d->md', y.reshape(-1), omega)
  x = np.einsum('m,d->md', x.reshape(-1), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class AddPositionEmbs(nn.Module):
  """Adds learned 1D position embeddings to a (B, N, D) sequence."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param(
        'pos_embedding', _param_init(nn.initializers.normal(stddev=0.02), (None, None, EMBED)),
        (1, x.shape[1], x.shape[2]), self.param_dtype)
    return x + pos_embedding.astype(x.dtype)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name='Dense_0',
                 kernel_init=_param_init(nn.initializers.xavier_uniform(), (EMBED, MLP)),
                 bias_init=_param_init(nn.initializers.normal(stddev=1e-6), (MLP,)))(x)
    x = nn.gelu(x)  # tanh approximation, as the released JAX models were trained with
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name='Dense_1',
                 kernel_init=_param_init(nn.initializers.xavier_uniform(), (MLP, EMBED)),
                 bias_init=_param_init(nn.initializers.normal(stddev=1e-6), (EMBED,)))(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the released layout: q/k/v kernels (D, heads, D/heads)."""
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by num_heads={self.num_heads}')
    head_dim = d // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=_param_init(nn.initializers.xavier_uniform(), (EMBED, HEADS, KV)),
        bias_init=_param_init(nn.initializers.zeros, (HEADS, KV)))
    q, k, v = dense('query')(x), dense('key')(x), dense('value')(x)
    if self.dropout_rate > 0. and not deterministic:
      # jax.nn.dot_product_attention has no dropout: spell attention out when it is needed.
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(q.dtype)
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v)
    return nn.DenseGeneral(
        d, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype, name='out',
        kernel_init=_param_init(nn.initializers.xavier_uniform(), (HEADS, KV, EMBED)),
        bias_init=_param_init(nn.initializers.zeros, (EMBED,)))(out)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _drop_path(self, y, deterministic: bool):
    """Stochastic depth: drop the whole residual branch per example."""
    if deterministic or self.stochastic_depth == 0.:
      return y
    keep = 1. - self.stochastic_depth
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, jnp.zeros_like(y))

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    ln = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        scale_init=_param_init(nn.initializers.ones, (EMBED,)),
        bias_init=_param_init(nn.initializers.zeros, (EMBED,)))
    y = ln('LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, self.dtype, self.param_dtype,
        name='MultiHeadDotProductAttention_1')(y, deterministic=deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + self._drop_path(y, deterministic)
    y = ln('LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype,
                 name='MlpBlock_3')(y, deterministic=deterministic)
    return x + self._drop_path(y, deterministic)


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks, final LayerNorm."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  posemb: str = 'learn'
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.posemb == 'learn':
      x = AddPositionEmbs(self.param_dtype, name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i in range(self.num_layers):
      # Linearly increasing drop rate over depth (Huang et al. 2016).
      sd = self.stochastic_depth * i / max(self.num_layers - 1, 1)
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout_rate,
                         self.attention_dropout_rate, sd, self.dtype, self.param_dtype,
                         name=f'encoderblock_{i}')(x, deterministic=not train)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                        name='encoder_norm',
                        scale_init=_param_init(nn.initializers.ones, (EMBED,)),
                        bias_init=_param_init(nn.initializers.zeros, (EMBED,)))(x)


class VisionTransformer(nn.Module):
  """ViT. Input NHWC images in [-1, 1]; output (B, num_classes) logits.

  classifier: 'token' (class token), 'gap' (mean of tokens), or 'unpooled' (all tokens).
  num_classes=None returns the pooled (pre-logits) representation.
  """
  num_classes: Optional[int]
  patch_size: int
  hidden_size: int
  num_layers: int
  mlp_dim: int
  num_heads: int
  classifier: str = 'token'
  posemb: str = 'learn'
  representation_size: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    for key, value, allowed in (('classifier', self.classifier, ('token', 'gap', 'unpooled')),
                                ('posemb', self.posemb, ('learn', 'sincos2d', 'none'))):
      if value not in allowed:
        raise ValueError(f'unknown {key}={value!r}; choose one of {allowed}')

  def embed(self, images):
    """Patchify + project: (B, H, W, C) -> (B, h, w, D)."""
    p = self.patch_size
    return nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                   dtype=self.dtype, param_dtype=self.param_dtype, name='embedding',
                   kernel_init=_param_init(nn.initializers.lecun_normal(),
                                           (None, None, None, EMBED)),
                   bias_init=_param_init(nn.initializers.zeros, (EMBED,)))(images)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = self.embed(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if self.posemb == 'sincos2d':
      x = x + jnp.asarray(posemb_sincos_2d(h, w, d), x.dtype)
    if self.classifier == 'token':
      cls = self.param('cls', _param_init(nn.initializers.zeros, (None, None, EMBED)),
                       (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    x = Encoder(self.num_layers, self.mlp_dim, self.num_heads,
                'learn' if self.posemb == 'learn' else 'none', self.dropout_rate,
                self.attention_dropout_rate, self.stochastic_depth, self.dtype,
                self.param_dtype, name='Transformer')(x, train=train)
    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = x.mean(axis=1)
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='pre_logits',
                           kernel_init=_param_init(nn.initializers.lecun_normal(),
                                                   (EMBED, MLP)),
                           bias_init=_param_init(nn.initializers.zeros, (MLP,)))(x))
    if self.num_classes is None or self.classifier == 'unpooled':
      return x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='head',
                      kernel_init=_param_init(nn.initializers.zeros, (EMBED, CLASSES)),
                      bias_init=_param_init(nn.initializers.constant(self.head_bias_init),
                                            (CLASSES,)))(x)
    return logits.astype(jnp.float32)
