"""The experiment runner (alignax.experiment) and the two layer-1 reproductions it runs.

Golden values: the KL table against a float64 NumPy reference on the same samples and against
Schulman's published cells; the bandit against the IPO optima, re-derived here as the stationary
points of the exact (full-dataset) IPO objective.
"""

import copy
import dataclasses
import json
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alignax as ax
from alignax import experiment
from experiments import ipo_vs_dpo_bandit as bandit
from experiments import kl_estimators
from tests.reference import numpy_rl

# ---------------------------------------------------------------------------------------------
# a plain-Python experiment (the `run(config)` protocol), for the runner's own behaviour


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  scale: float = 2.0
  offset: int = 1
  tags: tuple[str, ...] = ("a", "b")
  flag: bool = False
  limit: float | None = None
  seed: int = 0

  def __post_init__(self):
    if self.scale < 0:
      raise ValueError(f"scale must be >= 0, got {self.scale}")


def _toy_module() -> types.ModuleType:
  module = types.ModuleType("toy_experiment")
  module.CLAIM = "x equals scale * offset, plus a seed-sized wobble."
  module.PAPER = "A. Nobody, 2026, the toy paper"
  module.Config = ToyConfig

  def run(config):
    return {"x": config.scale * config.offset + 0.01 * config.seed, "y": np.arange(3.0)}

  def criteria(config, measured):
    return [experiment.criterion("x", paper_value=config.scale * config.offset,
                                 values=measured["x"], tolerance=0.05),
            experiment.criterion("x mean >= 0", paper_value=0.0, values=measured["x"],
                                 tolerance=0.0, rule="at_least", statistic="mean")]

  module.run, module.criteria = run, criteria
  return module


@pytest.fixture
def toy():
  return _toy_module()


def test_set_parses_by_field_type():
  got = experiment.parse_overrides(ToyConfig, ["scale=0.5", "offset=1e3", "tags=x, y,z",
                                               "flag=true", "limit=none", "seed=1_000"])
  assert got == {"scale": 0.5, "offset": 1000, "tags": ("x", "y", "z"), "flag": True,
                 "limit": None, "seed": 1000}
  assert experiment.parse_overrides(ToyConfig, ["limit=0.25"]) == {"limit": 0.25}
  assert experiment.parse_overrides(kl_estimators.Config, ["samples=1e6"]) == {"samples": 10 ** 6}
  assert experiment.parse_overrides(bandit.Config, ["taus=0.1,1"]) == {"taus": (0.1, 1.0)}


@pytest.mark.parametrize("items, message", [
    (["nope=1"], "unknown key 'nope' for"),
    (["offset=abc"], "field 'offset' of ToyConfig has type int"),
    (["offset=1.5"], "expected an integer"),
    (["flag=maybe"], "expected true or false"),
    (["scale"], "--set 'scale': expected key=value"),
    (["=3"], "expected key=value"),
])
def test_set_names_a_bad_key_or_value(items, message):
  with pytest.raises(experiment.ExperimentError, match=message):
    experiment.parse_overrides(ToyConfig, items)


def test_sweep_parses_values_and_rejects_bad_input():
  assert experiment.parse_sweep(ToyConfig, ["scale=1,2.5", "offset=3"]) == {
      "scale": [1.0, 2.5], "offset": [3]}
  with pytest.raises(experiment.ExperimentError, match="unknown key 'speed'"):
    experiment.parse_sweep(ToyConfig, ["speed=1,2"])
  with pytest.raises(experiment.ExperimentError, match="'tags' is a tuple field"):
    experiment.parse_sweep(ToyConfig, ["tags=a,b"])
  with pytest.raises(experiment.ExperimentError, match="has type float"):
    experiment.parse_sweep(ToyConfig, ["scale=1,fast"])
  with pytest.raises(experiment.ExperimentError, match="given twice"):
    experiment.parse_sweep(ToyConfig, ["scale=1", "scale=2"])


def test_config_checks_name_the_field(toy):
  with pytest.raises(experiment.ExperimentError, match="scale must be >= 0"):
    experiment.run_experiment(toy, overrides={"scale": -1.0})


