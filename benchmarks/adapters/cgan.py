"""Evaluation adapter for cgan.py (see adapters/__init__.py for the contract).

generate(attrs, seed): G(z, a) with z drawn as the checkpoint's notebook draws it.
edit(images, attr_src, attr_tgt): z* by latent optimisation under the face's own attributes
(cgan.invert: Adam on z, 100 steps, lr 1e-2), then G(z*, attr_tgt). generate_face_mismatch.ipynb
defines this optimisation but no notebook runs it; the FaceGen README edits given faces with its
interactive models 4 and 5 (an image as G's input), which cgan.py does not have. evaluate.py edits
the same test images once per attribute, so z* is found once per (images, attr_src) and reused.
reconstruct: None. The contract gives reconstruct() no attributes, and G(z*, a) needs the face's
attributes; the reconstruction quality shows in edit's true-edit PSNR on the demo set instead.
"""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cgan  # noqa: E402


def load(ckpt_path, device="cpu", batch_size=256):
    device = torch.device(device)
    generator, config, attr_names = cgan.load(ckpt_path, device)
    img_hw, crop = cgan.image_geometry(config)
    found = {}  # the last inversion: (images, attr_src) -> z*

    @torch.no_grad()
    def generate(attrs, seed=0):
        noise = cgan.sample_noise(config, len(attrs), torch.Generator().manual_seed(seed), device)
        return torch.cat([generator(z, a.float().to(device)).float().cpu()
                          for z, a in zip(noise.split(batch_size), attrs.split(batch_size))])

    def codes_for(images, attr_src):
        if not (found and torch.equal(found["images"], images) and torch.equal(found["attrs"], attr_src)):
            codes = [cgan.invert(generator, x.to(device), a.float().to(device))[0]
                     for x, a in zip(images.split(batch_size), attr_src.split(batch_size))]
            found.update(images=images.clone(), attrs=attr_src.clone(), codes=torch.cat(codes))
        return found["codes"]

    @torch.no_grad()
    def edit(images, attr_src, attr_tgt):
        codes = codes_for(images, attr_src)
        return torch.cat([generator(z, a.float().to(device)).float().cpu()
                          for z, a in zip(codes.split(batch_size), attr_tgt.split(batch_size))])

    return types.SimpleNamespace(
        attr_names=list(attr_names), img_size=img_hw[0] if img_hw[0] == img_hw[1] else img_hw,
        crop=crop, generate=generate, edit=edit, reconstruct=None, encode=None)
