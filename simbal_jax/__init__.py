"""simbal_jax: load balancing for sparse Mixture-of-Experts language models in JAX.

The pure modules (`routing`, `losses`, `metrics`, `specialization`, `balance`, `eval_metrics`)
import only jax and numpy, so any JAX codebase can call them:

  from simbal_jax import losses
  aux = losses.simbal(router_kernel)          # ||R^T R - I||_1, R: float32[D, E]

Shape-suffix legend used in names inside math code (`probs_TxE`, `x_BxLxD`):
  B batch, L sequence length, T tokens (B*L), D model width, F feed-forward width,
  H attention heads, V vocabulary, E experts, C capacity per expert, K experts per token (top-k),
  N sampled items (pairs, tokens).

Flax modules (`moe`, `model`), training (`train`, `env`, `evaluate`) and IO (`data`, `runio`)
are imported on demand so that importing the package stays light. docs/ARCHITECTURE.md maps
the modules and the places to edit for the common changes.
"""

from simbal_jax import losses
from simbal_jax import metrics
from simbal_jax import routing
from simbal_jax import specialization

__all__ = ["losses", "metrics", "routing", "specialization"]
__version__ = "0.1.0"
