"""Fixtures: a real ``mailgate serve`` subprocess on free loopback ports.

One server per database backend per session (SQLite in a temp dir, and
PostgreSQL in a throwaway database on 127.0.0.1:5432, user ``postgres``,
trust auth). Tests share it and isolate themselves with fresh
sub-accounts (``tenant`` fixture). Everything is set up through the CLI,
as an admin would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PG_HOST = "127.0.0.1"
PG_PORT = 5432
START_TIMEOUT_SECONDS = 30.0


def corpus_dir() -> Path:
    """Return ``shared/corpus``: ``$MAILGATE_CORPUS`` or a sibling of the repo's parent."""
    env = os.environ.get("MAILGATE_CORPUS")
    if env:
        return Path(env)
    for base in (REPO.parent, *REPO.parents):
        candidate = base / "shared" / "corpus"
        if candidate.is_dir():
            return candidate
    pytest.skip("corpus not found; set MAILGATE_CORPUS")


def free_port() -> int:
    """Bind port 0 on loopback and return the port the kernel chose."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mailgate_command() -> list[str]:
    """The ``mailgate`` console script when installed, else ``python -m gateway``."""
    script = Path(sys.executable).parent / "mailgate"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gateway"]


def subprocess_env() -> dict[str, str]:
    """Environment for the subprocesses: the checkout importable even when not installed."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p)}


class CliError(RuntimeError):
    """A CLI command exited non-zero; ``doc`` is its JSON error document."""

    def __init__(self, doc: Any, stderr: str) -> None:
        super().__init__(f"{doc} {stderr[-2000:]}")
        self.doc = doc


@dataclass
class Gateway:
    """A running ``mailgate serve`` and the CLI pointed at the same config."""

    root: Path
    database_url: str
    smtp_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    domain: str = "bcc.it.localhost"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    def write_config(self, **smtp: object) -> None:
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in smtp.items())
        self.config.write_text(
            f"[storage]\ndatabase_url = {json.dumps(self.database_url)}\n"
            f"data_dir = {json.dumps(str(self.root / 'data'))}\n"
            f'[smtp]\nhost = "127.0.0.1"\nport = {self.smtp_port}\n'
            f"max_message_bytes = {2 * 1024 * 1024}\n{extra}"
            f'[http]\nhost = "127.0.0.1"\nport = {self.http_port}\n'
            f"[bcc]\ndomain = {json.dumps(self.domain)}\n"
        )

    def cli(self, *args: str, check: bool = True) -> Any:
        """Run ``mailgate ARGS --json -c CONFIG`` and return the JSON document."""
        done = subprocess.run(
            [*mailgate_command(), *args, "--json", "-c", str(self.config)],
            capture_output=True,
            cwd=self.root,
            env=subprocess_env(),
            timeout=60,
            check=False,
        )
        doc = json.loads(done.stdout) if done.stdout.strip() else None
        if check and done.returncode != 0:
            raise CliError(doc, done.stderr.decode(errors="replace"))
        return doc

    def start(self) -> None:
        with (self.root / "serve.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*mailgate_command(), "serve", "-c", str(self.config)],
                cwd=self.root,
                env=subprocess_env(),
                stdout=log,
                stderr=log,
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"serve not ready: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.root / "serve.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the server (crash test)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None


@dataclass(frozen=True)
class Tenant:
    """A fresh sub-account with one user and that user's sync address."""

    subaccount: str
    user_email: str
    sync_address: str


def _psql(sql: str) -> None:
    subprocess.run(
        [
            "psql",
            "-h",
            PG_HOST,
            "-p",
            str(PG_PORT),
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _postgres_up() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(
    scope="session",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A ``mailgate serve`` on free ports, one per backend, for the session."""
    root = tmp_path_factory.mktemp(f"gw-{request.param}")
    database = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{root / 'mailgate.db'}"
    else:
        if not _postgres_up():
            pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
        database = f"mailgate_it_{uuid.uuid4().hex[:10]}"
        _psql(f'CREATE DATABASE "{database}"')
        url = f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{database}"
    gw = Gateway(root=root, database_url=url)
    gw.write_config()
    try:
        if database is not None:
            gw.cli("db", "upgrade")
        gw.start()
        yield gw
    finally:
        gw.stop()
        if database is not None:
            _psql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        shutil.rmtree(root / "data", ignore_errors=True)


def make_tenant(gw: Gateway, user_email: str | None = None) -> Tenant:
    """Create a sub-account and a user (by default a unique address) via the CLI."""
    suffix = uuid.uuid4().hex[:8]
    name = f"sub-{suffix}"
    email = user_email or f"user-{suffix}@example.org"
    gw.cli("subaccount", "add", name)
    gw.cli("user", "add", email, "--name", "Test User", "--subaccount", name)
    address = gw.cli("bcc-address", email, "--subaccount", name)["address"]
    return Tenant(subaccount=name, user_email=email, sync_address=address)


@pytest.fixture
def tenant(gateway: Gateway) -> Tenant:
    """A fresh sub-account and user on the shared server."""
    return make_tenant(gateway)
