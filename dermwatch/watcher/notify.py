"""systemd's sd_notify protocol: one datagram per message to $NOTIFY_SOCKET.

Without NOTIFY_SOCKET (not started by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address or None
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self._address else None

    def watchdog_interval(self) -> float | None:
        """Half of systemd's WatchdogSec, in seconds, if the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000

    def send(self, **fields: str) -> None:
        """send(READY="1", STATUS="...") sends ``READY=1\\nSTATUS=...``."""
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            # Never blocks: a listener that stops reading must not stall intake.
            self._socket.sendto(message, socket.MSG_DONTWAIT, self._address)
        except BlockingIOError:
            log.debug("systemd's notify socket is full; dropped %s", message[:60])
        except OSError as error:
            log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), error)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
