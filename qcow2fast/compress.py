"""Compressed clusters: zlib (raw deflate, via zlib-ng) and zstd."""

import zstandard
from zlib_ng import zlib_ng

from .errors import CorruptImageError
from .header import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def decompress_cluster(data, compression_type, cluster_size, host_offset):
    """Decompress one cluster; ``data`` may carry trailing padding.

    qemu writes raw deflate with a 4 KiB window; any window is accepted
    here.  Output that is not exactly one cluster is corruption.
    """
    try:
        if compression_type == COMPRESSION_ZLIB:
            d = zlib_ng.decompressobj(-15)
            out = d.decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            d = zstandard.ZstdDecompressor().decompressobj()
            out = d.decompress(data)[:cluster_size]
        else:  # rejected at open
            raise CorruptImageError(f"unknown compression type {compression_type}")
    except (zlib_ng.error, zstandard.ZstdError) as e:
        raise CorruptImageError(f"compressed cluster does not decompress: {e}",
                                offset=host_offset, field="compressed cluster") from None
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}",
            offset=host_offset, field="compressed cluster")
    return out
