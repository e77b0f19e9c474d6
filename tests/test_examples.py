"""The examples run and do what their docstrings say."""

import pathlib
import sys

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_quickstart_loss_falls(capsys):
  import quickstart
  losses = quickstart.main(["--epochs", "3"])
  out = capsys.readouterr().out
  assert "Epoch 1, Loss:" in out and "Epoch 3, Loss:" in out
  assert losses[2] < 0.5 * losses[0]
  assert np.all(np.isfinite(losses))
