"""ssh:// images (host/remote_ssh.py) against a real OpenSSH server, with
qemu's ssh driver as the oracle: the same names, the same output, the same
bytes, the same refusals."""

import json
import subprocess
import sys

import pytest

import qcow2fast
from qcow2fast.errors import Qcow2Error
from qcow2fast.host import remote_ssh
from tests.helpers.qemu_util import QEMU_IMG, qemu_img, qemu_io, require_qemu

pytestmark = pytest.mark.qemu


def _tool(tool, sshd, *args, env=None):
    cmd = [QEMU_IMG] if tool == "qemu-img" else [sys.executable, "-m", "qcow2fast"]
    p = subprocess.run(cmd + [str(a) for a in args], env=env or sshd.env, capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr.replace(f"{tool}: ", "PROG: ")


def _both(sshd, *args, env=None):
    """(qemu-img's, qcow2fast's) (status, stdout, stderr), program names blanked."""
    require_qemu()
    return _tool("qemu-img", sshd, *args, env=env), _tool("qcow2fast", sshd, *args, env=env)


@pytest.fixture(scope="module")
def images(sshd):
    """base.qcow2 (data, zeros, a compressed cluster), top.qcow2 over it
    (backing named relatively), and a raw file, on the server."""
    require_qemu()
    base, top = sshd.root / "base.qcow2", sshd.root / "top.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", base, "16M"], check=True)
    qemu_io(base, "write -P 0x5a 64k 1M", "write -z 2M 192k", "write -c -P 0x33 4M 64k",
            "write -P 0x11 7340000 5000")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                    top], check=True)
    qemu_io(top, "write -P 0x77 1M 128k")
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", base, sshd.root / "disk.raw"], check=True)
    return base, top


@pytest.mark.parametrize("output", ["human", "json"])
@pytest.mark.parametrize("name", ["base.qcow2", "disk.raw", "top.qcow2"])
def test_info_as_qemu(sshd, images, name, output):
    qemu, ours = _both(sshd, "info", f"--output={output}", sshd.url(name))
    assert qemu[0] == 0, qemu
    assert ours == qemu
    if name == "top.qcow2" and output == "human":     # (host_key_check: no directory)
        assert "backing file: base.qcow2 (cannot determine actual path)" in ours[1]


def test_convert_equals_qemu_and_local(sshd, images, tmp_path):
    base, _ = images
    for tool, out in (("qemu-img", tmp_path / "q.raw"), ("qcow2fast", tmp_path / "o.raw")):
        status, _, err = _tool(tool, sshd, "convert", "-O", "raw", sshd.url("base.qcow2"), out)
        assert status == 0, err
    local = tmp_path / "local.raw"
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", base, local], check=True)
    assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "q.raw").read_bytes() \
        == local.read_bytes()


def test_api_reads_bit_exact(sshd, images, monkeypatch):
    base, _ = images
    monkeypatch.setenv("SSH_AUTH_SOCK", sshd.env["SSH_AUTH_SOCK"])
    with qcow2fast.open(sshd.url("base.qcow2")) as remote, qcow2fast.open(base) as local:
        assert remote.size == local.size
        for off, n in ((0, remote.size), (7340000 - 3, 5006), (4 << 20, 65536)):
            assert remote.read(off, n) == local.read(off, n)
        assert list(remote.block_status(0, remote.size)) == \
            list(local.block_status(0, local.size))


