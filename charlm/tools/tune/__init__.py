"""``charlm tune``: hyperparameter search with Optuna, on one machine or many.

- :mod:`charlm.tools.tune.space`: the search space, a YAML file of config keys and distributions, checked against the
  config's schema before anything starts.
- :mod:`charlm.tools.tune.objective`: one trial = one ``charlm.training.fit.train`` run in
  ``<out>/<study>/trial-NNNN/``, scored by its best validation loss; the pruning callback that feeds each
  validation to Optuna's pruner; which trials count towards ``--trials``.
- :mod:`charlm.tools.tune.study`: the storage (SQLite in the study folder, or any Optuna storage URL that every
  machine joins), the worker processes, the trial count and what resuming after a kill does.
- :mod:`charlm.tools.tune.signals`: Ctrl-C and SIGTERM in a worker: raised between trials, held while a trial is
  created, and a worker that ends with its parent.
- :mod:`charlm.tools.tune.results`: the table, ``best.yaml`` (a config for ``charlm train --config``) and the
  parameter-importance plot.
"""
