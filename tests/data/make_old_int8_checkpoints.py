"""Writes ``old_int8_states.msgpack``: int8-moment optimizer states as saved
by jadam before its int8 state classes (``QuantizedAdamState``,
``QuantizedAmsgradState``, ``QuantizedAdemamixState``,
``QuantizedSecondMomentState``) went away.

Run once, at commit badb800, to write the fixture:

  cd <worktree of badb800> && \
    PYTHONPATH=. python /path/to/make_old_int8_checkpoints.py OUT

where OUT is the output file (tests/data/old_int8_states.msgpack). It is
kept for the record; running it with later code would not give old
checkpoints.

Per case the file holds ``{"state": flax.serialization.to_state_dict(state),
"params": params after 3 steps, "decoded": {"mu", "nu", "nu_max"} float32
moments of the Adam-family sub-state from jadam.decode_moments (None fields
left out; AdEMAMix's also "m2", its slow EMA), "path": "/"-joined keys of
that sub-state in the raw state dict}``.
"""

import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jadam

STEPS = 3
INT8 = jadam.BlockwiseInt8(min_size=1024)

CASES = {
    "adam": ("adam", dict(mu_dtype=INT8, nu_dtype=INT8)),
    "amsgrad": ("amsgrad", dict(mu_dtype=INT8, nu_dtype=INT8)),
    "adamax": ("adamax", dict(mu_dtype=INT8, nu_dtype=INT8)),
    "adopt": ("adopt", dict(mu_dtype=INT8, nu_dtype=INT8)),
    "ademamix": ("ademamix", dict(mu_dtype=INT8, nu_dtype=INT8)),
    "schedule_free_adamw": ("schedule_free_adamw", dict(nu_dtype=INT8)),
    "adam_bf16_mu_int8_nu": ("adam", dict(mu_dtype=jnp.bfloat16,
                                          nu_dtype=INT8)),
}

SUB_STATE_TYPES = tuple(
    getattr(jadam, n) for n in (
        "QuantizedAdamState", "QuantizedAmsgradState",
        "QuantizedAdemamixState", "QuantizedSecondMomentState"))


def find_sub_state(state, path=()):
  """(path, sub_state) of the one quantized Adam-family state in ``state``."""
  if isinstance(state, SUB_STATE_TYPES):
    return [(path, state)]
  found = []
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    for name in state._fields:
      found += find_sub_state(getattr(state, name), path + (name,))
  elif isinstance(state, (tuple, list)):
    for i, s in enumerate(state):
      found += find_sub_state(s, path + (str(i),))
  return found


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def run_case(name, kwargs):
  opt = getattr(jadam, name)(1e-2, **kwargs)
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 128)),
            "b": jnp.zeros(10)}
  state = opt.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(STEPS):
    key = jax.random.fold_in(jax.random.PRNGKey(1), i)
    grads = {k: jax.random.normal(key, v.shape) for k, v in params.items()}
    params, state = step(params, state, grads)

  (path, sub), = find_sub_state(state)
  moments = jadam.decode_moments(sub)
  decoded = {f: to_numpy(jax.tree.map(lambda x: x.astype(jnp.float32), t))
             for f, t in moments._asdict().items() if t is not None}
  if hasattr(sub, "m2"):
    # AdEMAMix's slow EMA, which decode_moments leaves out: decoded as m1.
    m2 = jadam.decode_moments(sub._replace(
        m1=sub.m2, scales={**sub.scales, "m1": sub.scales["m2"]})).mu
    decoded["m2"] = to_numpy(m2)
  print(f"{name} {kwargs}: sub-state {type(sub).__name__} at "
        f"{'/'.join(path)!r}")
  print("  ", jax.tree.map(lambda x: (x.dtype.name, x.shape), state))
  return {"state": to_numpy(flax.serialization.to_state_dict(state)),
          "params": to_numpy(params),
          "decoded": decoded,
          "path": "/".join(path)}


def main(out):
  print("jadam from", jadam.__file__)
  data = {case: run_case(name, kwargs)
          for case, (name, kwargs) in CASES.items()}
  blob = flax.serialization.msgpack_serialize(data)
  with open(out, "wb") as f:
    f.write(blob)
  print(f"wrote {out}: {len(blob)} bytes")


if __name__ == "__main__":
  main(sys.argv[1])
