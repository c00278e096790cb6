"""A throwaway PostgreSQL server on loopback (Debian's ``postgresql`` package): for the distributed-search tests and
the worker benchmark, and for trying ``neuromerge search --storage`` on one machine.

``initdb`` into a temporary folder (owned by the ``postgres`` system user when running as root: the server refuses
to run as root), trust authentication, listening on 127.0.0.1 on a free port only; ``pg_ctl`` starts it, a database
is created, the context manager yields its SQLAlchemy URL, then stops the server and removes the folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import NeuromergeError


def server_binaries() -> Path:
    """The folder of ``initdb`` / ``pg_ctl`` (newest installed version); NeuromergeError when absent."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise NeuromergeError("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql")
    return Path(initdb).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_db_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def throwaway_postgres(database: str = "neuromerge_search") -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:<port>/<database>`` of a fresh server, stopped and removed afterwards."""
    bindir = server_binaries()
    root = Path(tempfile.mkdtemp(prefix="nm-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()

    def run(cmd: list[str]) -> None:
        subprocess.run(_as_db_user(cmd), check=True, capture_output=True, text=True)

    try:
        run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock} -c fsync=off"
        run([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "30",
             "start"])
        run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database])
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_db_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