def test_relative_backing_through_known_hosts(sshd, images, tmp_path):
    """Without host_key_check the image has a directory: its backing file
    is found beside it; the server's key is checked against known_hosts."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(sshd.host_key_line)
    env = {**sshd.env, "HOME": str(home)}
    status, _, err = _tool("qcow2fast", sshd, "convert", "-O", "raw", sshd.url("top.qcow2", "yes"),
                           tmp_path / "o.raw", env=env)
    assert status == 0, err
    subprocess.run([QEMU_IMG, "convert", "-O", "raw", images[1], tmp_path / "local.raw"],
                   check=True)
    assert (tmp_path / "o.raw").read_bytes() == (tmp_path / "local.raw").read_bytes()
    status, out, _ = _tool("qcow2fast", sshd, "info", sshd.url("top.qcow2", "yes"), env=env)
    assert f"(actual path: ssh://{sshd.user}@127.0.0.1:{sshd.port}{sshd.root}/base.qcow2)" in out


def test_node_names_as_qemu(sshd, images):
    """json: and --image-opts nodes open and name themselves as qemu's."""
    path = str(sshd.root / "base.qcow2")
    node = {"driver": "ssh", "server": {"host": "127.0.0.1", "port": str(sshd.port)},
            "path": path, "host-key-check": {"mode": "hash", "type": "sha256",
                                             "hash": sshd.sha256}}
    legacy = f"host=127.0.0.1,port={sshd.port},path={path},host_key_check=sha256:{sshd.sha256}"
    for args in (["json:" + json.dumps(node)],
                 ["json:" + json.dumps({"driver": "qcow2", "file": node})],
                 ["--image-opts", "driver=ssh," + legacy],
                 ["--image-opts", "driver=qcow2," + ",".join("file." + kv for kv in
                                                             ("driver=ssh," + legacy).split(","))]):
        qemu, ours = _both(sshd, "info", *args)
        assert qemu[0] == 0, (args, qemu)
        assert ours == qemu, args


@pytest.mark.parametrize("name", [
    'json:{"driver": "ssh", "host": "localhost", "port": "0", "path": "/foo"}',
    'json:{"driver": "ssh", "host": "localhost", "port": 0.42, "path": "/foo"}',
    'json:{"driver": "ssh", "path": "/foo"}',
    'json:{"driver": "ssh", "server": {"host": "localhost"}, "path": "/foo"}',
    'json:{"driver": "ssh", "host": "localhost"}',
    'json:{"driver": "ssh", "port": 22, "path": "/x"}',
    'json:{"driver": "ssh", "server": {"host": "localhost", "port": "22x"}, "path": "/x"}',
    'json:{"driver": "ssh", "host": "localhost", "path": "/x", "foo": 1}',
    'json:{"driver": "ssh", "host": "localhost", "port": 1, "path": "/x", '
    '"host-key-check": {"mode": "hash"}}',
    'ssh://localhost:abc/foo', 'ssh://localhost/foo?host_key_check=maybe', 'ssh:///foo',
    'ssh://localhost', 'ssh://u@localhost:1/x?host_key_check=no&a=b',
    # ports and hosts as qemu reads them: a number (base 0) for the legacy
    # port, then decimal for server.port, then a numeric service to resolve
    'json:{"driver": "ssh", "host": "127.0.0.1", "port": 1180591620717411303424, "path": "/x"}',
    'json:{"driver": "ssh", "host": "127.0.0.1", "port": -1, "path": "/x"}',
    'json:{"driver": "ssh", "host": "127.0.0.1", "port": "0x0", "path": "/x"}',
    'json:{"driver": "ssh", "host": "127.0.0.1", "port": "-4294967296", "path": "/x"}',
    'json:{"driver": "ssh", "host": "", "path": "/x"}',
    'nbd://127.0.0.1:99999/', 'ssh://127.0.0.1:99999/x',
])
def test_bad_names_refused_as_qemu(sshd, name):
    qemu, ours = _both(sshd, "info", name)
    assert qemu[0] == 1 and qemu[2].startswith("PROG: Could not open"), qemu
    assert ours == qemu


def test_server_refusals_as_qemu(sshd, images):
    """A wrong fingerprint and a missing file: qemu's words."""
    for url in (sshd.url("base.qcow2", "sha256:00ff"), sshd.url("missing.qcow2"),
                sshd.url("base.qcow2", "md5:12:34")):
        qemu, ours = _both(sshd, "info", url)
        assert qemu[0] == 1, qemu
        assert ours == qemu


