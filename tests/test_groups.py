"""Parameter groups: one grouped pass equals optax's one-optimizer-per-group.

The reference is ``optax.partition`` of one ``optax.adamw`` per group (a
frozen group is ``optax.set_to_zero()``), compared bit for bit under jit.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam
from conftest import assert_bitwise, relative_error

PARTITION = getattr(optax, "partition", None) or optax.multi_transform

# Every XLA compilation in this process, by name (jax.monitoring).
COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: COMPILES.append(event)
    if "backend_compile" in event else None)


class _Model(nn.Module):
  """A small embedding model with every kind of leaf groups pick out."""

  @nn.compact
  def __call__(self, tokens):
    # The embedding and the output layer are large enough (8,192 entries)
    # for int8 moments; the other leaves stay float32 (docs/memory.md).
    x = nn.Embed(256, 32)(tokens)
    x = nn.LayerNorm()(x)
    x = nn.relu(nn.Dense(48)(x))
    x = nn.Dense(32)(x)
    return nn.Dense(256, use_bias=False)(x)


def _problem():
  model = _Model()
  tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, 256)
  params = model.init(jax.random.key(1), tokens)
  targets = jnp.roll(tokens, 1, axis=1)

  def loss(params):
    logits = model.apply(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()
  return params, loss


BASE = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, 100)
EMBED = optax.linear_schedule(1e-3, 1e-4, 100)
GROUPS = [
    jadam.Group("embed", match=r"params/Embed_0/.*", learning_rate=EMBED,
                b2=0.99),
    jadam.Group("no_decay", match=r".*/(bias|scale)", weight_decay=0.0),
    jadam.Group("backbone", match=r"params/Dense_0/.*", lr_scale=0.1,
                eps=1e-6),
    jadam.Group("frozen", match=r"params/Dense_1/kernel", frozen=True),
]
# The same assignment written out by hand, for optax.
LABELS = {"params": {
    "Embed_0": {"embedding": "embed"},
    "LayerNorm_0": {"scale": "no_decay", "bias": "no_decay"},
    "Dense_0": {"kernel": "backbone", "bias": "no_decay"},
    "Dense_1": {"kernel": "frozen", "bias": "no_decay"},
    "Dense_2": {"kernel": "default"},
}}


def _optax_reference():
  return PARTITION({
      "embed": optax.adamw(EMBED, b2=0.99, weight_decay=0.1),
      "no_decay": optax.adamw(BASE, weight_decay=0.0),
      "backbone": optax.adamw(lambda count: BASE(count) * 0.1, eps=1e-6,
                              weight_decay=0.1),
      "frozen": optax.set_to_zero(),
      "default": optax.adamw(BASE, weight_decay=0.1),
  }, LABELS)


def _run(tx, params, loss, steps):
  """``steps`` jitted steps; the gradients come from a jitted program of
  their own, so that two optimizers see the same gradients (inside one
  program XLA may sum a bias's gradient in another order)."""
  state = tx.init(params)
  grad = jax.jit(jax.grad(loss))

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state, grad(params))
  return params, state


def test_param_paths_are_slash_joined_without_flax_value():
  params, _ = _problem()
  paths = jax.tree.leaves(jadam.param_paths(params))
  assert "params/Embed_0/embedding" in paths
  assert "params/LayerNorm_0/scale" in paths
  boxed = {"w": nn.Partitioned(jnp.ones((2, 2)), names=("a", "b")),
           "layers": [{"bias": jnp.ones(2)}]}
  assert jax.tree.leaves(jadam.param_paths(boxed)) == ["layers/0/bias", "w"]


def test_grouped_adamw_is_bitwise_optax_partition_over_100_steps():
  params, loss = _problem()
  ours = jadam.adamw(BASE, weight_decay=0.1, groups=GROUPS)
  mine, _ = _run(ours, params, loss, 100)
  theirs, _ = _run(_optax_reference(), params, loss, 100)
  assert_bitwise(mine, theirs)
  # Trained, and the frozen group exactly not.
  assert not np.array_equal(mine["params"]["Dense_0"]["kernel"],
                            params["params"]["Dense_0"]["kernel"])
  assert_bitwise(mine["params"]["Dense_1"]["kernel"],
                 params["params"]["Dense_1"]["kernel"])


