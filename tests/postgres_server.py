"""A throwaway PostgreSQL server for the tests: initdb in a temporary folder, unix socket only.

Debian's `postgresql` package provides the binaries (.ci/run installs it). As root, the
server runs as the `postgres` user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MISSING = ("the PostgreSQL tests need Debian's postgresql server (apt-get install postgresql; .ci/run does) "
           "and the driver (pip install -e '.[postgres]')")


def server_binary(name: str) -> str:
    """initdb / pg_ctl from PATH or Debian's versioned folder; AssertionError saying what to install."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    assert found, MISSING
    return found


class PostgresServer:
    def __init__(self, password: str | None = None) -> None:
        """With ``password``, the user postgres must give it (scram-sha-256), else anyone is trusted."""
        self.password = password
        # Its own folder under /tmp: pytest's are closed to the postgres user.
        folder = self.folder = Path(tempfile.mkdtemp(prefix="dermwatch-postgres-"))
        self.data, self.socket_dir = folder / "data", folder / "socket"
        self.socket_dir.mkdir(parents=True)
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(folder, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        auth = ["--auth=trust"]
        if password is not None:
            password_file = folder / "password"
            password_file.write_text(password + "\n")
            if self.as_user:
                shutil.chown(password_file, "postgres")
            auth = ["--auth=scram-sha-256", f"--pwfile={password_file}"]
        self._run(server_binary("initdb"), "-D", str(self.data), "-U", "postgres", *auth, "--no-sync", "-E", "UTF8")
        options = f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} -c fsync=off " \
                  "-c max_connections=200"
        self._run(server_binary("pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-l",
                  str(folder / "server.log"), "start")
        self.created = 0

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self.as_user, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command[0]} failed: {result.stdout[-1000:]}{result.stderr[-1000:]}"

    def new_database(self) -> str:
        """A fresh empty database, as a SQLAlchemy URL."""
        import psycopg

        self.created += 1
        name = f"test_{os.getpid()}_{self.created}"
        with psycopg.connect(host=str(self.socket_dir), user="postgres", dbname="postgres", password=self.password,
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        user = "postgres" if self.password is None else f"postgres:{self.password}"
        return f"postgresql+psycopg://{user}@/{name}?host={self.socket_dir}"

    def stop(self) -> None:
        self._run(server_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
