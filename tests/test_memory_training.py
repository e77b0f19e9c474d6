"""Training with lean state matches float32 state, at a small size.

The experiments are those of ``examples/memory_study.py`` (whose full-size
numbers are in docs/memory.md), run for fewer epochs.
"""

import pathlib
import sys

import jax.numpy as jnp
import pytest

import jadam

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import memory_study  # noqa: E402

# int8 with min_size=0 quantizes every leaf of these small models (the
# default keeps leaves under 4096 elements in float32, which for the
# quickstart model would be all of them).
LEAN = {
    "bfloat16": memory_study.STORAGES["bfloat16"],
    "float16": memory_study.STORAGES["float16"],
    "int8": memory_study.STORAGES["int8 (min_size=0)"],
}


@pytest.fixture(scope="module")
def regression_float32():
  return memory_study.train_regression(memory_study.STORAGES["float32"], epochs=2)


@pytest.mark.parametrize("name", ["bfloat16", "int8"])
def test_quickstart_regression_loss_within_two_percent(name, regression_float32):
  losses, mse = memory_study.train_regression(LEAN[name], epochs=2)
  base_losses, base_mse = regression_float32
  assert losses[-1] < 0.7 * losses[0]  # it trains
  assert abs(losses[-1] / base_losses[-1] - 1) < 0.02
  assert abs(mse / base_mse - 1) < 0.02


@pytest.fixture(scope="module")
def digits_float32():
  return memory_study.train_digits(memory_study.STORAGES["float32"], epochs=10)


@pytest.mark.parametrize("name", ["bfloat16", "float16", "int8"])
def test_digits_mlp_loss_within_two_percent_and_accuracy_within_half_a_point(
    name, digits_float32):
  losses, accuracy, state_bytes = memory_study.train_digits(LEAN[name], epochs=10)
  base_losses, base_accuracy, base_bytes = digits_float32
  assert base_accuracy > 95.0 and losses[-1] < 0.1 * losses[0]
  assert abs(losses[-1] / base_losses[-1] - 1) < 0.02
  assert abs(accuracy - base_accuracy) <= 0.5
  assert state_bytes <= (0.51 if name != "int8" else 0.27) * base_bytes


def test_default_int8_quantizes_the_digits_kernel_only():
  params = memory_study.mlp_init(memory_study.jax.random.PRNGKey(0))
  state = jadam.adam(1e-3, mu_dtype="int8", nu_dtype="int8").init(params)[0]
  assert isinstance(state.mu["dense0"]["kernel"], jadam.Int8Moment)
  assert state.mu["dense0"]["kernel"].codes.dtype == jnp.int8  # 64×256 = 16384
  assert state.mu["dense1"]["kernel"].dtype == jnp.float32  # 256×10 < 4096


def test_bfloat16_parameters_stall_with_nearest_rounding_and_track_float32_with_stochastic():
  epochs = 4
  losses = {mode: memory_study.train_bf16_params(mode, epochs)
            for mode in memory_study.BF16_MODES}
  float32 = losses["float32"][-1]
  stochastic = losses["bfloat16 + stochastic rounding"][-1]
  nearest = losses["bfloat16"][-1]
  assert abs(stochastic / float32 - 1) < 0.02
  # Round to nearest loses most steps smaller than bfloat16's spacing.
  assert nearest > 2 * float32
