"""Checkpoints of every optimizer in every storage format.

Each of the 11 optimizers with float32, bfloat16, float16 and int8 moments
takes two jitted steps; its state then goes through

1. ``flax.serialization``: msgpack bytes and back onto ``opt.init(params)``;
2. ``flax.training.checkpoints``: ``save_checkpoint`` /
   ``restore_checkpoint(target=...)``, with its orbax backend (the default)
   and its legacy msgpack files;
3. orbax's ``StandardCheckpointer`` (the same API in orbax-checkpoint 0.11
   and 0.12): restored (a) onto ``jadam.sharding.abstract_state``, and (b)
   without a target, as raw dicts and lists, which the user turns back into
   the state with ``flax.serialization.from_state_dict`` (bitwise) or with
   ``jadam.convert_state`` (which re-encodes the moments, rounding to
   nearest: bitwise for float moments, within a measured bound for int8);

and the restored state must equal the saved one bitwise (every leaf, its
dtype, the tree structure down to the ``jadam.Int8Moment`` nodes) and take
the next jitted step bitwise as the original does. Last, an
``nnx.Optimizer`` with int8 second moments is saved and restored with orbax
and keeps training bitwise.

The 44 optimizer x format cases are all run (in about 40 s on two CPU
cores); all but a representative subset are marked slow, so that
``-m "not slow"`` runs every state class, every format and int8 in every
state class that has it in about half that.
"""

import functools
import warnings

import flax
from flax import nnx
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jadam
from conftest import assert_bitwise  # pylint: disable=g-bad-import-order

NAMES = ("adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "adamaxw",
         "radam", "adopt", "ademamix", "schedule_free_adamw")
FORMATS = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "int8": "int8"}

# Not marked slow: each state class (optax.ScaleByAdamState,
# ScaleByAmsgradState, ScaleByAdemamixState, jadam.contrib.ScaleBySecondMomentState)
# in int8, and each float format at least once.
SUBSET = {("adam", "int8"), ("nadamw", "float32"), ("amsgrad", "bfloat16"),
          ("amsgrad", "int8"), ("ademamix", "int8"), ("adopt", "float16"),
          ("schedule_free_adamw", "float16"), ("schedule_free_adamw", "int8")}

CASES = [pytest.param(name, fmt, id=f"{name}-{fmt}",
                      marks=() if (name, fmt) in SUBSET else pytest.mark.slow)
         for name in NAMES for fmt in FORMATS]

# Int8Moment nodes in a state with int8 storage: one per int8 moment of "w"
# (5120 elements); "b" (80 elements, under min_size) stays float.
INT8_MOMENTS = {"amsgrad": 3, "ademamix": 3, "schedule_free_adamw": 1}

# jadam.convert_state re-encodes int8 moments by rounding to nearest, on
# block scales of the decoded values, which need not be the scales the
# optimizer's step kept: a decoded value moves by up to half a gap of the
# code map (at most 1/32 of the block's maximum for the signed codes of
# first moments, 1/128 of max √v for the unsigned codes of second moments).
# Worst max|converted - original| / max|original| over the 11 optimizers,
# the same to 4 digits under JAX 0.8.0, 0.10.2 and 0.12.1 on CPU: mu 0.0225
# (nadam, nadamw), nu 0.0081 (nadam, nadamw), nu_max 0.0041 (amsgrad);
# AdEMAMix's slow EMA m2 0 here (bounded as mu, a signed first moment too).
# The bounds are about twice the worst. Float moments convert bitwise.
INT8_CONVERSION_BOUND = {"mu": 0.045, "m2": 0.045, "nu": 0.016,
                         "nu_max": 0.008}

MOMENT_STATES = (optax.ScaleByAdamState, optax.ScaleByAmsgradState,
                 optax.contrib.ScaleByAdemamixState,
                 jadam.contrib.ScaleBySecondMomentState)


def _make(name, fmt):
  if name == "schedule_free_adamw":
    return jadam.contrib.schedule_free_adamw(1e-2, nu_dtype=FORMATS[fmt])
  return getattr(jadam, name)(1e-2, mu_dtype=FORMATS[fmt],
                              nu_dtype=FORMATS[fmt])


def _problem():
  kw, kx = jax.random.split(jax.random.key(0))
  # "w" has 5120 >= 4096 elements, so int8 storage applies to it.
  params = {"w": jax.random.normal(kw, (64, 80)), "b": jnp.zeros(80)}
  x = jax.random.normal(kx, (16, 64))
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - 0.5) ** 2)
  return params, loss


class _Run:
  """An optimizer two jitted steps in, and its third step."""

  def __init__(self, name, fmt):
    self.opt = _make(name, fmt)
    params, loss = _problem()
    opt = self.opt

    @jax.jit
    def step(params, state):
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    self.step = step
    # Committed to the device, as orbax restores arrays: the restored state
    # then takes the next step without compiling it again.
    params, state = jax.device_put((params, opt.init(params)),
                                   jax.devices()[0])
    for _ in range(2):
      params, state = step(params, state)
    self.params, self.state = params, state
    self.next = step(params, state)
    expected = INT8_MOMENTS.get(name, 2) if fmt == "int8" else 0
    assert _int8_moments(state) == expected  # the format really applies


