"""Evaluation adapter for attgan.py (the contract: adapters/__init__.py).

edit: the official test (v1 test.py): every attribute that differs between attr_src and attr_tgt
is an edited one, at ±test_int; a rival of an attribute turned on is switched off (−thres_int);
the rest stay at ±thres_int. reconstruct: G(x, a') with a' read by D's classifier head, as
`attgan.py edit` does for a photo without labels."""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import attgan  # noqa: E402


def load(ckpt, device="cpu", batch_size=256):
    g, d, config, names = attgan.load(ckpt, device)
    thres_int, test_int = config["thres_int"], config["test_int"]

    @torch.no_grad()
    def edit(images, attr_src, attr_tgt):
        out = []
        for x, src, tgt in zip(images.split(batch_size), attr_src.split(batch_size),
                               attr_tgt.split(batch_size)):
            src, tgt = src.float().to(device), tgt.float().to(device)
            changes = {k: tgt[:, k] for k in range(len(names)) if bool((src[:, k] != tgt[:, k]).any())}
            out.append(g(x.to(device), attgan.edit_inputs(src, names, thres_int, test_int, changes)))
        return torch.cat(out).float().cpu()

    @torch.no_grad()
    def reconstruct(images):
        out = []
        for x in images.split(batch_size):
            x = x.to(device)
            attr_src = (d(x)[1] > 0).float()  # C's reading: logit > 0 is P > 0.5
            out.append(g(x, attgan.signed(attr_src, thres_int)))
        return torch.cat(out).float().cpu()

    return types.SimpleNamespace(attr_names=list(names), img_size=config["img_size"],
                                 crop=config["crop"], edit=edit, reconstruct=reconstruct,
                                 generate=None, encode=None)
