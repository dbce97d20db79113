"""Audits refused TLS handshakes, which gRPC reports only as a line in its own log on stderr.

gRPC's Python API has no hook for a handshake that fails (a client certificate from another
CA, no client certificate at all): the server never sees a call, and the C core writes
``Handshake failed with error SSL_ERROR_SSL: ...CERTIFICATE_VERIFY_FAILED...`` to file
descriptor 2. The watcher puts a pipe in front of descriptor 2, copies every byte through to
the original stderr unchanged, and hands each such line's reason to the registered listeners
(the running aggregators), which write it to their audit logs. gRPC does not log the peer's
address with that line, so the audit entry cannot name it. Keep gRPC's log verbosity at its
default (INFO) or lower: GRPC_VERBOSITY=ERROR hides these lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable

HANDSHAKE_FAILED = re.compile(rb"Handshake failed with (?:fatal )?error (\S+?):? (.*)$")
# ...error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get ...
_SSL_REASON = re.compile(rb"OPENSSL_internal:([A-Z_]+)(?::\s*(.*))?$")

Listener = Callable[[str], None]


def handshake_reason(line: bytes) -> str | None:
    """The refusal reason in a gRPC log line, or None for any other line."""
    match = HANDSHAKE_FAILED.search(line.rstrip(b"\r\n"))
    if match is None:
        return None
    detail = match.group(2)
    ssl = _SSL_REASON.search(detail)
    if ssl is not None:
        text = ssl.group(1) + (b": " + ssl.group(2) if ssl.group(2) else b"")
    else:
        text = match.group(1) + b": " + detail
    return "TLS handshake refused: " + text.decode("utf-8", "replace").strip()


class _Watcher:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[int, Listener] = {}
        self._pipe_id: tuple[int, int] | None = None

    def _installed(self) -> bool:
        if self._pipe_id is None:
            return False
        try:
            st = os.fstat(2)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._pipe_id

    def ensure(self) -> None:
        """(Re)install the pipe on descriptor 2 unless it is still ours (a test runner or a
        caller may have replaced descriptor 2 since)."""
        with self._lock:
            if self._installed():
                return
            original = os.dup(2)
            read_end, write_end = os.pipe()
            st = os.fstat(write_end)
            os.dup2(write_end, 2)
            os.close(write_end)
            self._pipe_id = (st.st_dev, st.st_ino)
            threading.Thread(
                target=self._pump, args=(read_end, original), name="fedcxr-tlswatch", daemon=True
            ).start()

    def _pump(self, read_end: int, original: int) -> None:
        pending = b""
        try:
            while data := os.read(read_end, 65536):
                with contextlib.suppress(OSError):
                    os.write(original, data)
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    reason = handshake_reason(line)
                    if reason is not None:
                        self._notify(reason)
                pending = pending[-65536:]
        finally:
            os.close(read_end)
            os.close(original)

    def _notify(self, reason: str) -> None:
        with self._lock:
            listeners = list(self._listeners.values())
        for listener in listeners:
            # An audit write that fails must not stop stderr.
            with contextlib.suppress(Exception):
                listener(reason)

    def add(self, listener: Listener) -> int:
        self.ensure()
        with self._lock:
            key = id(listener)
            self._listeners[key] = listener
            return key

    def remove(self, key: int) -> None:
        with self._lock:
            self._listeners.pop(key, None)


_WATCHER = _Watcher()


def watch_handshakes(listener: Listener) -> Callable[[], None]:
    """Call `listener(reason)` for every refused TLS handshake in this process until the
    returned function is called."""
    key = _WATCHER.add(listener)
    return lambda: _WATCHER.remove(key)
