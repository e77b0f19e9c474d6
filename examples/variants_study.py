"""Adam's variants against Adam on the digits tasks of the convergence study.

The problems, data split, initialisation, minibatches and dropout masks are
those of ``examples/kingma_ba.py`` (Kingma & Ba's Figures 1 and 2 on
scikit-learn's 8×8 digits): every optimizer sees the same minibatches in the
same order and the same dropout masks for a given seed.

Compared, each with the learning rate that gave the lowest final training
cost on seed 0 over a small grid (``--tune`` reruns the search):

* Adam (jadam.adam), the baseline;
* Cautious Adam (``jadam.adam(..., cautious=True)``);
* ADOPT (``jadam.contrib.adopt``);
* AdEMAMix (``jadam.contrib.ademamix``, β3 = 0.999 and α = 5: the paper advises a
  smaller β3 for runs of a few hundred steps, as here);
* schedule-free AdamW (``jadam.contrib.schedule_free_adamw``, no weight decay, a
  warmup of one epoch), evaluated at ``jadam.contrib.schedule_free_eval_params``.

For logistic regression the Adam-family rates decay as α/√t as in the paper;
schedule-free AdamW keeps its rate constant, which is its point.

Run: python examples/variants_study.py   (how long: docs/durations.md;
prints the tables and writes variants_logreg.png and variants_mlp.png into
./jadam-output/, made in the current directory if needed; ``--out DIR``
writes them elsewhere, and ``--help`` lists the other options)

Refresh the figures of docs/variants.md, which are committed, explicitly:

    python examples/variants_study.py --out docs/img
"""

from __future__ import annotations

import pathlib
import sys
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kingma_ba  # noqa: E402  pylint: disable=g-import-not-at-top

PROBLEMS = kingma_ba.PROBLEMS
BATCH_SIZE = kingma_ba.BATCH_SIZE
VARIANTS = ("Adam", "Cautious Adam", "ADOPT", "AdEMAMix",
            "Schedule-free AdamW")

# Chosen with ``--tune`` (30 epochs, seed 0): the grid value with the lowest
# final training cost, per variant and problem. On the MLP, schedule-free
# AdamW fits the training split exactly (cost 0.0 in float32) at 3e-2.
LEARNING_RATES = {
    "logreg": {"Adam": 0.3, "Cautious Adam": 0.3, "ADOPT": 1.0,
               "AdEMAMix": 0.1, "Schedule-free AdamW": 0.3},
    "mlp": {"Adam": 3e-3, "Cautious Adam": 1e-3, "ADOPT": 3e-3,
            "AdEMAMix": 3e-3, "Schedule-free AdamW": 3e-2},
}
GRID = {"logreg": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        "mlp": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)}


class Candidate(NamedTuple):
  """An optimizer and the map from its training to its evaluation params."""

  opt: optax.GradientTransformation
  eval_params: Callable[[optax.OptState, optax.Params], optax.Params]


def _train_params(state, params):
  del state
  return params


def make_variant(name: str, problem: str, learning_rate: float,
                 steps_per_epoch: int) -> Candidate:
  """The optimizer called ``name`` at ``learning_rate`` for ``problem``."""
  decayed = (
      (lambda count: learning_rate / jnp.sqrt(count + 1.0))
      if problem == "logreg" else learning_rate)
  if name == "Adam":
    return Candidate(jadam.adam(decayed), _train_params)
  if name == "Cautious Adam":
    return Candidate(jadam.adam(decayed, cautious=True), _train_params)
  if name == "ADOPT":
    return Candidate(jadam.contrib.adopt(decayed), _train_params)
  if name == "AdEMAMix":
    return Candidate(jadam.contrib.ademamix(decayed, b3=0.999, alpha=5.0),
                     _train_params)
  if name == "Schedule-free AdamW":
    return Candidate(
        jadam.contrib.schedule_free_adamw(learning_rate,
                                  warmup_steps=steps_per_epoch),
        jadam.contrib.schedule_free_eval_params)
  raise ValueError(f"unknown variant {name!r}; use one of {VARIANTS}.")


