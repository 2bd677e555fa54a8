"""Backing chains made by qemu for the commit and rebase tests, built
twice (one copy for qcow2fast, one for qemu-img) so the results can be
compared layer by layer."""

import os
import shutil

from .qemu_util import MiB, qemu_check, qemu_create, qemu_img, qemu_io, qemu_raw


class Layer:
    """One image of a chain: ``writes`` are qemu-io commands (``write -P
    3 0 64k``, ``write -z ...``, ``write -c ...``) or ``snapshot NAME``
    (an internal snapshot); ``fmt`` qcow2 or raw
    (raw only at the bottom); ``opts`` qemu-img create options."""

    def __init__(self, name, size=16 * MiB, writes=(), fmt="qcow2", **opts):
        self.name, self.size, self.writes, self.fmt, self.opts = name, size, writes, fmt, opts


def deep_chain(n, top=None):
    """``n`` layers (l0 ... l<n-1>, or ``top`` last), each writing its own
    pattern over part of the one below, cluster sizes 4k / 64k / 512k."""
    layers = [Layer("l0.qcow2", writes=["write -P 1 0 8M"])] + [
        Layer(f"l{i}.qcow2", cluster_size=(4096, 65536, 512 * 1024)[i % 3],
              writes=[f"write -P {i + 1} {i * 512}k 1M", f"write -z {i * 1024 + 100}k 8k"])
        for i in range(1, n)]
    if top is not None:
        layers[-1] = top
    return layers


def build_chain(d, layers):
    """Create ``layers`` (bottom first) in directory ``d``, each backed by the
    one before, with relative backing names.  Returns the paths."""
    os.makedirs(d, exist_ok=True)
    paths, below = [], None
    for layer in layers:
        p = os.path.join(d, layer.name)
        if layer.fmt == "raw":
            assert below is None, "a raw image can only be the base"
            qemu_img("create", "-q", "-f", "raw", p, str(layer.size))
        else:
            opts = dict(layer.opts)
            qemu_create(p, layer.size, backing=below and os.path.basename(below),
                        backing_fmt=below and (layers[len(paths) - 1].fmt), **opts)
        for cmd in layer.writes:
            if cmd.startswith("snapshot "):     # an internal snapshot, by name
                qemu_img("snapshot", "-c", cmd.split()[1], p)
            else:
                qemu_io(p, cmd, fmt=layer.fmt)
        paths.append(p)
        below = p
    return paths


def twin(d, layers, others=()):
    """The chain built in ``d/qf`` (beside the chains ``others``) and copied
    to ``d/qemu``: (ours, theirs), the paths of ``layers``' images."""
    for chain in others:
        build_chain(os.path.join(d, "qf"), chain)
    ours = build_chain(os.path.join(d, "qf"), layers)
    theirs_dir = os.path.join(d, "qemu")
    shutil.copytree(os.path.dirname(ours[0]), theirs_dir)
    return ours, [os.path.join(theirs_dir, os.path.basename(p)) for p in ours]


def views(paths, fmts):
    """Every layer's guest content as qemu reads it through its chain."""
    return [qemu_raw(p, fmt=f) for p, f in zip(paths, fmts)]


def assert_same_layers(ours, theirs, fmts):
    """``qemu-img compare`` of each layer (through its own chain) with its
    twin, and ``qemu-img check`` clean on each qcow2 layer."""
    for a, b, f in zip(ours, theirs, fmts):
        p = qemu_img("compare", "-f", f, "-F", f, a, b, check=False)
        assert p.returncode == 0, f"{os.path.basename(a)}: {p.stdout_text} {p.stderr_text}"
        if f == "qcow2":
            qemu_check(a)
