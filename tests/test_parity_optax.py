"""Every jadam alias equals its optax namesake, step after step, bitwise.

Two checks per alias and problem:

* lockstep: both optimizers see the same gradients for 300 jitted steps and
  every update and moment is bitwise the same;
* free-running: each trains on its own for 300 jitted steps and the final
  parameters are bitwise the same.

Bitwise equality under ``jax.jit`` holds because jadam writes each leaf's
step with optax's operations in optax's order and shares the per-update
scalars (the bias corrections) between leaves as optax does: XLA simplifies
a division by a shared scalar differently from one computed per leaf, which
used to move results by 2-3 ulp on trees of several leaves. Eager (unjitted)
updates agree to 1e-6 relative, not bitwise: there XLA compiles each
operation alone, and optax's own eager and jitted updates differ by 1-2 ulp.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from conftest import PROBLEMS, assert_bitwise, relative_error, train

STEPS = 300

ALIASES = {
    "adam": {},
    "adam_eps_root": {"eps_root": 1e-8, "b1": 0.8, "b2": 0.99},
    "adamw": {"weight_decay": 0.01},
    "nadam": {},
    "nadamw": {"weight_decay": 0.01},
    "amsgrad": {},
    "adamax": {},
    "adamaxw": {"weight_decay": 0.01},
    "radam": {},
}


def _pair(alias, learning_rate):
  name = alias.split("_")[0]
  kwargs = ALIASES[alias]
  return (getattr(jadam, name)(learning_rate, **kwargs),
          getattr(optax, name)(learning_rate, **kwargs))


# Step sizes at which every alias trains each problem without diverging
# (RAdam's first steps are momentum SGD on the raw gradient).
LEARNING_RATES = {"quadratic": 3e-2, "rosenbrock": 1e-3, "mlp": 3e-3}


@pytest.mark.parametrize("alias", sorted(ALIASES))
@pytest.mark.parametrize("problem_name", sorted(LEARNING_RATES))
def test_every_update_matches_optax_in_lockstep(alias, problem_name):
  params, loss = PROBLEMS[problem_name]()
  ours, theirs = _pair(alias, LEARNING_RATES[problem_name])

  @jax.jit
  def step(params, our_state, their_state):
    grads = jax.grad(loss)(params)
    our_updates, our_state = ours.update(grads, our_state, params)
    their_updates, their_state = theirs.update(grads, their_state, params)
    return (optax.apply_updates(params, their_updates), our_state,
            their_state, our_updates, their_updates)

  our_state, their_state = ours.init(params), theirs.init(params)
  start = params
  for _ in range(STEPS):
    params, our_state, their_state, a, b = step(params, our_state, their_state)
    assert np.isfinite(relative_error(a, b))
    assert_bitwise(a, b)
  assert loss(params) < 0.9 * loss(start)
  # The moments agree too: same classes, fields, dtypes and bits.
  assert_bitwise(our_state, their_state)


@pytest.mark.parametrize("alias", sorted(ALIASES))
@pytest.mark.parametrize("problem_name", sorted(LEARNING_RATES))
def test_final_parameters_match_optax(alias, problem_name):
  params, loss = PROBLEMS[problem_name]()
  ours, theirs = _pair(alias, LEARNING_RATES[problem_name])
  a, _ = train(ours, params, loss, STEPS)
  b, _ = train(theirs, params, loss, STEPS)
  assert_bitwise(a, b)
  # Both actually trained: parity of two runs that did nothing proves nothing.
  assert loss(a) < 0.9 * loss(params)


@pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
def test_adam_with_schedule_matches_optax(problem_name):
  params, loss = PROBLEMS[problem_name]()
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, 300, 1e-4)
  ours, _ = train(jadam.adam(schedule), params, loss, STEPS)
  theirs, _ = train(optax.adam(schedule), params, loss, STEPS)
  assert relative_error(ours, theirs) < 1e-6


def test_adamw_mask_matches_optax():
  params, loss = PROBLEMS["mlp"]()
  mask = lambda p: {k: {"kernel": True, "bias": False} for k in p}
  ours, _ = train(jadam.adamw(3e-3, weight_decay=0.1, mask=mask), params, loss, STEPS)
  theirs, _ = train(optax.adamw(3e-3, weight_decay=0.1, mask=mask), params, loss, STEPS)
  assert relative_error(ours, theirs) < 1e-6


def test_scale_by_adam_state_is_count_mu_nu():
  state = jadam.scale_by_adam().init({"w": jnp.ones(3)})
  assert isinstance(state, jadam.ScaleByAdamState)
  assert state._fields == ("count", "mu", "nu")
  assert state.count.dtype == jnp.int32


ALIAS_NAMES = ["adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "adamaxw",
           "radam"]


@pytest.mark.parametrize("name", ALIAS_NAMES)
def test_state_is_optax_state(name):
  # Same NamedTuple classes and layout as optax: equal tree structures, so
  # checkpoints of either restore into the other.
  params, _ = PROBLEMS["mlp"]()
  ours = getattr(jadam, name)(1e-3).init(params)
  theirs = getattr(optax, name)(1e-3).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  assert type(ours[0]) is type(theirs[0])
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    assert a.dtype == b.dtype and a.shape == b.shape


@pytest.mark.parametrize("name", ALIAS_NAMES)
def test_optax_state_continues_under_jadam_as_under_optax(name):
  # Train 10 steps with optax, then hand its state, as it is, to jadam: the
  # next 10 steps are bitwise optax's own continuation. And the other way
  # round: a state jadam trained continues under optax as under jadam.
  params, loss = PROBLEMS["mlp"]()
  theirs_tx, ours_tx = getattr(optax, name)(1e-2), getattr(jadam, name)(1e-2)

  def run(tx, params, state, steps):
    @jax.jit
    def step(params, state):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state
    for _ in range(steps):
      params, state = step(params, state)
    return params, state

  mid, state = run(theirs_tx, params, theirs_tx.init(params), 10)
  ours, ours_state = run(ours_tx, mid, state, 10)
  theirs, theirs_state = run(theirs_tx, mid, state, 10)
  assert int(ours_state[0].count) == 20
  assert relative_error(ours, mid) > 1e-4  # the 10 steps moved something
  assert_bitwise((ours, ours_state), (theirs, theirs_state))
  mid, state = run(ours_tx, params, ours_tx.init(params), 10)
  assert_bitwise(run(theirs_tx, mid, state, 10), run(ours_tx, mid, state, 10))


@pytest.mark.parametrize("name", ALIAS_NAMES + [
    "scale_by_adam", "scale_by_amsgrad", "scale_by_adamax", "scale_by_radam"])
def test_every_optax_argument_is_accepted_the_same_way(name):
  # Code written for optax (positional mu_dtype, nesterov=, bias_correction_*)
  # runs unchanged: same names, same kinds (positional or keyword), same
  # defaults.
  import inspect
  ours = inspect.signature(getattr(jadam, name)).parameters
  for param in inspect.signature(getattr(optax, name)).parameters.values():
    assert param.name in ours, param.name
    assert ours[param.name].kind == param.kind, param.name
    if param.name != "mask":  # optax's default None; jadam's too, typed
      assert ours[param.name].default == param.default, param.name


@pytest.mark.parametrize("mu,nu", [(True, False), (False, True),
                                   (False, False)])
def test_amsgrad_without_bias_correction_matches_optax(mu, nu):
  import inspect
  if "bias_correction_mu" not in inspect.signature(optax.amsgrad).parameters:
    pytest.skip(f"optax {optax.__version__}'s amsgrad has no bias_correction "
                "arguments to compare with")
  params, loss = PROBLEMS["quadratic"]()
  ours, _ = train(jadam.amsgrad(1e-2, 0.9, 0.999, 1e-8, 0.0, None, mu, nu),
                  params, loss, 100)
  theirs, _ = train(optax.amsgrad(1e-2, 0.9, 0.999, 1e-8, 0.0, None, mu, nu),
                    params, loss, 100)
  assert relative_error(ours, theirs) < 1e-6
  corrected, _ = train(jadam.amsgrad(1e-2), params, loss, 100)
  assert relative_error(ours, corrected) > 1e-3  # the flags do something


def test_nadam_accepts_nesterov_false_as_plain_adam():
  params, loss = PROBLEMS["quadratic"]()
  ours, _ = train(jadam.nadam(1e-2, nesterov=False), params, loss, 50)
  theirs, _ = train(optax.nadam(1e-2, nesterov=False), params, loss, 50)
  plain, _ = train(jadam.adam(1e-2), params, loss, 50)
  assert relative_error(ours, theirs) < 1e-6
  np.testing.assert_array_equal(jax.tree.leaves(ours)[0],
                                jax.tree.leaves(plain)[0])


def test_eager_and_jitted_updates_round_exactly_as_optax():
  # optax compiles its bias correction as one function; jadam does too, so
  # eager updates give optax's eager bits and jitted ones optax's jitted
  # bits. (Eager and jitted differ from each other by an ulp in both
  # libraries: XLA fuses the jitted step's division and square root.)
  params = {"w": jnp.linspace(-1.0, 1.0, 1000)}
  ours, theirs = jadam.scale_by_adam(), optax.scale_by_adam()
  eager = [ours.init(params), theirs.init(params)]
  jitted = [ours.init(params), theirs.init(params)]
  jit_updates = [jax.jit(ours.update), jax.jit(theirs.update)]
  for i in range(10):
    g = {"w": jnp.sin(jnp.arange(1000.0) * (i + 1))}
    (a, eager[0]), (b, eager[1]) = (ours.update(g, eager[0]),
                                    theirs.update(g, eager[1]))
    np.testing.assert_array_equal(a["w"], b["w"])
    (a, jitted[0]), (b, jitted[1]) = (jit_updates[0](g, jitted[0]),
                                      jit_updates[1](g, jitted[1]))
    np.testing.assert_array_equal(a["w"], b["w"])
