"""simbal_jax: load balancing for sparse Mixture-of-Experts language models in JAX.

The pure modules (`routing`, `dispatch`, `losses`, `metrics`, `specialization`, `balance`,
`eval_metrics`, `init`) import only jax and numpy, so any JAX codebase can call them; they are
all that `pip install simbal_jax` (no extras) provides:

  from simbal_jax import losses
  aux = losses.simbal(router_kernel)          # ||R^T R - I||_1, R: float32[D, E]

Shape-suffix legend used in names inside math code (`probs_TxE`, `x_BxLxD`):
  B batch, L sequence length, T tokens (B*L), D model width, F feed-forward width,
  H attention heads, V vocabulary, E experts, C capacity per expert, K experts per token (top-k),
  N sampled items (pairs, tokens).

Flax modules (`moe`, `model`), training (`train`, `env`, `evaluate`) and IO (`data`, `runio`)
are imported on demand so that importing the package stays light. They need the `train` extra
(`pip install 'simbal_jax[train]'`); importing one without it fails with one line naming the
extra and the missing distributions (`_TrainingStackCheck`). docs/ARCHITECTURE.md maps the
modules and the places to edit for the common changes.
"""

import importlib.metadata
import re
import sys

from simbal_jax import losses
from simbal_jax import metrics
from simbal_jax import routing
from simbal_jax import specialization

__all__ = ["losses", "metrics", "routing", "specialization"]
__version__ = "0.1.0"

# Submodules that import only jax and numpy (the core install); every other one needs `train`.
PURE_MODULES = frozenset({"_checks", "balance", "dispatch", "eval_metrics", "init", "losses",
                          "metrics", "routing", "specialization"})


def missing_training_stack():
  """The distributions of the `train` extra that are not installed (sorted; empty when all are,
  or when simbal_jax's own metadata is absent, e.g. a checkout on PYTHONPATH)."""
  try:
    requires = importlib.metadata.requires("simbal_jax") or ()
  except importlib.metadata.PackageNotFoundError:
    return []
  missing = set()
  for req in requires:
    spec, _, marker = req.partition(";")
    if not re.search(r"""extra\s*==\s*["']train["']""", marker):
      continue
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1)
    try:
      importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      missing.add(name)
  return sorted(missing)


class _TrainingStackCheck:
  """An import hook: `import simbal_jax.<module>` of a module outside PURE_MODULES, without the
  `train` extra installed, raises one ImportError naming the extra (instead of a traceback
  ending in `No module named 'flax'`). Checked once; nothing is done once the stack is there."""

  _ok = False

  def find_spec(self, name, path=None, target=None):  # pylint: disable=unused-argument
    if self._ok or not name.startswith(__name__ + "."):
      return None
    if name.split(".")[1] in PURE_MODULES:
      return None
    missing = missing_training_stack()
    if not missing:
      type(self)._ok = True
      return None
    raise ImportError(f"{name} needs the training stack (missing: {', '.join(missing)}): "
                      f"pip install 'simbal_jax[train]'", name=name)


if not any(type(f).__name__ == "_TrainingStackCheck" for f in sys.meta_path):  # reload
  sys.meta_path.insert(0, _TrainingStackCheck())
