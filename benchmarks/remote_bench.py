"""qcow2fast convert of a remote image versus qemu-img convert (its curl
driver) of the same ``http://`` URL, served by a local Range server; or,
with ``--protocol nbd``, of the same NBD export (``qemu-nbd -r -t -f qcow2``
of the image: the guest's bytes, read as raw through each tool's NBD client);
or, with ``--protocol ssh``, of the same ``ssh://`` file (a local OpenSSH
server, tests/helpers/sshd_util.py; qemu's ssh driver against ours).
``--write raw|qcow2`` (ssh only) times the other direction: ``convert -O
FMT`` of the local image into a new ``ssh://`` file on the server.

    python -m benchmarks.remote_bench [--quick] [--runs N] [--protocol http|nbd|ssh]
                                      [--write raw|qcow2] [--json OUT] [--tmpdir DIR]

The source is a qcow2 image made by qemu-img from random data with holes
(quick: 256 MiB, full: 3 GiB; cached in the temporary directory), served by
tests/helpers/http_server.py in its own process (so neither tool shares a
GIL with the server).  Side by side in one run, the tools in alternating
order, each run: ``convert -O raw URL out.raw`` (qemu-img with ``-m 1``:
see below), wall time, the tool's CPU time (user + system) and the
server's, and the HTTP requests and bytes the server saw (its /_stats
before and after; not counted for NBD).  Each
figure is the median of ``--runs`` runs.  Both outputs are verified once
against the local image (qemu-img compare).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request

from .common import BenchError, GiB, MiB, choose_tmpdir, git_revision, log, qcow2fast_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"quick": 256 * MiB, "full": 3 * GiB}
HOLE_EVERY = 16          # one MiB in this many left unwritten (sparse source)


def build_source(tmpdir, size):
    path = os.path.join(tmpdir, f"remote-src-{size // MiB}M.qcow2")
    if os.path.exists(path):
        return path
    raw = path + ".raw"
    log(f"building {path} ({size // MiB} MiB) ...")
    with open(raw, "wb") as f:
        f.truncate(size)
        chunk = os.urandom(MiB)
        for i in range(size // MiB):
            if i % HOLE_EVERY != HOLE_EVERY - 1:
                f.seek(i * MiB)
                f.write(chunk[i % 4096:] + chunk[:i % 4096])
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path + ".tmp"],
                   check=True)
    os.rename(path + ".tmp", path)
    os.unlink(raw)
    return path


class Server:
    """tests/helpers/http_server.py in a child process."""

    def __init__(self, root):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.http_server", root],
                                     cwd=REPO, stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def source(self, image):
        """(URL, format to open it as) of an image in the served directory."""
        return f"{self.url}/{os.path.basename(image)}", "qcow2"

    def stats(self):
        with urllib.request.urlopen(self.url + "/_stats") as r:
            return json.load(r)

    def cpu(self):
        """The server's CPU seconds so far (user + system)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.proc.kill()
        self.proc.wait()


class NbdServer(Server):
    """qemu-nbd exporting the image's guest view (read-only, persistent)."""

    def __init__(self, image):
        self.sock = image + ".sock"
        self.proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "qcow2", "-k", self.sock,
                                      image])
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("qemu-nbd did not start")
            time.sleep(0.01)

    def source(self, image):
        return f"nbd+unix:///?socket={self.sock}", "raw"

    def stats(self):
        return {"range": 0, "bytes": 0, "HEAD": 0}


class SshServer(Server):
    """sshd serving the image's directory over SFTP; both tools authenticate
    through its ssh-agent (SSH_AUTH_SOCK, set for this process's children).
    Its CPU is not counted (sshd forks a process per connection)."""

    def __init__(self, image):
        import pathlib
        import tempfile
        from tests.helpers.sshd_util import SshServer as Sshd
        self.dir = tempfile.mkdtemp(dir=os.path.dirname(image))
        self.sshd = Sshd(pathlib.Path(self.dir)).__enter__()
        os.symlink(image, self.sshd.root / os.path.basename(image))
        os.environ["SSH_AUTH_SOCK"] = self.sshd.env["SSH_AUTH_SOCK"]

    def source(self, image):
        return self.sshd.url(os.path.basename(image)), "qcow2"

    def target(self, name):
        """The ssh:// name of a new file ``name`` on the server, and its path."""
        return self.sshd.url(name), str(self.sshd.root / name)

    def stats(self):
        return {"range": 0, "bytes": 0, "HEAD": 0}

    def cpu(self):
        return 0.0

    def close(self):
        self.sshd.__exit__()
        shutil.rmtree(self.dir, ignore_errors=True)


