"""A differential fuzzer (hypothesis): random optimizers, storage formats,
wrapper stacks, parameter trees, gradient streams and JAX transformations,
checked against exact invariants, optax and one-step rounding bounds.

Each example draws

* an optimizer: the 8 aliases and the 3 variants, with ``cautious`` where it
  exists, and a storage format per moment (float32, bfloat16, float16,
  int8);
* a wrapper stack, inner to outer, from clipping in a chain,
  ``optax.masked``, ``jadam.skip_nonfinite``, ``optax.MultiSteps`` and
  ``jadam.sharding.offload`` (where this JAX moves arrays to host memory inside
  ``jit``), optionally ``optax.inject_hyperparams`` around the optimizer
  and ``jadam.with_telemetry`` outermost;
* a parameter tree (scalars, empty arrays, vectors, matrices with long and
  short rows, leaves large enough for int8 blocks; float32 and bfloat16);
* a gradient stream (normal, spiky, zero rows, one NaN step when a
  skipping wrapper is present);
* a transformation around the jitted step: plain, ``vmap`` over two models,
  ``lax.scan``, ``jax.checkpoint``, buffer donation, or ``jax.grad`` through
  two steps.

The oracle:

* exact invariants for every draw: the state's structure, shapes, dtypes and
  memory kinds stay as ``init`` made them; parameters stay finite; a step
  skipped by an outermost ``skip_nonfinite`` returns the inner state
  bitwise; ``checkpoint`` equals the plain step and donation changes
  nothing (bitwise); ``vmap`` equals a loop over the models and ``scan`` a
  loop over the steps up to the rounding of a differently fused program
  (not bitwise: optax's Adam differs by 1 ulp there too);
* optax bitwise for float32 compositions that have an optax twin (the
  aliases with clipping, masking, ``MultiSteps`` and ``inject_hyperparams``;
  ``skip_nonfinite``, telemetry, offload, ``cautious`` and the variants have
  none here);
* for compressed formats, a one-step bound from the same state: the stored
  moments after one step differ from float32 moments stepped from the same
  decoded state by at most one rounding step of their format;
* under ``jax.grad``: a finite derivative, or for int8 moments jadam's
  ``TypeError`` naming the unsupported combination.

In the suite it runs derandomized, with no deadline and no example
database (``FUZZ_EXAMPLES`` examples, 30 by default; marked slow, so CI
runs it on the readme and newest environments);
``FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py`` is the long profile.
"""

import functools
import inspect
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam._formats import _codes as _quant

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

OPTIMIZERS = {
    "adam": (jadam.adam, optax.adam), "adamw": (jadam.adamw, optax.adamw),
    "nadam": (jadam.nadam, optax.nadam),
    "nadamw": (jadam.nadamw, optax.nadamw),
    "amsgrad": (jadam.amsgrad, optax.amsgrad),
    "adamax": (jadam.adamax, optax.adamax),
    "adamaxw": (jadam.adamaxw, optax.adamaxw),
    "radam": (jadam.radam, optax.radam),
    "adopt": (jadam.contrib.adopt, None), "ademamix": (jadam.contrib.ademamix, None),
    "schedule_free_adamw": (jadam.contrib.schedule_free_adamw, None),
}
STORAGES = (None, "bfloat16", "float16", "int8")
SHAPES = ((), (0,), (3,), (5, 7), (64, 80), (8192,), (300, 32))
WRAPPERS = ("clip", "masked", "skip", "multisteps", "offload")
TRANSFORMS = ("jit", "vmap", "scan", "checkpoint", "donate", "grad")
STEPS = 4


def _offload_works():
  try:
    tx = jadam.sharding.offload(jadam.adam(1e-3))
    jax.jit(tx.init)({"w": jnp.ones(2)})
    return True
  except NotImplementedError:
    return False


OFFLOAD = _offload_works()


def _accepts(factory, name):
  return name in inspect.signature(factory).parameters