def test_known_hosts_and_authentication_errors(sshd, images, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    env = {**sshd.env, "HOME": str(home)}
    url = sshd.url("base.qcow2", "yes")

    def error(env):
        status, _, err = _tool("qcow2fast", sshd, "info", url, env=env)
        assert status == 1
        return err.strip().rsplit("': ", 1)[1]

    assert error(env) == "known_hosts file not found"
    known = home / ".ssh" / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port + 1} " + sshd.host_key_line.split(" ", 1)[1])
    assert error(env) == "no host key was found in known_hosts"
    other = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            tmp_path / "other"], check=True)
    assert other.returncode == 0
    known.write_text(f"[127.0.0.1]:{sshd.port} " + (tmp_path / "other.pub").read_text())
    assert error(env).startswith("host key (ssh-ed25519 key with fingerprint SHA256:")
    assert error(env).endswith("does not match the one in known_hosts; this may be a "
                               "possible attack")
    known.write_text(sshd.host_key_line)
    no_agent = {k: v for k, v in env.items() if k != "SSH_AUTH_SOCK"}
    assert error(no_agent) == ("failed to authenticate using publickey authentication and the "
                               "identities held by your ssh-agent")


def test_writes_as_qemu(sshd, monkeypatch):
    """resize, snapshot -c and a guest write through ssh:// by each tool,
    on two copies of one image: the results compare equal and check clean."""
    require_qemu()
    for name in ("q.qcow2", "o.qcow2"):
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", sshd.root / name, "8M"],
                       check=True)
        qemu_io(sshd.root / name, "write -P 0x11 0 1M")
    for tool, name in (("qemu-img", "q.qcow2"), ("qcow2fast", "o.qcow2")):
        for args in (["resize", sshd.url(name), "24M"], ["snapshot", "-c", "s1", sshd.url(name)]):
            status, _, err = _tool(tool, sshd, *args)
            assert status == 0, (tool, args, err)
    subprocess.run(["qemu-io", "-c", "write -P 0x77 20M 1M", sshd.url("q.qcow2")],
                   env=sshd.env, check=True, capture_output=True)
    monkeypatch.setenv("SSH_AUTH_SOCK", sshd.env["SSH_AUTH_SOCK"])
    with qcow2fast.open(sshd.url("o.qcow2"), "r+") as img:
        img.write(20 << 20, b"\x77" * (1 << 20))
        img.flush()
    q, o = sshd.root / "q.qcow2", sshd.root / "o.qcow2"
    subprocess.run([QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", q, o], check=True,
                   capture_output=True)
    subprocess.run([QEMU_IMG, "check", o], check=True, capture_output=True)
    info = [json.loads(subprocess.run([QEMU_IMG, "info", "--output=json", p], check=True,
                                      capture_output=True).stdout) for p in (q, o)]
    assert [i["virtual-size"] for i in info] == [24 << 20] * 2
    assert [[s["name"] for s in i["snapshots"]] for i in info] == [["s1"]] * 2


def test_commit_as_qemu(sshd, tmp_path):
    """commit of an ssh:// top into its ssh:// backing file (found beside
    it: known_hosts mode) leaves both as qemu-img commit leaves local copies."""
    require_qemu()
    base, top = sshd.root / "cbase.qcow2", sshd.root / "ctop.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", base, "8M"], check=True)
    qemu_io(base, "write -P 0x11 0 2M")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "cbase.qcow2", "-F", "qcow2",
                    top], check=True)
    qemu_io(top, "write -P 0x22 1M 2M", "write -z 5M 64k")
    local = tmp_path / "local"
    local.mkdir()
    for p in (base, top):
        (local / p.name).write_bytes(p.read_bytes())
    subprocess.run([QEMU_IMG, "commit", local / "ctop.qcow2"], check=True, capture_output=True)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(sshd.host_key_line)
    status, out, err = _tool("qcow2fast", sshd, "commit", sshd.url("ctop.qcow2", "yes"),
                             env={**sshd.env, "HOME": str(home)})
    assert (status, out) == (0, "Image committed.\n"), err
    for name in ("cbase.qcow2", "ctop.qcow2"):
        subprocess.run([QEMU_IMG, "check", sshd.root / name], check=True, capture_output=True)
        maps = [subprocess.run([QEMU_IMG, "map", "--output=json", "-f", "qcow2", d / name],
                               check=True, capture_output=True).stdout for d in (sshd.root, local)]
        assert maps[0] == maps[1], name
    subprocess.run([QEMU_IMG, "compare", base, local / "cbase.qcow2"], check=True,
                   capture_output=True)


