"""A state says what it stores: formats are objects, an int8 moment is a leaf
of optax's own state classes, and everything that reads a state (decoding,
telemetry, ``describe``, conversion, the check at ``update``) reads that.
"""

import functools
import pathlib

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

OPTIMIZERS = {
    "adam": jadam.adam, "adamw": jadam.adamw, "nadam": jadam.nadam,
    "nadamw": jadam.nadamw, "amsgrad": jadam.amsgrad,
    "adamax": jadam.adamax, "adamaxw": jadam.adamaxw, "radam": jadam.radam,
    "adopt": jadam.contrib.adopt, "ademamix": jadam.contrib.ademamix,
    "schedule_free_adamw": jadam.contrib.schedule_free_adamw,
}
FORMATS = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "int8": "int8"}
PARAMS = {"w": jnp.zeros((64, 80)), "b": jnp.zeros(80)}


def _make(name, storage, **extra):
  kwargs = {"nu_dtype": FORMATS[storage], **extra}
  if name != "schedule_free_adamw":
    kwargs["mu_dtype"] = FORMATS[storage]
  return OPTIMIZERS[name](1e-2, **kwargs)


def _grads(k):
  key = jax.random.PRNGKey(k)
  return {"w": jax.random.normal(key, (64, 80)) * 0.3,
          "b": jax.random.normal(jax.random.fold_in(key, 1), (80,))}


def _steps(tx, n=3, params=PARAMS):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k in range(n):
    _, state = update(_grads(k), state, params)
  return state


@functools.lru_cache(maxsize=None)
def _run(name, storage):
  """Three steps under with_telemetry: (its stats, the moment state)."""
  state = _steps(jadam.with_telemetry(_make(name, storage)))
  found = jadam._state.moment_states(state)  # pylint: disable=protected-access
  assert len(found) == 1
  return jadam.stats(state), found[0][1]


