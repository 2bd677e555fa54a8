#!/usr/bin/env python3
"""qemu's own qemu-iotests with qcow2fast standing in for qemu-img.

    python3 scripts/iotests.py [--real] [--record] [-j N] [TEST ...]

1. Fetches the iotests of the installed qemu-utils: Debian's source package of
   exactly that version (``apt-get source`` with deb-src entries derived from
   the machine's own apt sources, in a private apt directory; the system's
   apt configuration is not changed), unpacked once into a cache directory
   outside the repository ($QCOW2FAST_IOTESTS_CACHE, default
   ~/.cache/qcow2fast-iotests).  Installs what the run needs when it is
   missing (qemu-utils, qemu-system-x86 with qemu-system-common's
   qemu-storage-daemon, dpkg-dev for dpkg-source).
2. Builds a ``qemu-img`` stand-in: every qemu-img subcommand that qcow2fast has
   runs qcow2fast (this repository's package, in-process: no fallback), the
   others (and qemu-img's own -h/-V) the real qemu-img.  qemu-io, qemu-nbd,
   qemu-storage-daemon and qemu-system are the real ones; Debian builds
   qemu-system without the qtest accelerator, so a shim turns ``-accel qtest``
   into ``-accel tcg``.
3. Runs ``./check -qcow2`` on the tests that pass with the real qemu-img on
   this kind of machine (tests/iotests/real-qemu-img.txt), prints each result
   and compares: a test of that list that fails is a regression (exit 1)
   unless tests/iotests/expected-failures.txt lists it with its reason; an
   expected failure that passes is reported (remove it from the list).  A
   listed test that fails is first run once more, alone (``--retries``): the
   VM tests wait on events with timeouts a loaded machine can miss; one that
   passes then is reported FLAKY and counts as passed.

``--real`` runs with the real qemu-img instead; ``--record`` (with --real)
runs every test and rewrites tests/iotests/real-qemu-img.txt.  ``--all`` runs
every test, not only the listed ones.  Diffs of failing tests go to
``--log`` (default: the run directory's iotests.log).
"""

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTS = os.path.join(REPO, "tests", "iotests")
PASS_LIST = os.path.join(LISTS, "real-qemu-img.txt")
XFAIL_LIST = os.path.join(LISTS, "expected-failures.txt")
CACHE = os.environ.get("QCOW2FAST_IOTESTS_CACHE",
                       os.path.expanduser("~/.cache/qcow2fast-iotests"))
BIN = {"img": "/usr/bin/qemu-img", "io": "/usr/bin/qemu-io", "nbd": "/usr/bin/qemu-nbd",
       "qsd": "/usr/bin/qemu-storage-daemon", "system": "/usr/bin/qemu-system-x86_64"}
# Debian packages: the binaries above, dpkg-source, and tools the tests call.
PACKAGES = {"qemu-utils": BIN["img"], "qemu-system-x86": BIN["system"],
            "qemu-system-common": BIN["qsd"], "dpkg-dev": "/usr/bin/dpkg-source",
            "xz-utils": "/usr/bin/xz", "libnbd-bin": "/usr/bin/nbdinfo"}


