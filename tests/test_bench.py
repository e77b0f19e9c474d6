"""The benchmark CLI (``python -m benchmarks.bench``): what it runs, how it
plans memory, and what its output says."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

# The benchmark lives in the clone's benchmarks/ package, not in jadam.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import bench  # pylint: disable=wrong-import-position

# Bytes per parameter of both moments in int8 with a float32 scale per block
# of 256: 2 + 8/256.
INT8_BYTES_PER_PARAM = 2 + 8 / 256


def _num_params(shapes):
  return sum(int(np.prod(s)) for s in shapes.values())


def _no_torch(monkeypatch):
  """This process as if PyTorch were not installed."""
  real = bench._importable
  monkeypatch.setattr(bench, "_torch_adam_kind", lambda: None)
  monkeypatch.setattr(bench, "_importable",
                      lambda name: name != "torch" and real(name))


@pytest.mark.slow
def test_benchmark_quick_run_says_it_is_a_smoke_test_and_writes_the_json(
    tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  # torch is bench-only: leave the torch row out of the test run.
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.bench", "--quick", "--steps", "2",
       "--warmup", "1", "--impls", "jadam,jadam_tree,optax",
       "--json", str(out)], check=True, env=env, capture_output=True,
      text=True, timeout=600)
  assert done.stdout.startswith("Quick smoke test (--quick)")
  assert bench.QUICK_CAPTION in done.stdout
  # The plan comes before the table.
  assert done.stdout.index("Memory plan:") < done.stdout.index("| tree |")
  full = {"single_16m", "blocks_256x64k", "many_2000x8k", "gpt_like"}
  for name in full:
    assert f"| {name} |" not in done.stdout
  doc = json.loads(out.read_text())
  assert doc["quick"] is True
  trees = {bench.QUICK_NAMES[name]: name for name in full}
  assert set(doc["floor_ms"]) == set(trees)
  assert all(ms > 0 for ms in doc["floor_ms"].values())
  rows = {(r["tree"], r["impl"]): r for r in doc["results"]}
  for label, name in trees.items():
    params = _num_params(bench.TREES[name](True))
    assert doc["plan"]["trees"][label]["params"] == params
    for impl in ("jadam", "jadam_tree", "optax"):
      row = rows[(label, impl)]
      assert set(row) == {"tree", "impl", "step_ms", "compile_s",
                          "state_bytes_per_param", "params",
                          "float32_moment_leaves", "float32_moment_params"}
      assert row["params"] == params
      assert row["step_ms"] > 0 and row["compile_s"] > 0
      # Adam keeps m and v in float32 (plus one step counter per tree).
      assert 8.0 <= row["state_bytes_per_param"] < 8.1
  train = bench.tree_label(bench.TRAIN_TREE, True)
  assert {(train, "jadam"), (train, "optax")} <= set(rows)


def test_benchmark_quick_trees_are_named_by_their_own_size():
  # A quick tree never carries its full-size name: its name gives its size
  # (k = 1024 elements in the synthetic trees, 1000 parameters in the LMs).
  def count(text):
    value = float(text[:-1])
    return value * {"k": 1000, "m": 1e6}[text[-1]]

  for name, make in bench.TREES.items():
    label = bench.tree_label(name, quick=True)
    assert label != name and label not in bench.TREES
    shapes = make(True)
    size = label.rsplit("_", 1)[1]
    if "x" in size:  # blocks_16x4k: 16 leaves of 4096 elements
      leaves, per_leaf = size.split("x")
      assert len(shapes) == int(leaves)
      assert {int(np.prod(s)) for s in shapes.values()} == {
          int(count(per_leaf) * 1.024)}
    elif name.startswith("single"):
      assert _num_params(shapes) == int(count(size) * 1.024)
    else:
      assert abs(_num_params(shapes) - count(size)) < 0.005 * count(size)
  assert bench.tree_label("single_16m", quick=False) == "single_16m"
  assert bench.tree_label(bench.TRAIN_TREE, quick=True) == "gpt_like_921k_train"


def test_benchmark_int8_rows_on_quick_trees_store_int8():
  # The quick trees' leaves reach int8's min_size (4096) and have rows of
  # 256, as at full size: flat and tree rows store 2 + 8/256 bytes.
  trees = ["single_16m", "blocks_256x64k", "many_2000x8k"]
  doc = bench.run(trees, ["jadam_int8", "jadam_tree_int8"], steps=1,
                  warmup=0, quick=True, log=lambda _: None)
  assert len(doc["results"]) == 6
  for row in doc["results"]:
    assert row["state_bytes_per_param"] == pytest.approx(
        INT8_BYTES_PER_PARAM, abs=0.002), row
    assert row["float32_moment_leaves"] == 0
  assert "*" not in bench.format_table(doc)


def test_benchmark_counts_the_leaves_that_keep_float32_moments():
  # A bias under min_size keeps float32 moments in an int8 row: the row
  # says how many leaves and parameters, and the table marks it.
  runner = bench.IMPLS["jadam_tree_int8"]({"w": (16, 256), "b": (256,)})
  assert runner.float32_moments == (1, 256)
  assert runner.state_bytes / runner.num_params == pytest.approx(
      (4096 * INT8_BYTES_PER_PARAM + 256 * 8 + 4) / 4352)
  assert bench.IMPLS["jadam_int8"]({"w": (16, 256)}).float32_moments == (
      0, 0)
  assert bench.IMPLS["jadam_tree_bf16"]({"b": (256,)}).float32_moments == (
      0, 0)
  doc = {"results": [{
      "tree": "gpt_like_921k", "impl": "jadam_tree_int8", "step_ms": 1.0,
      "compile_s": 1.0, "state_bytes_per_param": 2.06, "params": 921344,
      "float32_moment_leaves": 10, "float32_moment_params": 3840}],
         "floor_ms": {}}
  table = bench.format_table(doc)
  assert "| 2.06* |" in table
  assert ("* jadam_tree_int8 on gpt_like_921k: 10 leaves (3,840 of 921,344 "
          "parameters) keep float32 moments") in table


def test_benchmark_without_torch_says_so_once_and_has_no_torch_column(
    monkeypatch):
  _no_torch(monkeypatch)
  messages = []
  doc = bench.run(["single_16m"], ["jadam", "optax", "torch_fused",
                                   "torch_foreach"], steps=1, warmup=0,
                  quick=True, log=messages.append)
  assert sum(m.count("PyTorch is not installed") for m in messages) == 1
  assert "Skipped torch_fused, torch_foreach: PyTorch is not installed" in (
      "\n".join(messages))
  assert doc["skipped"]["torch_fused"] == doc["skipped"]["torch_foreach"]
  table = bench.format_table(doc).splitlines()
  assert not any("torch" in line for line in table)
  assert table[table.index(bench.QUICK_CAPTION) + 2].endswith(
      "| × floor | × optax |")
  # With a torch_fused row, its column is back.
  doc["results"].append(dict(doc["results"][0], impl="torch_fused",
                             step_ms=2 * doc["results"][0]["step_ms"],
                             compile_s=None))
  table = bench.format_table(doc).splitlines()
  header = table.index(bench.QUICK_CAPTION) + 2
  assert table[header].endswith("| × optax | × torch_fused |")
  assert table[header + 2].startswith("| single_16k | jadam |")
  assert table[header + 2].endswith("| 0.50 |")


def test_benchmark_without_flax_skips_the_training_row_and_says_why(
    monkeypatch):
  # An install without the extras has no Flax: the training-step row, which
  # builds a Flax model, is skipped up front with the reason, and the other
  # rows still run.
  real = bench._importable
  monkeypatch.setattr(bench, "_importable",
                      lambda name: name != "flax" and real(name))
  messages = []
  doc = bench.run(["single_16m", bench.TRAIN_TREE], ["jadam"], steps=1,
                  warmup=0, quick=True, log=messages.append)
  assert any("Skipped gpt_like_921k_train: it needs Flax" in m
             for m in messages)
  assert {r["tree"] for r in doc["results"]} == {"single_16k"}


def test_benchmark_large_trees_are_the_accelerator_presets():
  # --size large: the trees of the GPU comparison, at their real sizes
  # (shapes only: nothing is allocated here).
  counts = {name: (len(shapes), sum(int(np.prod(s)) for s in shapes.values()))
            for name in bench.SIZES["large"]
            for shapes in [bench.TREES[name](False)]}
  assert counts["llama_1b"][0] == 201
  assert 1.09e9 < counts["llama_1b"][1] < 1.11e9
  assert counts["gpt2_small"] == (148, 124_439_808)
  assert counts["many_1000x64k"] == (1000, 1000 * 65536)
  assert counts["single_256m"] == (1, 1 << 28)


def test_benchmark_groups_fill_the_memory_in_order():
  groups, too_big = bench.plan_groups(
      {"a": 4, "b": 4, "c": 3, "big": 11, "d": 10, "e": 1}, limit=10)
  # a+b fit (8), c would make 11: a new group; d needs a group of its own;
  # e follows it in a new one; big cannot run even alone.
  assert groups == [["a", "b"], ["c"], ["d"], ["e"]]
  assert too_big == {"big": 11}


def test_benchmark_row_sizes_count_the_data_twice_and_the_compilation():
  shapes = bench.TREES["llama_1b"](False)
  n = sum(int(np.prod(s)) for s in shapes.values())
  # Twice params (4) + grads (4) + the state, which is counted from the
  # optimizer's own init without allocating it: float32 m and v (8), or
  # int8 codes (2) with block scales; plus a step counter. Then what
  # compiling the step takes: growing with the leaves (one for a flat row).
  compile_bytes = lambda impl: bench.IMPLS[impl].compile_bytes(shapes)
  assert bench.row_bytes("jadam", shapes) == (
      2 * (16 * n + 4) + compile_bytes("jadam"))
  assert bench.row_bytes("jadam_tree", shapes) == (
      2 * (16 * n + 4) + compile_bytes("jadam_tree"))
  assert 2 * 10 * n < bench.row_bytes("jadam_int8", shapes) < 2 * 10.1 * n
  assert bench.row_bytes("bnb_adam8bit", shapes) == 2 * 10 * n
  # A factory without a size of its own counts float32 Adam.
  assert bench.row_bytes("torch_foreach", shapes) == 2 * 16 * n


def test_benchmark_compiling_int8_moments_on_many_leaves_is_counted():
  # What filled a 24 GiB machine: compiling the int8 step over the 2000
  # leaves of many_2000x8k (measured 7.8 GB at 1000 leaves, growing as
  # leaves**1.5). The estimate says so; the flat path compiles one buffer.
  shapes = bench.TREES["many_2000x8k"](False)
  tree_int8 = bench.IMPLS["jadam_tree_int8"].compile_bytes(shapes)
  assert 20e9 < tree_int8 < 25e9
  assert bench.IMPLS["jadam_int8"].compile_bytes(shapes) < 1e6
  thousand = {f"w{i}": (8192,) for i in range(1000)}
  assert 7e9 < bench.IMPLS["jadam_tree_int8"].compile_bytes(thousand) < 9e9
  assert bench.IMPLS["jadam_tree"].compile_bytes(thousand) < 0.5e9


def test_default_plan_keeps_a_24_gib_machine_half_free(monkeypatch):
  # 22 GB available on a 24 GiB machine: the budget is half of it; every
  # group of the default run fits it, probe and data included, and the int8
  # tree row of many_2000x8k is skipped for what compiling it takes.
  available = 22 * 10**9
  monkeypatch.setattr(bench, "_device_memory_is_the_hosts", lambda: True)
  monkeypatch.setattr(bench, "memory_limit", lambda: available)
  trees = bench.SIZES["default"] + [bench.TRAIN_TREE]
  # As the benchmark does: offload rows only where this JAX can offload.
  impls = [name for name in bench.IMPLS if name != "bnb_adam8bit" and (
      "offload" not in name or bench.OPTIONAL[name]())]
  plan = bench.plan(trees, impls, quick=False, probe_bytes=64 << 20)
  assert plan["budget_bytes"] == available // 2
  for label, entry in plan["trees"].items():
    overhead = entry["host_bytes"] + (
        0 if label == bench.TRAIN_TREE else plan["probe_bytes"])
    for group in entry["groups"]:
      used = overhead + sum(entry["rows"][name] for name in group)
      assert used <= available // 2, (label, group)
  assert plan["trees"]["many_2000x8k"]["skipped"].keys() == {
      "jadam_tree_int8"}
  assert "to compile a step over 2000 leaves" in (
      plan["trees"]["many_2000x8k"]["skipped"]["jadam_tree_int8"])
  for label in ("single_16m", "blocks_256x64k", "gpt_like"):
    assert plan["trees"][label]["skipped"] == {}


def test_benchmark_prints_its_plan_and_keeps_to_it(monkeypatch):
  # A small fake MemAvailable: the budget is half of it, the plan is shown
  # before anything runs, and the rows run in the groups it names; a row
  # that does not fit even alone is skipped with the reason.
  shapes = bench.TREES["gpt2_small"](True)
  host = bench.HOST_BYTES_PER_PARAM * _num_params(shapes)
  probe = 1 << 20
  rows = {name: bench.row_bytes(name, shapes)
          for name in ("jadam", "jadam_int8", "jadam_bf16", "jadam_tree_int8")}
  # Room beside the data and the probe for jadam and jadam_int8 together;
  # jadam_bf16 then starts a group; compiling jadam_tree_int8's step over
  # 28 leaves takes more than that alone.
  budget = host + probe + rows["jadam"] + rows["jadam_int8"]
  assert rows["jadam_tree_int8"] > budget - host - probe
  monkeypatch.setattr(bench, "_device_memory_is_the_hosts", lambda: True)
  monkeypatch.setattr(bench, "memory_limit", lambda: 2 * budget + 1)
  events = []
  doc = bench.run(["gpt2_small"], list(rows), steps=1, warmup=0, quick=True,
                  log=events.append, probe_bytes=probe,
                  show=lambda text: events.append(("plan", text)))
  assert events[0][0] == "plan" and "setting up" in events[1]
  text = " ".join(events[0][1].split())  # unwrapped
  assert text.startswith("Memory plan: ")
  assert "the budget is half of it" in text
  assert "gpt2_137k: 136,960 parameters in 28 leaves" in text
  assert "in 2 groups: jadam, jadam_int8; jadam_bf16" in text
  assert "skipped, needing more than" in text
  assert doc["plan"]["budget_bytes"] == budget
  assert doc["groups"] == {"gpt2_137k": [["jadam", "jadam_int8"],
                                         ["jadam_bf16"]]}
  assert [r["impl"] for r in doc["results"]] == ["jadam", "jadam_int8",
                                                 "jadam_bf16"]
  why = doc["skipped"]["jadam_tree_int8 on gpt2_137k"]
  assert why.startswith("needs about")
  assert "of it to compile a step over 28 leaves" in why

  # Half as much: no row fits beside the data, and each says why.
  monkeypatch.setattr(bench, "memory_limit", lambda: budget)
  doc = bench.run(["gpt2_small"], ["jadam"], steps=1, warmup=0, quick=True,
                  log=lambda _: None, probe_bytes=probe)
  assert doc["results"] == []
  why = doc["skipped"]["jadam on gpt2_137k"]
  assert why.startswith("needs about") and "copies of the data" in why


def test_benchmark_times_rows_in_groups_when_they_do_not_fit_together():
  # The large trees do not fit all their rows at once on one device: rows
  # then run in consecutive groups, each with its own probe, and a row that
  # cannot fit even alone is skipped with its size.
  shapes = bench.TREES["gpt2_small"](True)
  one_row = bench.row_bytes("jadam", shapes)
  two_rows = one_row + bench.row_bytes("jadam_tree", shapes)
  assert bench.row_bytes("optax", shapes) + bench.row_bytes(
      "jadam_int8", shapes) <= two_rows
  probe = 1 << 20
  # The rows share one draw of parameters and gradients; none may write
  # into it (the steps donate their copies).
  params, grads = bench._tree_data(shapes)
  drawn = {k: v.copy() for k, v in {**params, **{"g" + k: v for k, v in
                                                 grads.items()}}.items()}
  doc = bench.run(["gpt2_small"], ["jadam", "jadam_tree", "optax",
                                   "jadam_int8"],
                  steps=1, warmup=0, quick=True, log=lambda _: None,
                  probe_bytes=probe, memory_bytes=probe + two_rows)
  assert doc["groups"] == {"gpt2_137k": [["jadam", "jadam_tree"],
                                         ["optax", "jadam_int8"]]}
  assert [r["impl"] for r in doc["results"]] == [
      "jadam", "jadam_tree", "optax", "jadam_int8"]
  assert doc["floor_ms"]["gpt2_137k"] > 0
  assert doc["skipped"] == {}
  for k, v in {**params, **{"g" + k: v for k, v in grads.items()}}.items():
    np.testing.assert_array_equal(v, drawn[k])

  doc = bench.run(["gpt2_small"], ["jadam", "jadam_int8"], steps=1,
                  warmup=0, quick=True, log=lambda _: None,
                  probe_bytes=probe, memory_bytes=probe + one_row - 1)
  assert [r["impl"] for r in doc["results"]] == ["jadam_int8"]
  assert doc["skipped"]["jadam on gpt2_137k"].startswith("needs about")


def test_benchmark_counts_its_own_host_copies_where_the_device_is_the_host(
    monkeypatch):
  # On a CPU the drawn data (and a flat row's packed copy) share the memory
  # with the rows: a row that would fit on its own does not fit beside them.
  shapes = bench.TREES["single_16m"](True)
  host = bench.HOST_BYTES_PER_PARAM * 16384
  probe = 1 << 20
  one_row = bench.row_bytes("jadam", shapes)
  monkeypatch.setattr(bench, "_device_memory_is_the_hosts", lambda: True)
  # The budget is half of what is available.
  monkeypatch.setattr(bench, "memory_limit", lambda: 2 * (probe + one_row))
  doc = bench.run(["single_16m"], ["jadam"], steps=1, warmup=0, quick=True,
                  log=lambda _: None, probe_bytes=probe)
  assert doc["results"] == []
  assert "copies of the data" in doc["skipped"]["jadam on single_16k"]
  monkeypatch.setattr(bench, "memory_limit",
                      lambda: 2 * (probe + one_row + host))
  doc = bench.run(["single_16m"], ["jadam"], steps=1, warmup=0, quick=True,
                  log=lambda _: None, probe_bytes=probe)
  assert [r["impl"] for r in doc["results"]] == ["jadam"]


def test_an_interrupted_benchmark_reports_the_rows_it_measured(monkeypatch):
  # Ctrl-C, or a time limit's SIGINT, during the second tree: the first
  # tree's rows and floor are still returned, marked as interrupted.
  real, calls = bench._interleave, []

  def interleave(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(bench, "_interleave", interleave)
  doc = bench.run(["single_16m", "gpt2_small"], ["jadam", "optax"], steps=1,
                  warmup=0, quick=True, log=lambda _: None)
  assert doc["interrupted"]
  assert [(r["tree"], r["impl"]) for r in doc["results"]] == [
      ("single_16k", "jadam"), ("single_16k", "optax")]
  assert set(doc["floor_ms"]) == {"single_16k"}


def test_benchmark_reports_the_machine_and_why_rows_are_skipped(monkeypatch):
  real = bench._importable
  monkeypatch.setattr(bench, "_importable",
                      lambda name: name != "bitsandbytes" and real(name))
  monkeypatch.setitem(bench.OPTIONAL, "bnb_adam8bit", lambda: False)
  doc = bench.run(["single_256m"], ["jadam", "bnb_adam8bit"], steps=1,
                  warmup=0, quick=True, log=lambda _: None)
  assert doc["skipped"] == {"bnb_adam8bit": "bitsandbytes is not installed"}
  machine = doc["machine"]
  assert machine["backend"] == jax.default_backend()
  assert machine["device_kind"] == jax.devices()[0].device_kind
  assert machine["jax"] == jax.__version__ and machine["probe_bytes"] > 0
  line = bench.describe_machine(machine)
  assert machine["device_kind"] in line and f"jax {jax.__version__}" in line
  # Far beyond the last-level cache: 64 MiB on a CPU, 1 GiB elsewhere.
  assert bench.default_probe_bytes() == (
      64 << 20 if jax.default_backend() == "cpu" else 1 << 30)
