"""One benchmark run, as a chain of resumable stages recorded in one MLflow run.

- :mod:`selbench.run.spec`: what a run *is* (the request, the method's label codec, the
  keys that identify a run); imported by everything that needs a run's identity.
- :mod:`selbench.run.selection_io`: the only code that names, writes or reads
  ``selection.parquet``.
- :mod:`selbench.run.stages`: the four stages as functions that return results.
- :mod:`selbench.run.lifecycle`: execute, resume and reaping; the one place that hands
  stage results to the recorder and the run directory.

This ``__init__`` imports nothing, so ``selbench.run.spec`` stays as light as it is.
"""
