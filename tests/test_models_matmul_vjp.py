"""``alignax.models.layers.matmul``: its hand-written VJP gives autodiff's gradients of ``x W``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from alignax.models import layers
from alignax.models.config import config_from_hf
from alignax.models.decoder import Transformer


@pytest.mark.parametrize("x_shape", [(5, 3), (2, 4, 3), (2, 2, 4, 3)])
def test_matmul_gradients_equal_autodiff_of_dot(x_shape):
  kx, kw, ky = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, (3, 6))
  dy = jax.random.normal(ky, (*x_shape[:-1], 6))
  y, vjp = jax.vjp(layers.matmul, x, w)
  y_ref, vjp_ref = jax.vjp(jnp.dot, x, w)
  np.testing.assert_array_equal(y, y_ref)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_matmul_cotangents_keep_bf16_dtypes_under_jit():
  x = jnp.ones((2, 4, 8), jnp.bfloat16)
  w = jnp.full((8, 16), 0.5, jnp.bfloat16)
  grads = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.matmul(x, w).astype(jnp.float32)), (0, 1)))(
    x, w
  )
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
  np.testing.assert_array_equal(grads[0], jnp.full((2, 4, 8), 8.0, jnp.bfloat16))
  np.testing.assert_array_equal(grads[1], jnp.full((8, 16), 8.0, jnp.bfloat16))


def test_scanned_decoder_gradients_equal_those_through_plain_dot(monkeypatch):
  hf = transformers.LlamaConfig(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=64,
  ).to_dict()
  model = Transformer(config_from_hf(hf), remat="dots", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)), jnp.int32)
  mask = jnp.asarray([[1] * 7, [0, 0] + [1] * 5], bool)

  def grads():
    def loss(params):
      hidden, _ = nnx.merge(graphdef, params)(ids, mask)
      return jnp.mean(jnp.where(mask[..., None], hidden, 0.0) ** 2)

    return jax.jit(jax.grad(loss))(params)

  got = grads()
  monkeypatch.setattr(layers, "matmul", jnp.dot)
  want = grads()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
