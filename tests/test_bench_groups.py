"""The parameter-groups benchmark (``python benchmarks/groups.py``): its
smoke test runs every row, checks the rows agree, and prints what it says."""

import json
import os
import subprocess
import sys

# The benchmark lives in the clone's benchmarks/ folder, not in jadam.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "groups.py")
ROWS = ("flat", "flat_groups", "flat_slices", "tree", "tree_groups",
        "optax_partition")


def _run(*args):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  done = subprocess.run([sys.executable, SCRIPT, "--quick", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _json_rows(stdout):
  return [json.loads(line) for line in stdout.splitlines()
          if line.startswith("{")]


def test_groups_benchmark_quick_run_prints_every_row_table_and_ratios(
    tmp_path):
  out = tmp_path / "groups.json"
  stdout = _run("--json", str(out))
  lines = stdout.splitlines()
  # A smoke test says so first, then the versions, device and command.
  assert lines[0].startswith("Quick smoke test (--quick)")
  assert "not a measurement" in lines[0]
  assert lines[1].startswith("JAX ") and "platform" in lines[1]
  assert lines[2].startswith("command: python ") and "--quick" in lines[2]
  # The correctness guards ran and passed before any timing.
  assert "check: flat_groups = tree_groups (raveled) to" in stdout
  assert "check: tree_groups = optax_partition bitwise" in stdout
  rows = _json_rows(stdout)
  assert [r["row"] for r in rows] == list(ROWS)
  by_name = {r["row"]: r for r in rows}
  for row in rows:
    assert set(row) == {"row", "compile_s", "step_ms", "leaves", "groups",
                        "params"}
    assert row["step_ms"] > 0 and row["compile_s"] > 0
  # The quick tree: 100 leaves in 10 groups, about 100k parameters.
  assert len({r["params"] for r in rows}) == 1
  assert 80_000 < rows[0]["params"] < 130_000
  assert (by_name["flat"]["leaves"], by_name["flat"]["groups"]) == (1, 0)
  assert (by_name["flat_groups"]["leaves"],
          by_name["flat_groups"]["groups"]) == (1, 10)
  assert (by_name["flat_slices"]["leaves"],
          by_name["flat_slices"]["groups"]) == (10, 10)
  assert (by_name["tree"]["leaves"], by_name["tree"]["groups"]) == (100, 0)
  assert by_name["optax_partition"]["leaves"] == 100
  # The table, one line per row, after the JSON lines; then the ratios.
  header = lines.index("| row | median step (ms) | compile (s) | "
                       "step × baseline |")
  assert header > max(i for i, l in enumerate(lines) if l.startswith("{"))
  for i, name in enumerate(ROWS):
    assert lines[header + 2 + i].startswith(f"| {name} | ")
  assert lines[header + 2].endswith("| 1.00 (vs flat) |")
  assert lines[header + 5].endswith("| 1.00 (vs tree) |")
  for prefix in ("flat_groups/flat: step ", "flat_groups/optax_partition: "
                 "step ", "optax_partition/flat_groups: compile ",
                 "tree_groups/tree: step ", "flat_slices/flat_groups: step "):
    assert any(l.startswith(prefix) for l in lines), prefix
  # The JSON file holds the same rows, marked as a smoke test.
  doc = json.loads(out.read_text())
  assert doc["quick"] is True
  assert doc["rows"] == rows
  assert [r["rows"] for r in doc["ratios"]] == [
      "flat_groups/flat", "flat_groups/optax_partition",
      "optax_partition/flat_groups", "tree_groups/tree",
      "flat_slices/flat_groups"]


def test_groups_benchmark_runs_only_the_rows_asked_for():
  stdout = _run("--rows", "tree,tree_groups")
  assert [r["row"] for r in _json_rows(stdout)] == ["tree", "tree_groups"]
  assert "| flat " not in stdout and "optax_partition" not in stdout
  assert "tree_groups/tree: step " in stdout
