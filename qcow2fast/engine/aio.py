"""The asyncio interface of an image: ``await img.read_async(offset,
length)``, ``readinto_async``, ``write_async``.

Requests made while the loop runs are gathered into batches
(``_ext/batch.pyx``): the first request of an idle image schedules a
dispatch for the end of the loop's current iteration, so every request
made until then goes in the same batch; while a batch is being carried out
(in a worker thread, the GIL released) the next requests gather for the
one after it.  The batch size follows the number of requests in flight.

Requests complete as if issued in the order they were made (a batch's
ordering, and one batch at a time).  Cancelling an awaiting task does not
take its request back once it is queued: it is still carried out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref

from .._ext.batch import READ, WRITE, submit
from ..errors import ImageClosedError


class AsyncQueue:
    """The requests of one image on one event loop, and the worker thread
    that carries out its batches."""

    def __init__(self, image, loop):
        self.image = weakref.ref(image)     # the image keys _queues: no strong reference
        self.loop = loop
        self.pending = []               # (op, offset, buffer, future), in order
        self.busy = False               # a dispatch is scheduled or a batch running
        self.executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="qcow2fast-aio")
        weakref.finalize(self, self.executor.shutdown, wait=False)

    def add(self, op, offset, buf):
        fut = self.loop.create_future()
        self.pending.append((op, offset, buf, fut))
        if not self.busy:
            self.busy = True
            self.loop.call_soon(self._dispatch)
        return fut

    def _dispatch(self):
        batch, self.pending = self.pending, []
        if not batch:
            self.busy = False
            return
        requests = [(op, off, buf) for op, off, buf, _ in batch]
        image = self.image()
        if image is None:
            error = ImageClosedError("I/O operation on a closed image")
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            self.busy = False
            return
        done = self.loop.run_in_executor(self.executor, submit, image, requests)
        done.add_done_callback(lambda f: self._complete(batch, f))

    def _complete(self, batch, f):
        error = f.exception()
        results = [error] * len(batch) if error is not None else f.result()
        for (_, _, _, fut), r in zip(batch, results):
            if fut.done():
                continue                    # cancelled
            if isinstance(r, BaseException):
                fut.set_exception(r)
            else:
                fut.set_result(r)
        self._dispatch()


_queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def queue(image) -> AsyncQueue:
    """The image's queue on the running loop."""
    loop = asyncio.get_running_loop()
    q = _queues.get(image)
    if q is None or q.loop is not loop:
        q = _queues[image] = AsyncQueue(image, loop)
    return q


async def readinto(image, offset, buf):
    return await queue(image).add(READ, offset, buf)


async def read(image, offset, length):
    buf = bytearray(length)
    await queue(image).add(READ, offset, buf)
    return bytes(buf)


async def write(image, offset, data):
    return await queue(image).add(WRITE, offset, data)
