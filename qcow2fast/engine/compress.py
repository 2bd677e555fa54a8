"""Compressed clusters: zlib (raw deflate, via zlib-ng) and zstd."""

import threading

from ..errors import CorruptImageError
from ..spec.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def decompress_cluster(data, compression_type, cluster_size, host_offset):
    """Decompress one cluster; ``data`` may carry trailing padding.

    qemu writes raw deflate with a 4 KiB window; any window is accepted
    here.  Output that is not exactly one cluster is corruption.
    """
    import zstandard            # (imported on first use, as below: the two
    from zlib_ng import zlib_ng  # cost ~6 ms of every command's start-up)
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


# qemu compresses with stock zlib, level 6, raw deflate, window 2^12,
# memLevel 9.  zlib-ng's levels on the clusters of benchmarks/convert_bench's
# ext4 image (--quick, 2679 clusters; CPU throughput per core here), output
# size against qemu's: level 3 +4.8% at 155 MB/s, 4 +2.8% at 135 MB/s,
# 5 +1.3% at 130 MB/s, 6 +1.0% at 125 MB/s; stock zlib 6 52 MB/s.  memLevel
# changes neither size nor speed in zlib-ng.  Level 5: within 3% of qemu's
# size (the goal) for about the speed of level 4.
ZLIB_DEFAULT_LEVEL = 5
# qemu compresses zstd at ZSTD_CLEVEL_DEFAULT, 3.  On 5189 data clusters of
# the full ext4 image (one core, 2026-12-05), size against level 3: level
# 2 +1.3% at 1.23x the speed, 1 +3.5% at 1.36x, -1 +13% at 1.53x.  Level 2:
# the fastest within 3% of qemu's size, the rule zlib's default follows.
ZSTD_DEFAULT_LEVEL = 2


class Compressor:
    """Compresses one cluster at a time, as qcow2 stores them: zlib as raw
    deflate with a 4 KiB window (qemu inflates with that window, so a
    larger one would not read back), zstd as one frame.  Callable from
    several threads: one zstd compressor per thread (sharing one crashes)."""

    def __init__(self, compression_type, level=None):
        if compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
            raise ValueError(f"unknown compression type {compression_type}")
        zlib = compression_type == COMPRESSION_ZLIB
        lo, hi = (1, 9) if zlib else (1, 22)
        if level is not None and not lo <= level <= hi:
            raise ValueError(f"compression level {level} out of range {lo}..{hi} for "
                             f"{'zlib' if zlib else 'zstd'}")
        self.compression_type = compression_type
        self.level = level if level is not None else \
            ZLIB_DEFAULT_LEVEL if zlib else ZSTD_DEFAULT_LEVEL
        self._local = threading.local()

    def __call__(self, data):
        if self.compression_type == COMPRESSION_ZLIB:
            from zlib_ng import zlib_ng
            c = zlib_ng.compressobj(self.level, zlib_ng.DEFLATED, -12)
            return c.compress(data) + c.flush()
        z = getattr(self._local, "zstd", None)
        if z is None:
            import zstandard
            z = self._local.zstd = zstandard.ZstdCompressor(level=self.level)
        return z.compress(data)
