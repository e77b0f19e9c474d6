"""Bad input gets a clear error, never a silent wrong answer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jadam


@pytest.mark.parametrize("kwargs,argument", [
    ({"b1": 1.5}, "b1"), ({"b1": 1.0}, "b1"), ({"b1": -0.1}, "b1"),
    ({"b2": 1.0}, "b2"), ({"b2": float("nan")}, "b2"),
    ({"eps": -1e-8}, "eps"), ({"eps_root": -1.0}, "eps_root"),
    ({"mu_dtype": "int32"}, "mu_dtype"), ({"nu_dtype": "not-a-dtype"}, "nu_dtype"),
])
def test_bad_hyperparameter_names_the_argument(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    jadam.scale_by_adam(**kwargs)


@pytest.mark.parametrize("alias", ["adam", "adamw", "nadam", "nadamw", "amsgrad",
                                   "adamax", "adamaxw", "radam"])
def test_every_alias_rejects_bad_b1_and_negative_learning_rate(alias):
  with pytest.raises(ValueError, match="b1"):
    getattr(jadam, alias)(1e-3, b1=1.5)
  with pytest.raises(ValueError, match="learning_rate"):
    getattr(jadam, alias)(-1e-3)
  with pytest.raises(ValueError, match="learning_rate"):
    getattr(jadam, alias)(jnp.asarray(-1e-3))


def test_negative_weight_decay_is_rejected():
  with pytest.raises(ValueError, match="weight_decay"):
    jadam.adamw(1e-3, weight_decay=-0.1)


def test_schedules_and_traced_values_are_accepted():
  jadam.adam(lambda count: 1e-3 * 0.5 ** count)
  # Inside jit the value cannot be checked; the transformation must still build.
  jax.jit(lambda lr: jadam.adam(lr).init(jnp.ones(2)))(jnp.asarray(1e-3))


def test_gradient_tree_mismatch_names_the_missing_and_the_extra_leaf():
  opt = jadam.scale_by_adam()
  params = {"encoder": {"w": jnp.ones(2), "b": jnp.ones(2)},
            "decoder": jnp.ones(3)}
  state = opt.init(params)
  with pytest.raises(ValueError) as error:  # ['encoder']['b'] missing
    opt.update({"encoder": {"w": jnp.ones(2)}, "decoder": jnp.ones(3)}, state)
  assert ("the gradients have no leaf at ['encoder']['b'], where the "
          "optimizer state has one (2 gradient leaves, 3 in the state)"
          in str(error.value))
  with pytest.raises(ValueError) as error:
    opt.update({**params, "extra": jnp.ones(1)}, state)
  assert "only the gradients have a leaf at ['extra'] (4 gradient" in str(
      error.value)
  with pytest.raises(ValueError) as error:  # renamed: one of each
    opt.update({"encoder": {"w": jnp.ones(2), "bias": jnp.ones(2)},
                "decoder": jnp.ones(3)}, state)
  assert ("no leaf at ['encoder']['b'], where the optimizer state has one; "
          "only the gradients have a leaf at ['encoder']['bias']"
          in str(error.value))


def test_gradient_shape_mismatch_names_the_key_path():
  opt = jadam.scale_by_adam()
  state = opt.init({"w": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match=r"\['w'\].*\(3, 2\).*\(2, 3\)"):
    opt.update({"w": jnp.ones((3, 2))}, state)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_or_boolean_gradients_raise_type_error(dtype):
  opt = jadam.scale_by_adam()
  state = opt.init({"w": jnp.ones(2), "steps": jnp.ones(2)})
  with pytest.raises(TypeError, match=r"\['steps'\]"):
    opt.update({"w": jnp.ones(2), "steps": jnp.ones(2, dtype)}, state)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_scalar_hyperparameters_are_accepted(dtype):
  # ml_dtypes scalars are real numbers, although NumPy's np.number excludes
  # bfloat16.
  lr = jnp.asarray(1e-3, dtype)
  params = {"w": jnp.ones(3)}
  tx = jadam.adam(lr, b1=jnp.asarray(0.875, dtype))
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -float(lr), rtol=1e-4)


def test_inject_hyperparams_with_float16_parameters():
  # optax.inject_hyperparams casts hyperparameters to the parameters' dtype
  # outside jit. (With bfloat16 parameters b2=0.999 rounds to 1.0, which
  # jadam rejects: the bias correction 1 - b2**t would be 0.)
  params = {"w": jnp.ones(3, jnp.float16)}
  tx = optax.inject_hyperparams(jadam.adam)(learning_rate=1e-3)
  updates, _ = tx.update({"w": jnp.ones(3, jnp.float16)}, tx.init(params),
                         params)
  assert updates["w"].dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(updates["w"], np.float32), -1e-3,
                             rtol=1e-3)


def test_complex_scalar_hyperparameters_are_rejected():
  with pytest.raises(ValueError, match="learning_rate must be a real scalar"):
    jadam.adam(1e-3 + 1e-3j)


def test_b2_that_rounds_to_one_is_rejected():
  # 0.999 in bfloat16 is 1.0: the bias correction 1 - b2**t would be 0.
  assert float(jnp.asarray(0.999, jnp.bfloat16)) == 1.0
  with pytest.raises(ValueError, match="b2 must be in"):
    jadam.adam(1e-3, b2=jnp.asarray(0.999, jnp.bfloat16))
