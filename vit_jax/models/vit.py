"""Vision Transformer (Dosovitskiy et al. 2021) in Flax linen.

Module and parameter names follow the released vit_jax checkpoints
(`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/query/kernel`, ...), so those
weights load without renaming; the MAP head uses big_vision's names (`MAPHead_0/probe`, ...).
Every parameter carries logical axis names; `vit_jax.scale.sharding` maps them to mesh axes. With
`scan_layers=True` the blocks are one `nn.scan` whose params are stacked under
`Transformer/encoderblock/...` with a leading 'layers' axis (big_vision's scanned layout).
Activations are constrained by logical names too (`ACT_*`), so that under FSDP they stay split
over the batch and only weights move between devices: each encoder block gathers its own layer's
weights before it computes (`_reading_gathered`).
"""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.scale import sharding
from vit_jax.models import resnet

Dtype = Any

# Logical axis names used on parameters (see vit_jax/scale/sharding.py for the rules). LAYERS leads
# the stacked params of scanned blocks and is mapped to no mesh axis.
EMBED, MLP, HEADS, KV, CLASSES, LAYERS = 'embed', 'mlp', 'heads', 'kv', 'classes', 'layers'
# ... and on activations.
ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_MLP, ACT_HEADS, ACT_KV, ACT_CLASSES = (
    'activation_batch', 'activation_length', 'activation_embed', 'activation_mlp',
    'activation_heads', 'activation_kv', 'activation_classes')
TOKENS = (ACT_BATCH, ACT_LENGTH, ACT_EMBED)  # a (B, N, D) sequence

CLASSIFIERS = ('token', 'gap', 'map', 'unpooled')
POSEMBS = ('learn', 'learn2d', 'sincos2d', 'relative', 'none')
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'nothing_saveable', 'everything_saveable')


def _param_init(init: Callable, axes: tuple) -> Callable:
  return nn.with_logical_partitioning(init, axes)


def layer_norm(name: str, dtype, param_dtype, use_bias: bool = True, axis: str = EMBED):
  """LayerNorm (eps 1e-6) over the last axis, whose logical name is `axis`. use_bias=False is
  ViT-22B's: neither bias nor centering (Zhang & Sennrich's RMS normalization), a scale only."""
  scale_init = _param_init(nn.initializers.ones, (axis,))
  if not use_bias:
    return nn.RMSNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=scale_init)
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=scale_init,
                      bias_init=_param_init(nn.initializers.zeros, (axis,)))


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


def relative_offsets(h: int, w: int) -> np.ndarray:
  """(h*w, h*w, 2) index into a (2h-1, 2w-1) table of every query-key 2D offset."""
  y, x = np.mgrid[:h, :w]
  pos = np.stack([y.reshape(-1), x.reshape(-1)], axis=-1)
  return pos[:, None, :] - pos[None, :, :] + np.array([h - 1, w - 1])


def remat_policy(name: str):
  """Maps a config string to a jax.checkpoint policy ('full' saves nothing)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f'unknown remat_policy={name!r}; choose one of {REMAT_POLICIES}')
  return None if name == 'full' else getattr(jax.checkpoint_policies, name)


class AddPositionEmbs(nn.Module):
  """Adds learned 1D position embeddings to a (B, N, D) sequence."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param(
        'pos_embedding', _param_init(nn.initializers.normal(stddev=0.02), (None, None, EMBED)),
        (1, x.shape[1], x.shape[2]), self.param_dtype)
    return x + pos_embedding.astype(x.dtype)