@pytest.mark.parametrize("storage", ["bfloat16", "float16", "int8"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_telemetry_and_decode_moments_read_every_format_of_every_optimizer(
    name, storage):
  """with_telemetry's nu_min/nu_max and decode_moments' m and v are values
  whatever the storage, near the float32-moment run's (raw int8 codes reach
  254, float16 √v is a square root: orders of magnitude off). Measured
  after 3 steps: nu_max within 0.2% in every case; nu_min, one element at
  the bottom of int8's code map, within 15% (schedule-free AdamW); the
  moments' relative error at most 0.052 (int8), 0.0037 (bfloat16), 0.0008
  (float16)."""
  reference, want_state = _run(name, "float32")
  stats, got_state = _run(name, storage)
  for key, bound in (("nu_max", 0.01), ("nu_min", 0.25)):
    want, got = float(reference[key]), float(stats[key])
    assert want > 0 and np.isfinite(got), (key, want, got)
    assert abs(got - want) <= bound * want, (key, want, got)
  bound = {"int8": 0.08, "bfloat16": 0.008, "float16": 0.002}[storage]
  want, got = (jadam.decode_moments(s) for s in (want_state, got_state))
  for field in ("mu", "nu"):
    if getattr(want, field) is None:
      continue
    for leaf in ("w", "b"):
      w = np.asarray(getattr(want, field)[leaf])
      g = np.asarray(getattr(got, field)[leaf])
      assert g.dtype == np.float32
      error = np.linalg.norm(g - w) / np.linalg.norm(w)
      assert error < bound, (field, leaf, error)


WRAPPERS = {
    "alone": lambda tx: tx,
    "skip_nonfinite": jadam.skip_nonfinite,
    "with_telemetry": jadam.with_telemetry,
    "chain": lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
    "MultiSteps": lambda tx: optax.MultiSteps(tx, 2),
}
PAIRS = [(a, b) for a in FORMATS for b in FORMATS if a != b]


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("made,given", PAIRS)
def test_a_state_of_another_format_is_refused_naming_path_and_formats(
    made, given, wrapper):
  """An int8 state given to a float32 adam, a float32 state to an int8 one,
  bf16 and f32 swapped: a ValueError naming the key path, the format found
  and the format configured, and the conversion function; never a silent
  step in the wrong format."""
  wrap = WRAPPERS[wrapper]
  state = wrap(jadam.adam(1e-2, mu_dtype=FORMATS[made],
                          nu_dtype=FORMATS[made])).init(PARAMS)
  tx = wrap(jadam.adam(1e-2, mu_dtype=FORMATS[given], nu_dtype=FORMATS[given]))
  with pytest.raises(ValueError, match=r"at \['[wb]'\] is stored as .* but this "
                     r"optimizer stores it as .*jadam\.convert_state"):
    jax.jit(tx.update)(_grads(0), state, PARAMS)


def test_the_refusal_names_both_formats():
  state = jadam.adam(1e-2, nu_dtype="int8").init(PARAMS)
  with pytest.raises(ValueError) as error:
    jadam.adam(1e-2).update(_grads(0), state, PARAMS)
  assert str(error.value).startswith(
      "The optimizer state's nu at ['w'] is stored as int8 √v, block 256, "
      "but this optimizer stores it as float32")


def test_float_states_of_the_parameters_dtype_need_no_params():
  """Without ``params`` a format that follows the parameter cannot know
  its dtype and takes the stored one (documented); formats named
  explicitly are still checked."""
  state = jadam.adam(1e-2, mu_dtype=jnp.bfloat16).init(PARAMS)
  # Accepted: it is what a bfloat16 parameter's state would be.
  jadam.adam(1e-2).update(_grads(0), state)
  with pytest.raises(ValueError, match="stored as bfloat16"):
    jadam.adam(1e-2, mu_dtype=jnp.float16).update(_grads(0), state)


def test_describe_names_each_leafs_formats_and_the_bytes_per_parameter():
  """A 64-128-10 MLP with nu_dtype='int8': only the 64x128 kernel is at
  least min_size (4096), so only it is int8 (blocks of its 128-long rows)."""
  params = {"w1": jnp.zeros((64, 128)), "b1": jnp.zeros(128),
            "w2": jnp.zeros((128, 10)), "b2": jnp.zeros(10)}
  summary = jadam.describe(jadam.adam(1e-3, nu_dtype="int8").init(params))
  rows = {row.path: row for row in summary.leaves}
  assert rows["['w1']"].formats == {"mu": "float32",
                                    "nu": "int8 √v, block 128"}
  assert rows["['w1']"].nbytes == 4 * 8192 + 8192 + 4 * 64
  for name in ("b1", "w2", "b2"):
    assert rows[f"['{name}']"].formats == {"mu": "float32", "nu": "float32"}
  assert summary.n_params == 8192 + 128 + 1280 + 10
  # Moments, plus the int32 step count.
  assert summary.state_bytes == 4 * 9610 + 8192 + 256 + 4 * 1418 + 4
  assert summary.bytes_per_param == pytest.approx(52564 / 9610)
  text = str(summary)
  assert "['w1']     64x128  float32  int8 √v, block 128  41216" in text
  assert text.endswith("52564 bytes of state for 9610 parameters: "
                       "5.47 bytes/parameter")


def test_describe_reads_every_optimizer_inside_wrappers():
  tx = jadam.skip_nonfinite(optax.chain(
      optax.clip(1.0), jadam.contrib.ademamix(1e-3, mu_dtype=jnp.bfloat16,
                                      nu_dtype=jnp.float16)))
  summary = jadam.describe(tx.init(PARAMS))
  assert [dict(r.formats) for r in summary.leaves] == [
      {"m1": "bfloat16", "nu": "float16 √v", "m2": "bfloat16"}] * 2


def test_convert_state_between_formats_keeps_the_moments():
  """float32 -> int8 on resume: the count is kept and every moment decodes
  to the float32 one within int8's nearest rounding; back to float32 the
  values are the decoded ones exactly."""
  state = _steps(jadam.adam(1e-2))
  lean = jadam.adam(1e-2, mu_dtype="int8", nu_dtype="int8")
  converted = jadam.convert_state(state, lean, PARAMS)
  assert isinstance(converted[0].nu["w"], jadam.Int8Moment)
  assert int(converted[0].count) == 3
  want, got = (jadam.decode_moments(s[0]) for s in (state, converted))
  for field in ("mu", "nu"):
    w = np.asarray(getattr(want, field)["w"])
    g = np.asarray(getattr(got, field)["w"])
    error = np.linalg.norm(g - w) / np.linalg.norm(w)
    assert error < 0.03, (field, error)
  back = jadam.convert_state(converted, jadam.adam(1e-2), PARAMS)
  np.testing.assert_array_equal(back[0].nu["w"], got.nu["w"])
  # It steps on, in int8.
  _, stepped = jax.jit(lean.update)(_grads(5), converted, PARAMS)
  assert int(stepped[0].count) == 4


OLD = pathlib.Path(__file__).parent / "data" / "old_int8_states.msgpack"
OLD_CASES = {
    "adam": (jadam.adam, dict(mu_dtype="int8", nu_dtype="int8")),
    "amsgrad": (jadam.amsgrad, dict(mu_dtype="int8", nu_dtype="int8")),
    "adamax": (jadam.adamax, dict(mu_dtype="int8", nu_dtype="int8")),
    "adopt": (jadam.contrib.adopt, dict(mu_dtype="int8", nu_dtype="int8")),
    "ademamix": (jadam.contrib.ademamix, dict(mu_dtype="int8", nu_dtype="int8")),
    "schedule_free_adamw": (jadam.contrib.schedule_free_adamw,
                            dict(nu_dtype="int8")),
    "adam_bf16_mu_int8_nu": (jadam.adam, dict(mu_dtype=jnp.bfloat16,
                                              nu_dtype="int8")),
}


def _old_case(name):
  raw = flax.serialization.msgpack_restore(OLD.read_bytes())[name]
  optimizer, kwargs = OLD_CASES[name]
  kwargs = {k: jadam.BlockwiseInt8(min_size=1024) if v == "int8" else v
            for k, v in kwargs.items()}
  params = jax.tree.map(jnp.asarray, raw["params"])
  return raw, optimizer(1e-2, **kwargs), optimizer(1e-2), params


def _sub_state(state, path):
  for key in path.split("/"):
    state = state[int(key)] if key.isdigit() else getattr(state, key)
  return state


@pytest.mark.parametrize("name", OLD_CASES)
def test_checkpoints_of_the_old_int8_classes_load_through_convert_state(name):
  """States written with the QuantizedAdamState family (tests/data, written
  at commit badb800), restored without a target, converted: to float32
  moments they decode bitwise to what the old code decoded; to the same
  int8 format within its rounding, and the count and other state kept."""
  raw, lean, full, params = _old_case(name)
  decoded = {k: v for k, v in raw["decoded"].items() if k != "m2"}
  as_float = _sub_state(jadam.convert_state(raw["state"], full, params),
                        raw["path"])
  as_int8 = _sub_state(jadam.convert_state(raw["state"], lean, params),
                       raw["path"])
  for state in (as_float, as_int8):
    assert int(state.count) == 3
  exact = jadam.decode_moments(as_float)
  again = jadam.decode_moments(as_int8)
  for field, want in decoded.items():
    for leaf in ("w", "b"):
      np.testing.assert_array_equal(getattr(exact, field)[leaf], want[leaf])
    w, g = want["w"], np.asarray(getattr(again, field)["w"])
    assert np.linalg.norm(g - w) <= 0.03 * np.linalg.norm(w), field
  if name == "ademamix":
    np.testing.assert_array_equal(
        jadam._state.decode_tree(as_float.m2, jnp.float32, second=False)["w"],
        raw["decoded"]["m2"]["w"])
  # The converted state steps on.
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
  _, stepped = jax.jit(lean.update)(grads, jadam.convert_state(
      raw["state"], lean, params), params)
  assert int(_sub_state(stepped, raw["path"]).count) == 4


def test_the_removed_classes_point_at_the_conversion():
  with pytest.raises(AttributeError, match="jadam.convert_state"):
    jadam.QuantizedAdamState  # pylint: disable=pointless-statement


def test_a_new_format_is_one_object_chosen_at_construction():
  """``mu_dtype``/``nu_dtype`` resolve to format objects once; equal
  spellings are one format and build one state."""
  spellings = [jnp.bfloat16, "bfloat16", jadam.Float(jnp.bfloat16)]
  states = [jadam.adam(1e-3, mu_dtype=s).init(PARAMS) for s in spellings]
  assert len({jax.tree.structure(s) for s in states}) == 1
  assert {s[0].mu["w"].dtype for s in states} == {jnp.dtype(jnp.bfloat16)}
  int8_states = [jadam.adam(1e-3, nu_dtype=s).init(PARAMS)
                 for s in ("int8", jadam.BlockwiseInt8())]
  assert all(isinstance(s[0].nu["w"], jadam.Int8Moment) for s in int8_states)
  with pytest.raises(ValueError, match="nu_dtype='int4'"):
    jadam.adam(1e-3, nu_dtype="int4")


def test_the_old_skip_argument_still_skips_and_warns():
  """``jadam_step_if`` (True took the step) is ``jadam_skip`` (True skips it)
  for one release, with a DeprecationWarning naming the new spelling."""
  tx = jadam.scale_by_adam()
  state = tx.init(PARAMS)
  with pytest.warns(DeprecationWarning, match="jadam_skip"):
    updates, new = tx.update(_grads(0), state, jadam_step_if=jnp.asarray(False))
  assert int(new.count) == 0
  assert not np.any(np.asarray(updates["w"]))
