"""The examples run and do what their docstrings say."""

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS_IMG = ROOT / "docs" / "img"
sys.path.insert(0, str(EXAMPLES))

SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py"))


def test_quickstart_loss_falls(capsys):
  import jax  # pylint: disable=g-import-not-at-top
  import quickstart  # pylint: disable=g-import-not-at-top
  losses = quickstart.main(["--epochs", "3"])
  out = capsys.readouterr().out
  assert "Epoch 1, Loss:" in out and "Epoch 3, Loss:" in out
  assert out.startswith(f"JAX {jax.__version__} on cpu ")
  assert losses[2] < 0.5 * losses[0]
  assert np.all(np.isfinite(losses))


def test_offload_trains_within_the_device_budget(capsys):
  import jax  # pylint: disable=g-import-not-at-top
  out = jax.jit(lambda x: jax.device_put(x, jax.memory.Space.Host))(
      np.zeros(()))
  if out.sharding.memory_kind != "pinned_host":
    pytest.skip("this JAX does not transfer to host memory inside jit")
  import offload  # pylint: disable=g-import-not-at-top
  losses = offload.main(["--steps", "60", "--width", "128"])
  text = capsys.readouterr().out
  assert "memory kinds: ['pinned_host']" in text
  assert losses[-1] < 0.5 * losses[0]


def _snapshot(directory: pathlib.Path) -> dict:
  """name → (modification time, content hash) of every file below."""
  return {str(p.relative_to(directory)): (
      p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(directory.rglob("*")) if p.is_file()}


def test_every_example_is_checked():
  # A new example joins the --help test by being in examples/; this pins
  # the list so that one removed by mistake is noticed too.
  assert SCRIPTS == [
      "data_parallel.py", "doctor_heatmap.py", "finetune_groups.py", "flat_flax.py",
      "flax_linen.py", "flax_nnx.py", "kingma_ba.py", "memory_study.py",
      "offload.py", "quickstart.py", "resume.py", "telemetry.py",
      "variants_study.py"]


def test_finetune_groups_freezes_the_backbone_and_compiles_once(capsys):
  import finetune_groups  # pylint: disable=g-import-not-at-top
  out = finetune_groups.main(["--pretrain-epochs", "2",
                              "--finetune-epochs", "2"])
  text = capsys.readouterr().out
  assert "adapter lr_scale 0.1 -> 0.5" in text
  assert out["compiles"] == 1  # the rate change did not recompile
  assert out["backbone_moved"] == 0.0
  assert out["losses"][-1] < 0.8 * out["losses"][0]
  assert out["accuracy"] > 0.6
  assert "adapter" in text and "no_decay" in text  # describe's group column


@pytest.mark.slow
@pytest.mark.matrix
def test_doctor_heatmap_finds_each_fault_and_clears_with_its_fix(capsys):
  import doctor_heatmap  # pylint: disable=g-import-not-at-top
  results = doctor_heatmap.main(["--steps", "100"])
  found = {name: {(f.path, f.measurement) for f in r["findings"]}
           for name, r in results.items()}
  assert found["bfloat16"] >= {("dense0/kernel", "rounded_away"),
                               ("dense1/kernel", "rounded_away")}
  assert {m for _, m in found["bfloat16"]} == {"rounded_away"}
  assert ("dense0/kernel", "eps_dominated") in found["eps=1e-2"]
  assert {m for _, m in found["eps=1e-2"]} == {"eps_dominated"}
  assert found["bfloat16 + stochastic rounding"] == set()
  assert found["eps=1e-8"] == set()
  losses = results["eps=1e-8"]["losses"]
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
  assert "jadam.stochastic_rounding()" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_writes_nothing(script, flag, tmp_path):
  docs_before = _snapshot(DOCS_IMG)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [str(ROOT)] + ([os.environ["PYTHONPATH"]]
                                if os.environ.get("PYTHONPATH") else [])))
  # The timeout is a backstop only: --help must not train, and an example
  # that did (flat_flax.py once ran its whole study) would print no usage.
  proc = subprocess.run([sys.executable, str(EXAMPLES / script), flag],
                        cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "usage" in proc.stdout, proc.stdout[-4000:]
  assert not list(tmp_path.iterdir())
  assert _snapshot(DOCS_IMG) == docs_before


def test_figures_are_not_written_into_docs_img_by_default():
  import doctor_heatmap
  import kingma_ba
  import memory_study
  import variants_study
  # A relative default lands in the current directory, so it must not be
  # docs/img from any likely starting point.
  defaults = {
      "kingma_ba": kingma_ba.parse_args([]).out_dir,
      "variants_study": variants_study.parse_args([]).out_dir,
      "memory_study --plot": memory_study.parse_args(["--plot"]).plot,
  }
  for name, default in defaults.items():
    assert pathlib.Path(default) == pathlib.Path("jadam-output"), name
    for cwd in (ROOT, EXAMPLES, DOCS_IMG.parent, DOCS_IMG):
      assert (cwd / default).resolve() != DOCS_IMG.resolve(), (name, cwd)
  assert doctor_heatmap.parse_args(["--plot"]).plot.parent == pathlib.Path(
      "jadam-output")
  assert doctor_heatmap.parse_args([]).plot is None
  # memory_study draws figures only when asked to.
  assert memory_study.parse_args([]).plot is None
  # docs/img is still reachable on purpose, under the old option name too.
  assert kingma_ba.parse_args(["--out", "docs/img"]).out_dir == "docs/img"
  assert kingma_ba.parse_args(["--out-dir", "x"]).out_dir == "x"