@pytest.mark.parametrize("fmt,options", [("qcow2", []), ("raw", []),
                                         ("qcow2", ["-o", "cluster_size=4k,preallocation=metadata"]),
                                         ("qcow2", ["-o", "preallocation=full"]),
                                         ("qcow2", ["-o", "preallocation=falloc"]),
                                         ("raw", ["-o", "preallocation=full"])])
def test_create_over_ssh_as_qemu(sshd, fmt, options):
    """create on the server, as qemu-img's ssh driver does (the file made, or
    an existing one emptied, there): the same "Formatting" line and status,
    and an image qemu reads equal to what qemu-img made over ssh (check
    clean, compare equal, the same size and map)."""
    made = {}
    for tool, name in (("qemu-img", "q.img"), ("qcow2fast", "o.img")):
        (sshd.root / name).write_bytes(b"x" * 100000)       # emptied first
        status, out, err = _tool(tool, sshd, "create", "-f", fmt, *options, sshd.url(name), "5M")
        made[tool] = (status, out.replace(name, "NAME"), err.replace(name, "NAME"),
                      sshd.root / name)
    assert made["qcow2fast"][:3] == made["qemu-img"][:3]
    q, o = made["qemu-img"][3], made["qcow2fast"][3]
    if made["qemu-img"][0]:         # qemu's ssh driver preallocates nothing: refused
        assert "Unsupported preallocation mode" in made["qemu-img"][2] or \
            "Invalid parameter 'preallocation'" in made["qemu-img"][2]
        return
    assert q.stat().st_size == o.stat().st_size
    qemu_img("compare", "-f", fmt, "-F", fmt, q, o)
    if fmt == "qcow2":
        qemu_img("check", o)
        assert qemu_img("map", "--output=json", o).stdout_text == \
            qemu_img("map", "--output=json", q).stdout_text
    else:
        assert o.read_bytes() == bytes(5 << 20)


def test_create_over_ssh_with_a_backing_file(sshd, images, tmp_path):
    """create -b over ssh takes the backing file's size through the server,
    as qemu-img (the backing file named by its own ssh:// URL: qemu's libssh
    reads known_hosts from the real home, so no relative name here)."""
    for tool in ("qemu-img", "qcow2fast"):
        status, _, err = _tool(tool, sshd, "create", "-q", "-f", "qcow2", "-b",
                               sshd.url("base.qcow2"), "-F", "qcow2",
                               sshd.url(f"over-{tool}.qcow2"))
        assert status == 0, err
    for tool in ("qemu-img", "qcow2fast"):
        info = json.loads(_tool("qemu-img", sshd, "info", "--output=json",
                                sshd.root / f"over-{tool}.qcow2")[1])
        assert info["backing-filename"] == sshd.url("base.qcow2")
        assert info["virtual-size"] == json.loads(
            _tool("qemu-img", sshd, "info", "--output=json", sshd.root / "base.qcow2")[1]
        )["virtual-size"]
    assert _tool("qemu-img", sshd, "check", sshd.root / "over-qcow2fast.qcow2")[0] == 0


