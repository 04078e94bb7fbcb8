"""The benchmark scripts' argument checks: a bad number or device gets one line, before any work
(the method files do the same with their parse_dataclass)."""
import math

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
