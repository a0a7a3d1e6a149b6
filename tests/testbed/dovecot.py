"""Run Dovecot from Debian packages as a child process, for integration tests.

State diagram::

    created --start()--> running --stop()--> stopped
                           |  ^
                  restart()|  |(same ports, same mail)
                           +--+

One instance per test session (start ≈ 40–80 ms, stop ≈ 1.1 s: the master
waits for its children). Everything listens on 127.0.0.1 only. It accepts
XOAUTH2/OAUTHBEARER with HS256 JWTs from :class:`tests.testbed.tokens.TokenMinter`
(validated locally by Dovecot), and PLAIN/LOGIN against a passwd-file.
Must not start a system daemon or daemonize (a daemonized master killed from
here becomes a zombie that blocks the next start, testbed.md §1.1).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from imapclient import IMAPClient  # type: ignore[import-untyped]

from tests.testbed import dovecot_config as cfg
from tests.testbed.netutil import free_ports, make_self_signed_cert
from tests.testbed.tokens import TokenKeys

#: Seconds to wait for the ``* OK`` greeting after spawning the master.
START_TIMEOUT_SECONDS = 10.0
#: Seconds to wait for the master to exit after SIGTERM.
STOP_TIMEOUT_SECONDS = 10.0
#: Attempts with fresh ports when a port was taken between choosing and binding.
START_ATTEMPTS = 5
_EX_NOUSER = 68  # doveadm's exit code for "no users kicked" (sysexits.h)
_APPENDUID = re.compile(rb"APPENDUID \d+ (\d+)")


class DovecotError(RuntimeError):
    """Dovecot is not installed, did not start, or a helper command failed."""


class Dovecot:
    """One Dovecot instance in a private temporary directory.

    Attributes:
        root: the instance directory (config, certs, keys, mail, log).
        keys: signs the tokens this instance accepts; retiring a user's kid
            reloads Dovecot's auth process (it caches keys).
        ports: set once started; kept across :meth:`restart`.
        ca_file: the self-signed certificate (CN/SAN localhost, 127.0.0.1);
            clients pass it as ``cafile`` to trust the TLS ports.
    """

    host = "127.0.0.1"

    def __init__(
        self, keys: TokenKeys, *, root: Path | None = None, extra_config: str = ""
    ) -> None:
        """Prepare (not start) an instance; ``root`` defaults to a new temp dir.

        Args:
            keys: signs the tokens this instance accepts.
            root: the instance directory; a new temp dir when None.
            extra_config: appended to the rendered ``dovecot.conf``; a later
                ``service imap { … }`` block overrides single settings of the
                earlier one (used by bench/bench_imap.py for 2,000 sessions).
                Empty (the tests' default): the config is unchanged.
        """
        self.keys = keys
        self.extra_config = extra_config
        keys.on_retire(self.reload_auth)
        self.root = root or Path(tempfile.mkdtemp(prefix="mailgate-dovecot-"))
        self.name = f"tb-{uuid.uuid4().hex[:8]}"
        self.ports: cfg.DovecotPorts | None = None
        self.ca_file = self.root / "cert.pem"
        self._proc: subprocess.Popen[bytes] | None = None
        self._layouts: dict[str, str] = {}

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Write the config and start the master in the foreground (``-F``).

        Chooses free loopback ports on the first start, retrying with new
        ones when a bind fails. Returns once the plain IMAP port greets ``* OK``.

        Raises:
            DovecotError: no ``dovecot`` binary, or it exited or stayed silent
                for START_TIMEOUT_SECONDS; the message quotes its log.
        """
        if shutil.which("dovecot") is None:
            raise DovecotError(
                "dovecot not installed: apt-get install -y dovecot-imapd dovecot-lmtpd "
                "(see docs/testbed.md)"
            )
        if self.ports is None:
            self._prepare_files()
        for _attempt in range(START_ATTEMPTS):
            if self.ports is None or _attempt > 0:
                imap, imaps, lmtp = free_ports(3)
                self.ports = cfg.DovecotPorts(imap=imap, imaps=imaps, lmtp=lmtp)
            (self.root / "dovecot.conf").write_text(
                cfg.render_config(self.root, self.ports, self.name) + self.extra_config
            )
            if self._spawn_and_wait():
                return
        raise DovecotError(f"dovecot did not start; log:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM the master and wait for it (≈ 1.1 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def reload_auth(self) -> None:
        """Reload the config (SIGHUP) and wait until the old auth process is gone.

        Dovecot's oauth2 passdb caches validation keys for the life of its
        auth process; a reload replaces it (≈ 15 ms), so a retired kid fails
        on the next login. No-op when not running.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        old = _children(proc.pid, "auth")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while old & _children(proc.pid, "auth"):
            if time.monotonic() > deadline:
                raise DovecotError("auth process did not restart after SIGHUP")
            time.sleep(0.002)

    def restart(self) -> None:
        """Stop, then start again on the same ports with the same users and mail."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop and delete the instance directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _prepare_files(self) -> None:
        uid, gid = cfg.mail_owner()
        self.root.chmod(0o755)
        for sub in ("run", "state", "mail", "passwd.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chown(self.root / "mail", uid, gid)
        (self.root / "oauth2.conf.ext").write_text(cfg.render_oauth2_ext(self.keys.key_dir))
        make_self_signed_cert(self.root / "cert.pem", self.root / "key.pem")

    def _spawn_and_wait(self) -> bool:
        assert self.ports is not None
        log = self.root / "dovecot.log"
        log_start = log.stat().st_size if log.exists() else 0
        with open(self.root / "stderr.log", "ab") as stderr:  # the child keeps its own fd
            self._proc = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.root / "dovecot.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log.read_bytes()[log_start:] if log.exists() else b""
                self._proc = None
                if b"Address already in use" in tail:
                    return False
                raise DovecotError(f"dovecot exited; log:\n{self.log_text()[-3000:]}")
            if _greets(self.host, self.ports.imap):
                return True
            time.sleep(0.003)
        self.stop()
        raise DovecotError(f"no IMAP greeting in {START_TIMEOUT_SECONDS} s")

    # ------------------------------------------------------------- users

    def add_user(self, address: str, password: str | None = None) -> None:
        """Add (or replace) a mailbox user: its own passwd-file, passdb and userdb.

        Users without a password get a random one: they can log in only with
        XOAUTH2/OAUTHBEARER tokens (like Gmail/Outlook accounts), while the
        testbed's own helpers still use tokens too.

        Args:
            address: the login name, lower-case addr-spec (``auth_username_format = %Lu``).
            password: PLAIN/LOGIN password for a generic IMAP mailbox, or None.
        """
        secret = password if password is not None else uuid.uuid4().hex
        if "/" in address or ":" in address or ":" in secret or "\n" in address + secret:
            raise ValueError("':' and newlines cannot appear in a passwd-file entry")
        path = self.root / "passwd.d" / address
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{address}:{{PLAIN}}{secret}::::::\n")
        tmp.replace(path)

    def create_layout(self, user: str, layout: str) -> tuple[str, ...]:
        """CREATE the provider-like folders of ``layout`` for ``user``.

        Args:
            user: an address added with :meth:`add_user`.
            layout: ``"gmail"`` or ``"outlook"`` (keys of ``cfg.LAYOUTS``).

        Returns:
            The folder names created, in layout order.

        Raises:
            KeyError: unknown layout.
        """
        folders = tuple(name for name, _flag in cfg.LAYOUTS[layout])
        with self.imap_session(user) as client:
            for folder in folders:
                client.create_folder(folder)
        self._layouts[user] = layout
        return folders

    def layout_of(self, user: str) -> str | None:
        """Return the layout created for ``user`` by :meth:`create_layout`, or None."""
        return self._layouts.get(user)

    # -------------------------------------------------------- mail helpers

    def deliver_lmtp(self, recipient: str, raw: bytes, sender: str = "") -> None:
        """Deliver ``raw`` to ``recipient``'s INBOX over LMTP (RFC 2033).

        Raises:
            smtplib.SMTPRecipientsRefused: unknown user (``550 5.1.1``).
            smtplib.SMTPDataError: delivery failed.
        """
        assert self.ports is not None
        with smtplib.LMTP(self.host, self.ports.lmtp, timeout=10) as lmtp:
            refused = lmtp.sendmail(sender, [recipient], raw)
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)

    def append(self, user: str, folder: str, raw: bytes, flags: Iterable[str] = ()) -> int:
        """APPEND ``raw`` to ``folder`` of ``user`` (RFC 9051 §6.3.12).

        Returns:
            The new message's UID, from the APPENDUID response code (RFC 4315).
        """
        with self.imap_session(user) as client:
            reply = client.append(folder, raw, flags=tuple(flags))
        match = _APPENDUID.search(reply if isinstance(reply, bytes) else b"")
        if match is None:
            raise DovecotError(f"no APPENDUID in {reply!r}")
        return int(match.group(1))

    def kick(self, user: str) -> bool:
        """Disconnect every session of ``user`` (they get ``* BYE``), via doveadm.

        Returns:
            True if sessions were kicked, False if ``user`` had none.
        """
        return self._doveadm("kick", user) is not None

    def users(self) -> frozenset[str]:
        """Return the addresses in the passwd-file (LMTP accepts exactly these)."""
        return frozenset(
            p.name for p in (self.root / "passwd.d").iterdir() if not p.name.endswith(".tmp")
        )

    @contextmanager
    def imap_session(self, user: str) -> Iterator[IMAPClient]:
        """Yield an imapclient logged in as ``user`` over IMAPS with a fresh token."""
        assert self.ports is not None
        client = IMAPClient(
            self.host,
            port=self.ports.imaps,
            ssl=True,
            ssl_context=self.ssl_context(),
            timeout=10,
        )
        try:
            client.oauth2_login(user, self.keys.mint(user, ttl_seconds=300))
            yield client
        finally:
            try:
                client.logout()
            except (OSError, client.Error):
                client.shutdown()

    def ssl_context(self) -> ssl.SSLContext:
        """Return a client context that trusts this instance's certificate."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def log_text(self) -> str:
        """Return Dovecot's log (auth failures give their reason here)."""
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _doveadm(self, *args: str) -> str | None:
        done = subprocess.run(
            ["doveadm", "-c", str(self.root / "dovecot.conf"), *args],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if done.returncode == _EX_NOUSER:
            return None
        if done.returncode != 0:
            raise DovecotError(f"doveadm {args[0]} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode(errors="replace")


def _children(ppid: int, comm: str) -> set[int]:
    """Return the live (non-zombie) child pids of ``ppid`` named ``comm``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
        if name == comm and int(parent) == ppid and state != "Z":
            found.add(int(entry))
    return found


def _greets(host: str, port: int) -> bool:
    """Return True if ``host:port`` answers with an ``* OK`` IMAP greeting."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            return sock.recv(64).startswith(b"* OK")
    except OSError:
        return False
