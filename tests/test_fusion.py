"""The single-pass step under XLA:CPU multi-output fusion (``jadam._fusion``).

XLA reads its flags once per process, so everything that needs the fusion
pass runs in a subprocess: this file, run as a script with the flag set. The
script writes what it measured to an ``.npz`` file; the tests below check it
against the same runs in this process, which has default flags.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from jadam import _fusion

ALIASES = ["adam", "adamw", "nadam", "nadamw", "amsgrad", "adamax", "adamaxw",
           "radam"]
STEPS = 25


def _optimizer(name):
  """A chain like a real one: clipping, a warm-up cosine schedule, the alias
  (with its default weight decay for the *w variants)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 5, STEPS)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     getattr(jadam, name)(schedule))


def _problem():
  key = jax.random.key(3)
  k1, k2, k3 = jax.random.split(key, 3)
  x = jax.random.normal(k1, (64, 12))
  y = jnp.tanh(x @ jax.random.normal(k2, (12,)))
  params = {"w": 0.3 * jax.random.normal(k3, (12, 32)), "b": jnp.zeros(32),
            "v": jnp.full((32,), 0.1)}
  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) @ p["v"] - y) ** 2)
  return params, loss


def _train(opt, flat=False):
  """Updates of ``opt`` for a fixed sequence of gradients (lockstep: both
  sides of a comparison see the same gradients, so ulps are not amplified by
  diverging trajectories), flattened and concatenated over the steps."""
  return _run(opt, flat)[0]


def _stored_moments(opt):
  """The moments ``opt`` keeps after the lockstep run, as stored (bfloat16
  or float16 values widened to float32), one vector."""
  state = _run(opt)[1]
  kinds = (jadam.ScaleByAdamState, jadam.ScaleByAmsgradState)
  nodes = [node for node in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, kinds)) if isinstance(node, kinds)]
  return np.concatenate([_leaves((node.mu, node.nu)) for node in nodes])


def _run(opt, flat=False):
  """:func:`_train`'s updates, and the final optimizer state."""
  params, _ = _problem()
  view = None
  if flat:
    view = jadam.FlatView(params)
    params = view.ravel(params)
  state = opt.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  out = []
  for k in range(STEPS):
    template, _ = _problem()
    keys = jax.random.split(jax.random.key(100 + k), len(template))
    grads = jax.tree.unflatten(jax.tree.structure(template), [
        (0.5 + k % 3) * jax.random.normal(key, x.shape)
        for key, x in zip(keys, jax.tree.leaves(template))])
    if flat:
      grads = view.ravel(grads)
    params, state, updates = step(params, state, grads)
    out.append(_leaves(view.unravel(updates) if flat else updates))
  return np.stack(out), state


def _leaves(tree):
  """All leaves of ``tree`` as one float64 vector."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def _step_errors(got, expected):
  """Worst relative error of one step's update over the steps (a zero
  update, at the schedule's first step, must be matched exactly)."""
  return max(np.linalg.norm(a - b) / np.linalg.norm(b) if np.any(b)
             else float(np.any(a)) for a, b in zip(got, expected))


def _one_leaf_step_hlo(opt, n=1 << 16):
  """Optimised HLO of a donated step of ``opt`` on one float32 leaf."""
  params = jnp.ones(n)
  state = opt.init(params)
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params).compile().as_text()


def _array_fusions(hlo, n=1 << 16):
  """(number of outputs) of every loop fusion that writes arrays of n."""
  entry = hlo.split("ENTRY", 1)[1]
  out = []
  for line in entry.splitlines():
    match = re.search(r"= (\(.*?\)|\S+) fusion\(", line)
    if match and f"[{n}]" in match.group(1):
      out.append(match.group(1).count(f"[{n}]"))
  return out


def _narrow():
  """Optimizers with bfloat16 and float16 moments (stochastic rounding)."""
  return {"bf16": jadam.adam(3e-2, mu_dtype=jnp.bfloat16,
                             nu_dtype=jnp.bfloat16),
          "f16": jadam.amsgrad(3e-2, mu_dtype=jnp.float16,
                               nu_dtype=jnp.float16)}


def _meta_gradient():
  """d loss(θ + update(s·g)) / ds at s = 1: differentiating through the
  update, as meta-learning does (with eps_root, so the root is smooth)."""
  opt = jadam.adam(1e-2, eps_root=1e-8)
  params, loss = _problem()
  state = opt.init(params)
  def meta(scale):
    grads = jax.tree.map(lambda g: scale * g, jax.grad(loss)(params))
    updates, _ = opt.update(grads, state, params)
    return loss(optax.apply_updates(params, updates))
  return np.array(jax.grad(meta)(1.0))


def _vmapped_updates():
  """First updates of three independent problems under ``jax.vmap``."""
  opt = jadam.adamw(1e-2, weight_decay=1e-2)
  batch = jnp.stack([jnp.full((16,), float(i)) for i in range(3)])
  def one(p, g):
    updates, _ = opt.update(g, opt.init(p), p)
    return updates
  return np.asarray(jax.jit(jax.vmap(one))(batch, jnp.cos(batch)))


