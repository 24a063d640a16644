"""XLA_FLAGS for a subprocess that simulates N CPU devices (XLA's host platform device count), the flags
conftest.py set for every test process kept: replacing XLA_FLAGS would drop them silently."""

import os


def device_flags(n: int) -> str:
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
