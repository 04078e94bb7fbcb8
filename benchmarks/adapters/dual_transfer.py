"""Evaluation adapter for dual_transfer.py (see adapters/__init__.py for the contract).

Built on dual_transfer.load (E, Dec and the frozen C in eval mode) and dual_transfer.transfer
(Dec(E(x), a)). The networks work in [0, 1], as the original's; the contract's images are in
[-1, 1], so they are mapped on the way in and out.

  edit(images, attr_src, attr_tgt) = Dec(E(x), attr_tgt)   (attr_src is not needed: the code and
                                                           the shortcuts carry the face)
  reconstruct(images) = Dec(E(x), a), a = the attributes the frozen classifier reads on x
  encode(images) = {"z": the bottleneck code fn, flattened}; generate = None (no prior)
"""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import dual_transfer  # noqa: E402


def load(ckpt_path, device="cpu"):
    device = torch.device(device)
    config, attr_names, (encoder, decoder, classifier) = dual_transfer.load(ckpt_path, device)

    def unit(images):
        return dual_transfer.to_unit(images.float().to(device))

    @torch.no_grad()
    def edit(images, attr_src, attr_tgt):
        out = dual_transfer.transfer(encoder, decoder, unit(images), attr_tgt.float().to(device))
        return (out * 2 - 1).cpu()

    @torch.no_grad()
    def reconstruct(images, batch_size=256):
        out = []
        for x in images.split(batch_size):
            x = unit(x)
            out.append(dual_transfer.transfer(encoder, decoder, x, (classifier(x) > 0).float()))
        return (torch.cat(out) * 2 - 1).cpu()

    @torch.no_grad()
    def encode(images, batch_size=256):
        return {"z": torch.cat([encoder(unit(x))[-1].float().flatten(1).cpu()
                                for x in images.split(batch_size)])}

    return types.SimpleNamespace(attr_names=list(attr_names), img_size=config["img_size"],
                                 crop=config["crop"] or None, edit=edit, reconstruct=reconstruct,
                                 encode=encode, generate=None)
