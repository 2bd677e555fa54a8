"""An OpenSSH server for the ssh:// tests (host/remote_ssh.py): sshd on
127.0.0.1 at a free port, with a host key of its own and one authorised
client key, held by an ssh-agent of its own.  Clients -- qcow2fast and
qemu's ssh driver alike -- authenticate through that agent when run in
``server.env`` (SSH_AUTH_SOCK); nothing in the user's ~/.ssh is read or
written."""

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HAVE_SSHD = os.access(SSHD, os.X_OK) and shutil.which("ssh-agent") is not None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, what, proc, seconds=10):
    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start in {seconds} s")
        time.sleep(0.05)


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


class SshServer:
    """``with SshServer(root) as server``: files under ``server.root`` are
    at ``server.url(NAME)`` (host key checked by its SHA-256 fingerprint)."""

    def __init__(self, root):
        self.dir = root / "sshd"
        self.root = root / "files"
        self.dir.mkdir()
        self.root.mkdir()
        self.port = _free_port()
        self.user = subprocess.run(["id", "-un"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        self._procs = []

    def _keygen(self, name):
        path = self.dir / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(path)], check=True)
        kind, blob = (path.with_suffix(".pub")).read_text().split()[:2]
        return path, kind, blob

    def __enter__(self):
        host_key, kind, blob = self._keygen("host_key")
        client_key, _, _ = self._keygen("client_key")
        self.host_key_line = f"[127.0.0.1]:{self.port} {kind} {blob}\n"
        self.sha256 = hashlib.sha256(base64.b64decode(blob)).hexdigest()
        (self.dir / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
        config = self.dir / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'pid'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # sshd's privsep directory
        try:
            sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self._procs.append(sshd)
            _wait(lambda: _listening(self.port), "sshd", sshd)
            sock = str(self.dir / "agent.sock")
            agent = subprocess.Popen(["ssh-agent", "-D", "-a", sock],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self._procs.append(agent)
            _wait(lambda: os.path.exists(sock), "ssh-agent", agent)
            self.env = {**os.environ, "SSH_AUTH_SOCK": sock}
            subprocess.run(["ssh-add", "-q", str(client_key)], env=self.env, check=True,
                           capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for proc in self._procs:
            proc.terminate()
            proc.wait(10)
            proc.stderr.close()

    def url(self, name, check=None):
        """The ssh:// name of ``root/name``; ``check``: host_key_check
        (default: the server's SHA-256 fingerprint; "yes": known_hosts)."""
        check = f"sha256:{self.sha256}" if check is None else check
        tail = "" if check == "yes" else f"?host_key_check={check}"
        return f"ssh://{self.user}@127.0.0.1:{self.port}{self.root / name}{tail}"