def _epoch_fn(problem: str, opt: optax.GradientTransformation) -> Callable:
  """One jitted pass over a stack of minibatches."""
  use_dropout = problem == "mlp"

  @jax.jit
  def run_epoch(params, state, xb, yb, keys):
    def step(carry, batch):
      params, state = carry
      x, y, k = batch
      loss, grads = jax.value_and_grad(
          lambda p: kingma_ba.loss_fn(problem, p, x, y,
                                      k if use_dropout else None))(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss
    (params, state), losses = jax.lax.scan(step, (params, state),
                                           (xb, yb, keys))
    return params, state, jnp.mean(losses)

  return run_epoch


def _train_one(problem: str, candidate: Candidate, run_epoch: Callable,
               data: kingma_ba.Data, seed: int, epochs: int,
               hidden: int) -> tuple[np.ndarray, float, float]:
  # Same seeds → same initialisation, minibatch order and dropout masks as
  # kingma_ba.py's runs.
  init_key, dropout_root = jax.random.split(jax.random.PRNGKey(seed))
  params = kingma_ba.init_params(problem, init_key, hidden=hidden)
  state = candidate.opt.init(params)
  order_rng = np.random.default_rng(seed)
  steps = len(data.x_train) // BATCH_SIZE
  full_cost = jax.jit(lambda p: kingma_ba.loss_fn(
      problem, p, data.x_train, data.y_train))
  epoch_loss = []
  for epoch in range(epochs):
    order = order_rng.permutation(len(data.x_train))[:steps * BATCH_SIZE]
    order = order.reshape(steps, BATCH_SIZE)
    keys = jax.random.split(jax.random.fold_in(dropout_root, epoch), steps)
    params, state, _ = run_epoch(params, state, data.x_train[order],
                                 data.y_train[order], keys)
    # The cost on the whole training split, dropout off, at the parameters
    # one would evaluate: for schedule-free AdamW those are x, not the y the
    # gradients are taken at (whose minibatch cost with dropout says little).
    epoch_loss.append(float(full_cost(candidate.eval_params(state, params))))
  evaluated = candidate.eval_params(state, params)
  final_loss = float(full_cost(evaluated))
  predictions = jnp.argmax(
      kingma_ba.logits_fn(problem, evaluated, data.x_test), -1)
  accuracy = float(jnp.mean(predictions == data.y_test))
  return np.asarray(epoch_loss), final_loss, accuracy


def run_variants(problem: str, rates: Mapping[str, float],
                 epochs: int = 30, seeds: Sequence[int] = (0, 1, 2),
                 hidden: int = 1000, data: kingma_ba.Data | None = None,
                 verbose: bool = True) -> dict[str, kingma_ba.StudyResult]:
  """Train ``problem`` with each variant in ``rates`` (name → learning rate).

  Returns:
    name → ``kingma_ba.StudyResult``: after each epoch, and at the end, the
    cost on the whole training split (dropout off) and the test accuracy,
    all at the evaluation parameters.
  """
  data = kingma_ba.load_data() if data is None else data
  steps_per_epoch = len(data.x_train) // BATCH_SIZE
  results = {}
  for name, rate in rates.items():
    candidate = make_variant(name.split(" @ ")[0], problem, rate,
                             steps_per_epoch)
    run_epoch = _epoch_fn(problem, candidate.opt)
    runs = [_train_one(problem, candidate, run_epoch, data, seed, epochs,
                       hidden) for seed in seeds]
    results[name] = kingma_ba.StudyResult(
        np.stack([r[0] for r in runs]), np.array([r[1] for r in runs]),
        np.array([r[2] for r in runs]))
    if verbose:
      print(f"  {problem} {name}: final cost "
            f"{results[name].final_loss.mean():.4g}", flush=True)
  return results


def tune(problem: str, epochs: int, hidden: int,
         data: kingma_ba.Data) -> dict[str, float]:
  """The grid rate with the lowest final training cost (seed 0), per variant."""
  best = {}
  for name in VARIANTS:
    rates = {f"{name} @ {lr:g}": lr for lr in GRID[problem]}
    results = run_variants(problem, rates, epochs, (0,), hidden, data,
                           verbose=False)
    costs = {rates[k]: float(r.final_loss[0]) for k, r in results.items()}
    costs = {k: (c if np.isfinite(c) else np.inf) for k, c in costs.items()}
    best[name] = min(costs, key=costs.get)
    print(f"{problem} {name}: " + ", ".join(
        f"{k:g}→{c:.4g}" for k, c in costs.items()), flush=True)
  return best


def format_table(problem: str,
                 results: Mapping[str, kingma_ba.StudyResult]) -> str:
  """Markdown: final training cost and test accuracy, mean ± std over seeds.

  Costs are printed with three significant digits, since several variants
  drive the MLP's training cost far below 1e-4.
  """
  lines = [f"| {problem} | learning rate | final training cost "
           "| test accuracy |", "| --- | --- | --- | --- |"]
  for name, r in results.items():
    rate = LEARNING_RATES[problem].get(name, float("nan"))
    lines.append(
        f"| {name} | {rate:g} | {r.final_loss.mean():.3g} ± "
        f"{r.final_loss.std():.2g} | {100 * r.test_accuracy.mean():.2f}% ± "
        f"{100 * r.test_accuracy.std():.2f} |")
  return "\n".join(lines)


def parse_args(argv=None):
  """The command line of kingma_ba.py's study, figures named variants_*.png."""
  return kingma_ba.study_arguments(__doc__.splitlines()[0],
                                   "variants").parse_args(argv)


def main(argv=None) -> dict[str, dict[str, kingma_ba.StudyResult]]:
  """Run the comparison (or, with ``--tune``, the learning-rate search).

  Returns:
    problem → name → ``kingma_ba.StudyResult`` (empty with ``--tune``).
  """
  args = parse_args(argv)

  data = kingma_ba.load_data()
  print(f"digits: {len(data.x_train)} training and {len(data.x_test)} test "
        f"images; {args.epochs} epochs, seeds {args.seeds}, batch "
        f"{BATCH_SIZE}", flush=True)
  if args.tune:
    for problem in args.problems:
      print(f"{problem}: best rates",
            tune(problem, args.epochs, args.hidden, data), flush=True)
    return {}
  out_dir = pathlib.Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  all_results = {}
  for problem in args.problems:
    results = run_variants(problem, LEARNING_RATES[problem], args.epochs,
                           args.seeds, args.hidden, data)
    path = out_dir / f"variants_{problem}.png"
    kingma_ba.plot_study(results, problem, path)
    print(format_table(problem, results))
    print(f"wrote {path}\n", flush=True)
    all_results[problem] = results
  return all_results


if __name__ == "__main__":
  main()
