"""``benchmarks/accelerator_run.sh``, the one command for a GPU run, works:
tried here on tiny trees (``QUICK=1``) so that it cannot rot between the
runs on a GPU."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None,
                    reason="needs coreutils' timeout")
def test_accelerator_run_stages_end_well_and_write_their_results(tmp_path):
  env = dict(os.environ, QUICK="1", OUT=str(tmp_path), PYTHON=sys.executable,
             BUDGET_S="300", WHEELS=str(tmp_path / "no-wheels"))
  done = subprocess.run(
      ["bash", str(ROOT / "benchmarks" / "accelerator_run.sh"), "machine",
       "bench", "cost", "layouts"], env=env, capture_output=True, text=True,
      timeout=400, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = (tmp_path / "summary.txt").read_text().splitlines()
  assert [line.split(":")[0] for line in summary] == [
      "machine", "bench", "cost", "layouts"]
  assert all(": exit 0 in " in line for line in summary), summary
  assert (tmp_path / "large.json").exists()
  assert (tmp_path / "large.png").exists()
  layouts = (tmp_path / "layouts.log").read_text()
  for how in ("leaves", "packed", "packed_small", "flat"):
    assert f"| gpt2_small | {how} |" in layouts
