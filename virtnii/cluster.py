"""Running virtnii's per-unit functions as Dask tasks (``--dask ADDRESS`` or a ``distributed.Client``).

The index batches and the pyramid batches are plain functions of picklable arguments; this module is the one
place that reaches a cluster, maps such a function over its units and hands back results as they finish, so
both commands fail alike: a missing ``distributed`` package or an unreachable scheduler is a
:class:`~virtnii.errors.ManifestError`, and once a unit fails the rest are cancelled, so nothing more is
written behind the caller's back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from .errors import ManifestError

U = TypeVar("U")


def dask_map(dask: Any, function: Callable[..., Any], units: Sequence[U], target: str,
             **kwargs: Any) -> Iterator[tuple[U, Any]]:
    """``(unit, function(unit, **kwargs))`` for every unit, run as Dask tasks, in the order they finish.

    ``dask`` is a ``distributed.Client`` (used as is) or a scheduler address (connected to, and closed at the
    end); ``target`` names what the tasks write, for the errors.  Tasks are not pure: a re-run must run them
    again (their inputs may have changed on disk under the same arguments).
    """
    try:
        import distributed
    except ImportError as err:
        raise ManifestError(target, "--dask needs the distributed package: pip install 'virtnii[dask]'") from err
    try:
        client = dask if isinstance(dask, distributed.Client) else distributed.Client(dask, timeout=30)
    except (OSError, TimeoutError, ValueError) as err:
        raise ManifestError(str(dask), f"cannot reach this Dask scheduler: {err}") from err
    futures = []
    try:
        futures = client.map(function, units, pure=False, **kwargs)
        by_key = {future.key: unit for future, unit in zip(futures, units)}
        for future in distributed.as_completed(futures):
            yield by_key[future.key], future.result()
    finally:
        client.cancel(futures)
        if client is not dask:
            client.close()
