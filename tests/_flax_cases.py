"""The storage formats the Flax tests run for (shared with their worker)."""

import jax.numpy as jnp

STORAGES = {
    "float32": {},
    "bfloat16": {"mu_dtype": jnp.bfloat16, "nu_dtype": jnp.bfloat16},
    "float16": {"mu_dtype": jnp.float16, "nu_dtype": jnp.float16},
    "int8": {"mu_dtype": "int8", "nu_dtype": "int8"},
    "bf16_int8": {"mu_dtype": jnp.bfloat16, "nu_dtype": "int8"},
}