@functools.lru_cache(maxsize=None)
def _run(name, fmt):
  # Compiled and stepped once per case, shared by the tests below.
  return _Run(name, fmt)


def _int8_moments(tree):
  is_entry = lambda x: isinstance(x, jadam.Int8Moment)
  return sum(map(is_entry, jax.tree.leaves(tree, is_leaf=is_entry)))


def _check_restored(run, restored):
  """Bitwise the saved state (dtypes, Int8Moment nodes) and its next step."""
  assert jax.tree.structure(restored) == jax.tree.structure(run.state)
  assert _int8_moments(restored) == _int8_moments(run.state)
  assert_bitwise(restored, run.state)
  # flax.serialization gives NumPy arrays: committed to the device like the
  # original's (orbax's already are), they reuse its compiled step.
  restored = jax.device_put(restored, jax.devices()[0])
  assert_bitwise(run.step(run.params, restored), run.next)


@pytest.mark.parametrize("name, fmt", CASES)
def test_flax_msgpack_round_trip_is_bitwise_and_continues(name, fmt):
  run = _run(name, fmt)
  blob = serialization.msgpack_serialize(serialization.to_state_dict(run.state))
  raw = serialization.msgpack_restore(blob)
  restored = serialization.from_state_dict(run.opt.init(run.params), raw)
  _check_restored(run, restored)


@pytest.mark.parametrize("backend", ["orbax", "msgpack"])
@pytest.mark.parametrize("name, fmt", CASES)
def test_flax_training_checkpoints_restore_bitwise_and_continue(
    name, fmt, backend, tmp_path):
  checkpoints = pytest.importorskip("flax.training.checkpoints")
  run = _run(name, fmt)
  with flax.config.temp_flip_flag("use_orbax_checkpointing",
                                  backend == "orbax"), \
      warnings.catch_warnings():
    # The legacy msgpack writer warns that it will be deprecated in favour
    # of orbax (a DeprecationWarning from flax; it still works).
    warnings.filterwarnings("ignore", "Flax Checkpointing will soon be",
                            DeprecationWarning)
    checkpoints.save_checkpoint(tmp_path, run.state, step=2)
    restored = checkpoints.restore_checkpoint(
        tmp_path, target=run.opt.init(run.params))
  _check_restored(run, restored)


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("orbax")


@functools.lru_cache(maxsize=None)
def _orbax_saved(name, fmt, directory):
  path = directory / f"{name}-{fmt}"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, _run(name, fmt).state)
  checkpointer.wait_until_finished()
  return path


@pytest.mark.parametrize("name, fmt", CASES)
def test_orbax_restores_onto_abstract_state_bitwise_and_continues(
    name, fmt, orbax_dir):
  run = _run(name, fmt)
  target = jadam.sharding.abstract_state(run.opt, run.params)
  restored = ocp.StandardCheckpointer().restore(
      _orbax_saved(name, fmt, orbax_dir), target)
  for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert leaf.sharding.is_equivalent_to(want.sharding, want.ndim)
  _check_restored(run, restored)


def _moment_states(state):
  found = [node for node in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, MOMENT_STATES))
           if isinstance(node, MOMENT_STATES)]
  assert len(found) == 1
  return found[0]


def _decoded(state):
  """Every moment of ``state`` decoded to float32, by field name."""
  node = _moment_states(state)
  moments = jadam.decode_moments(node)._asdict()
  if isinstance(node, optax.contrib.ScaleByAdemamixState):
    # decode_moments gives m1 as mu; the slow EMA m2 is read as a first
    # moment of its own.
    moments["m2"] = jadam.decode_moments(
        optax.ScaleByAdamState(node.count, node.m2, node.nu)).mu
  return {k: v for k, v in moments.items() if v is not None}


def _without_int8(tree):
  is_entry = lambda x: isinstance(x, jadam.Int8Moment)
  return jax.tree.map(lambda x: None if is_entry(x) else x, tree,
                      is_leaf=is_entry)


def _flax_state_dict(raw):
  """Orbax's raw restore as flax's state dict: a list (orbax's tuple)
  becomes a dict keyed "0", "1", ..., and None becomes {}: orbax writes no
  node for an empty NamedTuple (optax.EmptyState(), the learning-rate
  scaling's state) and gives None back, which from_state_dict cannot put
  into an EmptyState. (The states here have no None leaves of their own.)"""
  if raw is None:
    return {}
  if isinstance(raw, (list, tuple)):
    return {str(i): _flax_state_dict(x) for i, x in enumerate(raw)}
  if isinstance(raw, dict):
    return {k: _flax_state_dict(x) for k, x in raw.items()}
  return raw


