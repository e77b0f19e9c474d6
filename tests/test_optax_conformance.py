"""optax's own Adam-family tests, run against jadam.

The test files shipped inside the installed optax package run in a
subprocess with the plugin ``tests/optax_conformance/optax_as_jadam.py``,
which points optax's Adam-family functions (the 8 aliases, their
``scale_by_*`` transformations, ADOPT, AdEMAMix and schedule-free AdamW) at
jadam's and keeps only the tests about them. Tests where jadam differs on
purpose are left out by name, with the reason, in the plugin; each such
difference is listed in docs/migrating.md. Nothing of optax's is copied into
this repository.
"""

import os
import pathlib
import re
import subprocess
import sys

import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "tests" / "optax_conformance"
OPTAX = pathlib.Path(optax.__file__).parent
FILES = [
    "_src/alias_test.py", "_src/transform_test.py", "_src/float64_test.py",
    "_src/combine_test.py", "_src/sharding_test.py",
    "contrib/_common_test.py", "contrib/_complex_valued_test.py",
    "contrib/_schedule_free_test.py", "transforms/_accumulation_test.py",
    "schedules/_inject_test.py", "tree_utils/_tree_math_test.py",
    "tree_utils/_state_utils_test.py",
]


@pytest.mark.slow
@pytest.mark.matrix  # so in CI only the newest environment runs it
def test_optax_adam_family_tests_pass_against_jadam(tmp_path):
  files = [str(OPTAX / f) for f in FILES if (OPTAX / f).exists()]
  if not files:
    pytest.skip(f"optax {optax.__version__} ships no test files")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(PLUGIN_DIR), str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                      if os.environ.get("PYTHONPATH") else [])))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-p", "optax_as_jadam", "-q",
       "-p", "no:cacheprovider", "--rootdir", str(tmp_path), *files],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
      check=False)
  out = proc.stdout + proc.stderr
  summary = re.search(r"optax_as_jadam: (\d+) Adam-family tests run against "
                      r"jadam, (\d+) left out .* called (\d+) times", out)
  assert summary, out[-3000:]
  run, _, calls = (int(x) for x in summary.groups())
  # optax 0.2.8: 301 tests (292 pass, 9 skip), 11 deliberate differences.
  assert run >= 250 and calls >= run, summary.group(0)
  assert proc.returncode == 0 and " failed" not in out.splitlines()[-1], (
      out[-6000:])