def test_sweep_runs_the_cartesian_product_and_writes_every_point(toy, tmp_path):
  results = experiment.run_experiment(toy, sweep={"scale": [1.0, 3.0], "offset": [1, 2]},
                                      seeds=[0, 1, 2], output_dir=str(tmp_path))
  experiment.validate_results(results)
  assert results["config"]["sweep"] == {"scale": [1.0, 3.0], "offset": [1, 2]}
  assert results["config"]["seeds"] == [0, 1, 2]
  names = [c["name"] for c in results["criteria"]]
  assert names[::2] == ["scale=1.0,offset=1: x", "scale=1.0,offset=2: x", "scale=3.0,offset=1: x",
                        "scale=3.0,offset=2: x"]
  last = results["criteria"][6]["measured"]
  np.testing.assert_allclose(last["values"], [6.0, 6.01, 6.02])
  assert last["mean"] == pytest.approx(6.01) and last["std"] == pytest.approx(0.01)
  assert json.loads((tmp_path / "results.json").read_text()) == results
  point = json.loads((tmp_path / "scale=3.0,offset=2" / "results.json").read_text())
  experiment.validate_results(point)
  assert point["config"]["scale"] == 3.0 and point["config"]["offset"] == 2
  saved = np.load(tmp_path / "scale=3.0,offset=2" / "measurements.npz")
  np.testing.assert_allclose(saved["x"], [6.0, 6.01, 6.02])
  assert saved["y"].shape == (3, 3)


