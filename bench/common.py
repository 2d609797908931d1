"""What every benchmark shares: the machine it ran on, percentiles, process memory, JSON output, an older
revision to compare with."""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.embedding.precision import cpu_flags  # noqa: E402


def machine() -> dict:
    """What the figures were measured on: CPU model and the flags that decide speed, cores, date."""
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    flags = sorted((cpu_flags() or set()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"})
    info = {"cpu": model, "flags": flags, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if torch := sys.modules.get("torch"):  # only where the benchmark uses it: importing it costs ~670 MB
        info.update(threads=torch.get_num_threads(), torch=torch.__version__)
    return info


def percentile(values, q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mib(pid: int | str = "self", part: str = "VmRSS") -> float:
    """Resident memory of a process (default this one), MiB; part="RssAnon": only what no file backs (a
    memory-mapped file's pages count in VmRSS while they are in, and the kernel may drop them)."""
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{part}:")[1].split()[0]) / 1024


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (a server's worker processes); [] when it has ended."""
    try:
        children = [child for task in Path(f"/proc/{pid}/task").iterdir()
                    for child in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [pid] + [p for child in children for p in _tree(int(child))]


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, MiB; one that ends meanwhile, or has ended (a zombie
    has no memory), counts 0."""
    total = 0.0
    for member in _tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(status.split("VmRSS:")[1].split()[0]) / 1024 if "VmRSS:" in status else 0.0
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process and its live descendants have used so far, seconds."""
    total = 0.0
    for member in _tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc, timeout: float = 300) -> None:
    """Wait until the server at `base` answers /health 200; exit if it dies or takes longer than `timeout` s."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not become ready (exit {proc.poll()})")


def drop_database(name: str) -> None:
    """Drop the bench database `name` on the configured PostgreSQL, if it is there."""
    import sqlalchemy as sa

    from backend.storage.engine import database_url

    admin = sa.create_engine(database_url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def fresh_database(name: str):
    """A sessionmaker on a new, migrated database `name` on the configured PostgreSQL (dropped first if a run left
    it behind)."""
    from sqlalchemy.orm import sessionmaker

    from backend.storage.engine import database_url
    from backend.storage.migrations import migrated_engine

    drop_database(name)
    return sessionmaker(migrated_engine(database_url(), name), expire_on_commit=False)


def write_json(path: Path | None, report) -> None:
    """Write a report where --json asked for it, and say so."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")


@contextmanager
def checkout(revision: str | None):
    """This checkout (None), or `revision` of it in a temporary git worktree."""
    if revision is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="imsrc-baseline-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