@st.composite
def cases(draw):
  name = draw(st.sampled_from(sorted(OPTIMIZERS)))
  factory = OPTIMIZERS[name][0]
  kwargs = {}
  if _accepts(factory, "cautious") and draw(st.booleans()):
    kwargs["cautious"] = True
  for moment in ("mu_dtype", "nu_dtype"):
    if _accepts(factory, moment):
      storage = draw(st.sampled_from(STORAGES))
      if storage is not None:
        kwargs[moment] = storage
  allowed = [w for w in WRAPPERS if w != "offload" or OFFLOAD]
  wrappers = draw(st.lists(st.sampled_from(allowed), unique=True,
                           max_size=2))
  if wrappers == ["offload", "multisteps"]:
    # optax.MultiSteps selects the inner state with jnp.where, which leaves
    # host memory: unsupported, and a test of its own
    # (test_trust.py::test_multisteps_outside_offload_is_refused_by_jax).
    wrappers = ["multisteps", "offload"]
  inject = draw(st.booleans())
  telemetry = draw(st.booleans())
  leaves = draw(st.lists(st.tuples(st.sampled_from(SHAPES),
                                   st.sampled_from(("float32", "bfloat16"))),
                         min_size=1, max_size=3))
  stream = draw(st.sampled_from(
      ("normal", "spiky", "zero_rows") + (("nan_step",) if "skip" in wrappers
                                          else ())))
  transform = draw(st.sampled_from(TRANSFORMS))
  seed = draw(st.integers(0, 2**16))
  return dict(name=name, kwargs=kwargs, wrappers=wrappers, inject=inject,
              telemetry=telemetry, leaves=leaves, stream=stream,
              transform=transform, seed=seed)


def _mask(params):
  # Decay (and so step) every leaf of rank 2 or more; the rest pass through.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def build(case, optax_twin=False):
  """The transformation a case describes (or its optax twin)."""
  jadam_factory, optax_factory = OPTIMIZERS[case["name"]]
  factory = optax_factory if optax_twin else jadam_factory
  kwargs = {} if optax_twin else dict(case["kwargs"])
  if case["inject"]:
    # float32 hyperparameters: cast to bfloat16 parameters' dtype, b2=0.999
    # becomes 1.0 (jadam refuses it, naming hyperparam_dtype).
    # ADOPT's clip_value_fn is a function, not a schedule: static.
    static = ("clip_value_fn",) if case["name"] == "adopt" else ()
    tx = optax.inject_hyperparams(factory, static_args=static,
                                  hyperparam_dtype=jnp.float32)(
                                      learning_rate=1e-2, **kwargs)
  else:
    tx = factory(1e-2, **kwargs)
  for wrapper in case["wrappers"]:
    if wrapper == "clip":
      tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
    elif wrapper == "masked":
      # Leaves outside the mask are frozen (optax.masked alone would pass
      # their raw gradients through as updates).
      tx = optax.chain(optax.masked(tx, _mask), optax.masked(
          optax.set_to_zero(), lambda p: jax.tree.map(lambda m: not m,
                                                      _mask(p))))
    elif wrapper == "skip":
      tx = jadam.skip_nonfinite(tx)
    elif wrapper == "multisteps":
      tx = optax.MultiSteps(tx, every_k_schedule=2)
    elif wrapper == "offload":
      tx = jadam.sharding.offload(tx)
  if case["telemetry"] and not optax_twin:
    tx = jadam.with_telemetry(tx)
  return tx


def make_params(case, scale=1.0):
  key = jax.random.key(case["seed"])
  params = {}
  for i, (shape, dtype) in enumerate(case["leaves"]):
    key, sub = jax.random.split(key)
    params[f"p{i}"] = (scale * jax.random.normal(sub, shape)).astype(dtype)
  return params