def one_run(cmd, out, server):
    if os.path.exists(out):
        os.unlink(out)
    subprocess.run(["sync"])
    before, server_cpu = server.stats(), server.cpu()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}")
    after = server.stats()
    return {"seconds": wall,
            "cpu": ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime,
            "server_cpu": server.cpu() - server_cpu,
            "requests": after["range"] - before["range"],
            "bytes": after["bytes"] - before["bytes"], "head": after["HEAD"] - before["HEAD"]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.remote_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 MiB instead of 3 GiB")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--tmpdir")
    p.add_argument("--source", help="a qcow2 image to serve instead of a new one")
    p.add_argument("--protocol", choices=("http", "nbd", "ssh"), default="http")
    p.add_argument("--write", choices=("raw", "qcow2"),
                   help="convert the local image into a new ssh:// file of this format")
    a = p.parse_args(argv)
    if a.write and a.protocol != "ssh":
        p.error("--write needs --protocol ssh")
    size = SIZES["quick" if a.quick else "full"]
    tmpdir, _ = choose_tmpdir(a.tmpdir, 3 * size + GiB, prefix="qcow2fast-remote-bench-")
    try:
        return _bench(a, tmpdir, size)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _bench(a, tmpdir, size):
    if a.source:
        src = os.path.join(tmpdir, "remote-src.qcow2")
        os.symlink(os.path.abspath(a.source), src)
        size = json.loads(subprocess.run(["qemu-img", "info", "--output=json", src],
                                         capture_output=True, check=True).stdout)["virtual-size"]
    else:
        src = build_source(tmpdir, size)
    server = {"http": Server, "nbd": NbdServer, "ssh": SshServer}[a.protocol](
        tmpdir if a.protocol == "http" else src)
    url, fmt = server.source(src)
    out = os.path.join(tmpdir, "remote-out.raw")
    ofmt, dest = "raw", out
    if a.write:             # the other way: the local image into a new file there
        ofmt = a.write
        url, fmt = src, "qcow2"
        dest, out = server.target(f"remote-out.{ofmt}")
    tools = {
        "qcow2fast": [*qcow2fast_command(), "convert", "-f", fmt, "-O", ofmt, url, dest],
        # -m 1: qemu 7.2's curl driver hangs now and then (1 run in 5 at
        # 256 MiB) with its default 8 coroutines.  At the hang the server
        # has no request in progress, every byte it sent was received (ss:
        # empty queues on both ends) and qemu sends nothing more: the
        # driver waits for a request it never made, so it is not this
        # server's doing.  One coroutine is its setting that always finishes.
        "qemu-img": ["qemu-img", "convert", *(["-m", "1"] if a.protocol == "http" else []),
                     "-f", fmt, "-O", ofmt, url, dest],
    }
    samples = {t: [] for t in tools}
    try:
        for name, cmd in tools.items():              # verify each once
            one_run(cmd, out, server)
            subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", ofmt, src, out],
                           check=True, capture_output=True)
        for i in range(a.runs):
            order = list(tools) if i % 2 == 0 else list(reversed(tools))
            for name in order:
                samples[name].append(one_run(tools[name], out, server))
                s = samples[name][-1]
                log(f"run {i + 1} {name:9}: {s['seconds']:.2f} s, CPU {s['cpu']:.2f} s "
                    f"(server {s['server_cpu']:.2f} s), {s['requests']} requests")
    finally:
        server.close()
        if os.path.exists(out):
            os.unlink(out)
    result = {"size": size, "runs": a.runs, "protocol": a.protocol, "write": a.write,
              "revision": git_revision(REPO), "tools": {}}
    for name, runs in samples.items():
        sec = statistics.median(r["seconds"] for r in runs)
        result["tools"][name] = {
            "median_seconds": sec, "MiB_per_s": size / MiB / sec,
            "median_cpu": statistics.median(r["cpu"] for r in runs),
            "median_server_cpu": statistics.median(r["server_cpu"] for r in runs),
            "median_requests": statistics.median(r["requests"] for r in runs),
            "median_bytes": statistics.median(r["bytes"] for r in runs), "samples": runs}
    qf, qe = result["tools"]["qcow2fast"], result["tools"]["qemu-img"]
    result["speedup"] = qe["median_seconds"] / qf["median_seconds"]
    what = f"into {ofmt} " if a.write else ""
    print(f"convert of a {size // MiB} MiB qcow2 {what}over {a.protocol.upper()} "
          f"(medians of {a.runs} runs)")
    print(f"{'tool':10} {'seconds':>8} {'MiB/s':>8} {'CPU s':>6} {'server CPU s':>12} "
          f"{'requests':>9} {'MiB sent':>9}")
    for name, r in result["tools"].items():
        print(f"{name:10} {r['median_seconds']:8.2f} {r['MiB_per_s']:8.1f} "
              f"{r['median_cpu']:6.2f} {r['median_server_cpu']:12.2f} "
              f"{r['median_requests']:9.0f} {r['median_bytes'] / MiB:9.1f}")
    print(f"qcow2fast / qemu-img speed: {result['speedup']:.2f}x (load {os.getloadavg()[0]:.1f})")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
