"""The engine on 8 devices with FSDP and tensor parallelism matches the 1-device run with the same
global batch: per-step losses and gradient norms to float tolerance, and the final parameters (live
and exported)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import alignax as ax
from alignax import data
from alignax.sharding import make_mesh
from alignax.train.config import TrainingConfig
from alignax.train.loop import data_parallel_size, fit
from alignax.train.objectives import sft_objective
from train_factories import tiny_tokenizer_and_llama
from train_worker import rows

GLOBAL_ROWS = 8
ACCUMULATION = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("mesh")
  tokenizer, base = tiny_tokenizer_and_llama(root)
  config = data.DataConfig(max_length=32, seed=0)
  train = data.prepare_dataset(data.load_rows(rows(64, 0)), tokenizer, task="sft", config=config)
  return root, tokenizer, base, config, train


def _fit(setup, mesh, name):
  root, tokenizer, base, data_config, train = setup
  per_device = GLOBAL_ROWS // (data_parallel_size(mesh) * ACCUMULATION)
  config = TrainingConfig(output_dir=str(root / name), learning_rate=3e-3,
                          per_device_train_batch_size=per_device,
                          gradient_accumulation_steps=ACCUMULATION, max_steps=3, logging_steps=1,
                          save_steps=3, lr_scheduler_type="constant", disable_tqdm=True, seed=0)
  batches = data.make_batches(train, batch_size=GLOBAL_ROWS, config=data_config)
  result = fit(ax.from_pretrained(base, mesh=mesh), sft_objective, batches, config, mesh=mesh,
               tokenizer=tokenizer)
  lines = [json.loads(line) for line in open(root / name / "metrics.jsonl")]
  return result, lines, root / name


@pytest.fixture(scope="module")
def single_device_run(setup):
  return _fit(setup, make_mesh(devices=jax.devices()[:1]), "single")


# One mesh with every axis at once (data x fsdp x tensor = 8 devices): a mesh with a subset of the
# axes (fsdp=4, tensor=2) goes through the same sharding rules and is not run again.
@pytest.mark.parametrize("axes", [dict(data=2, fsdp=2, tensor=2)], ids=["data2xfsdp2xtensor2"])
def test_sharded_run_matches_the_one_device_run(setup, single_device_run, axes):
  single, single_lines, single_dir = single_device_run
  mesh = make_mesh(**axes)
  sharded, sharded_lines, sharded_dir = _fit(setup, mesh, "_".join(f"{k}{v}" for k, v in
                                                                   axes.items()))
  # The parameters really are split over both kinds of axes, not replicated.
  specs = {str(v.get_value().sharding.spec)
           for _, v in nnx.to_flat_state(nnx.state(sharded.model, nnx.Param))}
  assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs

  assert [line["step"] for line in sharded_lines] == [1, 2, 3]
  for a, b in zip(single_lines, sharded_lines):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    assert b["num_tokens"] == a["num_tokens"]

  single_params = dict(nnx.to_flat_state(nnx.state(single.model, nnx.Param)))
  for path, variable in nnx.to_flat_state(nnx.state(sharded.model, nnx.Param)):
    np.testing.assert_allclose(np.asarray(variable.get_value()),
                               np.asarray(single_params[path].get_value()), rtol=1e-4, atol=1e-6,
                               err_msg=str(path))
  exported, reference = (load_file(os.path.join(d, "model.safetensors"))
                         for d in (sharded_dir, single_dir))
  assert sorted(exported) == sorted(reference)
  for name, value in reference.items():
    np.testing.assert_allclose(exported[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