def test_flat_view_groups_are_one_segment_each_in_shared_buffers():
  params, _ = _problem()
  view = jadam.FlatView(params, groups=GROUPS)
  # Frozen and own-β groups apart; the other three share one buffer.
  assert view.keys == ("float32", "float32/b2=0.99", "float32/frozen")
  segments = view.groups.segments(view.ravel(params))
  assert [[s.group for s in leaf] for leaf in segments] == [[1, 2, 4], [0],
                                                              [3]]
  assert_bitwise(view.unravel(view.ravel(params)), params)


def test_flat_view_groups_step_as_the_tree_path_to_a_few_ulp():
  # As without groups (test_flat.py): the same arithmetic, compiled once for
  # the buffer and once per leaf, may round differently on XLA:CPU.
  params, loss = _problem()
  view = jadam.FlatView(params, groups=GROUPS)
  tree_tx = jadam.adamw(BASE, weight_decay=0.1, groups=GROUPS)
  flat_tx = jadam.adamw(BASE, weight_decay=0.1, groups=view.groups)

  def flat_state(state):
    moments, hyper = state
    def ravel(tree):
      full = jax.tree.map(
          lambda m, p: jnp.zeros_like(p) if isinstance(m, optax.MaskedNode)
          else m, tree, params,
          is_leaf=lambda x: isinstance(x, optax.MaskedNode))
      return {**view.ravel(full), "float32/frozen": optax.MaskedNode()}
    return moments._replace(mu=ravel(moments.mu), nu=ravel(moments.nu)), hyper

  grad, tree_update = jax.jit(jax.grad(loss)), jax.jit(tree_tx.update)
  flat_update = jax.jit(flat_tx.update)
  state, worst = tree_tx.init(params), 0
  for _ in range(30):
    grads = grad(params)
    tree_u, new_state = tree_update(grads, state, params)
    flat_u, _ = flat_update(view.ravel(grads), flat_state(state),
                            view.ravel(params))
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree_u)])
    b = np.concatenate([np.ravel(x) for x in
                        jax.tree.leaves(view.unravel(flat_u))])
    worst = max(worst, int(np.max(np.abs(
        a.view(np.int32).astype(np.int64) - b.view(np.int32)))))
    params, state = optax.apply_updates(params, tree_u), new_state
  assert worst <= 8, worst
  assert not np.any(view.unravel(flat_u)["params"]["Dense_1"]["kernel"])


