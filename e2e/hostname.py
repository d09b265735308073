"""
``[core] hostname_callable`` for the e2e deployment: every service reports its own name (``worker-1``,
``triggerer-2``...) instead of the machine's, so the metadata database says which process ran a task or
holds a trigger, and the harness knows which one to kill.
"""

from __future__ import annotations

import os
import socket


def service_name() -> str:
    return os.environ.get("E2E_SERVICE") or socket.getfqdn()