class AddPositionEmbs2D(nn.Module):
  """The paper's 2D ablation: learned Y and X embeddings of D/2 each, concatenated per patch."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, h, w, d = x.shape
    if d % 2:
      raise ValueError(f'learn2d position embeddings need an even width, got {d}')
    init = _param_init(nn.initializers.normal(stddev=0.02), (None, None, None, EMBED))
    pe_y = self.param('pos_embedding_y', init, (1, h, 1, d // 2), self.param_dtype)
    pe_x = self.param('pos_embedding_x', init, (1, 1, w, d // 2), self.param_dtype)
    pe = jnp.concatenate([jnp.tile(pe_y, (1, 1, w, 1)), jnp.tile(pe_x, (1, h, 1, 1))], axis=-1)
    return x + pe.astype(x.dtype)


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
    x = sharding.constrain(x, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
    x = nn.gelu(x)  # tanh approximation, as the released JAX models were trained with
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name='Dense_1',
                 kernel_init=_param_init(nn.initializers.xavier_uniform(), (MLP, EMBED)),
                 bias_init=_param_init(nn.initializers.normal(stddev=1e-6), (EMBED,)))(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class MultiHeadDotProductAttention(nn.Module):
  """Attention with the released layout: q/k/v kernels (D, heads, D/heads).

  Keys/values come from `kv` (default: `x`, self-attention). With `relative_grid=(h, w)` each
  head adds a learned bias per relative 2D offset between the last h*w tokens (`relative_bias`,
  (2h-1, 2w-1, heads)); leading tokens (the class token) get none. ViT-22B's options:
  `qk_norm` normalises each head's queries and keys (`query_norm`, `key_norm`: a LayerNorm over
  the head's features, shared by the heads) before their dot product, which bounds the logits;
  `use_bias=False` drops the query/key/value biases and makes those norms bias-free.
  """
  num_heads: int
  dropout_rate: float = 0.0
  relative_grid: Optional[tuple] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qk_norm: bool = False
  use_bias: bool = True

  def _relative_bias(self, seq_len: int):
    h, w = self.relative_grid
    table = self.param('relative_bias', _param_init(nn.initializers.zeros, (None, None, HEADS)),
                       (2 * h - 1, 2 * w - 1, self.num_heads), self.param_dtype)
    offsets = relative_offsets(h, w)
    bias = table[offsets[..., 0], offsets[..., 1]]  # (hw, hw, heads)
    prefix = seq_len - h * w
    bias = jnp.pad(bias, ((prefix, 0), (prefix, 0), (0, 0)))
    return jnp.transpose(bias, (2, 0, 1))[None]  # (1, heads, T, S)

  @nn.compact
  def __call__(self, x, kv=None, *, deterministic: bool):
    kv = x if kv is None else kv
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'hidden size {d} is not divisible by num_heads={self.num_heads}')
    head_dim = d // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        use_bias=self.use_bias,
        kernel_init=_param_init(nn.initializers.xavier_uniform(), (EMBED, HEADS, KV)),
        bias_init=_param_init(nn.initializers.zeros, (HEADS, KV)))
    heads = (ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV)
    q, k, v = (sharding.constrain(dense(name)(inputs), heads)
               for name, inputs in (('query', x), ('key', kv), ('value', kv)))
    if self.qk_norm:
      q, k = (layer_norm(name, self.dtype, self.param_dtype, self.use_bias, KV)(inputs)
              for name, inputs in (('query_norm', q), ('key_norm', k)))
    bias = None
    if self.relative_grid is not None:
      bias = self._relative_bias(x.shape[1]).astype(q.dtype)
    dropout = self.dropout_rate > 0. and not deterministic
    if dropout or self.is_mutable_collection('intermediates'):
      # jax.nn.dot_product_attention has neither dropout nor its weights: spell attention out
      # when either is wanted. The weights go to `intermediates` (vit_jax.inspect reads them:
      # `model.apply(..., mutable='intermediates')`).
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      if bias is not None:
        logits = logits + bias
      weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(q.dtype)
      self.sow('intermediates', 'attention_weights', weights)
      # The largest logit: what grows when attention collapses (ViT-22B's qk_norm bounds it).
      self.sow('intermediates', 'max_attention_logit', jnp.max(logits.astype(jnp.float32)))
      if dropout:
        weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, bias=bias)
    out = sharding.constrain(out, heads)
    return nn.DenseGeneral(
        d, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype, name='out',
        kernel_init=_param_init(nn.initializers.xavier_uniform(), (HEADS, KV, EMBED)),
        bias_init=_param_init(nn.initializers.zeros, (EMBED,)))(out)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)); with `parallel_block`
  (ViT-22B, from PaLM) x + MSA(LN(x)) + MLP(LN(x)) with one LayerNorm (`LayerNorm_0`; there is
  no `LayerNorm_2`), so both branches' matmuls can run side by side.

  Called as block(x, drop_rate, deterministic) -> (x, None), the shape nn.scan needs;
  drop_rate is this layer's stochastic-depth rate (None: no drop path).
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  relative_grid: Optional[tuple] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qk_norm: bool = False
  parallel_block: bool = False
  use_bias: bool = True

  def _drop_path(self, y, drop_rate, deterministic: bool):
    """Stochastic depth: drop the whole residual branch per example."""
    if deterministic or drop_rate is None:
      return y
    keep = 1. - drop_rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep, jnp.zeros_like(y)).astype(y.dtype)

  @nn.compact
  def __call__(self, x, drop_rate, deterministic: bool):
    x = sharding.constrain(x, TOKENS)
    normed = layer_norm('LayerNorm_0', self.dtype, self.param_dtype, self.use_bias)(x)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, self.relative_grid, self.dtype,
        self.param_dtype, qk_norm=self.qk_norm, use_bias=self.use_bias,
        name='MultiHeadDotProductAttention_1')(normed, deterministic=deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    mlp = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype,
                   name='MlpBlock_3')
    if self.parallel_block:
      y = y + mlp(normed, deterministic=deterministic)
      return sharding.constrain(x + self._drop_path(y, drop_rate, deterministic), TOKENS), None
    x = x + self._drop_path(y, drop_rate, deterministic)
    y = layer_norm('LayerNorm_2', self.dtype, self.param_dtype, self.use_bias)(x)
    y = mlp(y, deterministic=deterministic)
    return sharding.constrain(x + self._drop_path(y, drop_rate, deterministic), TOKENS), None


def _reading_gathered(block: type, kwargs: dict, dtype, x) -> type:
  """`block` (an Encoder1DBlock class) reading its parameters as it computes with them:
  kernels already in the compute dtype (Dense would cast them anyway: the same numbers, half
  the bytes to gather) and every parameter whole over the fsdp axis
  (`sharding.gathered_over_fsdp`), by the logical names a block's own init gives them (the
  parameters a step gets are plain arrays)."""
  def init(x):
    return block(parent=None, **kwargs).init(jax.random.key(0), x, None, True)
  logical_axes = nn.get_partition_spec(
      jax.eval_shape(init, jax.ShapeDtypeStruct(x.shape, x.dtype)))

  def computed_with(variables):  # boxed (as model.init gives them) or not
    if not sharding.gathers_over_fsdp():  # without FSDP the program stays as it was
      return variables
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v.astype(dtype) if path[-1] == jax.tree_util.DictKey('kernel') else v,
        nn.unbox(variables))
    return sharding.gathered_over_fsdp(variables, logical_axes)
  return nn.map_variables(block, 'params', trans_in_fn=computed_with)


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks (looped or scanned, optionally remat), LayerNorm.

  With `keep_idx` (B, n) only those patch tokens (after `num_prefix_tokens` leading ones, which
  are always kept) go through the blocks, after the full sequence got its position embeddings:
  MAE's encoder of visible patches, with the classifier's parameters.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  posemb: str = 'learn'
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  relative_grid: Optional[tuple] = None
  scan_layers: bool = False
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qk_norm: bool = False
  parallel_block: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool, keep_idx=None, num_prefix_tokens: int = 0):
    if self.posemb == 'learn':
      x = AddPositionEmbs(self.param_dtype, name='posembed_input')(x)
    if keep_idx is not None:
      if self.relative_grid is not None:
        raise ValueError("posemb='relative' needs every patch of the grid in the sequence; "
                         'an encoder of a subset of patches (MAE) cannot use it')
      patches = x[:, num_prefix_tokens:]
      kept = jnp.take_along_axis(patches, keep_idx[..., None], axis=1)
      x = jnp.concatenate([x[:, :num_prefix_tokens], kept], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    # Linearly increasing drop rate over depth (Huang et al. 2016).
    rates = self.stochastic_depth * np.arange(self.num_layers) / max(self.num_layers - 1, 1)
    kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                  dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate,
                  relative_grid=self.relative_grid, dtype=self.dtype,
                  param_dtype=self.param_dtype, qk_norm=self.qk_norm,
                  parallel_block=self.parallel_block, use_bias=self.use_bias)
    block = Encoder1DBlock
    if not self.is_initializing():  # each block gathers its own layer's parameters
      block = _reading_gathered(block, kwargs, self.dtype, x)
    if self.remat_policy != 'none':
      # Recompute block activations in the backward pass; scan already stops CSE across layers.
      block = nn.remat(block, policy=remat_policy(self.remat_policy),
                       prevent_cse=not self.scan_layers, static_argnums=(3,))
    if self.scan_layers:
      scanned = nn.scan(block, variable_axes={'params': 0, 'intermediates': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(0, nn.broadcast), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: LAYERS})
      drop_rates = jnp.asarray(rates, jnp.float32) if self.stochastic_depth else None
      x, _ = scanned(name='encoderblock', **kwargs)(x, drop_rates, not train)
    else:
      for i in range(self.num_layers):
        x, _ = block(name=f'encoderblock_{i}', **kwargs)(x, float(rates[i]) or None, not train)
    x = layer_norm('encoder_norm', self.dtype, self.param_dtype, self.use_bias)(x)
    return sharding.constrain(x, TOKENS)


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision): a learned probe attends over all tokens."""
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qk_norm: bool = False
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    probe = self.param('probe', _param_init(nn.initializers.xavier_uniform(),
                                            (None, None, EMBED)), (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe.astype(x.dtype), (b, 1, 1))
    x = MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                     param_dtype=self.param_dtype, qk_norm=self.qk_norm,
                                     use_bias=self.use_bias,
                                     name='MultiHeadDotProductAttention_0')(
                                         probe, x, deterministic=True)
    y = layer_norm('LayerNorm_0', self.dtype, self.param_dtype, self.use_bias)(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='MlpBlock_0')(y, deterministic=True)
    return x[:, 0]