def _damage(path):
    """A leak (L2 entry 0 cleared: its cluster keeps refcount 1) and a
    corruption (the refcount of L2 entry 1's cluster set to 0)."""
    import struct
    with open(path, "r+b") as f:
        head = f.read(104)
        cluster_bits, = struct.unpack_from(">I", head, 20)
        l1_offset, reftable_offset = struct.unpack_from(">Q", head, 40)[0], \
            struct.unpack_from(">Q", head, 48)[0]
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
        f.seek(l2)
        entries = struct.unpack(">QQ", f.read(16))
        f.seek(l2)
        f.write(bytes(8))
        data = (entries[1] & 0x00fffffffffffe00) >> cluster_bits
        f.seek(reftable_offset)
        block = struct.unpack(">Q", f.read(8))[0]      # (16-bit refcounts: one block covers it)
        f.seek(block + 2 * data)
        f.write(bytes(2))


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_check_repair_over_ssh_as_qemu(sshd, mode):
    """check -r of an ssh:// image repairs it in place, as qemu-img's ssh
    driver does: the same output and status, guest data equal, the same
    state after (-r all: clean; -r leaks stops at the corruption, as in
    qemu)."""
    require_qemu()
    for name in ("q.qcow2", "o.qcow2"):
        path = sshd.root / name
        subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", path, "4M"], check=True)
        qemu_io(path, "write -P 0x5a 0 128k", "write -P 0x11 1M 64k")
        _damage(path)
    q = _tool("qemu-img", sshd, "check", "-r", mode, sshd.url("q.qcow2"))
    o = _tool("qcow2fast", sshd, "check", "-r", mode, sshd.url("o.qcow2"))
    assert o == q
    assert "Leaked cluster 5" in q[2] and "ERROR cluster 6 refcount=0" in q[2]
    after = [subprocess.run([QEMU_IMG, "check", sshd.root / name], capture_output=True)
             for name in ("q.qcow2", "o.qcow2")]
    assert after[0].stdout == after[1].stdout
    # -r all: repaired; -r leaks: qemu stops at the corruption (a rebuild)
    assert [a.returncode for a in after] == [0, 0] if mode == "all" else [2, 2]
    subprocess.run([QEMU_IMG, "compare", "-f", "qcow2", "-F", "qcow2", sshd.root / "q.qcow2",
                    sshd.root / "o.qcow2"], check=True, capture_output=True)


@pytest.mark.parametrize("args", [["-O", "qcow2"], ["-O", "raw"], ["-O", "qcow2", "-c"],
                                  ["-O", "qcow2", "-o", "extended_l2=on"],
                                  ["-O", "qcow2", "-o", "preallocation=metadata"]])
def test_convert_into_ssh_as_qemu(sshd, images, args):
    """convert into an ssh:// file (made or emptied on the server): a new
    qcow2 image written in order as a stream, raw at random, the rest
    through the image; equal to qemu-img's conversion over ssh, clean;
    then -n into it again, over what it holds."""
    fmt = args[1]
    for tool, name in (("qemu-img", "cq.img"), ("qcow2fast", "co.img")):
        (sshd.root / name).write_bytes(b"x" * 100000)
        status, out, err = _tool(tool, sshd, "convert", *args, images[1], sshd.url(name))
        assert (status, out, err) == (0, "", ""), err
    q, o = sshd.root / "cq.img", sshd.root / "co.img"
    qemu_img("compare", "-f", fmt, "-F", fmt, q, o)
    qemu_img("compare", "-F", fmt, images[1], o)
    if fmt == "qcow2":
        qemu_img("check", o)
    else:
        assert q.stat().st_size == o.stat().st_size
    status, _, err = _tool("qcow2fast", sshd, "convert", "-n", "-O", fmt, images[0],
                           sshd.url("co.img"))
    assert status == 0, err
    qemu_img("compare", "-F", fmt, images[0], o)


def test_opened_read_only_refuses_writes(sshd, images, monkeypatch):
    monkeypatch.setenv("SSH_AUTH_SOCK", sshd.env["SSH_AUTH_SOCK"])
    before = images[0].read_bytes()
    with qcow2fast.open(sshd.url("base.qcow2")) as img:
        with pytest.raises((Qcow2Error, OSError)):
            img.write(0, b"x" * 512)
    assert images[0].read_bytes() == before


