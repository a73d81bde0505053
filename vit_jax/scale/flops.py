"""Matmul FLOPs counted on jaxprs: the benchmark's and the trainer's MFU (3 x the forward pass, the
usual model-FLOPs convention) and the AOT check's ideal step time (the whole step as traced,
recomputation included) are computed from this one count."""
import math

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp


def matmul_flops(closed_jaxpr) -> int:
  """FLOPs (2 per multiply-add) of every dot_general and convolution in a jaxpr, sub-jaxprs
  included; a scan's body counts `length` times."""
  total = 0
  for eqn in closed_jaxpr.jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs_shape[d] for d in lhs_contract)
    elif name == 'conv_general_dilated':
      rhs_shape = eqn.invars[1].aval.shape
      out_features = rhs_shape[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs_shape) // out_features
    repeat = eqn.params.get('length', 1) if name == 'scan' else 1
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if hasattr(sub, 'jaxpr') and hasattr(sub, 'consts'):  # ClosedJaxpr
          total += repeat * matmul_flops(sub)
        elif hasattr(sub, 'eqns'):  # open Jaxpr
          total += repeat * matmul_flops(jax_core.ClosedJaxpr(sub, ()))
  return total


def forward_flops_per_image(model, params, image_size: int) -> int:
  """Matmul FLOPs of one image's forward pass, counted on the model's traced computation."""
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({'params': p}, x, train=False))(params, image)
  return matmul_flops(jaxpr)
