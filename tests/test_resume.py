"""Exact resume: N steps, orbax save, restore into abstract targets, N more
steps give bitwise the parameters and state of 2N straight steps.

A fresh-process resume after SIGKILL is checked with examples/resume.py.
"""

import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jadam
from conftest import assert_bitwise  # pylint: disable=g-bad-import-order

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
N = 3  # steps before and after the checkpoint


def _params(dtype=jnp.float32):
  # "big" has more than 4096 entries so that int8 storage really quantizes it.
  return {"big": jnp.linspace(-1.0, 1.0, 64 * 80, dtype=dtype).reshape(64, 80),
          "layer": {"bias": jnp.zeros(5, dtype), "scale": jnp.ones((), dtype)}}


def _loss(params, t):
  """A smooth loss whose data change with the step t."""
  total = 0.0
  for i, p in enumerate(jax.tree.leaves(params)):
    p = p.astype(jnp.float32)
    target = jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)
                     * 0.37 + t + i)
    total += jnp.mean((jnp.tanh(p) - 0.5 * target) ** 2)
  return total


def _flat_case():
  decay = {"big": True, "layer": {"bias": False, "scale": False}}
  view = jadam.FlatView(_params(), groups=decay)
  return (jadam.adamw(0.05, weight_decay=1e-3, mask=view.mask(decay)),
          view.ravel(_params()), lambda flat, t: _loss(view.unravel(flat), t))


# name -> () -> (optimizer, initial params, loss(params, t))
CASES = {
    name: (lambda name=name: (getattr(jadam, name)(0.05), _params(), _loss))
    for name in ["adam", "adamw", "nadam", "amsgrad", "adamax", "radam",
                 "adopt", "ademamix",
                 "schedule_free_adamw"]
}
CASES.update({
    "chain_clip_schedule": lambda: (optax.chain(
        optax.clip_by_global_norm(0.5), jadam.scale_by_adam(),
        optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.1, 10))),
        _params(), _loss),
    "inject_hyperparams": lambda: (optax.inject_hyperparams(jadam.adamw)(
        learning_rate=0.05, weight_decay=1e-3), _params(), _loss),
    "multisteps": lambda: (optax.MultiSteps(jadam.adam(0.05), 2), _params(),
                           _loss),
    "skip_nonfinite_telemetry": lambda: (jadam.with_telemetry(
        jadam.skip_nonfinite(jadam.adamw(0.05))), _params(), _loss),
    "apply_if_finite": lambda: (optax.apply_if_finite(jadam.adam(0.05), 3),
                                _params(), _loss),
    "bf16_moments": lambda: (jadam.adam(0.05, mu_dtype="bfloat16",
                                        nu_dtype="bfloat16"), _params(), _loss),
    "f16_moments": lambda: (jadam.adam(0.05, mu_dtype="float16",
                                       nu_dtype="float16"), _params(), _loss),
    "int8_moments": lambda: (jadam.adam(0.05, mu_dtype="int8",
                                        nu_dtype="int8"), _params(), _loss),
    "int8_amsgrad": lambda: (jadam.amsgrad(0.05, mu_dtype="int8",
                                           nu_dtype="int8"), _params(), _loss),
    "bf16_params_stochastic_rounding": lambda: (optax.chain(
        jadam.adam(1e-3), jadam.stochastic_rounding(seed=7)),
        _params(jnp.bfloat16), _loss),
    "flat_fast_path": _flat_case,
    "zero1_one_device": lambda: (jadam.sharding.zero1(
        jadam.adam(0.05), jax.make_mesh((1,), ("data",))), _params(), _loss),
})


def _stepper(opt, loss):
  @jax.jit
  def step(params, state, t):
    grads = jax.grad(loss)(params, t)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step




