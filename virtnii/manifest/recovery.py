"""Finish what a killed scan left half done at a manifest's place, and remove its leftovers — never another's.

A manifest is written into ``OUT.partial-<id>`` beside ``OUT``; on local storage the old manifest is then moved
to ``OUT.partial-<id>.old``, the new one to ``OUT``, and the old one deleted.  A process killed (SIGKILL, power
loss) between those steps leaves one of these states, which :func:`recover` sets right:

===========================================  ===============================================================
left behind                                  recovery
===========================================  ===============================================================
``OUT`` missing, a complete                  finish the swap: the new manifest becomes ``OUT``
``OUT.partial-<id>``
``OUT`` missing, only ``.old``               put the old manifest back
``OUT`` there, and a ``.old``                delete the ``.old`` (the swap had finished)
an ``OUT.partial-<id>`` whose writer died    delete it (an aborted scan: nothing of it was ever visible)
===========================================  ===============================================================

Each writer leaves ``OUT.partial-<id>.owner`` (host and process id) while it works.  A partial folder is touched
only when its owner is known dead: on this host, a process id that no longer runs.  Another host's writer
cannot be checked, so its leftovers stay until a run on that host.
"""

from __future__ import annotations

import json
import os
import socket
import fsspec

from ..errors import storage_errors

PARTIAL = ".partial-"
OLD = ".old"
OWNER = ".owner"


def claim(fs: fsspec.AbstractFileSystem, tmp: str) -> None:
    """Mark ``tmp`` (a partial manifest folder about to be written) as this process's."""
    fs.pipe_file(tmp + OWNER, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())


def release(fs: fsspec.AbstractFileSystem, tmp: str) -> None:
    if fs.exists(tmp + OWNER):
        fs.rm(tmp + OWNER)


def _alive(fs: fsspec.AbstractFileSystem, tmp: str) -> bool:
    """Whether the writer of ``tmp`` may still be running (unknown counts as running)."""
    try:
        owner = json.loads(fs.cat_file(tmp + OWNER))
    except (*storage_errors(), ValueError):
        return False  # no owner file: written by a version without one, or its writer was killed first thing
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def _partials(fs: fsspec.AbstractFileSystem, out: str) -> list[str]:
    """``OUT.partial-<id>`` paths beside ``out`` (folders, or leftovers of their ``.old`` and ``.owner``)."""
    found = set()
    for path in fs.glob(f"{_escape(out)}{PARTIAL}*"):
        path = path.rstrip("/")
        for suffix in (OLD, OWNER):
            if path.endswith(suffix):
                path = path[: -len(suffix)]
        found.add(path)
    return sorted(found)


def _escape(path: str) -> str:
    """``path`` with glob characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def recover(fs: fsspec.AbstractFileSystem, out: str, index_file: str) -> list[str]:
    """Set right what killed writers left at ``out`` (see the module docstring); returns what was done."""
    done = []
    for tmp in _partials(fs, out):
        if _alive(fs, tmp):
            continue
        old = tmp + OLD
        has_out, has_old = fs.exists(f"{out}/{index_file}"), fs.exists(old)
        complete = fs.exists(f"{tmp}/{index_file}")
        if not has_out and complete:
            fs.mv(tmp, out, recursive=True)
            if has_old:
                fs.rm(old, recursive=True)
            done.append(f"finished putting the manifest written into {tmp} at {out}")
        elif not has_out and has_old:
            fs.mv(old, out, recursive=True)
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
            done.append(f"put the previous manifest back at {out}")
        else:
            if has_old:
                fs.rm(old, recursive=True)
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
            done.append(f"removed {tmp}, left by an interrupted run")
        release(fs, tmp)
    return done
