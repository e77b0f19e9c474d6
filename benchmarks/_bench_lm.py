"""The small GPT-like language model of the benchmark's end-to-end row.

Its parameters have exactly the shapes of the ``gpt_like`` benchmark tree
(:func:`gpt_like_shapes`), so the end-to-end row shows what the optimizer-only
row means inside a full training step. Needs Flax (the ``bench`` extra).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jadam import _compat


def gpt_like_shapes(vocab: int = 8192, width: int = 256, depth: int = 12,
                    hidden: int = 1024) -> dict[str, tuple[int, ...]]:
  """Leaf name -> shape of the benchmark's transformer parameters.

  With the defaults: a tied 8192×256 embedding; per block two layer norms
  (scale and bias of 256), qkv 256×768 + 768, attention out 256×256 + 256,
  MLP 256×1024 + 1024 and 1024×256 + 256; a final layer norm. 147 leaves,
  11.58M parameters.
  """
  shapes = {"embed/embedding": (vocab, width)}
  for i in range(depth):
    block = f"block_{i}"
    for norm in ("ln1", "ln2"):
      shapes[f"{block}/{norm}/scale"] = (width,)
      shapes[f"{block}/{norm}/bias"] = (width,)
    for name, (fan_in, fan_out) in {
        "qkv": (width, 3 * width), "attn_out": (width, width),
        "mlp_in": (width, hidden), "mlp_out": (hidden, width)}.items():
      shapes[f"{block}/{name}/kernel"] = (fan_in, fan_out)
      shapes[f"{block}/{name}/bias"] = (fan_out,)
  shapes["ln_f/scale"] = (width,)
  shapes["ln_f/bias"] = (width,)
  return shapes


def make_lm(vocab: int, width: int, depth: int, hidden: int, heads: int):
  """A pre-norm causal transformer LM as a Flax Linen module."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Block(nn.Module):
    """Pre-norm attention and MLP, each with a residual connection."""

    @nn.compact
    def __call__(self, x):
      batch, seq, _ = x.shape
      h = nn.LayerNorm(name="ln1")(x)
      qkv = nn.Dense(3 * width, name="qkv")(h)
      q, k, v = jnp.split(qkv.reshape(batch, seq, 3 * heads, -1), 3, axis=2)
      attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      x = x + nn.Dense(width, name="attn_out")(attended.reshape(batch, seq, -1))
      h = nn.LayerNorm(name="ln2")(x)
      h = nn.Dense(width, name="mlp_out")(
          nn.gelu(nn.Dense(hidden, name="mlp_in")(h)))
      return x + h

  class LM(nn.Module):
    """Token embedding (tied with the output), fixed sinusoidal positions."""

    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(vocab, width, name="embed")
      x = embed(tokens) + _sinusoids(tokens.shape[1], width)
      for i in range(depth):
        x = Block(name=f"block_{i}")(x)
      return embed.attend(nn.LayerNorm(name="ln_f")(x))

  return LM()


def _sinusoids(length: int, width: int) -> jax.Array:
  position = np.arange(length)[:, None]
  freq = np.exp(-np.log(10000.0) * np.arange(0, width, 2) / width)
  table = np.zeros((length, width), np.float32)
  table[:, 0::2] = np.sin(position * freq)
  table[:, 1::2] = np.cos(position * freq)
  return jnp.asarray(table)


def lm_problem(vocab: int = 8192, width: int = 256, depth: int = 12,
               hidden: int = 1024, heads: int = 4, seq: int = 128,
               batch: int = 8, seed: int = 0) -> tuple[Any, Any, Any]:
  """``(params, loss_fn, tokens)``: next-token cross-entropy on random text.

  ``params`` is the Linen parameter dict; ``loss_fn(params, tokens)``.
  """
  model = make_lm(vocab, width, depth, hidden, heads)
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (batch, seq + 1), 0,
                              vocab)
  params = model.init(jax.random.PRNGKey(seed + 1), tokens[:, :-1])["params"]
  shapes = {_compat.keystr(path, simple=True, separator="/"): leaf.shape
            for path, leaf in _compat.flatten_with_path(params)[0]}
  expected = gpt_like_shapes(vocab, width, depth, hidden)
  if shapes != expected:
    raise AssertionError("the LM's parameters differ from gpt_like_shapes")

  def loss_fn(params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  return params, loss_fn, tokens
