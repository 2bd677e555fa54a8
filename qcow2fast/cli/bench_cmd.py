"""qcow2fast bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-i aio] [-n]
                [--no-drain] [-o offset] [--pattern=N] [-q] [-s size] [-S step]
                [-t cache] [-w] [-U] [--random [--seed=N]] [--rw-mix=PERCENT] filename

qemu-img bench's options, meaning and summary lines (``-i`` and ``-n`` pick
qemu's AIO back end and are accepted and ignored here: qcow2fast does its
I/O itself).  After qemu's lines come IOPS, bandwidth and latency
percentiles, unless -q.  Extras: ``--random`` (size-aligned offsets,
uniform over the image, reproducible by seed) and ``--rw-mix`` (that
percentage of the requests write).  Cache options go through
``--image-opts``, as for every other subcommand.
"""

from ..errors import Qcow2Error
from .common import add_share_arguments, open_image, share_options
from .options import INT_MAX, UsageError, cvtnum


def add_parser(sub):
    p = sub.add_parser("bench", help="run a simple I/O benchmark on an image")
    p.expects("Expecting one image file name")
    p.add_argument("-c", dest="count", default="75000")
    p.add_argument("-d", dest="depth", default="64")
    p.add_argument("-f", dest="fmt")
    p.add_argument("--flush-interval", dest="flush_interval", default="0")
    p.add_argument("-i", dest="aio")
    p.add_argument("-n", dest="native_aio", action="store_true")
    p.add_argument("--no-drain", dest="drain", action="store_false")
    p.add_argument("-o", dest="offset", default="0")
    p.add_argument("--pattern", dest="pattern", default="0")
    p.add_argument("-q", dest="quiet", action="store_true")
    p.add_argument("-s", dest="size", default="4096")
    p.add_argument("-S", dest="step")
    p.add_argument("-t", dest="cache", default="writeback")
    p.add_argument("-w", dest="write", action="store_true")
    add_share_arguments(p)
    p.add_argument("--image-opts", dest="image_opts", action="store_true")
    p.add_argument("--random", dest="random", action="store_true")
    p.add_argument("--seed", dest="seed", default="1")
    p.add_argument("--rw-mix", dest="rw_mix")
    p.add_argument("filename")
    p.set_defaults(run=run)


def _int(text, what, low=0, high=2 ** 31 - 1):
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"Invalid {what} specified: {text!r}") from None
    if not low <= value <= high:
        raise UsageError(f"Invalid {what} specified: {text} (expected {low} to {high})")
    return value


def chain_summary(st):
    """One line on the backing chain's cache (engine/chain.py, Chain.stats)."""
    asked = st["chain_map_hits"] + st["chain_map_misses"]
    rate = st["chain_map_hits"] / asked if asked else 0.0
    return (f"Backing chain: {st['chain_layers']} layers ({st['chain_open_layers']} files "
            f"open); resolved map {st['chain_map_bytes'] // 1024} KiB, "
            f"{st['chain_map_used']}/{st['chain_map_blocks']} blocks, hit rate {rate:.1%}; "
            f"{st['chain_layer_lookups']} layer lookups")


def run(args):
    from ..engine.image import CACHE_MODES
    from ..ops import bench
    count = _int(args.count, "request count")
    depth = _int(args.depth, "queue depth", 1)
    size = cvtnum("buffer size", args.size, 0, INT_MAX)
    step = size if args.step is None else cvtnum("step_size", args.step, 0, INT_MAX)
    offset = cvtnum("offset", args.offset)
    pattern = _int(args.pattern, "pattern byte", 0, 255)
    flush_interval = _int(args.flush_interval, "flush interval")
    write_percent = 100 if args.write else 0
    if args.rw_mix is not None:
        write_percent = _int(args.rw_mix, "read/write mix (percent of writes)", 0, 100)
    if flush_interval and not write_percent:
        raise UsageError("--flush-interval is only available in write tests")
    if flush_interval and flush_interval < depth:
        raise UsageError("Flush interval can't be smaller than depth")
    if args.cache not in CACHE_MODES:
        raise UsageError("Invalid cache mode")
    extra = {"cache_mode": args.cache} if args.cache != "writeback" else {}
    img = open_image(args.filename, args.fmt, image_opts=args.image_opts,
                     writable=bool(write_percent), **share_options(args), **extra)
    try:
        seed = _int(args.seed, "seed") if args.random else None
        offsets = (bench.sequential_offsets(count, offset, step, img.size) if seed is None
                   else bench.random_offsets(count, size, img.size, seed))
        writes = bench.write_mask(count, write_percent, seed or 0)
        kind = {100: "write", 0: "read"}.get(write_percent, f"mixed ({write_percent}% write)")
        where = (f"starting at offset {offset}, step size {step}" if seed is None
                 else f"random offsets, seed {seed}")
        print(f"Sending {count} {kind} requests, {size} bytes each, {depth} in parallel "
              f"({where})")
        if flush_interval:
            print(f"Sending flush every {flush_interval} requests")
        try:
            result = bench.run(img, offsets, writes, size, depth=depth, pattern=pattern,
                               flush_interval=flush_interval, drain=args.drain)
        except (Qcow2Error, OSError) as e:
            raise UsageError(f"Failed request: {e}") from None
        print(f"Run completed in {result.elapsed:.3f} seconds.")
        if not args.quiet:
            p = result.percentile_us
            print(f"{result.iops:,.0f} IOPS, {result.bandwidth / (1 << 20):,.1f} MiB/s; "
                  f"latency p50 {p(50):.1f} us, p90 {p(90):.1f} us, p99 {p(99):.1f} us, "
                  f"p99.9 {p(99.9):.1f} us, max {p(100):.1f} us")
            if getattr(img, "chain", None) is not None:
                print(chain_summary(img.cache_stats))
    finally:
        img.close()
    return 0
