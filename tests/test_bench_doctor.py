"""benchmarks/doctor.py runs and prints its table (a smoke test on small
trees, never a timing)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import doctor  # pylint: disable=g-import-not-at-top


def test_doctor_benchmark_rows_and_table(capsys):
  results = doctor.main(["--quick", "--default-xla-flags",
                         "--trees", "single_16m",
                         "--rows", "plain", "doctor10", "spikes"])
  out = capsys.readouterr().out
  assert [(r["path"], r["row"]) for r in results] == [
      (path, row) for path in ("tree", "flat")
      for row in ("plain", "doctor10", "spikes")]
  assert all(r["step_ms"] > 0 and r["compile_s"] > 0 for r in results)
  assert "| single_16k | flat | doctor10 |" in out
