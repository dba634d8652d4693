"""Parameters from another run's checkpoint (`ckpt.init_from`): the newest step that reads and,
when it has save-time digests, matches them; a step without digests (a checkpoint from
elsewhere) is used with a warning. Also importable as checkpoint.restore_params_only."""

from absl import logging
import jax
import orbax.checkpoint as ocp

from simbal_jax.runio import integrity
from simbal_jax.runio import paths


def _params_digests(record):
  """The digests of the `params` arrays in an `integrity` item, keyed relative to params."""
  out = {}
  for k, v in (record or {}).get("leaves", {}).items():
    for prefix in (".params", "['params']"):
      if k.startswith(prefix):
        out[k[len(prefix):]] = v
  return out


def _verify(params, record, where):
  """Raises ValueError when `params` differ from their digests; warns when there are none."""
  if not record:
    logging.warning("init_from: %s has no digests (a checkpoint from elsewhere): its parameters "
                    "are used unverified", where)
    return
  if record.get("format") != integrity.DIGEST_FORMAT:
    logging.warning("init_from: %s: unknown digest format %r, not verified", where,
                    record.get("format"))
    return
  saved, now = _params_digests(record), integrity.state_digests(params)
  bad = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
  if bad:
    raise ValueError(f"{len(bad)} parameter array(s) differ from their save-time digests: "
                     f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")


def restore_params_only(directory, abstract_params):
  """Reads only `state.params` from the newest usable checkpoint in `directory` (init_from).

  Args:
    directory: str or epath.Path (local or cloud), a checkpoints directory written by
      checkpoint.Checkpointer.
    abstract_params: pytree of jax.ShapeDtypeStruct for the parameters.
  Returns:
    The parameter pytree.
  Raises:
    FileNotFoundError: no step reads (or matches its digests).
  """
  directory = paths.resolve(directory)
  manager = ocp.CheckpointManager(directory,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    for s in reversed(sorted(manager.all_steps())):
      where = f"step {s} in {directory}"
      try:
        with integrity.quiet():
          out = manager.restore(s, args=ocp.args.Composite(
              state=ocp.args.PyTreeRestore(item=None, partial_restore=True)))
          record = None
          if (directory / str(s) / "integrity").is_dir():
            record = manager.restore(s, args=ocp.args.Composite(
                integrity=ocp.args.JsonRestore()))["integrity"]
        params = out["state"]["params"]
        _verify(params, record, where)
        return jax.tree.map(
            lambda a, x: jax.device_put(x, a.sharding) if hasattr(a, "sharding") and
            a.sharding is not None else x, abstract_params, params)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("init_from: %s unusable (%s)", where, integrity.brief(e))
    raise FileNotFoundError(f"init_from: no readable checkpoint in {directory}")
  finally:
    manager.close()
