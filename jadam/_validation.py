"""Checks that turn bad input into a clear error instead of a wrong answer.

Hyperparameters are checked at construction, gradients at ``update``; traced
values (hyperparameters injected under jit) cannot be, and are let through.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jadam import _compat


def concrete(value: Any) -> Optional[np.ndarray]:
  """The value as a NumPy array, or None if it is traced and unknowable."""
  if _compat.is_tracer(value):
    return None
  try:
    return np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None


def _scalar(name: str, value: Any) -> Optional[float]:
  array = concrete(value)
  if array is None:
    return None
  # jnp's dtype tree, where bfloat16 (which inject_hyperparams may cast
  # hyperparameters to) is floating; it is not an np.number.
  real = (jnp.issubdtype(array.dtype, jnp.floating)
          or jnp.issubdtype(array.dtype, jnp.integer))
  if array.ndim != 0 or not real:
    raise ValueError(f"{name} must be a real scalar, got {value!r}.")
  return float(array)


def check_decay(name: str, value: Any) -> None:
  """A decay rate must lie in [0, 1): 1 never forgets, and > 1 diverges."""
  x = _scalar(name, value)
  if x is not None and not 0.0 <= x < 1.0:
    hint = ""
    if x == 1.0 and jnp.finfo(np.asarray(value).dtype).bits < 32:
      hint = (f" A {np.asarray(value).dtype} hyperparameter rounds decays "
              "such as 0.999 to 1: optax.inject_hyperparams casts them to "
              "the parameters' dtype unless given "
              "hyperparam_dtype=jnp.float32.")
    raise ValueError(f"{name} must be in [0, 1), got {value!r}.{hint}")


def check_nonnegative(name: str, value: Any, *, schedule: bool = False
                      ) -> None:
  """eps, weight decay and the like must be finite and >= 0.

  A callable passes only with ``schedule``; elsewhere it fails here rather
  than as a ``TypeError`` deep inside the first update.
  """
  if callable(value):
    if schedule:
      return  # a schedule; its values are the schedule's business
    raise ValueError(
        f"{name} must be a number, got the callable {value!r}: only the "
        "learning rate, the weight decay and AdEMAMix's alpha and b3 take a "
        "schedule. To change it during training, use "
        "optax.inject_hyperparams and set it in the state.")
  x = _scalar(name, value)
  if x is not None and not (0.0 <= x < float("inf")):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def check_learning_rate(value: Any) -> None:
  """A constant learning rate must be finite and >= 0; schedules pass."""
  check_nonnegative("learning_rate", value, schedule=True)


# How a moment may be stored between steps; it is computed in float32 or wider.
FLOAT_STORAGE = ("float32", "bfloat16", "float16", "float64")
# Complex storage (optax's mu_dtype=jnp.complex64): real parameters and the
# second moment get the real counterpart (float32 for complex64).
COMPLEX_STORAGE = ("complex64", "complex128")


def canonical_storage(name: str, dtype: Any,
                      extra: Sequence[str] = ()) -> Optional[str]:
  """Canonical name of a moment storage dtype, None for "like the param";
  a ValueError for anything but a float dtype or an ``extra`` format."""
  if dtype is None:
    return None
  if isinstance(dtype, str) and dtype in extra:
    return dtype
  try:
    canonical = jnp.dtype(dtype).name
  except TypeError as error:
    raise ValueError(
        f"{name}={dtype!r} is not a dtype; use one of "
        f"{', '.join(FLOAT_STORAGE + tuple(extra))} or None.") from error
  if (canonical not in FLOAT_STORAGE + COMPLEX_STORAGE
      and canonical not in extra):
    raise ValueError(
        f"{name}={dtype!r} cannot hold an optimizer moment; use one of "
        f"{', '.join(FLOAT_STORAGE + tuple(extra))} or None.")
  return canonical


def _path_str(path: Sequence[Any]) -> str:
  return _compat.keystr(tuple(path)) or "<root>"


def _listed(names: list[str], most: int = 3) -> str:
  shown = ", ".join(names[:most])
  return shown + (f" and {len(names) - most} more" if len(names) > most
                  else "")


def check_same_tree(updates: Any, reference: Any, *, what: str,
                    is_leaf: Optional[Callable[[Any], bool]] = None) -> None:
  """Raise a ValueError naming the first key path where the gradients and
  ``reference`` (a state tree shaped like the parameters, called ``what`` in
  the message) differ; ``is_leaf`` marks compound leaves (int8 moments)."""
  g_paths = _compat.flatten_with_path(updates)[0]
  r_paths = _compat.flatten_with_path(reference, is_leaf=is_leaf)[0]
  g_names = [_path_str(p) for p, _ in g_paths]
  r_names = [_path_str(p) for p, _ in r_paths]
  g_set, r_set = set(g_names), set(r_names)
  missing = [n for n in r_names if n not in g_set]
  extra = [n for n in g_names if n not in r_set]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"the gradients have no leaf at {_listed(missing)}, where "
                   f"the {what} has one")
    if extra:
      parts.append(f"only the gradients have a leaf at {_listed(extra)}")
    raise ValueError(
        f"The gradient tree does not match the {what}: {'; '.join(parts)} "
        f"({len(g_paths)} gradient leaves, {len(r_paths)} in the state). "
        "Pass gradients with the parameters' structure.")
  for (gp, g), (_, r) in zip(g_paths, r_paths):
    g_shape = np.shape(g)
    r = getattr(r, "codes", r)  # an int8 moment has its codes' shape
    r_shape = getattr(r, "shape", None)
    r_shape = np.shape(r) if r_shape is None else r_shape
    if tuple(g_shape) != tuple(r_shape):
      raise ValueError(
          f"The gradient at {_path_str(gp)} has shape {tuple(g_shape)} but "
          f"the {what} there has shape {tuple(r_shape)}.")
  g_def = jax.tree.structure(updates)
  try:
    g_def.flatten_up_to(reference)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"The gradient tree does not match the {what}: same leaves, but "
        f"different containers ({error}).") from error


def check_float_leaves(updates: Any) -> None:
  """Raise a TypeError naming the first integer or boolean gradient leaf."""
  for path, g in _compat.flatten_with_path(updates)[0]:
    dtype = jnp.result_type(g)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"The gradient at {_path_str(path)} has dtype {dtype}; Adam needs "
          "floating-point or complex gradients. Cast integer parameters to "
          "float, or exclude them with optax.masked / optax.partition.")


def check_moment_kinds(updates: Any, grads: Sequence[Any],
                       columns: Sequence[Sequence[Any]],
                       real: Sequence[bool]) -> None:
  """Raise a TypeError naming the first gradient its moments cannot take.

  An integer parameter has integer moments (as in optax), which would
  truncate a float gradient to 0 every step; it shows as all moments sharing
  one integer dtype (int8 codes are int8 for m, uint8 for v). A complex
  gradient of a real parameter would lose its imaginary part in m.
  ``columns`` holds each moment's stored leaves, ``real`` whether it is a
  moment of |g|².
  """
  for index, g in enumerate(grads):
    stored = [column[index] for column in columns]
    dtypes = {jnp.dtype(x.dtype) for x in stored}
    problem = None
    if len(stored) > 1 and len(dtypes) == 1 and not jnp.issubdtype(
        next(iter(dtypes)), jnp.inexact):
      problem = (
          f"its parameter is {next(iter(dtypes))}, so its moments are too "
          "and a floating-point gradient would be truncated to 0 every step."
          " Cast the parameter to a float dtype, or exclude it with "
          "optax.masked / optax.partition (optax.set_to_zero).")
    elif jnp.iscomplexobj(g) and any(
        not r and not jnp.issubdtype(x.dtype, jnp.complexfloating)
        for x, r in zip(stored, real)):
      problem = (
          "the gradient is complex but its parameter is real, so the first "
          "moment is real and would drop the imaginary part. Take the real "
          "part of the gradient, or make the parameter complex.")
    if problem is not None:
      path = _compat.flatten_with_path(updates)[0][index][0]
      raise TypeError(f"The gradient at {_path_str(path)} "
                      f"({jnp.result_type(g)}) cannot be stepped: {problem}")


def check_parameter_kinds(updates: Any, params: Any) -> None:
  """``check_moment_kinds`` from the parameters themselves, for optimizers
  whose only moment (v) is real either way."""
  grads = jax.tree.leaves(updates)
  leaves = jax.tree.leaves(params)
  if len(leaves) != len(grads):
    return  # check_same_tree reports mismatched trees
  check_moment_kinds(updates, grads, [leaves, leaves], (False, False))
