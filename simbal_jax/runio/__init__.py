"""Run-directory IO: everything a run reads from or writes into its workdir.

  paths        local or cloud (`gs://`) paths, atomic writes, directory checks
  rundir       the workdir lock, the config comparison on resume (STRUCTURAL fields)
  checkpoint   Orbax checkpoints of the TrainState and the data iterator, verified on restore
  integrity    save-time digests and what a damaged step looks like
  storage      the room a checkpoint needs, checked before the first save
  preemption   a stop request (signal, several hosts) turned into a checkpointed step
  warmstart    parameters only from another run (`ckpt.init_from`)
  writers      metrics.jsonl, TensorBoard events, side records and the progress bar

Import the modules (`from simbal_jax.runio import checkpoint`); this package imports none of
them so that `paths` stays light.
"""
