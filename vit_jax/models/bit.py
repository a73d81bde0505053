"""BiT-style ResNet classifier (Kolesnikov et al. 2020): the ViT paper's convolutional baseline.

The hybrid's ResNet (`resnet.stem`: weight-standardised convs + GroupNorm bottlenecks, names
`conv_root`, `gn_root`, `block{s}/unit{u}/...`) with all its stages, global average pooling and
a zero-initialised `head`. Built from a name by the registry: 'BiT-R<depth>x<width>'.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from vit_jax.scale import sharding
from vit_jax.models import resnet, vit

Dtype = Any


class ResNet(nn.Module):
  """Input NHWC images in [-1, 1]; output (B, num_classes) logits, or with num_classes=None the
  pooled (B, 256 * width_factor * 2**(stages - 1)) features. Any image size: every stage after
  the first halves the feature map (SAME padding), down to 1x1."""
  num_classes: Optional[int]
  stage_sizes: tuple
  width_factor: int = 1
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # no dropout: GroupNorm behaves the same in training and evaluation
    x = sharding.constrain(images.astype(self.dtype), (vit.ACT_BATCH, None, None, None))
    x = resnet.stem(x, tuple(self.stage_sizes), self.width_factor, self.dtype, self.param_dtype)
    x = sharding.constrain(jnp.mean(x, axis=(1, 2)), (vit.ACT_BATCH, vit.ACT_EMBED))
    if self.num_classes is None:
      return x
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='head',
                      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                               (vit.EMBED, vit.CLASSES)),
                      bias_init=nn.with_logical_partitioning(
                          nn.initializers.constant(self.head_bias_init), (vit.CLASSES,)))(x)
    return sharding.constrain(logits.astype(jnp.float32), (vit.ACT_BATCH, vit.ACT_CLASSES))
