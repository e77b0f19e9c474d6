"""The numbers of every optimizer x storage format x path, frozen before the
redesign of the engine (issue 31) so that it can be checked bit for bit.

Each case runs three jitted steps of ``skip_nonfinite(optimizer)`` on a small
tree (one leaf large enough for int8 blocks, one below ``min_size``), the
second step with a NaN gradient (skipped), on the tree path and through
``jadam.FlatView``, and hashes the final parameters' and state's arrays (dtype, shape and bytes of
each; in any order, so that moving a leaf within the state changes nothing).
The reference (``tests/numerics_reference.json``) holds one table per JAX
version and CPU model, since XLA may round differently between versions and
instruction sets; where the running pair has none the test is skipped.

Run it with ``-m matrix`` (it is deselected by default, like the sharding
matrix; CI runs it in its newest environment, where the slow tests and the
matrix both run); record a table (only from a commit whose numbers are the intended
ones) with ``JADAM_RECORD_NUMERICS=1 python -m pytest -m matrix
tests/test_numerics_frozen.py``. Tables recorded at this file's first
commit: JAX 0.8.0, 0.10.2 and 0.12.1 on the project's 2-core AMD EPYC.
"""

import hashlib
import json
import os
import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam

REFERENCE = pathlib.Path(__file__).with_name("numerics_reference.json")
OPTIMIZERS = {
    "adam": jadam.adam, "adamw": jadam.adamw, "nadam": jadam.nadam,
    "nadamw": jadam.nadamw, "amsgrad": jadam.amsgrad, "adamax": jadam.adamax,
    "adamaxw": jadam.adamaxw, "radam": jadam.radam, "adopt": jadam.contrib.adopt,
    "ademamix": jadam.contrib.ademamix,
    "schedule_free_adamw": jadam.contrib.schedule_free_adamw,
}
FORMATS = {"float32": None, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16, "int8": "int8"}


def _cpu_model():
  """The CPU's model name and a hash of its instruction-set flags (XLA:CPU
  compiles for the instructions it finds)."""
  model, flags = platform.processor() or platform.machine(), ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return f"{model} {hashlib.sha256(flags.encode()).hexdigest()[:8]}"


def _table_key():
  return f"jax {jax.__version__} / {jax.default_backend()} / {_cpu_model()}"


def _digest(case):
  name, storage, path = case
  fmt = FORMATS[storage]
  kwargs = {"nu_dtype": fmt}
  if name != "schedule_free_adamw":
    kwargs["mu_dtype"] = fmt
  tx = jadam.skip_nonfinite(OPTIMIZERS[name](1e-2, **kwargs))
  key = jax.random.PRNGKey(7)
  params = {"w": jax.random.normal(key, (64, 80)), "b": jnp.zeros(80)}
  grads = [jax.tree.map(lambda p, k=k: jax.random.normal(
      jax.random.fold_in(key, k), p.shape), params) for k in (1, 2, 3)]
  grads[1]["w"] = grads[1]["w"].at[3, 5].set(jnp.nan)
  if path == "flat":
    view = jadam.FlatView(params)
    params, grads = view.ravel(params), [view.ravel(g) for g in grads]

  @jax.jit
  def run(params, grads):
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  out = run(params, grads)
  assert int(out[1].skipped) == 1
  # The arrays' digests sorted, not the arrays in tree order: the redesign
  # moves int8 block scales from a field of their own into the moments'
  # leaves, which reorders the leaves without changing one bit of them.
  h = hashlib.sha256()
  for part in sorted(_array_digest(leaf) for leaf in jax.tree.leaves(out)):
    h.update(part)
  return h.hexdigest()[:16]


def _array_digest(leaf):
  array = np.asarray(leaf)
  return hashlib.sha256(str((array.dtype, array.shape)).encode()
                        + array.tobytes()).digest()


CASES = [(name, storage, path) for name in OPTIMIZERS for storage in FORMATS
         for path in ("tree", "flat")]


@pytest.mark.slow
@pytest.mark.matrix  # so in CI only the newest environment runs it (70 s)
def test_numbers_equal_the_recorded_reference():
  digests = {"/".join(case): _digest(case) for case in CASES}
  tables = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
  if os.environ.get("JADAM_RECORD_NUMERICS"):
    tables[_table_key()] = digests
    REFERENCE.write_text(json.dumps(tables, indent=1, sort_keys=True) + "\n")
  table = tables.get(_table_key())
  if table is None:
    pytest.skip(f"no recorded numbers for {_table_key()}")
  changed = sorted(k for k in table if digests.get(k) != table[k])
  assert not changed, f"{len(changed)} of {len(table)} cases changed: {changed}"