def log(msg):
    print(f"== {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def install_missing():
    missing = [pkg for pkg, path in PACKAGES.items() if not os.path.exists(path)]
    if not missing:
        return
    log(f"installing Debian packages: {' '.join(missing)}")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(sudo + ["apt-get", "update"], env=env)
    run(sudo + ["apt-get", "install", "-y", "--no-install-recommends"] + missing, env=env)


# ---- fetching the iotests of the installed qemu ---------------------------

def source_version():
    """(source package, version) of the installed qemu-utils."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${source:Package} ${source:Version}",
                          "qemu-utils"], check=True, capture_output=True, text=True).stdout
    name, version = out.split()
    return name, version


def deb_src_entries(etc="/etc/apt"):
    """The machine's enabled apt sources turned into deb-src entries:
    (file name, text) pairs for a private sources.list.d."""
    out = []
    for path in sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources"))):
        with open(path) as f:
            stanzas = f.read().split("\n\n")
        keep = []
        for stanza in stanzas:
            lines = stanza.strip().splitlines()
            types = [ln for ln in lines if ln.lower().startswith("types:")]
            enabled = not any(ln.lower().replace(" ", "") == "enabled:no" for ln in lines)
            if types and "deb" in types[0].split(":", 1)[1].split() and enabled:
                keep.append("\n".join("Types: deb-src" if ln in types else ln
                                      for ln in lines))
        if keep:
            out.append((os.path.basename(path), "\n\n".join(keep) + "\n"))
    lists = [os.path.join(etc, "sources.list")] + sorted(
        glob.glob(os.path.join(etc, "sources.list.d", "*.list")))
    for path in lists:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            src = [re.sub(r"^deb(\s)", r"deb-src\1", ln.strip()) for ln in f
                   if re.match(r"^deb\s", ln.strip())]
        if src:
            out.append((os.path.basename(path) if path.endswith(".list") else "sources.list",
                        "\n".join(src) + "\n"))
    return out


def fetch_iotests():
    """The tests/qemu-iotests directory of the installed qemu's source."""
    name, version = source_version()
    root = os.path.join(CACHE, f"{name}_{version.replace(':', '_')}")
    tree = os.path.join(root, "tree")
    iotests = os.path.join(tree, "tests", "qemu-iotests")
    if os.path.exists(os.path.join(root, "done")):
        return iotests
    log(f"fetching Debian source {name}={version} into {root}")
    shutil.rmtree(root, ignore_errors=True)
    apt = os.path.join(root, "apt")
    parts = os.path.join(apt, "sources.list.d")
    os.makedirs(os.path.join(apt, "lists", "partial"))
    os.makedirs(parts)
    for fname, text in deb_src_entries():
        with open(os.path.join(parts, fname), "w") as f:
            f.write(text)
    empty = os.path.join(apt, "empty.list")
    open(empty, "w").close()
    opts = ["-o", f"Dir::Etc::SourceList={empty}", "-o", f"Dir::Etc::SourceParts={parts}",
            "-o", f"Dir::State::Lists={apt}/lists", "-o", f"Dir::Cache={apt}/cache",
            "-o", "APT::Sandbox::User=root"]
    run(["apt-get", *opts, "update"], stdout=subprocess.DEVNULL)
    dl = os.path.join(root, "download")
    os.makedirs(dl)
    run(["apt-get", *opts, "source", "--download-only", f"{name}={version}"], cwd=dl,
        stdout=subprocess.DEVNULL)
    dsc, = glob.glob(os.path.join(dl, "*.dsc"))
    run(["dpkg-source", "--no-check", "-x", dsc, tree], stdout=subprocess.DEVNULL)
    # Keep what the iotests use: themselves, qemu's python package, scripts.
    for entry in os.listdir(tree):
        if entry not in ("tests", "python", "scripts"):
            path = os.path.join(tree, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    shutil.rmtree(dl)
    shutil.rmtree(apt)
    open(os.path.join(root, "done"), "w").close()
    return iotests


# ---- the stand-in -----------------------------------------------------------

def qemu_img_commands():
    """qemu-img's subcommands, from its own help."""
    out = subprocess.run([BIN["img"], "--help"], capture_output=True, text=True).stdout
    section = out.split("Command syntax:", 1)[1].split("Command parameters:", 1)[0]
    return sorted({m.group(1) for m in re.finditer(r"^\s+([a-z]+)\s", section, re.M)})


def qcow2fast_commands():
    sys.path.insert(0, REPO)
    from qcow2fast.cli import build_parser
    parser = build_parser()
    sub, = [a for a in parser._actions if a.choices and a.dest == "command"]
    return sorted(sub.choices)


WRAPPER = '''#!{python}
# qemu-img stand-in made by scripts/iotests.py: qemu-img's subcommands that
# qcow2fast has run qcow2fast (no fallback), the others the real qemu-img.
import os, sys

COMMANDS = {commands!r}


def command(argv):
    """qemu-img's subcommand: the first argument after its own options
    (getopt "+:hVT:")."""
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-T", "--trace"):
            i += 2
        elif a.startswith("-") and a != "-":
            i += 1
        else:
            return a
    return None


if command(sys.argv) in COMMANDS:
    sys.path.insert(0, {repo!r})
    from qcow2fast.cli import main
    sys.exit(main())
os.execv({real!r}, [{real!r}] + sys.argv[1:])
'''

QEMU_SHIM = '''#!/bin/sh
# Debian builds qemu-system without the qtest accelerator: tcg instead.
prev=
for a do
    shift
    if [ "$prev" = -accel ] && [ "$a" = qtest ]; then a=tcg; fi
    set -- "$@" "$a"
    prev=$a
done
exec {real} "$@"
'''


def make_bin(bindir, real):
    os.makedirs(bindir, exist_ok=True)
    shim = os.path.join(bindir, "qemu-system-x86_64")
    with open(shim, "w") as f:
        f.write(QEMU_SHIM.format(real=BIN["system"]))
    os.chmod(shim, 0o755)
    if real:
        return BIN["img"], shim, []
    theirs, ours = qemu_img_commands(), qcow2fast_commands()
    standing_in = [c for c in theirs if c in ours]
    wrapper = os.path.join(bindir, "qemu-img")
    with open(wrapper, "w") as f:
        f.write(WRAPPER.format(python=sys.executable, commands=standing_in, repo=REPO,
                               real=BIN["img"]))
    os.chmod(wrapper, 0o755)
    log(f"qcow2fast stands in for: {' '.join(standing_in)}; the real qemu-img for: "
        f"{' '.join(c for c in theirs if c not in ours) or '-h/-V only'}")
    return wrapper, shim, standing_in


# ---- the run -----------------------------------------------------------------

def read_list(path):
    """{test: reason} from a list file ('NAME  reason', '#' comments)."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                out[name] = reason.strip()
    return out


def kill_leftovers(workdir):
    """Daemons a failed test left running (qemu-nbd --fork, qemu-storage-
    daemon --daemonize: outside check's process group), by their use of
    this run's directory."""
    for pid, (_, argv) in _processes().items():
        if pid != os.getpid() and any(workdir + "/" in a for a in argv[1:]):
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def unmount_leftovers(test_dir):
    """FUSE exports a failed test left mounted under the run directory."""
    with open("/proc/mounts") as f:
        for line in f:
            point = line.split()[1]
            if point.startswith(test_dir + "/"):
                subprocess.run(["umount", "-l", point], check=False)


def _processes():
    """{pid: (parent pid, argv)} of the running processes."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry)] = (ppid, argv)
    return out


def _descendants(procs, root):
    tree, grown = {root}, True
    while grown:
        more = {p for p, (pp, _) in procs.items() if pp in tree} - tree
        grown = bool(more)
        tree |= more
    return tree


def watchdog(check_pid, iotests, timeout, stop):
    """Kill a test of this run (and what it started) running longer than
    ``timeout`` seconds: check then counts it failed.  Some VM tests wait
    for ever on a qemu-system without the qtest accelerator."""
    seen = {}
    prefix = os.path.realpath(iotests) + "/"
    while not stop.wait(5):
        procs = _processes()
        now = time.monotonic()
        mine = _descendants(procs, check_pid)
        for pid, (_, argv) in procs.items():
            if pid not in mine or procs[pid][0] in seen:     # not ours, or a subshell
                continue
            test = next((a[len(prefix):] for a in argv[:2] if a.startswith(prefix)), None)
            if not test or not re.fullmatch(r"[0-9]{3}|tests/[\w-]+", test):
                continue
            started = seen.setdefault(pid, now)
            if now - started > timeout:
                tree = _descendants(procs, pid)
                print(f"{test:<32} killed after {timeout} s", flush=True)
                for p in tree:
                    try:
                        os.kill(p, 9)
                    except OSError:
                        pass
                seen.pop(pid)


def run_check(iotests, img, shim, tests, jobs, workdir, logf, timeout):
    env = dict(os.environ, QEMU_PROG=shim, QEMU_IMG_PROG=img, QEMU_IO_PROG=BIN["io"],
               QEMU_NBD_PROG=BIN["nbd"], QSD_PROG=BIN["qsd"],
               TEST_DIR=os.path.join(workdir, "scratch"), SOCK_DIR=os.path.join(workdir, "s"))
    env.pop("PYTHONPATH", None)
    for d in (env["TEST_DIR"], env["SOCK_DIR"]):
        os.makedirs(d, exist_ok=True)
    cmd = [sys.executable, "./check", "-qcow2", "-tap", "-j", str(jobs), *tests]
    results = {}
    with open(logf, "w") as errs:
        proc = subprocess.Popen(cmd, cwd=iotests, env=env, stdout=subprocess.PIPE,
                                stderr=errs, text=True, start_new_session=True)
        stop = threading.Event()
        threading.Thread(target=watchdog, args=(proc.pid, iotests, timeout, stop),
                         daemon=True).start()
        try:
            for line in proc.stdout:
                m = re.match(r"^(not ok|ok) qcow2 (\S+)( # SKIP)?", line)
                if m:
                    status = "skip" if m.group(3) else "pass" if m.group(1) == "ok" else "fail"
                    results[m.group(2)] = status
                    print(f"{m.group(2):<32} {status}", flush=True)
            proc.wait()
        finally:
            stop.set()
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            kill_leftovers(workdir)
            unmount_leftovers(env["TEST_DIR"])
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", nargs="*", help="tests to run (default: the listed ones)")
    ap.add_argument("--real", action="store_true", help="the real qemu-img, not qcow2fast")
    ap.add_argument("--record", action="store_true",
                    help="with --real: run every test, rewrite " + PASS_LIST)
    ap.add_argument("--all", action="store_true", help="every test, not only the listed")
    ap.add_argument("-j", type=int, default=os.cpu_count() or 1, help="parallel jobs")
    ap.add_argument("--timeout", type=int, default=900,
                    help="seconds after which a test is killed (and fails)")
    ap.add_argument("--retries", type=int, default=1,
                    help="times a failed listed test is run again, alone (default 1)")
    ap.add_argument("--workdir", help="run directory (default: a new temporary one)")
    ap.add_argument("--log", help="where the diffs of failing tests go")
    args = ap.parse_args(argv)
    if args.record and not args.real:
        ap.error("--record needs --real")

    # Stopped from outside: still stop check's process group (finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    install_missing()
    iotests = fetch_iotests()
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="qcow2fast-iotests-"))
    img, shim, _ = make_bin(os.path.join(workdir, "bin"), args.real)
    listed, xfail = read_list(PASS_LIST), read_list(XFAIL_LIST)
    tests = args.tests or ([] if args.record or args.all else sorted(listed))
    logf = args.log or os.path.join(workdir, "iotests.log")
    log(f"./check -qcow2 in {iotests}, QEMU_IMG_PROG={img}, {len(tests) or 'all'} tests")
    start = time.monotonic()
    results = run_check(iotests, img, shim, tests, args.j, workdir, logf, args.timeout)
    flaky, diffs = [], logf
    for attempt in range(args.retries):
        # A test of the list that failed, run again alone: the VM tests wait
        # on events with timeouts that a loaded machine misses.  One that
        # passes then counts as passed and is named below.
        again = sorted(t for t, st in results.items() if st == "fail" and t in listed
                       and t not in xfail)
        if not again or args.real:
            break
        log(f"retry {attempt + 1}: {' '.join(again)}, one at a time")
        diffs = f"{logf}.retry{attempt + 1}"
        retried = run_check(iotests, img, shim, again, 1, workdir, diffs, args.timeout)
        for t, st in retried.items():
            if st == "pass":
                flaky.append(t)
                results[t] = st
    took = time.monotonic() - start

    passed = sorted(t for t, s in results.items() if s == "pass")
    if args.record:
        with open(PASS_LIST, "w") as f:
            f.write("# Tests that pass with the real qemu-img on this kind of machine\n"
                    "# (python3 scripts/iotests.py --real --record).\n")
            f.write("".join(f"{t}\n" for t in passed))
        log(f"recorded {len(passed)} tests in {PASS_LIST}")
    counts = {s: sum(1 for v in results.values() if v == s) for s in ("pass", "fail", "skip")}
    print(f"\n{'real qemu-img' if args.real else 'qcow2fast standing in'}: "
          f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} not run "
          f"({len(results)} tests, {took:.0f} s); diffs in {logf}")
    if args.real:
        return 0 if not args.tests or counts["fail"] == 0 else 1
    wanted = [t for t in (args.tests or sorted(listed)) if t in listed]
    regressions = [t for t in wanted if results.get(t) != "pass" and t not in xfail]
    expected = [t for t in wanted if results.get(t) != "pass" and t in xfail]
    fixed = [t for t in wanted if results.get(t) == "pass" and t in xfail]
    for t in expected:
        print(f"expected failure {t}: {xfail[t]}")
    for t in sorted(flaky):
        print(f"FLAKY {t}: failed in the parallel run, passed when run again alone")
    for t in fixed:
        print(f"XPASS {t}: passes now, remove it from {os.path.relpath(XFAIL_LIST, REPO)}")
    if regressions:             # their diffs, for the CI log
        with open(diffs, errors="replace") as f:
            print("".join(f.readlines()[:2000]))
    for t in regressions:
        print(f"REGRESSION {t}: {results.get(t, 'did not run')}")
    ok = len(wanted) - len(regressions) - len(expected)
    print(f"of the {len(wanted)} tests passing with the real qemu-img: {ok} pass with "
          f"qcow2fast, {len(expected)} expected failures, {len(regressions)} regressions")
    print(f"iotests: {ok} passed, {len(regressions)} failed")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
