"""systemd's notify protocol (sd_notify), without libsystemd: one datagram per state change.

``Type=notify`` units wait for READY=1; ``WatchdogSec=`` expects WATCHDOG=1 more often than
the interval systemd passes in ``WATCHDOG_USEC``. Outside systemd (no NOTIFY_SOCKET) every call
is a no-op, so the agent runs the same under a shell, in tests and in a container.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends states to ``$NOTIFY_SOCKET``; tells how often the watchdog must be fed."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names an abstract socket (a NUL byte in the kernel's address).
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        watched_pid = env.get("WATCHDOG_PID", "")
        mine = not watched_pid or watched_pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *states: str) -> bool:
        """Send ``states`` ("READY=1", "STATUS=…"); False when not under systemd or on error."""
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(states).encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")