@pytest.mark.parametrize("case", sorted(CASES))
def test_n_plus_n_steps_through_orbax_equal_2n_straight(case, tmp_path):
  opt, params0, loss = CASES[case]()
  step = _stepper(opt, loss)

  params, state = params0, opt.init(params0)
  for t in range(2 * N):
    params, state = step(params, state, t)
  straight = {"params": params, "opt_state": state}

  params, state = params0, opt.init(params0)
  for t in range(N):
    params, state = step(params, state, t)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  del params, state

  # Abstract targets: no arrays are computed, and the restored tree has the
  # optimizer's own NamedTuple structure rather than orbax's dicts. Sharded
  # state needs concrete shardings in its target (see the next test).
  abstract_params = jax.eval_shape(lambda: params0)
  abstract_state = (jadam.sharding.abstract_state if case.startswith("zero1")
                    else lambda opt, p: jax.eval_shape(opt.init, p))
  target = {"params": abstract_params,
            "opt_state": abstract_state(opt, abstract_params)}
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  assert (jax.tree.structure(restored)
          == jax.tree.structure(jax.eval_shape(lambda: straight)))
  params, state = restored["params"], restored["opt_state"]
  for t in range(N, 2 * N):
    params, state = step(params, state, t)
  assert_bitwise({"params": params, "opt_state": state}, straight)


def _save(path, tree):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()


def _leaf_bytes(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def continue_from_checkpoint(case, path, out):
  """Restore ``case`` from ``path``, take N more steps, save leaf bytes."""
  opt, params0, loss = CASES[case]()
  abstract_params = jax.eval_shape(lambda: params0)
  restored = ocp.StandardCheckpointer().restore(path, {
      "params": abstract_params,
      "opt_state": jax.eval_shape(opt.init, abstract_params)})
  params, state = restored["params"], restored["opt_state"]
  step = _stepper(opt, loss)
  for t in range(N, 2 * N):
    params, state = step(params, state, t)
  np.savez(out, *[np.frombuffer(b, np.uint8) for b in
                  _leaf_bytes({"params": params, "opt_state": state})])


FRESH_CASES = ["int8_amsgrad", "bf16_params_stochastic_rounding",
               "flat_fast_path", "skip_nonfinite_telemetry"]


@pytest.mark.slow
def test_restore_in_a_fresh_process_continues_bitwise(tmp_path):
  # Compressed moments, a PRNG key, flat buffers and wrapper counters:
  # saved here, restored and continued by another Python process.
  expected = {}
  for case in FRESH_CASES:
    opt, params, loss = CASES[case]()
    step = _stepper(opt, loss)
    state = opt.init(params)
    for t in range(2 * N):
      params, state = step(params, state, t)
      if t == N - 1:
        _save(tmp_path / case, {"params": params, "opt_state": state})
    expected[case] = _leaf_bytes({"params": params, "opt_state": state})
  script = (
      "import sys; sys.path.insert(0, sys.argv[1]); import test_resume\n"
      "for case in sys.argv[3:]:\n"
      "  test_resume.continue_from_checkpoint(\n"
      "      case, f'{sys.argv[2]}/{case}', f'{sys.argv[2]}/{case}.npz')\n")
  result = subprocess.run(
      [sys.executable, "-c", script, str(pathlib.Path(__file__).parent),
       str(tmp_path), *FRESH_CASES], capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for case in FRESH_CASES:
    got = np.load(tmp_path / f"{case}.npz")
    got = [got[f"arr_{i}"].tobytes() for i in range(len(got.files))]
    assert got == expected[case], case


def test_sharded_state_needs_jadam_abstract_state_as_target(tmp_path):
  # jax.eval_shape of a zero1 init gives shardings on an abstract mesh, which
  # orbax cannot place; jadam.sharding.abstract_state gives the concrete ones.
  opt = jadam.sharding.zero1(jadam.adam(0.05), jax.make_mesh((1,), ("data",)))
  state = opt.init(_params())
  _save(tmp_path / "ckpt", state)
  checkpointer = ocp.StandardCheckpointer()
  shapes = jax.eval_shape(opt.init, _params())
  if isinstance(getattr(shapes[0].mu["big"].sharding, "mesh", None),
                jax.sharding.AbstractMesh):
    # Newer JAX (0.9 on) gives eval_shape's shardings an abstract mesh.
    with pytest.raises(ValueError, match="AbstractMesh"):
      checkpointer.restore(tmp_path / "ckpt", shapes)
  restored = checkpointer.restore(
      tmp_path / "ckpt", jadam.sharding.abstract_state(opt, _params()))
  assert_bitwise(restored, state)
  big = state[0].mu["big"]
  assert restored[0].mu["big"].sharding.is_equivalent_to(big.sharding,
                                                         big.ndim)


def test_restored_state_keeps_storage_dtypes(tmp_path):
  opt = jadam.adam(0.05, mu_dtype="bfloat16", nu_dtype="int8")
  state = opt.init(_params())
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt",
                                  jax.eval_shape(opt.init, _params()))
  assert restored[0].mu["big"].dtype == jnp.bfloat16
  assert isinstance(restored[0].nu["big"], jadam.Int8Moment)
  assert restored[0].nu["big"].codes.dtype == jnp.uint8
  assert_bitwise(restored, state)


def _save_adam(tmp_path):
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": params,
                                        "opt_state": jadam.adam(0.1).init(params)})
  checkpointer.wait_until_finished()
  return checkpointer, params


