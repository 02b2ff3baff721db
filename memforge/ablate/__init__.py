"""Ablation studies: study files expanded into runs, run in parallel, and reported with confidence intervals.

``memforge ablate STUDY.toml`` and ``memforge ablate report DIR`` (see ``docs/ablation.md``):

* :mod:`memforge.ablate.study`: the study file, checked and expanded into planned runs;
* :mod:`memforge.ablate.runner`: the study directory, the plan, skipping and resuming;
* :mod:`memforge.ablate.executors`: local worker processes or Ray tasks, running
  :func:`memforge.ablate.job.run_job` (train, evaluate, record one run);
* :mod:`memforge.ablate.report`, :mod:`memforge.ablate.stats`, :mod:`memforge.ablate.plots`: the
  tables with bootstrap intervals, the differences paired by seed, the tidy file and the plots.
"""
