"""Checkpoints written atomically: Lightning's checkpoint I/O that never leaves a torn file, and says in one
sentence what went wrong and what was kept when a save fails. Reading is :mod:`charlm.model.checkpoint`'s."""

from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from charlm.model.checkpoint import safe_load
from charlm.util.atomic import atomic_write_bytes
from charlm.util.errors import CharlmError


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` into memory, then the bytes written atomically (see :mod:`charlm.util.atomic`).

    A kill at any moment leaves either the old file or the new one, never a torn one. Serialising to
    memory first keeps the file system out of torch's zip writer, which reports a failed write (a full
    disk) as a bare ``unexpected pos`` error; here the write's own ``OSError`` (``ENOSPC``) comes out.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that saves atomically and loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as exc:
            raise save_failure(Path(path), exc) from None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        # clear errors for every bad file; tensors land on the CPU and Lightning moves them where they belong
        return safe_load(path)


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def save_failure(path: Path, exc: OSError) -> CharlmError:
    """One sentence for a checkpoint that could not be written: why, what is kept, what to do."""
    kept = "the previous checkpoint there is unchanged" if path.is_file() else "nothing was written"
    if exc.errno in _NO_SPACE:
        advice = "Free some space, then resume with `charlm train --resume`"
    elif exc.errno in _NOT_WRITABLE:
        advice = (f"{path.parent} is not writable: make it writable, then resume with `charlm train --resume`, "
                  "or train again with another --out")
    else:
        advice = "Check the disk, then resume with `charlm train --resume`, or train again with another --out"
    return CharlmError(f"could not save checkpoint {path}: {exc.strerror or exc} "
                       f"({errno.errorcode.get(exc.errno or 0, 'OSError')}); {kept}. {advice}")
