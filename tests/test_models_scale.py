"""A training step of a model on 8 fake CPU devices is data parallel and equals the unsharded step.

The step is what a trainer runs: a forward to the final hidden states, the fused log-prob loss
(``ax.token_logprobs``), and the gradient of every parameter, constrained to the parameter's own
sharding (as an optimizer update on sharded parameters consumes it). Checked on ``fsdp=8`` and
``fsdp=4 × tensor=2`` meshes from :func:`alignax.sharding.make_mesh`:

* values: loss, hidden states and every gradient equal the single-device step;
* data parallelism: the hidden states come out split over the batch, every weight gradient is
  reduced across the batch shards (FSDP's reduce-scatter), no collective moves a full-batch
  activation, and the per-device temporaries shrink with the batch shard (``memory_analysis``);
* one mesh: the model's arrays and those of ``ax.token_logprobs(..., mesh=mesh)`` combine outside
  ``jit``.

No timings: only values, shardings, compiled-HLO structure and compiled memory sizes.
"""

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from model_factories import CONFIGS, saved_checkpoint

import alignax as ax
from alignax import models
from alignax.sharding import batch_sharding, make_mesh

BATCH = 8  # global rows: one per device on fsdp=8
LENGTH = 24  # with BATCH, a [8, 24, ...] or [192, ...] tensor can only be a full-batch activation


def _batch(vocab_size: int, seed: int = 0):
  """Right- and left-padded rows; next-token targets and their loss mask."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size, size=(BATCH, LENGTH))
  mask = np.ones((BATCH, LENGTH), bool)
  mask[1, :5] = False
  mask[2, -4:] = False
  mask[5, :2] = False
  ids = np.where(mask, ids, 0)
  targets = np.concatenate([ids[:, 1:], np.zeros((BATCH, 1), ids.dtype)], axis=1)
  loss_mask = np.concatenate([mask[:, 1:] & mask[:, :-1], np.zeros((BATCH, 1), bool)], axis=1)
  return ids.astype(np.int32), mask, targets.astype(np.int32), loss_mask


def _train_step(graphdef, shardings):
  """``(loss, hidden), grads`` of the mean token log-prob; grads constrained like the parameters."""

  def loss_fn(params, rest, ids, mask, targets, loss_mask):
    model = nnx.merge(graphdef, params, rest)
    hidden = model(ids, mask, compute_logits=False).hidden_states
    logp = ax.token_logprobs(hidden, model.get_lm_head(), targets, mask=loss_mask).logp
    return jnp.sum(logp) / jnp.sum(loss_mask), hidden

  def step(params, rest, *batch):
    (loss, hidden), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, *batch)
    if shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, shardings)
    return (loss, hidden), grads

  return jax.jit(step)


class _Run(NamedTuple):
  mesh: Any
  compiled: Any  # the compiled step (HLO text, memory analysis)
  outputs: Any  # ((loss, hidden), grads)


def _run(path: str, mesh, vocab_size: int) -> _Run:
  """Compiles and runs the step on ``mesh`` (None: one device)."""
  model = models.from_pretrained(path, mesh=mesh)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = [jnp.asarray(a) for a in _batch(vocab_size)]
  shardings = None
  if mesh is not None:
    batch = [jax.device_put(a, batch_sharding(mesh, 2)) for a in batch]
    shardings = jax.tree.map(lambda a: a.sharding, params)
  compiled = _train_step(graphdef, shardings).lower(params, rest, *batch).compile()
  return _Run(mesh, compiled, compiled(params, rest, *batch))


MESHES = {"fsdp8": dict(fsdp=8), "fsdp4_tensor2": dict(fsdp=4, tensor=2)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path, hf_model = saved_checkpoint(tmp_path_factory, "llama")
  return path, hf_model.config.vocab_size


@pytest.fixture(scope="module")
def runs(llama):
  """``runs(name)``: the step on mesh ``name`` of :data:`MESHES` (None: one device), run once."""
  path, vocab_size = llama
  cache: dict[str | None, _Run] = {}

  def get(name: str | None) -> _Run:
    if name not in cache:
      cache[name] = _run(path, None if name is None else make_mesh(**MESHES[name]), vocab_size)
    return cache[name]

  return get


@pytest.mark.parametrize("name", MESHES)
def test_sharded_forward_backward_equals_unsharded(runs, name):
  (want_loss, want_hidden), want_grads = runs(None).outputs
  (loss, hidden), grads = runs(name).outputs

  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(hidden), np.asarray(want_hidden), atol=2e-5, rtol=1e-4)
  flat, want_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(want_grads))
  assert len(flat) == len(want_flat)
  for path_, grad in flat:
    want = np.asarray(want_flat[path_][...])
    scale = max(1e-3, float(np.abs(want).max()))
    err = float(np.abs(np.asarray(grad[...]) - want).max()) / scale
    assert err < 1e-4, f"gradient of {'.'.join(map(str, path_))}: relative error {err:.2e}"


def _collective_results(text: str) -> list[tuple[str, str]]:
  """``(op, result type)`` of every collective in an HLO module's text."""
  found = []
  for line in text.splitlines():
    match = re.search(r"=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(",
                      line)
    if match:
      found.append((match.group(2), match.group(1)))
  return found


