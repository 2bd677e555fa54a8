"""The executors a fleet runs on: a local process pool, or a Dask cluster
(the optional extra ``qcow2fast[dask]``)."""

from __future__ import annotations

import os

from ..errors import UnsupportedFeatureError

LOCAL = "local"


def dask_client(address: str):
    """A ``dask.distributed.Client`` of the scheduler at ``address``
    (``tcp://HOST:PORT``); a clear error naming the extra when Dask is
    not installed."""
    try:
        from dask.distributed import Client
    except ImportError as e:
        raise UnsupportedFeatureError(
            f"a Dask scheduler ({address}) needs dask.distributed, which is not installed: "
            f"pip install 'qcow2fast[dask]' ({e})", feature="dask") from None
    return Client(address)


class FleetExecutor:
    """``with FleetExecutor(scheduler, workers) as ex:`` -- a process pool of
    ``workers`` processes for ``"local"`` (default: one per CPU), else the
    executor of a Dask client connected to ``scheduler`` (closed on exit)."""

    def __init__(self, scheduler: str = LOCAL, workers: int | None = None):
        self.client = None
        if scheduler == LOCAL:
            import concurrent.futures  # not at import: the CLI's parser needs only LOCAL
            self.executor = concurrent.futures.ProcessPoolExecutor(workers or os.cpu_count()
                                                                   or 1)
        else:
            self.client = dask_client(scheduler)
            self.executor = self.client.get_executor()

    def __enter__(self):
        return self.executor

    def __exit__(self, *exc):
        self.executor.shutdown(wait=True)
        if self.client is not None:
            self.client.close()
