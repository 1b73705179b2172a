"""The KL-estimator experiment reproduces Schulman's (2020) table within sampling error."""

import json

import pytest

from experiments import kl_estimators


@pytest.mark.slow
def test_every_cell_within_tolerance_of_the_published_value(capsys):
  assert kl_estimators.main(["--samples", "1000000", "--seed", "1", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["pass"] and len(report["cells"]) == 6
  for row in report["cells"]:
    for column in ("bias/true", "stdev/true"):
      cell = row[column]
      assert abs(cell["measured"] - cell["published"]) <= cell["tolerance"], (row, column)
      # The tolerance is tight enough to tell the estimators apart (k2's bias at mu = 1 is 0.25).
      assert cell["tolerance"] < 0.2, (row, column)


def test_cells_fail_against_a_wrong_published_value(monkeypatch):
  """The pass/fail check is live: k2's bias at mu = 1 reported as 0.00 must fail."""
  table = {mu: dict(cells) for mu, cells in kl_estimators.PUBLISHED.items()}
  table[1.0]["k2"] = ("0.00", table[1.0]["k2"][1])
  monkeypatch.setattr(kl_estimators, "PUBLISHED", table)
  rows = kl_estimators.run(samples=100_000, seed=0)
  failed = [(r["mu"], r["estimator"]) for r in rows if not r["bias/true"]["pass"]]
  assert failed == [(1.0, "k2")]
  assert kl_estimators.main(["--samples", "100000"]) == 1