def _has_shape(result_type: str, dims: tuple[int, ...]) -> bool:
  """Whether a result type (one shape or a tuple) holds ``dims``, optionally behind a layer axis."""
  pattern = r"\[(?:\d+,)?" + ",".join(map(str, dims)) + r"\]"
  return re.search(pattern, result_type) is not None


def test_fsdp_step_is_data_parallel(runs):
  run = runs("fsdp8")
  text = run.compiled.as_text()
  collectives = _collective_results(text)

  # FSDP reduces each weight gradient over the batch shards: a reduce-scatter on GPU/TPU. XLA:CPU
  # decomposes reduce-scatters into an all-reduce of the whole gradient followed by this device's
  # slice, so on CPU the reduction shows as an all-reduce whose result has a weight's shape. With a
  # replicated batch (every device computing every row) no weight gradient is ever reduced.
  d, f = CONFIGS["llama"]["hidden_size"], CONFIGS["llama"]["intermediate_size"]
  weight_shapes = [(d, f), (f, d)]
  reductions = [
    (op, result) for op, result in collectives
    if op == "reduce-scatter"
    or (op == "all-reduce" and any(_has_shape(result, s) for s in weight_shapes))
  ]
  assert reductions, f"no weight-gradient reduction among {len(collectives)} collectives"
  # ... and no collective carries a full-batch activation ([B, T, ...] or flattened [B·T, ...]).
  full_batch = [
    (op, result) for op, result in collectives
    if re.search(rf"(f32|bf16|f16)\[({BATCH},{LENGTH}|{BATCH * LENGTH})[,\]]", result)
  ]
  assert not full_batch, f"collectives move full-batch activations: {full_batch[:3]}"

  (_, hidden), _ = run.outputs
  batch_split = NamedSharding(run.mesh, P(("data", "fsdp"), None, None))
  assert hidden.sharding.is_equivalent_to(batch_split, hidden.ndim), hidden.sharding


def test_activation_temporaries_shrink_with_the_batch_shard(runs):
  sharded = runs("fsdp8").compiled.memory_analysis().temp_size_in_bytes
  single = runs(None).compiled.memory_analysis().temp_size_in_bytes
  # One row of eight per device: activations shrink 8×; gathered weights and small per-layer
  # buffers keep the ratio above 1/8.
  assert sharded / single < 0.3, f"per-device temporaries {sharded} B vs unsharded {single} B"


def test_model_and_kernel_arrays_combine_outside_jit(llama):
  path, vocab_size = llama
  mesh = make_mesh(fsdp=4, tensor=2)
  model = models.from_pretrained(path, mesh=mesh)
  ids, mask, targets, loss_mask = (
    jax.device_put(jnp.asarray(a), batch_sharding(mesh, 2)) for a in _batch(vocab_size)
  )
  out = nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask)
  model_logp = jnp.take_along_axis(
    jax.nn.log_softmax(out.logits, axis=-1), targets[..., None], axis=-1
  )[..., 0]
  kernel_logp = ax.token_logprobs(
    out.hidden_states, model.get_lm_head(), targets, mask=loss_mask, mesh=mesh
  ).logp
  # Eager arithmetic on arrays of the model's mesh and the kernel's: one mesh, so no
  # "Mesh for all inputs should be equal".
  diff = jnp.where(loss_mask, model_logp - kernel_logp, 0.0)
  assert float(jnp.max(jnp.abs(diff))) < 1e-4
  assert model_logp.sharding.mesh == kernel_logp.sharding.mesh == mesh