def test_a_frozen_group_holds_no_moments():
  params, _ = _problem()
  state = jadam.adamw(BASE, groups=GROUPS).init(params)
  frozen = params["params"]["Dense_1"]["kernel"]
  assert isinstance(state[0].mu["params"]["Dense_1"]["kernel"],
                    optax.MaskedNode)
  unfrozen = jadam.adamw(BASE, groups=GROUPS[:3]).init(params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert nbytes(unfrozen) - nbytes(state) == 2 * frozen.nbytes


def test_changing_group_values_between_steps_compiles_once():
  params, loss = _problem()
  tx = jadam.adamw(1e-3, weight_decay=0.1, groups=GROUPS)
  traces = []

  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  params = jax.tree.map(jnp.copy, params)
  rates = np.geomspace(1e-4, 1e-2, 20)
  for k, rate in enumerate(rates):
    state = jadam.set_group_hyperparams(
        state, default={"learning_rate": rate},
        no_decay={"learning_rate": rate / 2},
        embed={"lr_scale": 1 + k / 10},
        backbone={"weight_decay": 0.01 * k, "eps": 1e-7})
    params, state = step(params, state)
  assert len(traces) == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access
  values = jadam.group_hyperparams(state)
  assert float(values["default"]["learning_rate"]) == np.float32(rates[-1])
  assert values["backbone"]["weight_decay"].dtype == jnp.float32
  assert not values["backbone"]["weight_decay"].weak_type


def test_a_set_learning_rate_takes_effect_as_a_new_optimizer_would():
  params, loss = _problem()
  groups = [jadam.Group("b", match=r".*bias", learning_rate=1e-3)]
  tx = jadam.adam(1e-3, groups=groups)
  _, state = _run(tx, params, loss, 3)
  grads = jax.grad(loss)(params)
  changed = jadam.set_group_hyperparams(state, b={"learning_rate": 5e-3})
  updates, _ = jax.jit(tx.update)(grads, changed, params)
  tx2 = jadam.adam(1e-3, groups=[jadam.Group("b", match=r".*bias",
                                             learning_rate=5e-3)])
  # The state's values win over the configuration's ...
  kept, _ = jax.jit(tx2.update)(grads, state, params)
  assert_bitwise(kept, jax.jit(tx.update)(grads, state, params)[0])
  # ... until the configuration is applied again, in one call.
  configured = jadam.set_group_hyperparams(
      state, **jadam.group_hyperparams(tx2.init(params)))
  expected, _ = jax.jit(tx2.update)(grads, configured, params)
  assert_bitwise(updates, expected)


def test_skipped_step_holds_the_group_schedules_count():
  params, loss = _problem()
  tx = jadam.skip_nonfinite(jadam.adamw(BASE, groups=GROUPS))
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  update = jax.jit(tx.update)
  _, state = update(grads, state, params)
  _, skipped = update(bad, state, params)
  assert int(skipped.skipped) == 1
  assert int(skipped.inner_state[1].count) == 1
  assert_bitwise(skipped.inner_state, state.inner_state)
  reference, _ = update(grads, state, params)
  again, _ = update(grads, skipped, params)
  assert_bitwise(again, reference)


@pytest.mark.parametrize("nu_dtype", ["int8", "bfloat16"])
def test_compressed_moments_with_groups(nu_dtype):
  """Groups with the optimizer's own values step as the ungrouped optimizer
  (bitwise), and the grouped int8 run stays near its float32 twin."""
  params, loss = _problem()
  same = [jadam.Group("no_decay", match=r".*/(bias|scale)")]
  grouped, _ = _run(jadam.adamw(1e-3, nu_dtype=nu_dtype, groups=same),
                    params, loss, 20)
  plain, _ = _run(jadam.adamw(1e-3, nu_dtype=nu_dtype), params, loss, 20)
  assert_bitwise(grouped, plain)
  narrow, state = _run(jadam.adamw(1e-3, nu_dtype=nu_dtype, groups=GROUPS),
                       params, loss, 20)
  stored = state[0].nu["params"]["Embed_0"]["embedding"]
  if nu_dtype == "int8":
    assert isinstance(stored, jadam.Int8Moment)
  else:
    assert stored.dtype == jnp.bfloat16
  wide, _ = _run(jadam.adamw(1e-3, groups=GROUPS), params, loss, 20)
  # The parameters' movement against float32 moments' (2.0% for int8, as
  # 1.7% without groups; bfloat16 closer).
  moved = lambda tree: jax.tree.map(jnp.subtract, tree, params)
  assert relative_error(moved(narrow), moved(wide)) < 0.05


def test_vmap_over_a_group_learning_rate_is_a_sweep_in_one_program():
  params, loss = _problem()
  tx = jadam.adam(1e-3, groups=[jadam.Group("b", match=r".*bias")])
  rates = jnp.asarray([1e-4, 1e-3, 1e-2], jnp.float32)
  state = tx.init(params)

  def one(rate):
    s = jadam.set_group_hyperparams(state, b={"learning_rate": rate})
    updates, _ = tx.update(jax.grad(loss)(params), s, params)
    return updates

  swept = jax.jit(jax.vmap(one))(rates)
  for k, rate in enumerate(rates):
    alone = jax.jit(one)(rate)
    for x, y in zip(jax.tree.leaves(swept), jax.tree.leaves(alone)):
      np.testing.assert_array_equal(x[k], y)


def test_reset_group_unfreezes_with_fresh_moments():
  params, loss = _problem()
  frozen_tx = jadam.adamw(BASE, groups=GROUPS)
  _, state = _run(frozen_tx, params, loss, 3)
  thawed = GROUPS[:3] + [jadam.Group("frozen", match=r"params/Dense_1/kernel")]
  tx = jadam.adamw(BASE, groups=thawed)
  new = jadam.reset_group(state, tx, params, thawed, "frozen")
  mu = new[0].mu["params"]
  assert not np.any(mu["Dense_1"]["kernel"])
  assert_bitwise(mu["Dense_0"], state[0].mu["params"]["Dense_0"])
  jax.jit(tx.update)(jax.grad(loss)(params), new, params)  # it steps
  reset = jadam.reset_group(new, tx, params, thawed, "backbone")
  assert not np.any(reset[0].nu["params"]["Dense_0"]["kernel"])


def test_group_errors_name_the_problem():
  params, _ = _problem()
  with pytest.raises(ValueError, match=r"'ghost'.*params/Embed_0/embedding"):
    jadam.adam(1e-3, groups=[jadam.Group("ghost", match="nothing")]).init(
        params)
  with pytest.raises(ValueError, match="no weight decay"):
    jadam.adam(1e-3, groups=[jadam.Group("x", ".*", weight_decay=0.0)])
  with pytest.raises(ValueError, match="both learning_rate and lr_scale"):
    jadam.Group("x", ".*", learning_rate=1e-3, lr_scale=0.5)
  with pytest.raises(TypeError, match="must return a Python or NumPy bool"):
    jadam.adam(1e-3, groups=[jadam.Group("x", lambda p, x: x.ndim)]).init(
        params)
  state = jadam.adamw(BASE, groups=GROUPS).init(params)
  with pytest.raises(ValueError, match="set lr_scale"):
    jadam.set_group_hyperparams(state, no_decay={"learning_rate": 1.0})
  with pytest.raises(ValueError, match="no runtime 'momentum'"):
    jadam.set_group_hyperparams(state, no_decay={"momentum": 1.0})
  with pytest.raises(ValueError, match="compiled in"):
    jadam.set_group_hyperparams(state, embed={"b2": 0.9})
  with pytest.raises(ValueError, match="no group 'frozen'"):
    jadam.set_group_hyperparams(state, frozen={"eps": 1.0})
  with pytest.raises(ValueError, match="finite number >= 0"):
    jadam.set_group_hyperparams(state, no_decay={"lr_scale": -1.0})


OPTIMIZERS = {
    "adam": (jadam.adam, False), "adamw": (jadam.adamw, True),
    "nadam": (jadam.nadam, False), "nadamw": (jadam.nadamw, True),
    "amsgrad": (jadam.amsgrad, False), "adamax": (jadam.adamax, False),
    "adamaxw": (jadam.adamaxw, True), "radam": (jadam.radam, False),
    "adopt": (jadam.contrib.adopt, False),
    "ademamix": (jadam.contrib.ademamix, True),
    "schedule_free_adamw": (jadam.contrib.schedule_free_adamw, True),
}


@pytest.mark.slow  # with matrix: in CI only the newest environment runs it
@pytest.mark.matrix
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_takes_groups_as_optax_partition_of_itself(name):
  make, has_decay = OPTIMIZERS[name]
  decay = dict(weight_decay=0.1) if has_decay else {}
  own = dict(eps=1e-6, b2=0.99, **(dict(weight_decay=0.0) if has_decay
                                   else {}))
  params, loss = _problem()
  labels = jax.tree.map(lambda p: "bias" if p.endswith("bias") else "rest",
                        jadam.param_paths(params))
  grouped = make(3e-3, **decay,
                 groups=[jadam.Group("bias", match=r".*bias", **own)])
  reference = PARTITION({"bias": make(3e-3, **{**decay, **own}),
                         "rest": make(3e-3, **decay)}, labels)
  mine, _ = _run(grouped, params, loss, 10)
  theirs, _ = _run(reference, params, loss, 10)
  assert_bitwise(mine, theirs)


def test_schedule_free_groups_refuse_a_learning_rate_of_their_own():
  with pytest.raises(ValueError, match="one schedule of the learning rate"):
    jadam.contrib.schedule_free_adamw(
        1e-3, groups=[jadam.Group("a", ".*", learning_rate=1e-4)])


_SHARDED = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import json
import jax, jax.numpy as jnp, numpy as np, optax, jadam
from jax.sharding import NamedSharding, PartitionSpec as P

mesh = jax.make_mesh((4, 2), ("data", "model"))
def put(x, *spec):
  return jax.device_put(x, NamedSharding(mesh, P(*spec)))
params = {"embed": put(jnp.linspace(-1, 1, 128 * 64).reshape(128, 64),
                       "data", "model"),
          "dense": {"kernel": put(jnp.linspace(0, 1, 32 * 16).reshape(32, 16),
                                  None, "model"),
                    "bias": put(jnp.zeros(16))}}
groups = [jadam.Group("embed", r"embed", learning_rate=1e-3, b2=0.99),
          jadam.Group("no_decay", r".*bias", weight_decay=0.0)]
out = {}
for name in ("grouped", "grouped_int8", "zero1", "ungrouped",
             "ungrouped_zero1"):
  tx = jadam.adamw(1e-2, weight_decay=0.1,
                   groups=None if name.startswith("ungrouped") else groups,
                   nu_dtype="int8" if name == "grouped_int8" else None)
  if name.endswith("zero1"):
    tx = jadam.sharding.zero1(tx, mesh)
  traces = []
  def step(p, s, g, tx=tx):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  shardings = jax.tree.map(lambda x: x.sharding, params)
  jitted = jax.jit(step, donate_argnums=(0, 1),
                   out_shardings=(shardings, None))
  p = jax.tree.map(jnp.copy, params)
  s = tx.init(p)
  for k in range(20):
    if not name.startswith("ungrouped"):
      s = jadam.set_group_hyperparams(
          s, embed={"learning_rate": 1e-3 * (1 + k)},
          default={"weight_decay": 0.01 * k, "eps": 1e-7})
    g = jax.tree.map(lambda x: jnp.sin(x * (k + 1.0)) + 0.01, p)
    p, s = jitted(p, s, g)
  if name.startswith("ungrouped"):
    out[name] = {"compiled": jitted._cache_size()}
    continue
  values = jadam.group_hyperparams(s)
  hyper = [x for x in jax.tree.leaves(s) if x.ndim == 0]
  mu = s[0].mu
  out[name] = {
      "traces": len(traces), "compiled": jitted._cache_size(),
      "int8": isinstance(s[0].nu["embed"], jadam.Int8Moment),
      "lr": float(values["embed"]["learning_rate"]),
      "scalar_specs": sorted({str(x.sharding.spec) for x in hyper}),
      "embed_spec": [str(a) for a in p["embed"].sharding.spec],
      "mu_spec": [str(a) for a in mu["embed"].sharding.spec],
      "finite": bool(all(np.all(np.isfinite(np.asarray(x)))
                         for x in jax.tree.leaves(p)))}
print(json.dumps(out))
"""


def test_sharded_donated_and_zero1_steps_compile_once_over_20_settings():
  from conftest import run_json_worker  # pylint: disable=g-import-not-at-top
  out = run_json_worker(_SHARDED)
  # 20 settings add no compilation: as many as the loop without groups.
  assert out["grouped"]["compiled"] == out["ungrouped"]["compiled"]
  assert out["grouped_int8"]["compiled"] == out["ungrouped"]["compiled"]
  assert out["zero1"]["compiled"] == out["ungrouped_zero1"]["compiled"]
  assert out["ungrouped"]["compiled"] <= 2
  assert out["grouped_int8"]["int8"] and not out["grouped"]["int8"]
  for name, got in out.items():
    if name.startswith("ungrouped"):
      continue
    assert got["traces"] == 1, name
    assert got["lr"] == np.float32(0.02), name
    assert got["scalar_specs"] in (["P()"], ["PartitionSpec()"]), name
    assert got["embed_spec"] == ["data", "model"], name
    assert got["finite"], name
  assert out["grouped"]["mu_spec"] == ["data", "model"]
  assert out["zero1"]["mu_spec"] == ["data", "model"]


def test_offloaded_groups_stay_in_host_memory_and_compile_once():
  from conftest import offload_supported  # pylint: disable=g-import-not-at-top
  if not offload_supported():
    pytest.skip("this JAX cannot move arrays to host memory inside jit here")
  params, loss = _problem()
  tx = jadam.sharding.offload(jadam.adamw(1e-3, groups=GROUPS))
  plain = jadam.adamw(1e-3, groups=GROUPS)
  traces = []

  def step(params, state, grads, tx=tx):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  # Parameters donated with the state: donating an offloaded state alone to a
  # step that returns new parameters aborts XLA:CPU (docs/memory.md).
  jitted = jax.jit(step, donate_argnums=(0, 1))
  reference = jax.jit(lambda p, s, g: step(p, s, g, plain))
  # Committed, as the step returns them: else the second step compiles again.
  params = jax.device_put(params, jax.devices()[0])
  state, ref_state = tx.init(params), plain.init(params)
  p, ref_p = jax.tree.map(jnp.copy, params), params
  grad = jax.jit(jax.grad(loss))
  for k in range(20):
    rate = {"learning_rate": 1e-4 * (k + 1)}
    state = jadam.set_group_hyperparams(state, default=rate)
    ref_state = jadam.set_group_hyperparams(ref_state, default=rate)
    g = grad(p)
    p, state = jitted(p, state, g)
    ref_p, ref_state = reference(ref_p, ref_state, g)
  assert len(traces) == 2  # the offloaded step once, the reference once
  assert jitted._cache_size() == 1  # pylint: disable=protected-access
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state)}
  assert kinds == {"pinned_host"}
  assert_bitwise(p, ref_p)


def test_nnx_optimizer_groups_set_between_steps_without_retracing():
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(10, 8, rngs=rngs)
      self.backbone = nnx.Linear(8, 8, rngs=rngs)
      self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(nnx.relu(self.backbone(self.embed(x))))

  model = Model(nnx.Rngs(0))
  paths = jax.tree.leaves(jadam.param_paths(nnx.state(model, nnx.Param)))
  assert paths == ["backbone/bias", "backbone/kernel", "embed/embedding",
                   "head/bias", "head/kernel"]
  groups = [jadam.Group("frozen", r"backbone/.*", frozen=True),
            jadam.Group("no_decay", r".*bias", weight_decay=0.0),
            jadam.Group("embed", r"embed/.*", learning_rate=1e-2)]
  optimizer = nnx.Optimizer(model, jadam.adamw(1e-3, groups=groups),
                            wrt=nnx.Param)
  frozen_before = np.asarray(model.backbone.kernel[...])
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x):
    traces.append(1)
    loss = lambda model: jnp.mean(model(x) ** 2)
    optimizer.update(model, nnx.grad(loss)(model))

  tokens = jnp.arange(12) % 10
  compiles = []
  for k in range(5):
    optimizer.opt_state = jadam.set_group_hyperparams(
        optimizer.opt_state, embed={"learning_rate": 1e-3 * (k + 1)})
    before = len(COMPILES)
    train_step(model, optimizer, tokens)
    compiles.append(len(COMPILES) - before)
  assert len(traces) == 1
  assert compiles[1:] == [0, 0, 0, 0]  # XLA compiled only the first step
  values = jadam.group_hyperparams(optimizer.opt_state)
  assert float(values["embed"]["learning_rate"]) == np.float32(5e-3)
  np.testing.assert_array_equal(model.backbone.kernel[...], frozen_before)


def test_orbax_resume_is_bitwise_and_keeps_the_checkpoints_values(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  params, loss = _problem()
  tx = jadam.skip_nonfinite(jadam.adamw(BASE, nu_dtype="int8",
                                        groups=GROUPS))
  grad = jax.jit(jax.grad(loss))
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u),
                                                s))(*tx.update(g, s, p)))
  state = tx.init(params)
  state = jadam.set_group_hyperparams(state, no_decay={"lr_scale": 0.5})
  p = params
  for _ in range(3):
    p, state = step(p, state, grad(p))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", {"params": p, "state": state})
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt", {
      "params": jax.eval_shape(lambda: p),
      "state": jadam.sharding.abstract_state(tx, params)})
  assert_bitwise(restored["state"], state)
  assert isinstance(restored["state"].inner_state[0].nu["params"]["Dense_2"][
      "kernel"], jadam.Int8Moment)
  assert float(jadam.group_hyperparams(restored["state"])["no_decay"][
      "lr_scale"]) == 0.5  # the checkpoint's value, not the configuration's
  a, b = (p, state), (restored["params"], restored["state"])
  for _ in range(3):
    a = step(*a, grad(a[0]))
    b = step(*b, grad(b[0]))
  assert_bitwise(a, b)


def test_describe_shows_each_leafs_group():
  params, _ = _problem()
  state = jadam.adamw(BASE, groups=GROUPS).init(params)
  rows = {row.path: row.group
          for row in jadam.describe(state, GROUPS).leaves}
  assert rows["['params']['Embed_0']['embedding']"] == "embed"
  assert rows["['params']['Dense_2']['kernel']"] == "default"
  assert "['params']['Dense_1']['kernel']" not in rows  # frozen: no moments
  view = jadam.FlatView(params, groups=GROUPS)
  summary = jadam.describe(jadam.adamw(BASE, groups=view.groups).init(
      view.ravel(params)), view.groups)
  assert [row.group for row in summary.leaves] == [
      "no_decay+backbone+default", "embed"]
  assert "group" in str(summary).splitlines()[0]


def test_groups_page_example_runs_and_does_what_it_says():
  import pathlib  # pylint: disable=g-import-not-at-top
  text = (pathlib.Path(__file__).resolve().parent.parent / "docs" /
          "groups.md").read_text()
  code = text.split("```python\n", 1)[1].split("```", 1)[0]
  scope = {}
  exec(code, scope)  # pylint: disable=exec-used
  state, params = scope["state"], scope["params"]
  values = jadam.group_hyperparams(state)
  assert float(values["embed"]["learning_rate"]) == np.float32(5e-5)
  assert float(values["backbone"]["learning_rate"]) == np.float32(3e-5)
  assert set(values) == {"embed", "no_decay", "backbone", "default"}
  np.testing.assert_array_equal(params["patch_embed"]["kernel"], 1.0)
  assert not np.array_equal(params["encoder"]["kernel"], 1.0)


def test_telemetry_and_skip_wrap_a_grouped_optimizer():
  params, loss = _problem()
  tx = jadam.with_telemetry(jadam.skip_nonfinite(
      jadam.adamw(BASE, nu_dtype="int8", groups=GROUPS)))
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  stats = jadam.stats(state)
  assert np.isfinite(float(stats["grad_norm"]))
  assert float(stats["update_norm"]) > 0
  assert float(stats["nu_max"]) > 0  # the grouped moments are found
  assert not np.any(updates["params"]["Dense_1"]["kernel"])


def test_flax_sharding_recipes_see_the_grouped_state():
  """optax.tree_map_params (whose init gets a leafless placeholder) and
  jadam.sharding.state_specs: moments get the parameters' specs, frozen
  leaves stay MaskedNode, the groups' scalars are not parameters."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  params, _ = _problem()
  specs = jax.tree.map(lambda p: P(*[None] * (p.ndim - 1), "model"), params)
  tx = jadam.adamw(BASE, nu_dtype="int8", groups=GROUPS)
  state = tx.init(params)
  special = lambda x: isinstance(x, (jadam.Int8Moment, optax.MaskedNode))

  def spec_of(x, spec):
    if isinstance(x, jadam.Int8Moment):
      return jadam.Int8Moment(spec, P())
    return x if isinstance(x, optax.MaskedNode) else spec

  got = optax.tree_map_params(tx, spec_of, state, specs,
                              transform_non_params=lambda _: P(),
                              is_leaf=special)
  nu = got[0].nu["params"]
  assert nu["Embed_0"]["embedding"] == jadam.Int8Moment(P(None, "model"),
                                                        P())
  assert nu["Dense_0"]["kernel"] == P(None, "model")
  assert isinstance(nu["Dense_1"]["kernel"], optax.MaskedNode)
  assert got[1].hyperparams["embed"]["eps"] == P()
  placed = jadam.sharding.state_specs(tx, params, specs)
  assert placed[0].mu["params"]["Dense_0"]["kernel"] == P(None, "model")
  assert placed[1].count == P()