def make_stream(case, params, scale=1.0):
  key = jax.random.key(case["seed"] + 1)
  stream = []
  for t in range(STEPS):
    grads = {}
    for name, p in params.items():
      key, sub = jax.random.split(key)
      g = scale * jax.random.normal(sub, p.shape, jnp.float32)
      if case["stream"] == "spiky" and g.size:
        g = g.at[(0,) * g.ndim].multiply(1e4)
      if case["stream"] == "zero_rows" and g.ndim >= 1 and g.shape[0] > 1:
        g = g.at[1:].set(0.0) if t % 2 else g
      if case["stream"] == "nan_step" and t == 2 and g.size:
        g = g.at[(0,) * g.ndim].set(jnp.nan)
      grads[name] = g.astype(p.dtype)
    stream.append(grads)
  return stream


@functools.lru_cache(maxsize=None)
def _jitted_step(tx, donate=False, remat=False):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  if remat:
    step = jax.checkpoint(step)
  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def run_loop(tx, params, stream, **jit_kwargs):
  state = tx.init(params)
  states = [state]
  step = _jitted_step(tx, **jit_kwargs)
  for grads in stream:
    params, state = step(params, state, grads)
    states.append(state)
  return params, states


def _bits(tree):
  return [(np.asarray(x).dtype, np.asarray(x).shape, np.asarray(x).tobytes())
          for x in jax.tree.leaves(tree)]


def assert_bitwise(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  assert _bits(a) == _bits(b), what


def assert_within_rounding(a, b, what, rtol=1e-6):
  """Equal up to the rounding of differently fused programs: within 1e-6 of
  each array's largest value. (``vmap`` and ``scan`` change how XLA:CPU
  fuses the step: optax.adam's vmapped step differs from its loop by 1 ulp
  in 2 of 35 elements of a (5, 7) leaf beside a scalar one, and so do
  jadam's.)"""
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(
        x, y, rtol=rtol, atol=rtol * float(np.max(np.abs(y), initial=0)),
        err_msg=what)


def _layout(state):
  return jax.tree.map(
      lambda x: (x.shape, str(x.dtype),
                 getattr(getattr(x, "sharding", None), "memory_kind", None)),
      state)


def _inner_of_skip(state):
  found = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, jadam.SkipNonfiniteState))
           if isinstance(s, jadam.SkipNonfiniteState)]
  return found[0].inner_state


def check_invariants(case, tx, params, states, final):
  init_layout = jax.tree_util.tree_flatten_with_path(
      _layout(states[0]), is_leaf=lambda x: isinstance(x, tuple)
      and len(x) == 3 and isinstance(x[1], str))[0]
  for state in states[1:]:
    layout = jax.tree_util.tree_flatten_with_path(
        _layout(state), is_leaf=lambda x: isinstance(x, tuple)
        and len(x) == 3 and isinstance(x[1], str))[0]
    # optax 0.2.6's MultiSteps turns bfloat16 accumulated gradients into
    # float32 after a step (its own state; later optax keeps the dtype).
    changed = [(jax.tree_util.keystr(path), before, after)
               for (path, before), (_, after) in zip(init_layout, layout)
               if before != after and not (
                   ".acc_grads" in jax.tree_util.keystr(path)
                   and optax.__version__ == "0.2.6")]
    assert len(layout) == len(init_layout) and not changed, (
        f"state layout changed: {changed}")
  assert all(np.isfinite(np.asarray(x, np.float32)).all()
             for x in jax.tree.leaves(final)), "parameters not finite"
  outer = [w for w in case["wrappers"] if w != "offload"]
  has_nan = any(int(np.prod(shape)) for shape, _ in case["leaves"])
  if (case["stream"] == "nan_step" and has_nan and outer
      and outer[-1] == "skip"):
    # Step 3 (index 2) held: its inner state is step 2's, bitwise.
    assert_bitwise(_inner_of_skip(states[3]), _inner_of_skip(states[2]),
                   "a skipped step changed the inner state")


