"""The benchmark scripts' command-line plumbing: a bad number, device or output path gets one line
before any work (the method files do the same with their parse_dataclass); outputs are written
atomically; bad input and Ctrl-C end in one line, never a traceback."""
import io
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from common import InputError


def vet(args, positive=(), at_least_zero=()):
    """Numbers finite and not negative, those in `positive` above 0 (None: not given); lists of
    numbers item by item; --device one this machine has -> args."""
    for name in (*positive, *at_least_zero):
        values = getattr(args, name)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not (math.isfinite(value) and (
                    value > 0 or value == 0 and name not in positive)):
                raise InputError(f"--{name.replace('_', '-')} {value}: expected a finite number "
                                 f"{'above' if name in positive else 'of at least'} 0")
    name = getattr(args, "device", "auto")
    available = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    try:
        device = torch.device(name) if name != "auto" else None
    except RuntimeError:
        device = torch.device("meta")  # not a device name at all
    if device is not None and (device.type not in available or (device.index or 0) >= max(
            torch.cuda.device_count(), 1)):
        raise InputError(f"--device {name}: not on this machine; expected auto or {', '.join(available)}")
    return args


def output_path(path, flag, overwrite=False):
    """Before any work: `path` must be a file name in a folder this process can write (created
    if missing; a probe file is written there and deleted, which a read-only or full file system
    refuses even to root), and no file may be there unless --overwrite -> Path."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; expected a file name")
    if path.exists() and not overwrite:
        raise InputError(f"{flag} {path} exists; pass --overwrite to replace it, or name a new file")
    above = next(p for p in path.parents if p.exists() or p == p.parent)  # nearest existing folder
    if not above.is_dir():
        raise InputError(f"{flag} {path}: {above} is a file, not a folder; expected a file name in "
                         "a writable folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent) as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot write there ({err.strerror or err}); expected a "
                         "file name in a writable folder") from None
    return path


def write_output(path, content):
    """Write `content` (bytes, str, or an object for torch.save) to a temporary file beside `path`,
    then rename it over `path` (atomic). A failure (disk full, quota, read-only) -> one line naming
    the path and the cause, with no temporary file left and any previous `path` intact."""
    path = Path(path)
    if not isinstance(content, (bytes, str)):
        buffer = io.BytesIO()  # serialised in memory: the file is written by Python, whose
        torch.save(content, buffer)  # OSError names the cause (torch's own writer raises a bare
        content = buffer.getvalue()  # "iostream error")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path} ({err.strerror or err}); nothing was written there") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def run(main):
    """A benchmark script's top level: bad input -> "error: <one line>" (exit 1); Ctrl-C -> its
    one line (exit 130, the shell's code for SIGINT)."""
    try:
        main()
    except InputError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt as err:
        print(str(err) or "interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        sys.exit(130)
