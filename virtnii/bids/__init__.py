"""Whole BIDS datasets: ``virtnii index`` (:mod:`.job`) and the queries on its manifests (:mod:`.query`).

:mod:`.listing` lists a dataset once, :mod:`.metadata` resolves entities and sidecars, :mod:`.units` is the
per-batch work that runs on threads or Dask workers, :mod:`.report` the run's summary.
"""

from .job import IndexResult, index
from .query import find, table

__all__ = ["IndexResult", "index", "find", "table"]
