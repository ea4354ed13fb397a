"""Writing files and folders so that nothing half-written is ever seen under the final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def default_mode() -> int:
    """What a plainly created file gets (0666 less the umask); mkstemp's files are 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Write ``target`` through ``write(temporary path)`` in the same folder, then rename."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_folder(target: Path, write: Callable[[Path], object],
                  complete: Callable[[Path], bool] | None = None) -> Path:
    """Fill a temporary folder beside ``target`` through ``write(folder)``, then rename it to
    ``target``. An existing ``target`` is replaced, unless ``complete(target)`` says it is whole
    (another process finished the same work first): then it is kept and this copy dropped."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        os.chmod(tmp, default_mode() | 0o111)  # mkdtemp's folders are 0700
        write(tmp)
        if complete is None:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            return target
        # Shared work (several processes may fill the same target): a whole target is never removed,
        # since another process may be reading it; rename fails while a non-empty target exists.
        if complete(target):
            shutil.rmtree(tmp)
            return target
        try:
            os.replace(tmp, target)
        except OSError:
            if not complete(target):  # a broken leftover (not one of ours: ours appear whole)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
            else:  # another process finished first: keep its folder
                shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
