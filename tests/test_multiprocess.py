"""Two processes joined by jax.distributed train the quickstart model as one.

``examples/data_parallel.py --num-processes 2`` launches two copies of itself
on 127.0.0.1 (gloo collectives, one CPU device each, a free port), trains the
quickstart model data-parallel (1024 samples, 2 epochs of 32 steps at batch
32, dropout on), then trains the same model in one process, and reports both.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "data_parallel.py"


def run_data_parallel(tmp_path, *flags):
  out = tmp_path / "report.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
                 "PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--num-processes", "2", "--epochs", "2",
       "--samples", "1024", "--timeout", "400", "--out", str(out), *flags],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text()), proc.stdout


def test_two_processes_train_like_one(tmp_path):
  report, stdout = run_data_parallel(tmp_path)
  assert "relative difference of parameters" in stdout
  assert report["multi"]["num_processes"] == 2
  assert report["multi"]["devices"] == 2
  assert report["single"]["num_processes"] == 1
  assert report["processes_agree"]
  assert report["relative_difference"] < 1e-6
  np.testing.assert_allclose(report["multi"]["epoch_losses"],
                             report["single"]["epoch_losses"], rtol=1e-6)


@pytest.mark.slow
def test_two_processes_with_zero1_train_like_one_and_halve_state(tmp_path):
  report, _ = run_data_parallel(tmp_path, "--zero1")
  assert report["processes_agree"]
  assert report["relative_difference"] < 1e-6
  # Adam's m and v of 8·32 + 32 + 32·1 + 1 = 321 parameters: 2568 bytes on
  # one device; the 1-element bias stays whole, so each of two holds
  # (2568 − 8) / 2 + 8 bytes, plus the step counts.
  single = report["single"]["state_bytes_per_device"]
  multi = report["multi"]["state_bytes_per_device"]
  assert multi < 0.55 * single
