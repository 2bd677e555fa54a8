"""The image's compressed-write API (qemu-io's ``write -c``; what
``convert -c`` writes through): :class:`~.image.Image` inherits it.

The requests are checked and the clusters compressed here; placing the
payloads is engine/compressed.py's (``CompressedClusters.write``), run under
the image's exclusive lock through ``Image._update``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError, UnsupportedFeatureError
from .compress import Compressor

if TYPE_CHECKING:
    import collections.abc

    from .._ext._typing import Buffer


class CompressedWriteAPI:
    """Mixed into Image (state-free, as image_lifecycle.LifecycleAPI)."""

    __slots__ = ()

    def write_compressed(self, offset: int, data: Buffer,
                         compressor: Compressor | None = None) -> int:
        """Write ``data`` at guest ``offset`` as compressed clusters (qemu's
        ``write -c``).  ``offset`` is cluster aligned; ``data`` is whole
        clusters, the last of which may stop at the end of the disk.
        ``compressor``: a :class:`qcow2fast.engine.compress.Compressor` of
        the image's compression type (default: its default level).  Returns
        the number of bytes written."""
        mv = memoryview(data).cast("B")     # type: ignore[arg-type]  # ndarray: see _ext/_typing.pyi
        self._check_compressed_request(offset, len(mv))
        ctype = self.header.compression_type
        if compressor is None:
            compressor = Compressor(ctype)
        elif compressor.compression_type != ctype:
            raise InvalidArgumentError(
                f"the compressor is for compression type {compressor.compression_type}, the "
                f"image uses {ctype} ({self.compression_type})")
        cs = self.cluster_size
        payloads = []
        for k in range(0, len(mv), cs):
            chunk: memoryview | bytes = mv[k:k + cs]
            if len(chunk) < cs:         # the disk's last cluster: padded with zeros
                chunk = bytes(chunk) + bytes(cs - len(chunk))
            c = compressor(chunk)
            payloads.append(c if len(c) < cs else chunk)
        self.write_compressed_clusters(offset, payloads)
        return len(mv)

    def write_compressed_clusters(self, offset: int,
                                  payloads: collections.abc.Sequence[Buffer]) -> None:
        """Write already compressed clusters from guest ``offset`` (cluster
        aligned): ``payloads[i]`` is guest cluster i's, either its data
        compressed with the image's compression type (shorter than a
        cluster; not verified) or the whole cluster uncompressed (exactly
        ``cluster_size`` bytes, zero-padded past the end of the disk),
        which is written through the normal write path.  Same rules as
        :meth:`write_compressed`."""
        cs = self.cluster_size
        sizes = [memoryview(p).nbytes for p in payloads]   # type: ignore[arg-type]  # as above
        for i, n in enumerate(sizes):
            if not 0 < n <= cs:
                raise InvalidArgumentError(f"payload {i} is {n} bytes: a compressed cluster "
                                           f"is 1 to {cs - 1} bytes, an uncompressed one {cs}")
        length = min(len(payloads) * cs, self.size - offset)
        self._check_compressed_request(offset, length)
        if len(payloads) != -(-length // cs):
            raise InvalidArgumentError(f"{len(payloads)} clusters from guest offset {offset:#x} "
                                       f"go past the end of the disk (size {self.size})")
        if payloads and self.state.external_data:
            raise UnsupportedFeatureError("Operation not supported: compressed clusters cannot "
                                          "be written to an image with an external data file",
                                          feature="compression")
        if payloads and self.state.transform is not None:
            raise UnsupportedFeatureError("compressed clusters cannot be written through a "
                                          "data transform (encryption)", feature="compression")
        if payloads:
            self._notify_write(offset, length)
            self._update(self.clusters.compressed.write, offset, payloads)
            if self.writethrough:
                self.flush()

    def _check_compressed_request(self, offset, length):
        self._check_request(offset, length)
        self._check_writable()
        cs = self.cluster_size
        if offset % cs:
            raise InvalidArgumentError(f"compressed write at guest offset {offset:#x}: not "
                                       f"aligned to the cluster size ({cs})")
        if length % cs and offset + length != self.size:
            raise InvalidArgumentError(
                f"compressed write of {length} bytes at guest offset {offset:#x}: not whole "
                f"clusters ({cs} bytes) and not ending at the end of the disk ({self.size})")
