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


def _run(method, seed, loss, **final):
  return dict(method=method, lr=None, seed=seed, dir=f"{method}/seed{seed}",
              curve=[(100, loss + 1.0), (200, loss)], tokens=200, seq_loss=None,
              final={"step": 2, "eval/loss": loss, **final}, change={})


def test_extra_eval_sets_final_loss_and_load_shift_over_seeds():
  runs = [_run("lbl", 0, 2.0, **{"eval_py/loss": 3.0, "eval_py/load_tv": 0.1}),
          _run("lbl", 1, 2.2, **{"eval_py/loss": 3.4, "eval_py/load_tv": 0.3}),
          _run("simbal", 0, 1.9, **{"eval_py/loss": 2.5, "eval_py/load_tv": 0.2,
                                    "eval_syn/loss": 4.0}),  # syn: one seed only, left out
          _run("simbal", 1, 2.0, **{"eval_py/loss": 2.7, "eval_py/load_tv": 0.2})]
  table = convergence_table.aggregate(runs, (), "lbl")
  py = table["methods"]["lbl"]["eval_sets"]["py"]
  assert py["loss"]["mean"] == pytest.approx(3.2) and py["load_tv"]["mean"] == pytest.approx(0.2)
  assert list(table["methods"]["simbal"]["eval_sets"]) == ["py"]
  md = convergence_table.format_table(table)
  assert "Extra evaluation sets (train.eval_sets)" in md
  assert "| simbal | 2.6000 ± 0.1414 / 0.200 ± 0.000 |" in md
  assert convergence_table.format_eval_sets({"methods": {"a": {}}}) == []
