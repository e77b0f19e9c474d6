"""The documentation site builds, and the convergence study it reports runs."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import jadam

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def _nav_pages():
  text = (ROOT / "mkdocs.yml").read_text()
  nav = text[text.index("\nnav:"):]
  nav = nav[:re.search(r"\n\S", nav[1:]).start() + 1]
  return re.findall(r":\s*([\w./-]+\.md)", nav)


def test_every_nav_page_and_image_exists():
  pages = _nav_pages()
  assert {"index.md", "getting-started.md", "algorithms.md", "migrating.md",
          "convergence.md", "api.md"} <= set(pages)
  for page in pages:
    text = (ROOT / "docs" / page).read_text()
    assert text.strip(), page
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
      assert (ROOT / "docs" / image).is_file(), (page, image)


def test_mkdocs_build_is_strict_clean(tmp_path):
  pytest.importorskip("mkdocs", reason="needs the docs extra")
  pytest.importorskip("mkdocstrings")
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
       str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin",
                        "HOME": str(tmp_path)})
  assert result.returncode == 0, result.stderr[-3000:]
  api = (tmp_path / "site" / "api" / "index.html").read_text()
  # mkdocstrings rendered the docstrings, not just the headings.
  assert "Kingma" in api and "jadam.adamw" in api
  assert "Decoupled Weight Decay" in api
  # Doctest examples render as highlighted code, Sphinx roles do not leak.
  assert '<span class="gp">&gt;&gt;&gt; </span>' in api
  assert ":func:" not in api and ":class:" not in api
  # The math is handed to MathJax.
  algorithms = (tmp_path / "site" / "algorithms" / "index.html").read_text()
  assert algorithms.count('class="arithmatex"') > 50


# --- The convergence study (examples/kingma_ba.py) at a small size ----------

@pytest.fixture(scope="module")
def study():
  import kingma_ba
  return kingma_ba


@pytest.mark.slow
def test_study_jadam_and_optax_adam_curves_coincide(study):
  data = study.load_data()
  for problem in study.PROBLEMS:
    paper_set = study.default_optimizers(problem)
    assert list(paper_set) == ["jadam Adam", "optax Adam", "SGD Nesterov",
                               "AdaGrad", "RMSProp"]
    adam_rate = study.LEARNING_RATES[problem]["Adam"]
    optimizers = {
        "jadam Adam": paper_set["jadam Adam"],
        "optax Adam": paper_set["optax Adam"],
        # A second, separately built jadam Adam: the seed fixes the
        # initialisation, the batches and the dropout masks, so it repeats.
        "again": jadam.adam(study._schedule(problem, adam_rate)),
    }
    results = study.run_study(problem, optimizers, epochs=3, seeds=(0, 1),
                              hidden=256, data=data, show_progress=False)
    ours, theirs = results["jadam Adam"], results["optax Adam"]
    assert ours.epoch_loss.shape == (2, 3)
    # Bitwise: the compiled Adam steps round as optax's (docs/convergence.md).
    assert study.curve_gap(ours, theirs) == (0.0, 3)
    np.testing.assert_array_equal(ours.epoch_loss, theirs.epoch_loss)
    np.testing.assert_array_equal(ours.final_loss, theirs.final_loss)
    np.testing.assert_array_equal(ours.test_accuracy, theirs.test_accuracy)
    np.testing.assert_array_equal(results["again"].epoch_loss, ours.epoch_loss)
    assert np.all(ours.epoch_loss[:, -1] < 0.5 * ours.epoch_loss[:, 0])
    assert np.all(ours.test_accuracy > 0.8), problem  # chance: 0.1


@pytest.mark.slow
def test_study_script_writes_figure_table_and_control(study, tmp_path, capsys):
  study.main(["--problems", "mlp", "--epochs", "2", "--seeds", "0",
              "--hidden", "256", "--out-dir", str(tmp_path)])
  out = capsys.readouterr().out
  png = tmp_path / "kingma_ba_mlp.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| mlp | final training cost | test accuracy |" in out
  for name in ("jadam Adam", "optax Adam", "SGD Nesterov", "AdaGrad",
               "RMSProp"):
    row = re.search(rf"\| {name} \| (\S+) ± \S+ \| (\S+)% ± \S+ \|", out)
    assert row, name
    # Every optimizer learns: below the uniform guess's cost ln 10 = 2.30,
    # far above the 10% accuracy of chance.
    assert float(row.group(1)) < 2.0 and float(row.group(2)) > 50.0, row[0]
  assert "jadam Adam vs optax Adam: curves agree to 1e-5 for the first 2" in out
  assert "optax Adam, θ0 + 1 ulp vs optax Adam" in out


# --- The examples in the docstrings -----------------------------------------

def _docstring_examples():
  import doctest
  import importlib
  import pkgutil
  finder = doctest.DocTestFinder()
  for info in pkgutil.walk_packages(jadam.__path__, "jadam."):
    module = importlib.import_module(info.name)
    for test in finder.find(module):
      if test.examples and test.name.startswith(info.name):
        yield test


@pytest.mark.parametrize("test", list(_docstring_examples()),
                         ids=lambda test: test.name)
def test_docstring_example_runs_and_prints_what_it_says(test):
  import doctest
  import jax
  if test.name.endswith("_offload.offload") and jax.__version_info__ < (0,
                                                                       10):
    pytest.skip("offload needs JAX 0.10 on the CPU (see docs/memory.md)")
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  result = runner.run(test, out=lambda text: print(text, end=""))
  assert result.failed == 0, test.name


def test_front_page_example_runs_and_is_optax_adamw_bitwise():
  text = (ROOT / "docs" / "index.md").read_text()
  block = text.split("## Ten lines", 1)[1].split("```python\n", 1)[1]
  code = block.split("```", 1)[0]
  assert len(code.strip().splitlines()) <= 12
  import jax
  import optax
  scope = {}
  exec(code, scope)  # pylint: disable=exec-used
  x = jax.random.normal(jax.random.key(0), (32, 3))
  y = x @ jax.numpy.array([1.0, -2.0, 0.5]) + 0.3
  params, state = scope["params"], scope["state"]
  reference = optax.adamw(1e-2, weight_decay=1e-4)
  ref_params, ref_state = params, reference.init(params)

  @jax.jit
  def ref_step(p, s):
    grads = jax.grad(scope["loss"])(p, x, y)
    updates, s = reference.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  for _ in range(200):
    params, state = scope["step"](params, state, x, y)
    ref_params, ref_state = ref_step(ref_params, ref_state)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(scope["loss"](params, x, y)) < 0.5 * float(
      scope["loss"](scope["params"], x, y))


# --- Durations: one table (docs/durations.md) --------------------------------

_DURATION = re.compile(
    r"(?:about|~|roughly|around|nearly|almost|under|over)\s*[0-9][0-9.,]*\s*"
    r"(?:s|sec|secs|seconds|min|mins|minutes|h|hours?)\b"
    r"|\b[0-9][0-9.,]*\s*(?:min|mins|minutes|hours?)\b"
    r"|\ba few (?:seconds|minutes)\b|\b(?:a|one|half an?) (?:minute|hour)\b"
    r"|\b[0-9][0-9.,]*\s*s on (?:a|two|2)\b",
    re.IGNORECASE)


def _prose_files():
  yield ROOT / "README.md"
  yield ROOT / "pyproject.toml"
  # Not docs/design/: the design notes record past runs with their dates.
  for pattern in ("docs/*.md", "examples/*.py", "jadam/**/*.py",
                  "benchmarks/*.py", "benchmarks/*.sh"):
    yield from sorted(ROOT.glob(pattern))


def test_durations_are_only_in_the_durations_table():
  """How long a command takes is said once, in docs/durations.md (with what
  it includes and the machine); elsewhere a page links to it. Measurements
  of one operation (a step in ms, a compile in s) stay on their pages."""
  table = ROOT / "docs" / "durations.md"
  assert "| command |" in table.read_text()
  stray = []
  for path in _prose_files():
    if path == table:
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      for match in _DURATION.finditer(line):
        stray.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)}")
  assert not stray, "durations outside docs/durations.md:\n" + "\n".join(
      stray)


def test_install_lines_are_the_readme_demo_command_with_jax_extras():
  """The GPU and TPU lines are the README's CPU line with one JAX extra
  added, and the installed JAX declares each extra they name."""
  import importlib.metadata
  readme = (ROOT / "README.md").read_text()
  cpu = next(line for line in readme.splitlines()
             if line.startswith("python3 -m venv .venv") and "[examples]"
             in line)
  extras = set(importlib.metadata.metadata("jax").get_all("Provides-Extra"))
  for page in ("index.md", "getting-started.md"):
    lines = [line for line in (ROOT / "docs" / page).read_text().splitlines()
             if line.startswith("python3 -m venv .venv")]
    assert cpu in lines, page
    named = []
    for line in lines:
      if line == cpu:
        continue
      found = re.search(r' -U "jax\[(\w+)\]"', line)
      assert found and line.replace(found.group(0), "") == cpu, line
      named.append(found.group(1))
    assert named and set(named) <= extras, (page, named)
  assert {"cuda13", "cuda12", "tpu"} <= set(re.findall(
      r'"jax\[(\w+)\]"', (ROOT / "docs" / "getting-started.md").read_text()))