class PatchEmbedding(nn.Module):
  """Patchify + project: (B, H, W, C) -> (B, h, w, D), through the ResNet stem if hybrid.

  The ViT shares its scope with it, so `embedding/kernel` (and a hybrid's `conv_root`, ...)
  stay top-level names as in the released checkpoints.
  """
  patch_size: int
  hidden_size: int
  resnet_layers: Optional[tuple] = None
  resnet_width: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = images.astype(self.dtype)
    if self.resnet_layers is not None:
      x = resnet.stem(x, self.resnet_layers, self.resnet_width, self.dtype, self.param_dtype)
    p = self.patch_size
    x = sharding.constrain(x, (ACT_BATCH, None, None, None))
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, param_dtype=self.param_dtype, name='embedding',
                kernel_init=_param_init(nn.initializers.lecun_normal(),
                                        (None, None, None, EMBED)),
                bias_init=_param_init(nn.initializers.zeros, (EMBED,)))(x)
    return sharding.constrain(x, (ACT_BATCH, None, None, ACT_EMBED))


class VisionTransformer(nn.Module):
  """ViT. Input NHWC images in [-1, 1]; output (B, num_classes) logits.

  classifier: 'token' (class token), 'gap' (mean of tokens), 'map' (attention pooling), or
  'unpooled' (all tokens). num_classes=None returns the pooled (pre-logits) representation.
  posemb: 'learn' (1D), 'learn2d' (Y/X halves), 'sincos2d' (fixed), 'relative' (learned bias
  per 2D offset in every attention layer), 'none'. resnet_layers: a hybrid's ResNet stage sizes
  (e.g. (3, 4, 9) for R50+ViT-B_16); patches are then cut from its feature map.
  ViT-22B's changes (Dehghani et al. 2023), each off by default, where the released weights'
  names stay as they are: qk_norm (LayerNorm on every attention's queries and keys),
  parallel_block (attention and MLP from one LayerNorm, summed), use_bias=False (no biases in
  the query/key/value projections; every LayerNorm without bias and centering).
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
  resnet_layers: Optional[tuple] = None
  resnet_width: int = 1
  scan_layers: bool = False
  remat_policy: str = 'none'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qk_norm: bool = False
  parallel_block: bool = False
  use_bias: bool = True

  def setup(self):
    for key, value, allowed in (('classifier', self.classifier, CLASSIFIERS),
                                ('posemb', self.posemb, POSEMBS),
                                ('remat_policy', self.remat_policy, REMAT_POLICIES)):
      if value not in allowed:
        raise ValueError(f'unknown {key}={value!r}; choose one of {allowed}')

    self.patch_embedding = PatchEmbedding(self.patch_size, self.hidden_size, self.resnet_layers,
                                          self.resnet_width, self.dtype, self.param_dtype)
    nn.share_scope(self, self.patch_embedding)

  def embed(self, images):
    """(B, H, W, C) images -> (B, h, w, D) patch embeddings, before any position embedding.
    Callable on its own: `model.apply(variables, images, method='embed')`."""
    return self.patch_embedding(images)

  # The encoder's pieces, in the order every task (classifier, MAE, masked patch prediction)
  # runs them; the self-supervised models in `mae.py` call these, so an option cannot be
  # honoured by one task and dropped by another.

  def patch_tokens(self, images):
    """(B, N, D) patch embeddings in row-major grid order, and the grid (h, w)."""
    x = self.embed(images)
    b, h, w, d = x.shape
    return x.reshape(b, h * w, d), (h, w)

  def encode(self, x, grid: tuple, *, train: bool, keep_idx=None):
    """Patch tokens (B, N, D) -> encoded tokens: position embeddings, the class token (with
    classifier='token', leading), the `Transformer` blocks and norm. `keep_idx`: see Encoder."""
    b, n, d = x.shape
    h, w = grid
    if self.posemb == 'learn2d':
      x = AddPositionEmbs2D(self.param_dtype, name='posembed_input')(
          x.reshape(b, h, w, d)).reshape(b, n, d)
    elif self.posemb == 'sincos2d':
      x = x + jnp.asarray(posemb_sincos_2d(h, w, d), x.dtype)
    if self.classifier == 'token':
      cls = self.param('cls', _param_init(nn.initializers.zeros, (None, None, EMBED)),
                       (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    encoder = Encoder(self.num_layers, self.mlp_dim, self.num_heads,
                      'learn' if self.posemb == 'learn' else 'none', self.dropout_rate,
                      self.attention_dropout_rate, self.stochastic_depth,
                      grid if self.posemb == 'relative' else None, self.scan_layers,
                      self.remat_policy, self.dtype, self.param_dtype, self.qk_norm,
                      self.parallel_block, self.use_bias, name='Transformer')
    return encoder(x, train=train, keep_idx=keep_idx, num_prefix_tokens=self.num_prefix_tokens)

  @property
  def num_prefix_tokens(self) -> int:
    return 1 if self.classifier == 'token' else 0

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = self.encode(*self.patch_tokens(images), train=train)
    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = x.mean(axis=1)
    elif self.classifier == 'map':
      x = MAPHead(self.mlp_dim, self.num_heads, self.dtype, self.param_dtype, self.qk_norm,
                  self.use_bias, name='MAPHead_0')(x)
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='pre_logits',
                           kernel_init=_param_init(nn.initializers.lecun_normal(),
                                                   (EMBED, MLP)),
                           bias_init=_param_init(nn.initializers.zeros, (MLP,)))(x))
    if self.num_classes is None or self.classifier == 'unpooled':
      return x
    x = sharding.constrain(x, (ACT_BATCH, ACT_EMBED))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='head',
                      kernel_init=_param_init(nn.initializers.zeros, (EMBED, CLASSES)),
                      bias_init=_param_init(nn.initializers.constant(self.head_bias_init),
                                            (CLASSES,)))(x)
    return sharding.constrain(logits.astype(jnp.float32), (ACT_BATCH, ACT_CLASSES))
