"""Evaluation adapter for feature_ae.py (see adapters/__init__.py for the contract).

edit(images, attr_src, attr_tgt) = D(E(x) + 1.5·Σ_a (tgt_a − src_a)·v_a), with the vectors of
vectors.pt beside the checkpoint when they were made from exactly its weights (otherwise computed
from up to 1000 training images per side, and saved there); reconstruct = D(E(x)); encode =
{"z": E(x)}; generate = None (an autoencoder has no prior to sample from). A pgae checkpoint below
its final resolution works at the one it reached: inputs are average-pooled to it, outputs
upsampled (nearest) back to img_size. Outputs are clamped to [-1, 1] (the decoder's last conv is
bare, as the original's).
"""
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import feature_ae  # noqa: E402


def load(ckpt_path, device="cpu"):
    trained = feature_ae.load(ckpt_path, device)
    device, img_size = torch.device(device), trained.config["img_size"]
    model, size, alpha = trained.model, trained.size, trained.alpha
    vectors = []  # computed (or read) on the first edit only

    def prepare(images):  # (B, 3, H, W) float in [-1, 1] -> (B, 3, size, size) on the device
        images = images.to(device).float()
        if tuple(images.shape[-2:]) != (img_size, img_size):
            images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", antialias=True)
        return F.adaptive_avg_pool2d(images, size)

    def finish(images):
        return F.interpolate(images.float(), size=(img_size, img_size), mode="nearest").clamp(-1, 1).cpu()

    @torch.no_grad()
    def encode(images, batch_size=256):
        return {"z": torch.cat([model.encode(prepare(x), alpha).float().cpu() for x in images.split(batch_size)])}

    @torch.no_grad()
    def reconstruct(images, batch_size=256):
        return torch.cat([finish(model(prepare(x), alpha)) for x in images.split(batch_size)])

    @torch.no_grad()
    def edit(images, attr_src, attr_tgt, batch_size=256):
        if not vectors:
            vectors.append(feature_ae.vectors_for(trained, trained.attr_names, device).to(device))
        out = []
        for x, src, tgt in zip(images.split(batch_size), attr_src.split(batch_size), attr_tgt.split(batch_size)):
            z = feature_ae.edit_codes(model.encode(prepare(x), alpha), vectors[0], src.to(device), tgt.to(device))
            out.append(finish(model.decode(z, size, alpha)))
        return torch.cat(out)

    return types.SimpleNamespace(attr_names=trained.attr_names, img_size=img_size, crop=None,
                                 edit=edit, reconstruct=reconstruct, generate=None, encode=encode)
