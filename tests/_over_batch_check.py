"""Run by tests/test_train.py::test_pallas_kernels_run_per_device_under_a_mesh in a subprocess with
2 simulated CPU devices: the LASAD and LINA Pallas kernels (interpreter) inside a jit traced under
``jax.set_mesh`` on batch-sharded inputs give the unsharded results and gradients (LINA's: bitwise),
with no all-gather in the compiled programs."""

import jax
import jax.numpy as jnp
import numpy as np

from lasad_jax import sharding as S
from lasad_jax.lina.attention import lina_attention_qkv
from lasad_jax.ops import lasad_attention

mesh = S.make_mesh(2, 1)
rng = np.random.default_rng(0)
b, t, h, d = 4, 40, 2, 16
q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
g = jnp.asarray(-rng.uniform(0.01, 0.5, (b, t, h, d)), jnp.float32)
w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)


def lasad_loss(q, k, v, g):
  o = lasad_attention(q, k, v, g, width=8, prefix=1, boundary=-jnp.inf, scale=1.0, impl="pallas")
  return jnp.sum(o * w)


qkv = jnp.asarray(rng.standard_normal((b, t, 3, h, 32)), jnp.bfloat16)
ks = jnp.asarray(rng.uniform(0.5, 1.5, (h, t)), jnp.float32)


w2 = jnp.asarray(rng.standard_normal((b, t, h, 32)), jnp.float32)


def lina_out(qkv):
  o = lina_attention_qkv(qkv, ks, ks, impl="pallas")
  return o, jax.grad(lambda x: jnp.sum(lina_attention_qkv(x, ks, ks, impl="pallas") * w2))(qkv)


ref = jax.jit(jax.value_and_grad(lasad_loss, argnums=(0, 1, 2, 3)))(q, k, v, g)
ref_lina = jax.jit(lina_out)(qkv)
sh = S.batch_sharding(mesh)
args = [jax.device_put(x, sh) for x in (q, k, v, g)]
with jax.set_mesh(mesh):
  f = jax.jit(jax.value_and_grad(lasad_loss, argnums=(0, 1, 2, 3)))
  hlo = f.lower(*args).compile().as_text()
  got = f(*args)
  f2 = jax.jit(lina_out)
  hlo2 = f2.lower(jax.device_put(qkv, sh)).compile().as_text()
  got_lina = f2(jax.device_put(qkv, sh))
for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
  np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=2e-5, atol=2e-5)
np.testing.assert_array_equal(np.asarray(got_lina[0]), np.asarray(ref_lina[0]))
np.testing.assert_array_equal(np.asarray(got_lina[1], np.float32), np.asarray(ref_lina[1], np.float32))
assert "all-gather" not in hlo, "the LASAD kernel was fed the gathered batch"
assert "all-gather" not in hlo2, "the LINA kernel was fed the gathered batch"
print("per-device kernels: ok", got[1][0].sharding)
