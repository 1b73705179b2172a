"""Packaging: the public namespace, the 8 fake devices, and the `kernels` folder never shadowing."""

import subprocess
import sys
from pathlib import Path

import jax
import pytest

import alignax as ax

REPO = Path(__file__).resolve().parents[1]


def test_eight_fake_cpu_devices():
  assert jax.device_count() == 8
  assert {d.platform for d in jax.devices()} == {"cpu"}


def test_version():
  assert isinstance(ax.__version__, str)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                        timeout=300)


def test_transformers_imports_from_repo_root():
  # Python puts the working directory first on sys.path, so a `kernels` folder there must not be
  # mistaken for the optional `kernels` package transformers probes for.
  res = _run("import transformers; transformers.LlamaConfig(); import alignax.kernels; print('ok')",
             REPO)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip().endswith("ok")


def test_transformers_imports_with_installed_alignax(tmp_path):
  res = _run("import alignax, alignax.kernels, transformers; transformers.LlamaConfig(); print('ok')",
             tmp_path)
  assert res.returncode == 0, res.stderr


def test_top_level_kernels_import_is_inert():
  # Imported under the wrong name the folder defines nothing and imports nothing of ours.
  res = _run("import sys, kernels; print(sorted(n for n in vars(kernels) if not n.startswith('_')));"
             "print(any(m.startswith('alignax') for m in sys.modules))", REPO)
  assert res.returncode == 0, res.stderr
  assert res.stdout.split() == ["[]", "False"]


def test_layer1_imports_neither_flax_nor_transformers():
  # The pure math must not pay for (or depend on) the model stack: alignax/__init__ is lazy.
  res = _run("import alignax.losses, alignax.aggregation, alignax.kl, alignax.advantages, sys;"
             "import alignax as ax; ax.dpo_loss, ax.grpo_loss, ax.next_token_targets;"
             "heavy = {'transformers', 'tokenizers', 'flax'} & set(sys.modules);"
             "assert not heavy, heavy; print('ok')", REPO)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip() == "ok"


def test_every_public_name_resolves():
  assert len(ax.__all__) == len(set(ax.__all__))
  for name in ax.__all__:
    assert getattr(ax, name) is not None, name
  assert set(ax.__all__) <= set(dir(ax))
  # Renamed or removed in issue 7: one way each (masked_whiten takes mask=None).
  assert "whiten" not in ax.__all__ and not hasattr(ax, "whiten")
  assert ax.next_token_targets.__module__ == "alignax.losses.supervised"
  with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
    ax.not_a_name  # noqa: B018
