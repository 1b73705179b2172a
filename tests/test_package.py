"""Packaging: the public namespace, the 8 fake devices, and the `kernels` folder never shadowing."""

import subprocess
import sys
from pathlib import Path

import jax

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