def _target(opt, params):
  return {"params": jax.eval_shape(lambda: params),
          "opt_state": jax.eval_shape(opt.init, params)}


@pytest.mark.parametrize("other, missing", [
    (lambda: jadam.amsgrad(0.1), "nu_max"),
    (lambda: jadam.skip_nonfinite(jadam.adam(0.1)), "inner_state"),
])
def test_restore_into_another_optimizer_structure_raises(tmp_path, other,
                                                         missing):
  checkpointer, params = _save_adam(tmp_path)
  with pytest.raises(ValueError, match=f"Structure mismatch.*{missing}"):
    checkpointer.restore(tmp_path / "ckpt", _target(other(), params))


def test_restore_into_other_parameters_raises(tmp_path):
  checkpointer, params = _save_adam(tmp_path)
  renamed = {"w": params["w"], "c": params["b"]}
  with pytest.raises(ValueError, match="Structure mismatch.*'c'"):
    checkpointer.restore(tmp_path / "ckpt", _target(jadam.adam(0.1), renamed))
  grown = {"w": jnp.ones(4), "b": params["b"]}
  with pytest.raises(ValueError, match=r"shape: \(4,\) is not compatible"):
    checkpointer.restore(tmp_path / "ckpt", _target(jadam.adam(0.1), grown))


def test_restore_into_another_moment_dtype_casts_silently(tmp_path):
  # A trap worth knowing: orbax casts to the target dtype without a word, so
  # a float32 checkpoint restores into bfloat16 moments (rounded).
  checkpointer, params = _save_adam(tmp_path)
  restored = checkpointer.restore(
      tmp_path / "ckpt", _target(jadam.adam(0.1, mu_dtype="bfloat16"), params))
  assert restored["opt_state"][0].mu["w"].dtype == jnp.bfloat16


def test_restore_without_target_loses_the_state_types(tmp_path):
  checkpointer, params = _save_adam(tmp_path)
  restored = checkpointer.restore(tmp_path / "ckpt")
  assert isinstance(restored["opt_state"][0], dict)
  with pytest.raises(AttributeError, match="'dict' object has no attribute"):
    jadam.adam(0.1).update(params, restored["opt_state"], params)


