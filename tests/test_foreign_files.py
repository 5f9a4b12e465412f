"""Files the service does not own, and links: archived without wedging, nothing outside touched."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dermwatch.pipeline.claim import place

STAFF, SERVICE = "dermwatch-test-staff", "dermwatch-test-svc"


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


@pytest.fixture
def two_users() -> Iterator[tuple[pwd.struct_passwd, pwd.struct_passwd, Path]]:
    """A staff user, the service's user, and a folder the service owns (outside root's 0700 tmp)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a staff user and a service user")
    staff, service = _user(STAFF), _user(SERVICE)
    folder = Path(tempfile.mkdtemp(prefix="dermwatch-users-"))
    folder.chmod(0o755)
    for sub in ("intake", "archive"):
        (folder / sub).mkdir()
        os.chown(folder / sub, service.pw_uid, service.pw_gid)
    (folder / "intake").chmod(0o777)  # staff drop files here
    try:
        yield staff, service, folder
    finally:
        shutil.rmtree(folder)


def _as_user(user: pwd.struct_passwd, action) -> Path:
    """Run ``action`` in a forked child as ``user`` with umask 027 (the unit's); its returned path.

    Forked, not a new interpreter: the service user cannot reach an interpreter under /root."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.umask(0o027)
            os.write(writer, str(action()).encode())
            os._exit(0)
        except BaseException as error:  # noqa: BLE001 - anything goes back to the test
            os.write(writer, f"ERROR {error!r}".encode())
            os._exit(1)
    os.close(writer)
    with os.fdopen(reader) as stream:
        said = stream.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, said
    return Path(said)


def test_a_file_staff_dropped_as_themselves_is_archived_as_the_services_own(
        two_users: tuple[pwd.struct_passwd, pwd.struct_passwd, Path]) -> None:
    staff, service, folder = two_users
    dropped = folder / "intake" / "lesion.jpg"
    dropped.write_bytes(b"\xff\xd8 a photo \xff\xd9")
    os.chown(dropped, staff.pw_uid, staff.pw_gid)
    dropped.chmod(0o644)
    archived = _as_user(service, lambda: place(dropped, folder / "archive", "lesion.jpg", 0o027))
    status = archived.lstat()
    assert (status.st_uid, status.st_mode & 0o777) == (service.pw_uid, 0o640)
    assert archived.read_bytes() == b"\xff\xd8 a photo \xff\xd9" and not dropped.exists()
    assert [p.name for p in (folder / "archive").iterdir()] == ["lesion.jpg"]  # no partial copy left


def test_a_link_is_placed_without_changing_what_it_points_to(tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    secret.write_text("not the service's to touch")
    secret.chmod(0o600)
    link = tmp_path / "intake" / "fifo.jpg"
    link.parent.mkdir()
    link.symlink_to(secret)
    placed = place(link, tmp_path / "quarantine", "fifo.jpg", 0o027 if os.geteuid() else 0o077)
    assert placed.is_symlink() and secret.stat().st_mode & 0o777 == 0o600
