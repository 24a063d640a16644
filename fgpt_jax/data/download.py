"""Checked, atomic, resumable downloads into the cache (HellaSwag's jsonl, CORE's eval bundle).

`fetch(url, dest, check)` streams `url` into `dest.part`, then runs `check(part)` and renames the
part onto `dest`, so `dest` either does not exist or holds content that passed its check:
- Resumable: an interrupted transfer leaves `dest.part` behind, and the next call asks the server
  for the rest (an HTTP `Range` request); a server that ignores the range (a `200` answer, or a
  `file://` URL) is read again from the start. A part that fails its check is deleted, since
  resuming it could not repair it.
- Atomic: `os.replace(part, dest)` after the check; a reader sees no file or the whole checked one.
- One writer per file: concurrent callers on one host (several processes of a multi-process run)
  serialise on an `flock` of `.<name>.lock` beside `dest`; whoever comes second finds `dest` done.
  The lock file is removed once `dest` exists, so a finished cache holds only its files.

urllib (standard library) is used rather than `requests` or `huggingface_hub`: these are plain
public HTTPS files, and the range logic is a dozen lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fgpt_jax.errors import UserError

CHUNK = 1 << 20


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive flock on `path` (created if needed); blocks until it is free."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.lock"


def fetch(
    url: str,
    dest: str | os.PathLike,
    check: Callable[[Path], None] | None = None,
    error: type[UserError] = UserError,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], object] | None = None,
) -> Path:
    """`dest`, downloaded from `url` unless it already exists (see the module docstring).

    `check(path)` raises (any exception; an `error` is built from its message) when the downloaded
    content is not what was expected. `progress(done, total)` is called as bytes arrive (total None
    when the server does not say). Network failures raise `error` naming the URL and how far it got;
    the part is kept for the next call to resume."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return dest
    lock = _lock_path(dest)
    with file_lock(lock):
        if dest.exists():  # another process finished it while this one waited
            return dest
        part = dest.parent / f"{dest.name}.part"
        _download(url, part, error, timeout, progress)
        try:
            if check is not None:
                check(part)
        except Exception as e:
            part.unlink(missing_ok=True)
            if isinstance(e, UserError):
                raise
            raise error(f"{url}: {e}") from e
        os.replace(part, dest)
        lock.unlink(missing_ok=True)  # safe now: a later caller sees dest before it needs the lock
    return dest


def _download(url: str, part: Path, error: type[UserError], timeout: float, progress) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part already holds everything (or more): start over
            part.unlink()
            return _download(url, part, error, timeout, progress)
        raise error(f"{url}: download failed (HTTP {e.code} {e.reason})") from None
    except OSError as e:
        raise error(f"{url}: download failed ({getattr(e, 'reason', e)}); copy the file by hand or retry") from None
    with response:
        resumed = have and getattr(response, "status", None) == 206
        if resumed and not (response.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            resumed = False  # a range other than the one asked for: not trusted
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        done = have
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:
            raise error(
                f"{url}: download interrupted after {done:,} bytes ({e}); run again to resume from {part}"
            ) from None
    if total is not None and done != total:
        raise error(f"{url}: download stopped at {done:,} of {total:,} bytes; run again to resume from {part}")


__all__ = ["fetch", "file_lock", "CHUNK"]
