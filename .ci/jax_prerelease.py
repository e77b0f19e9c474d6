"""Print the JAX pre-release the package registry serves beyond the newest
release, or 'none (newest release X)' if it serves none (.ci/run's early
warning environment)."""

import re
import subprocess
import sys


def newest(*flags):
  out = subprocess.run([sys.executable, "-m", "pip", "index", "versions",
                        "jax", *flags], capture_output=True, text=True,
                       check=False).stdout
  match = re.search(r"^jax \(([^)]+)\)", out, re.M)
  return match.group(1) if match else None


release, newest_any = newest(), newest("--pre")
# pip lists the highest version first; with --pre a pre-release is listed
# only if it is higher than every release.
if newest_any and re.search(r"(a|b|rc|dev)\d*$", newest_any):
  print(newest_any)
else:
  print(f"none (newest release {release})")