@pytest.mark.parametrize("name, fmt", CASES)
def test_orbax_restore_without_target_then_from_state_dict_or_convert(
    name, fmt, orbax_dir):
  run = _run(name, fmt)
  raw = ocp.StandardCheckpointer().restore(_orbax_saved(name, fmt, orbax_dir))
  # Without a target orbax gives plain containers: dicts for the state
  # classes and Int8Moment, a list for a chain's tuple (schedule-free AdamW's
  # state is one NamedTuple, a dict).
  assert isinstance(raw, list if name != "schedule_free_adamw" else dict)
  assert _int8_moments(raw) == 0
  if fmt == "int8":
    assert isinstance(_moment_states(run.state).nu["w"], jadam.Int8Moment)
    leaves = jax.tree.leaves(raw)
    assert any(np.asarray(x).dtype == np.uint8 for x in leaves)

  # flax.serialization puts them back into the optimizer's own structure,
  # once they are spelled as flax's state dicts (see _flax_state_dict).
  restored = serialization.from_state_dict(run.opt.init(run.params),
                                           _flax_state_dict(raw))
  _check_restored(run, restored)

  # jadam.convert_state reads the raw tree too, and re-encodes the moments.
  converted = jadam.convert_state(raw, run.opt, run.params)
  assert jax.tree.structure(converted) == jax.tree.structure(run.state)
  assert [x.dtype for x in jax.tree.leaves(converted)] == [
      x.dtype for x in jax.tree.leaves(run.state)]
  if fmt != "int8":
    _check_restored(run, converted)
    return
  # Everything but the int8 moments is bitwise (float "b" moments included).
  assert_bitwise(_without_int8(converted), _without_int8(run.state))
  got, want = _decoded(converted), _decoded(run.state)
  assert set(got) == set(want)
  for field in want:
    for key in ("w", "b"):
      a, b = np.asarray(got[field][key]), np.asarray(want[field][key])
      assert a.dtype == b.dtype == np.float32
      if key == "b":
        assert a.tobytes() == b.tobytes()
        continue
      error = np.max(np.abs(a - b)) / np.max(np.abs(b))
      assert error <= INT8_CONVERSION_BOUND[field], (field, error)


class _Model(nnx.Module):

  def __init__(self, rngs):
    # 64 x 128 = 8192 >= min_size: int8; the (128, 4) layer stays float.
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


@pytest.mark.parametrize("fmt", [
    "int8", "float32",
    pytest.param("bfloat16", marks=pytest.mark.slow),
    pytest.param("float16", marks=pytest.mark.slow)])
def test_nnx_optimizer_saved_and_restored_with_orbax_steps_bitwise(
    fmt, tmp_path):
  x = jax.random.normal(jax.random.key(1), (32, 64))
  y = jax.random.normal(jax.random.key(2), (32, 4))
  loss = lambda model: jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    optimizer.update(model, nnx.grad(loss)(model))

  def build():
    model = _Model(nnx.Rngs(0))
    return model, nnx.Optimizer(
        model, jadam.adam(1e-2, mu_dtype=FORMATS[fmt], nu_dtype="int8"),
        wrt=nnx.Param)

  model, optimizer = build()
  for _ in range(2):
    step(model, optimizer)
  adam_state = optimizer.opt_state[0]
  assert isinstance(adam_state.nu["hidden"]["kernel"], jadam.Int8Moment)
  assert not isinstance(adam_state.nu["out"]["kernel"], jadam.Int8Moment)
  assert isinstance(adam_state.mu["hidden"]["kernel"],
                    jadam.Int8Moment) == (fmt == "int8")

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"model": nnx.state(model),
                                        "optimizer": nnx.state(optimizer)})
  checkpointer.wait_until_finished()

  fresh_model, fresh_optimizer = build()
  restored = checkpointer.restore(
      tmp_path / "ckpt", {"model": nnx.state(fresh_model),
                          "optimizer": nnx.state(fresh_optimizer)})
  nnx.update(fresh_model, restored["model"])
  nnx.update(fresh_optimizer, restored["optimizer"])
  assert isinstance(fresh_optimizer.opt_state[0].nu["hidden"]["kernel"],
                    jadam.Int8Moment)
  assert_bitwise(nnx.state(fresh_model), nnx.state(model))
  assert_bitwise(nnx.state(fresh_optimizer), nnx.state(optimizer))

  leaf_bytes = lambda m: [np.asarray(v).tobytes()
                          for v in jax.tree.leaves(nnx.state(m, nnx.Param))]
  before = leaf_bytes(model)
  step(model, optimizer)
  step(fresh_model, fresh_optimizer)
  assert all(a != b for a, b in zip(leaf_bytes(model), before))  # it moved
  assert_bitwise(nnx.state(fresh_model), nnx.state(model))
  assert_bitwise(nnx.state(fresh_optimizer), nnx.state(optimizer))