def test_url_of_builds_qemu_names():
    assert remote_ssh.url_of({"driver": "ssh", "host": "h", "path": "/p"}) == "ssh://h:22/p"
    assert remote_ssh.url_of({"server.host": "::1", "server.port": "2222", "path": "/a b",
                              "user": "u", "host-key-check.mode": "none"}) == \
        "ssh://u@[::1]:2222/a%20b?host_key_check=no"
    t = remote_ssh.parse_url("ssh://u@[::1]:2222/a%20b?host_key_check=no")
    assert (t.user, t.host, t.port, t.path, t.check) == ("u", "::1", 2222, "/a b", "no")
    assert remote_ssh.node_name({"server.host": "h", "server.port": "22", "path": "/p",
                                 "user": "u", "host-key-check.mode": "none"}) == "ssh://u@h:22/p"


@pytest.mark.parametrize("driver", ["ssh", "nbd"])
def test_port_past_65535_is_refused(sshd, driver):
    """qemu connects to such a port's low 16 bits; qcow2fast says what is wrong."""
    node = {"driver": driver, "server": {"host": "127.0.0.1", "port": "99999"}}
    if driver == "ssh":
        node["path"] = "/x"
    else:
        node["server"]["type"] = "inet"
    status, out, err = _tool("qcow2fast", sshd, "info", "json:" + json.dumps(node))
    assert (status, out) == (1, "")
    assert err.endswith("Failed to connect to '127.0.0.1:99999': the port is not in "
                        "0..65535\n"), err


def test_random_overlapping_reads(sshd, monkeypatch):
    """Reads of any length at any offset, ranges read before among them,
    return the file's bytes, and return (paramiko's pipelined readv, used
    before, now and then waited forever on such a sequence: a race, seen
    once in two runs of 300 reads, not on every run)."""
    import random
    import threading
    data = random.Random(7).randbytes((8 << 20) + 5)
    (sshd.root / "random.bin").write_bytes(data)
    monkeypatch.setenv("SSH_AUTH_SOCK", sshd.env["SSH_AUTH_SOCK"])
    f = remote_ssh.SftpFile(sshd.url("random.bin"), 30)
    rng, bad, done = random.Random(1), [], threading.Event()

    def reads():
        try:
            for _ in range(120):
                a = rng.randrange(len(data))
                b = min(len(data), a + rng.choice((1, 4096, 65536, 300000, 4 << 20)))
                if f.fetch(a, b) != data[a:b]:
                    bad.append((a, b))
        finally:
            done.set()
    try:
        threading.Thread(target=reads, daemon=True).start()
        assert done.wait(120), "a read never returned"
        assert not bad
        assert f.size == len(data)
    finally:
        f.close()


@pytest.mark.parametrize("limits", [True, False])
def test_request_size_from_the_servers_limits(sshd, monkeypatch, limits):
    """OpenSSH states its read and write limits (limits@openssh.com): one
    request then carries up to them (255 KiB); a server without the
    extension gets paramiko's 32 KiB.  Writes and reads of unaligned
    lengths across those sizes land byte for byte either way."""
    import random
    from paramiko import SFTPClient
    if not limits:          # as a server that does not know the extension answers
        real = SFTPClient._request

        def request(self, t, *args):
            if args and args[0] == "limits@openssh.com":
                raise OSError("Operation unsupported")
            return real(self, t, *args)
        monkeypatch.setattr(SFTPClient, "_request", request)
    monkeypatch.setenv("SSH_AUTH_SOCK", sshd.env["SSH_AUTH_SOCK"])
    data = random.Random(3).randbytes(3 << 20)
    f = remote_ssh.SftpFile(sshd.url("limits.bin"), 30, create=True)
    try:
        size = f._handle().MAX_REQUEST_SIZE
        assert size == (261120 if limits else remote_ssh.REQUEST_SIZE)
        for off, n in ((0, 1 << 20), (1 << 20, size + 1), ((1 << 20) + size + 1, 5),
                       ((1 << 20) + size + 6, len(data))):
            f.write(data[off:off + n], off)
        f.fsync()
        assert (sshd.root / "limits.bin").read_bytes() == data
        for a, b in ((0, len(data)), (7, size + 9), (size - 1, 2 * size + 1)):
            assert f.fetch(a, b) == data[a:b]
    finally:
        f.close()
