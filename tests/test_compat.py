"""jadam._compat: every moved or movable JAX API, reached without a
deprecation warning on the JAX under test (CI runs the lowest and the newest
supported)."""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jadam import _compat

# Warnings attributed to a jadam module become errors in this file's
# subprocess, whatever optax, Flax or orbax raise.
_STRICT = ("import warnings; warnings.filterwarnings('error', "
           "category=DeprecationWarning, module=r'jadam(\\..*)?$'); "
           "warnings.filterwarnings('error', category=FutureWarning, "
           "module=r'jadam(\\..*)?$'); ")


def test_import_jadam_raises_no_deprecation_at_all():
  # Stricter than the criterion: any DeprecationWarning during the import,
  # from any module, fails (a user's test suite run with -W error).
  done = subprocess.run(
      [sys.executable, "-W", "error::DeprecationWarning", "-c",
       "import jadam, jadam.sharding, jadam.contrib, jadam.rule"],
      capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-2000:]


def test_training_step_of_every_storage_warns_nothing_from_jadam():
  code = _STRICT + """
import jax, jax.numpy as jnp, optax, jadam
params = {"w": jax.device_put(jnp.ones((64, 128)), jax.devices()[0]),
          "b": jnp.ones(3)}
for kw in ({}, {"mu_dtype": jnp.bfloat16}, {"nu_dtype": "int8"},
           {"mu_dtype": "int8", "nu_dtype": "int8"}):
  for tx in (jadam.adam(1e-3, **kw), jadam.amsgrad(1e-3, **kw),
             jadam.contrib.ademamix(1e-3, **kw),
             jadam.skip_nonfinite(jadam.adamw(1e-3, **kw)),
             jadam.with_telemetry(jadam.adam(1e-3, **kw))):
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
    updates, state = step(params, state)
    jadam.sharding.abstract_state(tx, params)
    jadam.sharding.state_specs(tx, params, {"w": ("a", None), "b": None})
print("ok")
"""
  done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, check=False)
  assert done.returncode == 0 and done.stdout.strip() == "ok", (
      done.stderr[-3000:])


def test_single_device_sharding_helpers():
  device = jax.devices()[0]
  sharding = _compat.make_single_device_sharding(device)
  x = jax.device_put(jnp.ones(3), sharding)
  assert _compat.is_single_device_sharding(x.sharding)
  mesh = jax.make_mesh((1,), ("a",))
  named = _compat.NamedSharding(mesh, _compat.PartitionSpec("a"))
  assert not _compat.is_single_device_sharding(named)


def test_tracer_typeof_and_key_paths():
  seen = []

  def f(x):
    seen.append((_compat.is_tracer(x), _compat.typeof(x).shape))
    return x
  jax.jit(f)(jnp.ones(2))
  assert seen == [(True, (2,))]
  assert not _compat.is_tracer(jnp.ones(2))
  tree = {"a": [jnp.ones(1), jnp.zeros(2)]}
  pairs, _ = _compat.flatten_with_path(tree)
  assert [_compat.keystr(p, simple=True, separator="/")
          for p, _ in pairs] == ["a/0", "a/1"]
  doubled = _compat.map_with_path(lambda p, x: 2 * x, tree)
  np.testing.assert_array_equal(doubled["a"][1], np.zeros(2))


def test_reshard_auto_axes_and_shard_map_on_one_device():
  mesh = jax.make_mesh((1,), ("a",),
                       axis_types=(_compat.AxisType.Explicit,))
  assert _compat.is_explicit(mesh.axis_types[0])
  with jax.set_mesh(mesh):
    x = jax.device_put(jnp.arange(4.0), _compat.NamedSharding(
        mesh, _compat.PartitionSpec("a")))
    y = jax.jit(lambda v: _compat.reshard(
        v * 2, _compat.PartitionSpec(None)))(x)
    np.testing.assert_array_equal(y, 2 * np.arange(4.0))
    z = jax.jit(_compat.auto_axes(lambda v: v + 1, out_sharding=_compat.
                                  NamedSharding(mesh, _compat.PartitionSpec(
                                      "a"))))(x)
    np.testing.assert_array_equal(z, np.arange(4.0) + 1)
  auto = jax.make_mesh((1,), ("a",), axis_types=(_compat.AxisType.Auto,))
  total = jax.jit(_compat.shard_map(
      lambda v: jax.lax.psum(jnp.sum(v), "a"), mesh=auto,
      in_specs=_compat.PartitionSpec("a"),
      out_specs=_compat.PartitionSpec()))(jnp.arange(4.0))
  assert float(total) == 6.0


def test_memory_kinds_lists_the_devices_memories():
  kinds = _compat.memory_kinds(jax.devices()[0])
  assert "device" in kinds or kinds == []


def test_no_jadam_module_reads_a_moved_jax_api_directly():
  """The next deprecation must be a one-line change in _compat: no other
  module spells the APIs it covers."""
  import pathlib  # pylint: disable=g-import-not-at-top
  import jadam  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(jadam.__file__).parent
  moved = ("SingleDeviceSharding", "jax.core.", "jax.sharding.reshard",
           "jax.sharding.auto_axes", "jax.experimental", "jax.typeof(",
           "jax.memory.", "tree_flatten_with_path(", "jax.shard_map")
  offenders = []
  for path in root.glob("*.py"):
    if path.name == "_compat.py":
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#")[0].strip()
      in_text = code.startswith(('"', "f\"", "'", "f'"))  # a message
      if any(name in code for name in moved) and ">>>" not in line and (
          "``" not in line) and not in_text:
        offenders.append(f"{path.name}:{number}: {line.strip()}")
  assert not offenders, offenders
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    assert callable(_compat.shard_map)
