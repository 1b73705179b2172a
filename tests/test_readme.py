"""Every Python example in README.md runs as written (in order, one shared namespace, as a reader
would paste them), except blocks the README marks ``<!-- not run: REASON -->`` (they need a user's
checkpoint or a network)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(<!-- not run: [^>]*-->\s*)?```python\n(.*?)```", re.S)


def _blocks():
  return [(m.group(2), bool(m.group(1))) for m in _BLOCK.finditer(README.read_text())]


def test_readme_python_examples_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  blocks = _blocks()
  assert sum(not skipped for _, skipped in blocks) >= 3  # the harness really finds the examples
  for i, (code, skipped) in enumerate(blocks):
    if skipped:
      continue
    try:
      exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    except Exception as error:  # re-raised with the block, so the failing example is obvious
      raise AssertionError(f"README python block {i} failed:\n{code}") from error
