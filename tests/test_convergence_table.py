"""experiments/convergence_table.py: the table's statistics (tables of runs on disk:
test_convergence.py)."""
import pytest

from simbal_jax.experiments import convergence_table


def test_tokens_to_target_interpolates_and_never_extrapolates():
  curve = [(500, 2.5), (1000, 1.9)]
  assert convergence_table.tokens_to_target(curve, 2.1) == pytest.approx(500 + 0.4 / 0.6 * 500)
  assert convergence_table.tokens_to_target(curve, 2.6) == 500  # the first evaluation is below
  assert convergence_table.tokens_to_target(curve, 1.8) is None  # not reached
  assert convergence_table.tokens_to_target([(1, 3.0), (2, 2.0), (3, 2.5)], 2.0) == 2


def test_t_quantiles_match_textbook_tables():
  # Two-sided 95 % Student t critical values as printed (4 decimals) in statistics tables.
  for df, printed in ((1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423)):
    assert round(convergence_table.t975(df), 4) == printed
  assert round(convergence_table.t975(10**6), 4) == 1.9600  # tends to the normal quantile