def check_transform(case, tx, params, stream, final, states):
  transform = case["transform"]
  if transform == "jit":
    return
  if transform == "donate":
    donated, _ = run_loop(tx, jax.tree.map(jnp.copy, params), stream,
                          donate=True)
    assert_bitwise(donated, final, "donation changed the result")
  elif transform == "checkpoint":
    remat, _ = run_loop(tx, params, stream, remat=True)
    assert_bitwise(remat, final, "jax.checkpoint changed the result")
  elif transform == "scan":
    if (optax.__version__ == "0.2.6" and "multisteps" in case["wrappers"]
        and any(d != "float32" for _, d in case["leaves"])):
      return  # optax 0.2.6's MultiSteps changes its carry's dtype (above)
    def body(carry, grads):
      p, s = carry
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *stream)
    (scanned, _), _ = jax.jit(lambda p, s, g: jax.lax.scan(body, (p, s), g))(
        params, tx.init(params), stacked)
    assert_within_rounding(scanned, final, "lax.scan differs from a loop")
  elif transform == "vmap":
    other = make_params(case, scale=0.5)
    other_stream = make_stream(case, other, scale=2.0)
    other_final, _ = run_loop(tx, other, other_stream)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other)
    state = jax.vmap(tx.init)(both)
    step = jax.jit(jax.vmap(_jitted_step(tx)))
    for g, h in zip(stream, other_stream):
      both, state = step(both, state, jax.tree.map(
          lambda a, b: jnp.stack([a, b]), g, h))
    assert_within_rounding(jax.tree.map(lambda x: x[0], both), final,
                           "vmap differs from a loop (model 0)")
    assert_within_rounding(jax.tree.map(lambda x: x[1], both), other_final,
                           "vmap differs from a loop (model 1)")
  elif transform == "grad":
    def loss_after_two_steps(p):
      state = tx.init(p)
      for grads in stream[:2]:
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
      return sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                 for x in jax.tree.leaves(p))
    quantized = "int8" in case["kwargs"].values()
    try:
      derivative = jax.jit(jax.grad(loss_after_two_steps))(params)
    except TypeError as e:
      assert quantized and "int8" in str(e), f"unexpected TypeError: {e}"
      return
    except ValueError as e:
      # Reverse mode through offload is not supported (JAX's transfer to
      # host memory has no transpose that returns device cotangents).
      assert "offload" in case["wrappers"], f"unexpected ValueError: {e}"
      return
    if quantized:
      # int8 moments with a derivative can only be a leaf below min_size.
      pass
    assert all(np.isfinite(np.asarray(x, np.float32)).all()
               for x in jax.tree.leaves(derivative)), "derivative not finite"


def check_optax_twin(case, params, stream, final):
  twin_ok = (OPTIMIZERS[case["name"]][1] is not None and not case["kwargs"]
             and not {"skip", "offload"} & set(case["wrappers"])
             and all(d == "float32" for _, d in case["leaves"]))
  if not twin_ok:
    return False
  expected, _ = run_loop(build(case, optax_twin=True), params, stream)
  assert_bitwise(final, expected, "differs from optax")
  return True


def _gap(signed):
  values = np.sort(_quant.code_map(signed)[1])
  values = values[np.isfinite(values)]
  return float(np.max(np.diff(values)))


