"""Self-supervised ViTs: MAE (He et al. 2021) and masked patch prediction (ViT paper, 5.4).

Both models subclass `vit.VisionTransformer` and encode with its own `patch_tokens` and
`encode` (the classifier's code, every option included), so the encoder's parameters have
exactly the names and shapes of a `get_model(...)` classifier with the same architecture and
transfer into it unchanged. Everything only pretraining needs lives under the top-level names
in `PRETRAINING_ONLY`.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import registry, vit

# Top-level parameter names a classifier never has: `checkpoint.load_pretrained` drops them.
PRETRAINING_ONLY = ('decoder', 'mask_embedding', 'mpp_head')

# Masked patch prediction targets: 3 bits per RGB channel of a patch's mean colour.
COLOUR_BITS = 3
NUM_COLOURS = 2**(3 * COLOUR_BITS)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, P*P*C), patches in row-major grid order like the `embedding` conv."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple, channels: int = 3) -> jax.Array:
  """(B, N, P*P*C) -> (B, H, W, C); the inverse of `patchify`."""
  gh, gw = grid
  p = patch_size
  x = patches.reshape(patches.shape[0], gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(patches.shape[0], gh * p, gw * p, channels)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Visible patches per image; at least one so the encoder has something to see."""
  if not 0. <= mask_ratio < 1.:
    raise ValueError(f'mask_ratio={mask_ratio} must be in [0, 1)')
  return max(int(num_patches * (1. - mask_ratio)), 1)


def random_masking(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float):
  """Per-image random subset of visible patches, from the argsort of uniform noise.

  Returns keep_idx (B, n_keep) positions of the visible patches, restore_idx (B, N) that puts a
  [visible; masked] sequence back into grid order, and mask (B, N): 1. where masked.
  """
  n_keep = num_kept(num_patches, mask_ratio)
  shuffle = jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=1)
  restore = jnp.argsort(shuffle, axis=1)
  mask = (restore >= n_keep).astype(jnp.float32)
  return shuffle[:, :n_keep], restore, mask


def _gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x, idx[..., None], axis=1)


def _dense(features: int, name: str, axes: tuple, dtype, param_dtype) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=vit._param_init(nn.initializers.xavier_uniform(), axes),
                  bias_init=vit._param_init(nn.initializers.zeros, (axes[-1],)))


class MaeDecoder(nn.Module):
  """Encoded visible tokens + a shared mask token at masked positions, fixed sin-cos posemb,
  transformer blocks, a linear layer to each patch's pixels."""
  grid: tuple
  patch_dim: int
  width: int = 512
  num_layers: int = 8
  mlp_dim: int = 2048
  num_heads: int = 16
  num_prefix_tokens: int = 1
  dtype: vit.Dtype = jnp.float32
  param_dtype: vit.Dtype = jnp.float32

  @nn.compact
  def __call__(self, latent, restore_idx, *, train: bool):
    x = _dense(self.width, 'embed', (vit.EMBED, None), self.dtype, self.param_dtype)(latent)
    prefix, visible = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
    b, num_patches = restore_idx.shape
    mask_token = self.param('mask_token',
                            vit._param_init(nn.initializers.normal(0.02), (None, None, None)),
                            (1, 1, self.width), self.param_dtype).astype(x.dtype)
    masked = jnp.tile(mask_token, (b, num_patches - visible.shape[1], 1))
    x = _gather_tokens(jnp.concatenate([visible, masked], axis=1), restore_idx)
    x = x + jnp.asarray(vit.posemb_sincos_2d(*self.grid, self.width), x.dtype)
    x = jnp.concatenate([prefix, x], axis=1)  # the class token gets no position embedding
    for i in range(self.num_layers):
      x, _ = vit.Encoder1DBlock(self.mlp_dim, self.num_heads, dtype=self.dtype,
                                param_dtype=self.param_dtype,
                                name=f'decoderblock_{i}')(x, None, not train)
    x = vit.layer_norm('decoder_norm', self.dtype, self.param_dtype)(x)
    x = _dense(self.patch_dim, 'pred', (vit.EMBED, None), self.dtype, self.param_dtype)(x)
    return x[:, self.num_prefix_tokens:].astype(jnp.float32)


class MaskedAutoencoder(vit.VisionTransformer):
  """MAE: returns (predicted pixels (B, N, P*P*3), mask (B, N), 1. = masked).

  `mask_rng` draws the mask; None uses a fixed key (initialisation, deterministic evaluation).
  """
  mask_ratio: float = 0.75
  decoder_width: int = 512
  decoder_layers: int = 8
  decoder_mlp_dim: int = 2048
  decoder_heads: int = 16

  @nn.compact
  def __call__(self, images, *, train: bool = False, mask_rng: Optional[jax.Array] = None):
    x, grid = self.patch_tokens(images)
    b, n, _ = x.shape
    rng = jax.random.key(0) if mask_rng is None else mask_rng
    keep_idx, restore_idx, mask = random_masking(rng, b, n, self.mask_ratio)
    latent = self.encode(x, grid, train=train, keep_idx=keep_idx)
    pred = MaeDecoder(grid, self.patch_size**2 * images.shape[-1], self.decoder_width,
                      self.decoder_layers, self.decoder_mlp_dim, self.decoder_heads,
                      self.num_prefix_tokens, self.dtype, self.param_dtype,
                      name='decoder')(latent, restore_idx, train=train)
    return pred, mask


