"""``charlm compare``: several cells trained under one config, seed and budget; one table, one figure.

Every cell (and, with ``--seeds``, every seed) is one ordinary training run in its own folder
``<out>/<cell>-seed<seed>/`` (``best.ckpt``, ``last.ckpt``, ``metrics.csv``, ``config.yaml``), made by
:func:`charlm.training.fit.train`. Only ``model.cell``, ``train.seed`` and, with ``--match-params``,
``model.hidden_size`` differ between runs. Each finished run is scored again from its ``best.ckpt`` on
the whole validation and test splits, and the figures land in ``<out>/``:

- ``results.csv``: one row per cell (mean over seeds, with std / min / max columns), ``runs.csv``: one
  row per run, ``results.json``: both plus the settings and each run's validation curve,
  ``results.md``: the table for a README, ``curves.png``: validation bpc against step and wall time.

Resuming: ``<out>/<run>/compare-run.json`` records the run's settings and, once it is finished, its
scores. Re-running the same command with the same ``--out`` skips every run that has scores, continues
an unfinished one from its ``last.ckpt`` as ``charlm train --resume`` does (its ``metrics.csv`` and its
training clock go on), and refuses (naming the keys) a run whose settings differ.

Presets: ``--preset jozefowicz`` / ``greff`` name their rows as the papers do (``LSTM-f``, ``MUT1``, ``V``,
``NIG`` ...). The jozefowicz preset also sets ``model.forget_bias=0`` (over the config file, before any
``--set``): the paper's LSTM rows start from a zero forget bias and LSTM-b is the one with a bias of 1.
``--preset modern`` (LSTM, GRU, minGRU, minLSTM, sLSTM, Mogrifier) matches parameter counts and runs seeds
1, 2, 3 unless ``--seeds`` says otherwise.

Diverged runs: a run whose best validation loss is not finite or above ln V (a uniform guess) is counted in
the ``diverged`` column and left out of every mean, spread, test and of the choice of the best row
(:mod:`~charlm.tools.compare.summary`); ``--rebuild --out DIR`` writes a comparison's tables again from its
``results.json`` under these rules, training nothing (:mod:`~charlm.tools.compare.rebuild`).

Budget: ``--max-steps`` alone turns the config's time limit off and ``--max-time`` alone its step
limit, so every cell gets exactly the stated budget; with both, whichever comes first. Samples printed
during training are off (``--set sample.enabled=true`` turns them back on).

Wall time: each validation point is placed at the training time the run logged with it (``elapsed_s``
in ``metrics.csv``, carried over a resume by the checkpoint), and a final best point at the time its
``best.ckpt`` was written. A point without a logged time (a run resumed from a checkpoint made before
charlm kept the time) is left out of the wall-time panel, never placed by guess. A run's training time
is its clock at the end (``last.ckpt``'s ``elapsed_s``).

The package, by job: :mod:`~charlm.tools.compare.plan` (cells, presets, seeds, budgets, matched parameter
counts, the planned runs), :mod:`~charlm.tools.compare.records` (each run's record and curve),
:mod:`~charlm.tools.compare.summary` (mean and spread per cell), :mod:`~charlm.tools.compare.significance`
(Welch's t-test, the papers' claims), :mod:`~charlm.tools.compare.tables` (tables, results files),
:mod:`~charlm.tools.compare.plot` (``curves.png``), :mod:`~charlm.tools.compare.run` (the run loop) and
:mod:`~charlm.tools.compare.rebuild` (the tables again from the records).
"""
