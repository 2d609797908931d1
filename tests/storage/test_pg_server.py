"""The embedded PostgreSQL is private: another local user cannot reach it, it needs its password, it is on TCP only
when asked (and then on 127.0.0.1 only), and clusters that earlier versions made with `trust` are upgraded."""
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from backend.storage.embedded_server import SYSTEM_USER, EmbeddedPostgres, _pg_install

ROOT = Path(__file__).resolve().parents[2]


def _as(user: str, group: str) -> list[str]:
    """The command prefix that runs a program as `user` (we run as root), or skip."""
    if os.geteuid() != 0:
        pytest.skip("running a command as another local user needs root")
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups"]
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "-g", group, "--"]
    pytest.skip("neither setpriv nor runuser is installed to run a command as another user")


def _psql(url: str, prefix: list[str] | None = None, password: str | None = None, host: str | None = None,
          port: int | None = None) -> subprocess.CompletedProcess:
    """The server's own psql, run by `prefix` (as someone else), against the server behind `url`."""
    parsed = make_url(url)
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PGPASSFILE": os.devnull, "PGCONNECT_TIMEOUT": "5"}
    if password is not None:
        env["PGPASSWORD"] = password
    cmd = [*(prefix or []), str(_pg_install() / "bin" / "psql"), "-w", "-X", "-U", "postgres", "-d", "postgres",
           "-h", host or parsed.query["host"], "-p", str(port or parsed.query["port"]), "-tAc", "SELECT 1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, cwd="/")


def _scalar(url: str, sql: str):
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()
    finally:
        engine.dispose()


def _trust_lines(pgdata: Path) -> list[str]:
    lines = [line.split("#")[0].split() for line in (pgdata / "pg_hba.conf").read_text().splitlines()]
    return [" ".join(fields) for fields in lines if "trust" in fields]


def _server_uid() -> int:
    return pwd.getpwnam(SYSTEM_USER).pw_uid if os.geteuid() == 0 else os.geteuid()


@pytest.fixture(params=["short", "long"])
def private_server(request, tmp_path):
    """A server of its own, Unix socket only, in a data directory with a short path or one too long for a socket."""
    pgdata = tmp_path / "data" if request.param == "short" else tmp_path / ("d" * 100) / "data"
    assert (len(str(pgdata)) > 100) == (request.param == "long")
    server = EmbeddedPostgres(pgdata)
    socket_dir = Path(make_url(server.acquire()).query["host"])
    yield server
    server.release()
    if socket_dir != server.pgdata:
        socket_dir.rmdir()  # not left behind in /tmp


def test_another_local_user_cannot_connect(private_server):
    nobody = _as("nobody", "nogroup")
    url = private_server.url
    socket_dir = Path(make_url(url).query["host"])
    if len(str(private_server.pgdata)) > 100:
        assert socket_dir.parent == Path(tempfile.gettempdir())
    else:
        assert socket_dir == private_server.pgdata
    st = os.lstat(socket_dir)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == _server_uid() and stat.S_IMODE(st.st_mode) == 0o700
    password = make_url(url).password
    assert _psql(url, password=password).stdout.strip() == "1"  # the command itself works, for the owner
    denied = _psql(url, nobody, password=password)  # even knowing the password
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied.stderr
    assert _scalar(url, "SHOW listen_addresses") == ""  # and no TCP to try instead
    assert _scalar(url, "SHOW unix_socket_permissions") == "0700"
    secret = private_server.password_file.stat()
    assert stat.S_IMODE(secret.st_mode) == 0o600 and secret.st_uid == os.geteuid()
    assert secret.st_size > 20


def test_the_server_needs_its_password_even_where_its_socket_can_be_reached(tmp_path, monkeypatch):
    server = EmbeddedPostgres(tmp_path / "data")
    url = server.acquire()
    try:
        assert _trust_lines(server.pgdata) == []
        as_server = _as(SYSTEM_USER, grp.getgrgid(pwd.getpwnam(SYSTEM_USER).pw_gid).gr_name)
        refused = _psql(url, as_server)  # the server's own user, who can enter the socket directory
        assert refused.returncode != 0 and "no password supplied" in refused.stderr, refused.stderr
        wrong = _psql(url, as_server, password="not-it")
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, wrong.stderr
        monkeypatch.setenv("PGPASSFILE", os.devnull)
        monkeypatch.delenv("PGPASSWORD", raising=False)
        parsed = make_url(url)
        with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
            psycopg2.connect(host=parsed.query["host"], port=parsed.query["port"], user="postgres", dbname="postgres")
    finally:
        server.release()


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) that have a socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_tcp_only_on_127_0_0_1_and_with_the_password(pg_server):
    server, url, _ = pg_server
    assert _scalar(url.render_as_string(hide_password=False), "SHOW listen_addresses") == "127.0.0.1"
    assert _listening(server.port) == {"0100007F"}  # 127.0.0.1, and nothing on any other address or on IPv6
    nobody = _as("nobody", "nogroup")
    rendered = url.render_as_string(hide_password=False)
    tcp = {"host": "127.0.0.1", "port": server.port}
    assert _psql(rendered, password=url.password, **tcp).stdout.strip() == "1"
    refused = _psql(rendered, nobody, **tcp)
    assert refused.returncode != 0 and "no password supplied" in refused.stderr, refused.stderr
    wrong = _psql(rendered, nobody, password="guess", **tcp)
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, wrong.stderr