def check_one_step_bound(case, params, stream):
  """Compressed moments after one step from a state, against float32
  moments stepped from the same (decoded) state."""
  name, kwargs = case["name"], case["kwargs"]
  storages = {k: v for k, v in kwargs.items() if k.endswith("_dtype")}
  if (name not in ("adam", "amsgrad", "radam", "nadam") or not storages
      or case["stream"] == "nan_step"):
    return False
  factory = OPTIMIZERS[name][0]
  flags = {k: v for k, v in kwargs.items() if not k.endswith("_dtype")}
  compressed = factory(1e-2, **kwargs)
  # float32 moments whatever the parameters' dtype (the default would keep
  # a bfloat16 parameter's moments in bfloat16, and an update refuses a
  # state stored otherwise than its optimizer stores it).
  plain = factory(1e-2, mu_dtype=jnp.float32, nu_dtype=jnp.float32, **flags)
  _, states = run_loop(compressed, params, stream[:2])
  before = states[-1]
  decoded = jadam.decode_moments(before[0])
  fields = {"mu": decoded.mu, "nu": decoded.nu}
  if decoded.nu_max is not None:
    fields["nu_max"] = decoded.nu_max
  float_inner = type(plain.init(params)[0])(count=before[0].count, **{
      k: jax.tree.map(lambda d, p: d.astype(jnp.promote_types(
          p.dtype, jnp.float32)), v, params) for k, v in fields.items()})
  float_state = (float_inner,) + tuple(before[1:])
  step_c, step_f = _jitted_step(compressed), _jitted_step(plain)
  _, after_c = step_c(params, before, stream[2])
  _, after_f = step_f(params, float_state, stream[2])
  got = jadam.decode_moments(after_c[0])
  want = jadam.decode_moments(after_f[0])
  for field, storage_key in (("mu", "mu_dtype"), ("nu", "nu_dtype"),
                             ("nu_max", "nu_dtype")):
    storage = storages.get(storage_key)
    if storage is None or getattr(got, field) is None:
      continue
    root = field != "mu"
    for key in params:
      g = np.asarray(getattr(got, field)[key], np.float64)
      w = np.asarray(getattr(want, field)[key], np.float64)
      # The two programs fuse the moment's multiply-add differently (an FMA
      # or not): a few float32 ulps of its operands, which matter where
      # they cancel (0.9·(-0.1953) + 0.1·1.758 is 0 or 4.7e-9).
      grad = np.asarray(stream[2][key], np.float64)
      old = np.abs(np.asarray(getattr(decoded, field)[key], np.float64))
      fused = 2.0**-20 * (old + (grad**2 if root else np.abs(grad)))
      if storage == "int8":
        moment = getattr(after_c[0], field)[key]
        scales = (moment.scales if isinstance(moment, jadam.Int8Moment)
                  else None)
        if scales is None:
          bound = 1e-6 * np.abs(w) + 1e-30
        else:
          n = w.size
          block = _quant.block_size_of(n, scales.shape[0])
          scale = np.repeat(np.asarray(scales, np.float64), block)[:n]
          step = _gap(not root) * scale.reshape(w.shape)
          # Codes of v hold √v: one step of √v is 2√v·step + step² in v.
          bound = (2 * np.sqrt(np.maximum(w, 0)) * step + step**2 if root
                   else step)
      else:
        bits = {"bfloat16": 8, "float16": 11}[storage]
        relative = 2.0 ** (1 - bits)
        # Below the smallest normal the spacing is absolute.
        tiny = float(jnp.finfo(storage).smallest_subnormal)
        if root and storage == "float16":  # stored as √v
          relative = 2 * relative + relative**2
          tiny = 2 * np.sqrt(np.abs(w)) * tiny + tiny**2
        bound = relative * np.abs(w) + tiny
      excess = np.abs(g - w) - (bound * (1 + 1e-5) + fused)
      assert (excess <= 0).all(), (
          f"{field}[{key}] off by {np.max(excess):.3g} beyond one rounding "
          f"step of {storage}")
  return True


@pytest.mark.slow  # CI's lowest environment leaves it out, for time
@FUZZ
@given(cases())
def test_fuzz(case):
  tx = build(case)
  params = make_params(case)
  stream = make_stream(case, params)
  final, states = run_loop(tx, params, stream)
  check_invariants(case, tx, params, states, final)
  check_transform(case, tx, params, stream, final, states)
  check_optax_twin(case, params, stream, final)
  check_one_step_bound(case, params, stream)
