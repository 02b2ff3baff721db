"""Ablation studies: study files expanded into runs, run in parallel, and reported with confidence intervals.

``memforge ablate STUDY.toml`` and ``memforge ablate report DIR`` (see ``docs/ablation.md``):

* :mod:`memforge.ablate.study`: the study file, checked and expanded into planned runs;
* :mod:`memforge.ablate.runner`: the study directory, the plan, skipping and resuming;
* :mod:`memforge.ablate.executors`: local worker processes or Ray tasks, running
  :func:`memforge.ablate.job.run_job` (train, evaluate, record one run);
* :mod:`memforge.ablate.report` (:func:`~memforge.ablate.report.write_report`): the report, from
  :mod:`memforge.ablate.results` (the study directory read and checked), :mod:`memforge.ablate.rows`
  (rows with bootstrap intervals from :mod:`memforge.ablate.stats`, differences paired by seed),
  :mod:`memforge.ablate.tables` (the CSV and Markdown tables, the tidy file) and
  :mod:`memforge.ablate.plots` (the figures).
"""