# --- masked patch prediction -------------------------------------------------------------------

# How a corrupted patch embedding is replaced: the ViT paper's (BERT's) 80/10/10.
KEEP, MASK_EMBEDDING, OTHER_PATCH = 0, 1, 2


def corrupt_patches(rng: jax.Array, x: jax.Array, mask_embedding: jax.Array,
                    corrupt_ratio: float = 0.5):
  """Corrupts `corrupt_ratio` of each image's patch embeddings x (B, N, D).

  Of the corrupted ones 80% become `mask_embedding`, 10% another random patch of the same image,
  10% stay. Returns (x, corrupted (B, N) 1. where corrupted, kind (B, N) of KEEP/MASK_EMBEDDING/
  OTHER_PATCH).
  """
  b, n, _ = x.shape
  select_rng, kind_rng, other_rng = jax.random.split(rng, 3)
  _, _, corrupted = random_masking(select_rng, b, n, corrupt_ratio)
  u = jax.random.uniform(kind_rng, (b, n))
  kind = jnp.where(u < 0.8, MASK_EMBEDDING, jnp.where(u < 0.9, OTHER_PATCH, KEEP))
  kind = jnp.where(corrupted > 0, kind, KEEP)
  # A different position in the same image: shift by 1..N-1 (mod N).
  other_idx = (jnp.arange(n) + jax.random.randint(other_rng, (b, n), 1, max(n, 2))) % n
  other = _gather_tokens(x, other_idx)
  x = jnp.where((kind == MASK_EMBEDDING)[..., None], mask_embedding.astype(x.dtype), x)
  x = jnp.where((kind == OTHER_PATCH)[..., None], other, x)
  return x, corrupted, kind


def mean_colour_classes(images: jax.Array, patch_size: int) -> jax.Array:
  """Masked patch prediction targets (B, N) in [0, 512): each patch's mean RGB in [-1, 1],
  quantised to 3 bits per channel, as r * 64 + g * 8 + b."""
  patches = patchify(images, patch_size)
  channels = images.shape[-1]
  mean = patches.reshape(*patches.shape[:2], -1, channels).mean(axis=2)
  levels = 2**COLOUR_BITS
  bins = jnp.clip(jnp.floor((mean + 1.) / 2. * levels), 0, levels - 1).astype(jnp.int32)
  return (bins * levels**jnp.arange(channels - 1, -1, -1)).sum(axis=-1)


class MaskedPatchPredictor(vit.VisionTransformer):
  """ViT-paper masked patch prediction: returns (logits (B, N, 512) per patch, corrupted (B, N)).

  `mask_rng` draws the corruption; None uses a fixed key.
  """
  corrupt_ratio: float = 0.5

  @nn.compact
  def __call__(self, images, *, train: bool = False, mask_rng: Optional[jax.Array] = None):
    x, grid = self.patch_tokens(images)
    mask_embedding = self.param(
        'mask_embedding', vit._param_init(nn.initializers.normal(0.02), (None, None, vit.EMBED)),
        (1, 1, x.shape[-1]), self.param_dtype)
    rng = jax.random.key(0) if mask_rng is None else mask_rng
    # Patch embeddings are corrupted before positions are added (every posemb alike): a mask
    # token still says where it sits, and another patch's embedding gets this position.
    x, corrupted, _ = corrupt_patches(rng, x, mask_embedding, self.corrupt_ratio)
    x = self.encode(x, grid, train=train)
    logits = _dense(NUM_COLOURS, 'mpp_head', (vit.EMBED, vit.CLASSES), self.dtype,
                    self.param_dtype)(x[:, self.num_prefix_tokens:])
    return logits.astype(jnp.float32), corrupted


def get_model(task: str, name: str, **overrides) -> vit.VisionTransformer:
  """`task` 'mae' or 'masked_patch' on the architecture `name` stands for (see registry)."""
  classes = {'mae': MaskedAutoencoder, 'masked_patch': MaskedPatchPredictor}
  if task not in classes:
    raise ValueError(f'unknown self-supervised task={task!r}; choose one of {sorted(classes)}')
  if registry.is_resnet(name):
    raise ValueError(f'task={task!r} predicts masked patches: it needs a ViT, not the ResNet '
                     f'{name!r} (e.g. model.name="ViT-B_16")')
  cls = classes[task]
  kwargs = registry.model_config(name)
  kwargs.update(overrides)
  fields = set(cls.__dataclass_fields__) - {'parent', 'name', 'num_classes'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'unknown model option(s) {unknown} for task={task!r}; '
                     f'known: {sorted(fields)}')
  return cls(num_classes=None, **kwargs)