def _init_the_old_way(server: EmbeddedPostgres) -> None:
    """A cluster as earlier versions of imsrc made it: initialised with --auth=trust and no password."""
    server.pgdata.mkdir(parents=True)
    if os.geteuid() == 0:
        server._grant_system_user()
    server._run([server._bin("initdb"), "-D", str(server.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres",
                 "--no-instructions"])
    assert _trust_lines(server.pgdata)


def _assert_upgraded(server: EmbeddedPostgres, url: str) -> None:
    assert _trust_lines(server.pgdata) == []
    assert stat.S_IMODE(server.password_file.stat().st_mode) == 0o600
    assert make_url(url).password == server.password_file.read_text().strip()
    assert _scalar(url, "SELECT current_user") == "postgres"
    deadline = time.monotonic() + 10  # a reload takes effect a moment after pg_ctl returns
    while (without := _psql(url)).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert without.returncode != 0 and "no password supplied" in without.stderr, without.stderr


HOLDER = textwrap.dedent("""
    import sys
    from backend.storage.embedded_server import EmbeddedPostgres
    print(EmbeddedPostgres(sys.argv[1]).acquire(), flush=True)
    sys.stdin.readline()  # hold the server until told to go
""")


def test_a_trust_cluster_is_upgraded_when_two_processes_start_it_at_once(tmp_path):
    server = EmbeddedPostgres(tmp_path / "data")
    _init_the_old_way(server)
    holders = [subprocess.Popen([sys.executable, "-c", HOLDER, str(server.pgdata)], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(2)]
    try:
        urls = [holder.stdout.readline().strip() for holder in holders]
        assert urls[0] and urls[0] == urls[1]
        _assert_upgraded(server, urls[0])
    finally:
        errors = [holder.communicate("\n", timeout=60)[1] for holder in holders]
    assert all(holder.returncode == 0 for holder in holders) and not any("Traceback" in e for e in errors), errors
    assert server._running() is None  # the last of them stopped it


def test_a_running_trust_server_is_upgraded_when_adopted(tmp_path):
    server = EmbeddedPostgres(tmp_path / "data")
    _init_the_old_way(server)
    server._pg_ctl("-w", "-l", str(server.pgdata / "server.log"), "-o", f"-h '' -k {server.pgdata}", "start")
    try:
        url = server.acquire()
        assert make_url(url).query["host"] == str(server.pgdata)
        _assert_upgraded(server, url)
        again = EmbeddedPostgres(server.pgdata)  # a second process adopting it finds nothing left to do
        assert again.acquire() == url
        again.release()
    finally:
        server.release()
    assert server._running() is None  # the last user stopped it


@pytest.mark.parametrize("squat", ["symlink", "someone else's directory", "a directory others can enter"])
def test_a_squatted_socket_directory_is_replaced_by_a_private_one(tmp_path, squat):
    _as("nobody", "nogroup")  # making a directory that belongs to someone else needs root
    server = EmbeddedPostgres(tmp_path / ("d" * 100) / "data")
    socket_dir = Path(make_url(server.acquire()).query["host"])
    server.release()
    shutil.rmtree(socket_dir)
    nobody = pwd.getpwnam("nobody")
    if squat == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o777)
        socket_dir.symlink_to(target)
    else:
        socket_dir.mkdir()
        socket_dir.chmod(0o777)
        if squat == "someone else's directory":
            os.chown(socket_dir, nobody.pw_uid, nobody.pw_gid)
        (socket_dir / "planted").write_text("x")
    url = server.acquire()
    try:
        assert make_url(url).query["host"] == str(socket_dir)
        st = os.lstat(socket_dir)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == _server_uid() and stat.S_IMODE(st.st_mode) == 0o700
        assert not (socket_dir / "planted").exists()
        assert _scalar(url, "SELECT 1") == 1
    finally:
        server.release()
    socket_dir.rmdir()  # not left behind in /tmp