def _worker(path):
  """Run in the subprocess, with the fusion flag in XLA_FLAGS."""
  result = {"active": _fusion.cpu_fusion_active()}
  # The problem's leaves are small; take the single-pass form on all of them.
  _fusion.MIN_SIZE = 0
  for name in ALIASES:
    result[f"tree_{name}"] = _train(_optimizer(name))
    result[f"flat_{name}"] = _train(_optimizer(name), flat=True)
  result["optax_adam"] = _train(optax.chain(
      optax.clip_by_global_norm(1.0), optax.adam(
          optax.warmup_cosine_decay_schedule(0.0, 3e-2, 5, STEPS))))
  result["fusions_adam"] = np.array(_array_fusions(
      _one_leaf_step_hlo(jadam.adam(1e-3))))
  result["fusions_adamw"] = np.array(_array_fusions(
      _one_leaf_step_hlo(jadam.adamw(1e-3, weight_decay=1e-2))))
  result["fusions_optax"] = np.array(_array_fusions(
      _one_leaf_step_hlo(optax.adam(1e-3))))
  for name, opt in _narrow().items():
    result[f"narrow_updates_{name}"] = _train(opt)
    result[f"narrow_moments_{name}"] = _stored_moments(opt)
  result["meta_grad"] = _meta_gradient()
  result["vmap"] = _vmapped_updates()
  np.savez(path, **result)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
  path = tmp_path_factory.mktemp("fusion") / "fused.npz"
  env = dict(os.environ)
  env["XLA_FLAGS"] = _fusion._with_option(env.get("XLA_FLAGS", ""))
  # The single-pass form is XLA:CPU's; on a machine with a GPU the worker
  # still measures it on the CPU backend.
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
       env.get("PYTHONPATH", "")])
  subprocess.run([sys.executable, os.path.abspath(__file__), str(path)],
                 env=env, check=True, timeout=600)
  return dict(np.load(path))


def test_flag_is_added_to_existing_xla_flags():
  option = _fusion.OPTION
  assert _fusion._with_option("") == f"--xla_backend_extra_options={option}"
  assert _fusion._with_option("--xla_cpu_enable_fast_math=false") == (
      f"--xla_cpu_enable_fast_math=false --xla_backend_extra_options={option}")
  assert _fusion._with_option("--xla_backend_extra_options=a,b") == (
      f"--xla_backend_extra_options=a,b,{option}")
  once = _fusion._with_option("")
  assert _fusion._with_option(once) == once


def test_default_flags_keep_the_plain_form():
  # This process runs with the default flags (no fusion): jadam must not
  # duplicate work that would not merge.
  if "xla_cpu_use_multi_output_fusion" in os.environ.get("XLA_FLAGS", ""):
    pytest.skip("this process has the fusion flag")
  assert not _fusion.cpu_fusion_active()
  assert not _fusion.single_pass(1 << 20)


def test_enabling_after_the_backend_started_is_an_error():
  if _fusion.cpu_fusion_active():
    pytest.skip("this process has the fusion flag")
  if jax.default_backend() != "cpu":
    pytest.skip("the flag is an XLA:CPU option; on GPU/TPU enabling it is a "
                "no-op, not an error")
  jnp.ones(3).block_until_ready()
  saved = os.environ.get("XLA_FLAGS")
  try:
    with pytest.raises(RuntimeError, match="before the first JAX computation"):
      jadam.enable_cpu_fusion()
  finally:
    if saved is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = saved
    _fusion.cpu_fusion_active.cache_clear()
  assert not _fusion.single_pass(1 << 20)


def test_the_flag_is_active_in_the_worker(fused):
  assert bool(fused["active"])


def test_one_pass_writes_parameters_and_both_moments(fused):
  # One loop with three outputs (θ, m, v) instead of three loops; optax,
  # under the same flag, still needs two (m and v, then θ).
  assert list(fused["fusions_adam"]) == [3]
  assert list(fused["fusions_adamw"]) == [3]
  assert sorted(fused["fusions_optax"]) == [1, 2]


@pytest.mark.parametrize("name", ALIASES)
def test_single_pass_numerics_equal_default_flags(fused, name):
  # The same 25 steps (clipping, warm-up cosine, the same gradients) in this
  # process, with the plain three-loop form, and in the worker, tree path
  # and flat path.
  expected = _train(_optimizer(name))
  for path in ("tree", "flat"):
    got = fused[f"{path}_{name}"]
    err = _step_errors(got, expected)
    assert err < 1e-6, (path, err)


def test_single_pass_equals_optax(fused):
  assert _step_errors(fused["tree_adam"], fused["optax_adam"]) < 1e-6


@pytest.mark.parametrize("name", ["bf16", "f16"])
def test_narrow_moments_round_from_the_same_bits(fused, name):
  # Under the flag each stored moment is computed in a loop of its own,
  # hashing its random bits again; they must be the bits of the default form.
  # A different stream would change about half the rounding decisions; the
  # only allowed differences are roundings flipped by a last-bit difference
  # in the float32 value (fused multiply-adds), which are rare.
  opt = _narrow()[name]
  expected = _stored_moments(opt)
  got = fused[f"narrow_moments_{name}"]
  assert got.shape == expected.shape
  assert np.mean(got != expected) < 0.01
  assert _step_errors(fused[f"narrow_updates_{name}"], _train(opt)) < 1e-2


def test_gradient_through_the_update(fused):
  expected = _meta_gradient()
  assert np.isfinite(fused["meta_grad"])
  np.testing.assert_allclose(fused["meta_grad"], expected, rtol=1e-5)


def test_vmap_of_the_single_pass(fused):
  # The per-example updates, vmapped in the worker, against this process.
  np.testing.assert_allclose(fused["vmap"], _vmapped_updates(), rtol=1e-6,
                             atol=1e-9)


if __name__ == "__main__":
  _worker(sys.argv[1])


def test_importing_jadam_runs_nothing_on_a_backend():
  # enable_cpu_fusion must be callable right after `import jadam`: nothing
  # in the package may compute on a backend at import time.
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, "-c", "import jadam; jadam.enable_cpu_fusion()"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