def _run_example(*args):
  return subprocess.Popen(
      [sys.executable, str(EXAMPLES / "resume.py"), *map(str, args)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_bitwise_the_same_parameters(tmp_path):
  sys.path.insert(0, str(EXAMPLES))
  import resume  # pylint: disable=import-outside-toplevel

  common = ["--steps", 40, "--checkpoint-every", 10]
  # A slow run (50 ms per step), killed from outside as soon as its second
  # periodic checkpoint has been started: by then the first has been
  # committed, and the second may be half written.
  victim = _run_example("--dir", tmp_path / "run", "--sleep", 0.05, *common)
  lines = []
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline:
    line = victim.stdout.readline()
    if not line:
      break
    lines.append(line)
    if line.startswith("step 20:"):
      victim.send_signal(signal.SIGKILL)
      break
  assert victim.wait(timeout=60) == -signal.SIGKILL, "".join(lines)
  assert not any(line.startswith("finished") for line in lines)

  survivor = _run_example("--dir", tmp_path / "run", "--out",
                          tmp_path / "resumed.npz", *common)
  out, _ = survivor.communicate(timeout=240)
  assert survivor.returncode == 0, out
  resumed_from = [int(line.split()[-1]) for line in out.splitlines()
                  if line.startswith("resumed from step")]
  assert resumed_from and resumed_from[0] in (10, 20), out

  straight = resume.main(["--dir", str(tmp_path / "straight"),
                          *map(str, common)])
  resumed = np.load(tmp_path / "resumed.npz")
  assert sorted(resumed.files) == sorted(straight)
  for key, value in straight.items():
    assert resumed[key].dtype == value.dtype
    assert resumed[key].tobytes() == value.tobytes(), key


OPTAX_PAIRS = {
    name: (getattr(optax, name), getattr(jadam, name))
    for name in ("adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax",
                 "adamaxw", "radam")}
OPTAX_PAIRS.update({
    name: (getattr(optax.contrib, name), getattr(jadam, name))
    for name in ("adopt", "ademamix", "schedule_free_adamw")})


def _run_pair_problem(tx, params, state, steps):
  loss = lambda p: jnp.sum((p["w"] @ jnp.ones(4) - 1.0) ** 2) + jnp.sum(
      (p["b"] - 0.5) ** 2)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.grad(loss)(p), s, p)))
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("name", sorted(OPTAX_PAIRS))
def test_flax_serialized_states_cross_between_optax_and_jadam(name):
  # flax.serialization (msgpack bytes, as flax.training checkpoints write
  # them): optax's state restores into jadam's and continues bitwise as
  # under optax, and jadam's restores into optax's the same way.
  from flax import serialization
  make_optax, make_jadam = OPTAX_PAIRS[name]
  txs = {"optax": make_optax(1e-2), "jadam": make_jadam(1e-2)}
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
            "b": jnp.zeros(4)}
  for source, target in (("optax", "jadam"), ("jadam", "optax")):
    mid, state = _run_pair_problem(txs[source], params,
                                   txs[source].init(params), 5)
    blob = serialization.to_bytes(state)
    restored = serialization.from_bytes(txs[target].init(params), blob)
    assert_bitwise(restored, state)
    assert_bitwise(_run_pair_problem(txs[target], mid, restored, 5),
                   _run_pair_problem(txs[source], mid, state, 5))


@pytest.mark.parametrize("name", sorted(OPTAX_PAIRS))
def test_an_optax_checkpoint_restores_into_jadam_and_continues(name,
                                                               tmp_path):
  # Saved by optax through orbax, restored with jadam's own state as the
  # target, then stepped by jadam: bitwise optax's own continuation.
  make_optax, make_jadam = OPTAX_PAIRS[name]
  theirs, ours = make_optax(1e-2), make_jadam(1e-2)
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
            "b": jnp.zeros(4)}
  run = _run_pair_problem
  params, state = run(theirs, params, theirs.init(params), 5)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt",
                                  jax.eval_shape(ours.init, params))
  assert jax.tree.structure(restored) == jax.tree.structure(
      ours.init(params))
  assert_bitwise(restored, state)
  assert_bitwise(run(ours, params, restored, 5), run(theirs, params, state, 5))