def test_main_exit_codes_and_named_errors(toy, tmp_path, capsys):
  out = str(tmp_path / "run")
  assert experiment.main(["--set", "scale=0.5", "--seeds", "2", "--output_dir", out],
                         module=toy) == 0
  assert "2/2 criteria passed" in capsys.readouterr().out
  # A wobble of 0.01 per seed leaves the 0.05 tolerance at seed 6.
  assert experiment.main(["--seeds", "7", "--output_dir", out], module=toy) == 1
  assert json.loads((tmp_path / "run" / "results.json").read_text())["passed"] is False
  assert experiment.main(["--set", "bogus=1", "--output_dir", out], module=toy) == 2
  assert "unknown key 'bogus'" in capsys.readouterr().err
  assert experiment.main(["--seeds", "0", "--output_dir", out], module=toy) == 2
  assert "--seeds must be >= 1" in capsys.readouterr().err
  assert experiment.main(["experiments/no_such_experiment.py"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_a_config_results_json_cannot_hold_is_rejected_before_measuring(toy, tmp_path, capsys):
  # `--set limit=inf` used to run every seed, then crash in json.dump(allow_nan=False).
  calls = []
  run = toy.run
  toy.run = lambda config: calls.append(config) or run(config)
  out = str(tmp_path / "inf")
  assert experiment.main(["--set", "limit=inf", "--output_dir", out], module=toy) == 2
  assert "ToyConfig.limit=inf cannot be written to results.json" in capsys.readouterr().err
  with pytest.raises(experiment.ExperimentError, match="limit=nan"):
    experiment.run_experiment(toy, sweep={"limit": [1.0, float("nan")]})
  assert not calls and not (tmp_path / "inf").exists()


def test_load_experiment_from_a_path_and_a_module_name():
  by_path = experiment.load_experiment("experiments/kl_estimators.py")
  assert by_path.PAPER == kl_estimators.PAPER and dataclasses.is_dataclass(by_path.Config)
  assert experiment.load_experiment("experiments.kl_estimators") is kl_estimators
  broken = types.ModuleType("broken")
  broken.CLAIM, broken.PAPER = "c", "p"
  with pytest.raises(experiment.ExperimentError, match="needs a dataclass named Config"):
    experiment.check_module(broken)


def test_an_experiment_file_of_a_package_imports_its_siblings_by_package_name(tmp_path,
                                                                              monkeypatch):
  # As `alignax run mylab/exp.py` from anywhere: exp.py does `from mylab import helper`.
  package = tmp_path / "mylab_h1"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "helper.py").write_text("VALUE = 3\n")
  (package / "exp.py").write_text(
    "import dataclasses\nfrom mylab_h1 import helper\nCLAIM = PAPER = 'x'\n"
    "@dataclasses.dataclass\nclass Config:\n  seed: int = 0\n  n: int = helper.VALUE\n"
    "def run(config):\n  return {}\ndef criteria(config, measured):\n  return []\n")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  assert experiment.load_experiment(str(package / "exp.py")).Config().n == 3


def test_criterion_rules_statistics_and_non_finite_values():
  within = experiment.criterion("w", paper_value=1.0, values=[0.96, 1.04], tolerance=0.05)
  assert within["passed"] and within["measured"]["std"] == pytest.approx(np.std([0.96, 1.04],
                                                                                 ddof=1))
  assert not experiment.criterion("w", paper_value=1.0, values=[0.9, 1.0], tolerance=0.05)["passed"]
  # One seed off, the mean inside: "mean" passes, "each_seed" does not.
  assert experiment.criterion("m", paper_value=1.0, values=[0.9, 1.1], tolerance=0.05,
                              statistic="mean")["passed"]
  assert experiment.criterion("lo", paper_value=5.0, values=[7.0], tolerance=0.0,
                              rule="at_least")["passed"]
  assert not experiment.criterion("hi", paper_value=5.0, values=[7.0], tolerance=1.0,
                                  rule="at_most")["passed"]
  nan = experiment.criterion("nan", paper_value=0.0, values=[0.0, float("nan")], tolerance=1.0)
  assert nan["measured"] == {"mean": None, "std": None, "values": [0.0, None]}
  assert not nan["passed"]
  with pytest.raises(experiment.ExperimentError, match="rule='close'"):
    experiment.criterion("x", paper_value=0.0, values=[0.0], tolerance=1.0, rule="close")
  with pytest.raises(experiment.ExperimentError, match=r"values must have shape \[seeds\]"):
    experiment.criterion("x", paper_value=0.0, values=[[0.0]], tolerance=1.0)


def _mutations():
  def drop(key):
    return lambda r: r.pop(key)

  def setter(path, value):
    def mutate(r):
      target = r
      for part in path[:-1]:
        target = target[part]
      target[path[-1]] = value
    return mutate

  return {
      "missing claim": (drop("claim"), r"results: missing keys \['claim'\]"),
      "extra key": (setter(["notes"], "hi"), r"unexpected keys \['notes'\]"),
      "empty paper": (setter(["paper"], " "), "results.paper: expected a non-empty string"),
      "no seeds": (setter(["config", "seeds"], []), "results.config.seeds"),
      "no criteria": (setter(["criteria"], []), "results.criteria: expected a non-empty list"),
      "paper_value a string": (setter(["criteria", 0, "paper_value"], "1.0"),
                               r"criteria\[0\].paper_value"),
      "negative tolerance": (setter(["criteria", 0, "tolerance"], -0.1),
                             r"criteria\[0\].tolerance"),
      "unknown rule": (setter(["criteria", 0, "rule"], "close"), r"criteria\[0\].rule"),
      "measured a number": (setter(["criteria", 0, "measured"], 2.0),
                            r"criteria\[0\].measured: expected an object"),
      "wrong mean": (setter(["criteria", 0, "measured", "mean"], 3.0),
                     r"measured.mean: 3.0 is not the mean"),
      "wrong std": (setter(["criteria", 1, "measured", "std"], 0.0),
                    r"criteria\[1\].measured.std"),
      "value a string": (setter(["criteria", 0, "measured", "values", 0], "2"),
                         r"measured.values\[0\]"),
      "too few values": (lambda r: r["criteria"][0]["measured"]["values"].pop(),
                         "is not the mean|values for 2 seeds"),
      "passed a lie": (setter(["criteria", 0, "passed"], False),
                       r"criteria\[0\].passed: says False but the values give True"),
      "top passed a lie": (setter(["passed"], False), "results.passed: says False"),
      "duplicate name": (setter(["criteria", 1, "name"], "x"), "'x' appears twice"),
  }


@pytest.mark.parametrize("mutation", list(_mutations()))
def test_schema_checker_rejects_malformed_results(toy, mutation):
  results = experiment.run_experiment(toy, seeds=[0, 1])
  experiment.validate_results(results)
  experiment.validate_results(json.loads(json.dumps(results)))  # survives a JSON round trip
  mutate, message = _mutations()[mutation]
  broken = copy.deepcopy(results)
  mutate(broken)
  with pytest.raises(experiment.ResultsSchemaError, match=message):
    experiment.validate_results(broken)


def test_schema_checker_accepts_integers_where_json_holds_them(toy):
  results = experiment.run_experiment(toy, overrides={"scale": 1.0}, seeds=[0])
  criterion = results["criteria"][0]
  criterion["paper_value"], criterion["tolerance"] = 1, 0
  criterion["measured"] = {"mean": 1, "std": 0, "values": [1]}
  experiment.validate_results(results)


def test_plots_are_skipped_with_a_note_without_matplotlib(toy, tmp_path, monkeypatch, caplog):
  calls = []
  toy.plot = lambda config, measured, out_dir: calls.append(out_dir)
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
  with caplog.at_level("WARNING", logger="alignax.experiment"):
    experiment.run_experiment(toy, output_dir=str(tmp_path))
  assert not calls and "matplotlib is not installed" in caplog.text
  assert (tmp_path / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020)


def test_kl_estimators_end_to_end(tmp_path, capsys):
  out = tmp_path / "kl"
  argv = ["experiments/kl_estimators.py", "--set", "samples=100000", "--seeds", "2", "--seed", "3",
          "--output_dir", str(out), "--no_plots"]
  assert experiment.main(argv) == 0
  assert "16/16 criteria passed: REPRODUCED" in capsys.readouterr().out
  results = json.loads((out / "results.json").read_text())
  experiment.validate_results(results)
  assert results["passed"] and results["config"]["seeds"] == [3, 4]
  assert results["config"]["samples"] == 100000
  cells = {c["name"]: c for c in results["criteria"]}
  assert len(cells) == 16
  # The tolerance is tight enough to tell k2's bias at mu = 1 (0.25) from the others' (0).
  assert cells["N(1,1) k2 bias/true"]["tolerance"] < 0.1
  assert cells["N(1,1) k2 bias/true"]["measured"]["mean"] == pytest.approx(0.25, abs=0.1)


def test_kl_module_entry_point_runs_the_runner(tmp_path, capsys):
  argv = ["--set", "samples=20000", "--output_dir", str(tmp_path), "--no_plots", "--json"]
  assert experiment.main(argv, module=kl_estimators) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed == json.loads((tmp_path / "results.json").read_text())


def test_readme_command_python_m_experiments_kl_estimators(tmp_path):
  """`python -m experiments.kl_estimators` (the README's main job) runs the runner end to end."""
  import os
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "experiments.kl_estimators", "--set", "samples=5000",
                         "--output_dir", str(tmp_path), "--no_plots"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "16/16 criteria passed: REPRODUCED" in done.stdout
  experiment.validate_results(json.loads((tmp_path / "results.json").read_text()))


def test_kl_cell_fails_against_a_wrong_published_value(monkeypatch, tmp_path):
  """The pass/fail check is live: k2's bias at mu = 1 reported as 0.00 must fail, alone."""
  table = {mu: dict(cells) for mu, cells in kl_estimators.PUBLISHED.items()}
  table[1.0]["k2"] = ("0.00", table[1.0]["k2"][1])
  monkeypatch.setattr(kl_estimators, "PUBLISHED", table)
  results = experiment.run_experiment(kl_estimators, overrides={"samples": 100_000})
  assert [c["name"] for c in results["criteria"] if not c["passed"]] == ["N(1,1) k2 bias/true"]
  assert experiment.main(["--set", "samples=100000", "--output_dir", str(tmp_path), "--no_plots"],
                         module=kl_estimators) == 1


def test_kl_statistics_equal_a_float64_numpy_reference_on_the_same_samples():
  config = kl_estimators.Config(samples=20_000)
  measured = experiment.measure(kl_estimators, config, [5])
  sample_key, _ = jax.random.split(jax.random.key(5))
  x = np.asarray(jax.random.normal(sample_key, (config.samples,), jnp.float32), np.float64)
  for i, mu in enumerate(kl_estimators.PUBLISHED):
    log_q, log_p = -0.5 * x ** 2, -0.5 * (x - mu) ** 2
    true_kl = mu ** 2 / 2
    for j, estimator in enumerate(kl_estimators.ESTIMATORS):
      k = numpy_rl.kl_estimator(log_q, log_p, estimator)
      np.testing.assert_allclose(measured["bias_over_true"][0, i, j],
                                 (k.mean() - true_kl) / true_kl, atol=2e-5)
      np.testing.assert_allclose(measured["std_over_true"][0, i, j], k.std(ddof=1) / true_kl,
                                 rtol=1e-5)
      np.testing.assert_allclose(measured["se_bias"][0, i, j],
                                 k.std(ddof=1) / math.sqrt(k.size) / true_kl, rtol=1e-5)


def test_kl_closed_forms_match_schulman_table():
  for mu, row in kl_estimators.PUBLISHED.items():
    for estimator, (bias, std) in row.items():
      exact_bias, exact_std = kl_estimators.closed_form(mu, estimator)
      assert exact_bias == pytest.approx(float(bias), abs=6e-4)
      assert exact_std == pytest.approx(float(std), abs=0.006), (mu, estimator)


def test_kl_gradient_identity_check_is_live():
  """Swapping the targets (k3 against the reverse KL) gives a large error: the check can fail."""
  errors = np.asarray(kl_estimators._identity_errors(jax.random.key(0), 10))
  assert np.all(errors < 1e-5)
  theta = jax.random.normal(jax.random.split(jax.random.key(0))[0], (10,))
  ref_logits = jax.random.normal(jax.random.split(jax.random.key(0))[1], (10,))
  reverse = jax.grad(lambda th: ax.categorical_kl(th, ref_logits))(theta)
  forward = jax.grad(lambda th: ax.categorical_kl(ref_logits, th))(theta)
  assert float(jnp.max(jnp.abs(forward - reverse)) / jnp.max(jnp.abs(forward))) > 1e-2


# ---------------------------------------------------------------------------------------------
# IPO vs DPO on the 3-action bandit (Azar et al. 2023)


SMOKE = {"steps": 6000, "curve_points": 12}


@pytest.fixture(scope="module")
def bandit_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("ipo")
  results = experiment.run_experiment(bandit, overrides=SMOKE, seeds=range(10),
                                      output_dir=str(out), plots=False)
  return results, out


def test_bandit_reproduces_the_claim_and_writes_valid_results(bandit_run):
  results, out = bandit_run
  on_disk = json.loads((out / "results.json").read_text())
  experiment.validate_results(on_disk)
  assert on_disk == results
  failed = [(c["name"], c["measured"]["mean"]) for c in results["criteria"] if not c["passed"]]
  assert not failed and results["passed"]
  assert len(results["criteria"]) == 8 * 3
  cells = {c["name"]: c for c in results["criteria"]}
  # The claim's contrast: DPO is greedy at every tau while IPO's pi(ya) moves with tau.
  assert all(min(cells[f"D1 tau={t:g} DPO pi(ya)"]["measured"]["values"]) > 0.99
             for t in (0.1, 0.5, 1))
  ipo_ya = [cells[f"D1 tau={t:g} IPO pi(ya)"]["measured"]["mean"] for t in (0.1, 0.5, 1)]
  assert ipo_ya[0] > 0.95 and ipo_ya[2] < 0.46 and ipo_ya == sorted(ipo_ya, reverse=True)
  saved = np.load(out / "measurements.npz")
  assert saved["ipo_curve"].shape == (10, 3, 3, SMOKE["curve_points"], 3)


def test_bandit_criteria_fail_when_dpo_and_ipo_trade_places(bandit_run):
  """The criteria are live: the same run with DPO's and IPO's measurements swapped fails every
  criterion, at every tau. With a flat 0.01 tolerance three passed at tau = 0.1, where IPO's
  optimum is near DPO's limit (D2: sigmoid(5) = 0.9933; pi*(yc) = 0.0012 on D1, 0.0034 on D3')."""
  _, out = bandit_run
  measured = dict(np.load(out / "measurements.npz"))
  swapped = {**measured, "dpo_policy": measured["ipo_policy"], "ipo_policy": measured["dpo_policy"]}
  criteria = bandit.criteria(bandit.Config(**SMOKE), swapped)
  assert len(criteria) == 8 * 3
  assert [c["name"] for c in criteria if c["passed"]] == []


def _ipo_population_loss(theta, tau, pairs):
  """The exact IPO objective on a dataset: the mean over its pairs, no sampling."""
  logp = jax.nn.log_softmax(theta)
  winners = jnp.asarray([w for w, _ in pairs])
  losers = jnp.asarray([l for _, l in pairs])
  ref = jnp.full((3,), -math.log(3.0))
  return ax.dpo_loss(logp[winners], logp[losers], ref[winners], ref[losers], beta=tau,
                     loss_type="ipo")[0]


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_ipo_optima_are_stationary_points_of_the_ipo_objective(tau):
  """The docstring's derivation: the analytic optima zero the exact objective's gradient."""
  grad = jax.jit(jax.grad(_ipo_population_loss), static_argnums=(1, 2))
  d1 = jnp.log(jnp.asarray(bandit.ipo_optimum_d1(tau), jnp.float32))
  np.testing.assert_allclose(grad(d1, tau, bandit.DATASETS["D1"]), 0.0, atol=1e-5)
  x = math.log(bandit.ipo_optimum_d2(tau) / (1 - bandit.ipo_optimum_d2(tau)))
  np.testing.assert_allclose(grad(jnp.asarray([x, 0.0, 0.0]), tau, bandit.DATASETS["D2"])[:2], 0.0,
                             atol=1e-5)
  p_c = bandit.ipo_optimum_d3_yc(tau)
  d3 = jnp.log(jnp.asarray([(1 - p_c) / 2, (1 - p_c) / 2, p_c], jnp.float32))
  np.testing.assert_allclose(grad(d3, tau, bandit.DATASETS["D3'"]), 0.0, atol=1e-5)
  # ... and a perturbation raises the objective (the IPO objective is a convex quadratic in theta).
  base = _ipo_population_loss(d1, tau, bandit.DATASETS["D1"])
  assert _ipo_population_loss(d1 + jnp.asarray([0.05, 0.0, 0.0]), tau,
                              bandit.DATASETS["D1"]) > base


def test_ipo_optimum_matches_the_quoted_values():
  np.testing.assert_allclose(bandit.ipo_optimum_d1(1.0), [0.448, 0.321, 0.230], atol=6e-4)
  np.testing.assert_allclose(bandit.ipo_optimum_d1(0.5), [0.563, 0.289, 0.148], atol=6e-4)
  np.testing.assert_allclose(bandit.ipo_optimum_d1(0.1), [0.964, 0.034, 0.001], atol=6e-4)
  assert bandit.ipo_optimum_d3_yc(1.0) == pytest.approx(0.2327, abs=1e-4)


def test_vmap_over_seeds_and_sweep_equals_a_python_loop():
  """One jit(vmap) program over seeds x lr equals a separate run per (lr, seed)."""
  base = bandit.Config(taus=(0.5, 1.0), steps=300, curve_points=3)
  points = [{"lr": 0.01}, {"lr": 0.03}]
  seeds = [0, 1, 2]
  vmapped = experiment.measure_points(bandit, base, points, seeds, vmap=True)
  looped = experiment.measure_points(bandit, base, points, seeds, vmap=False)
  for fast, slow in zip(vmapped, looped):
    assert set(fast) == set(slow)
    for name in fast:
      assert fast[name].shape == slow[name].shape == (3, *fast[name].shape[1:])
      np.testing.assert_allclose(fast[name], slow[name], rtol=1e-5, atol=1e-7, err_msg=name)
  # The sweep value and the seed both matter, so the comparison is not vacuous.
  assert not np.allclose(vmapped[0]["ipo_policy"], vmapped[1]["ipo_policy"])
  assert not np.allclose(vmapped[0]["ipo_policy"][0], vmapped[0]["ipo_policy"][1])


def test_experiment_plots_are_written_when_matplotlib_is_installed(bandit_run, tmp_path):
  pytest.importorskip("matplotlib")
  results, out = bandit_run
  measured = dict(np.load(out / "measurements.npz"))
  config = bandit.Config(**SMOKE)
  experiment._plot(bandit, config, measured, str(tmp_path))
  kl_config = kl_estimators.Config(samples=20_000)
  experiment._plot(kl_estimators, kl_config, experiment.measure(kl_estimators, kl_config, [0]),
                   str(tmp_path))
  for name in ("curves.png", "policies.png", "table.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
