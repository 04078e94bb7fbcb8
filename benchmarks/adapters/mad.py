"""Evaluation adapter for mad.py (see adapters/__init__.py for the contract).

encode returns MAD's four factors, E_dis(E(x)): pose (B, 3), identity, style, expression (B, 32
each, unit vectors). A checkpoint of stage 'ae' has E_dis at its initialisation, so its factors are
the baseline the disentangle stage starts from. reconstruct is G(E(x)) at stage 'ae' and
G(G_dis(E_dis(E(x)))) after it (as the original's forward). generate decodes samples of the prior
N(0, I) and ignores the attributes (conditional=False); edit is None (MAD edits by swapping factors:
`python mad.py swap`).
"""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import mad  # noqa: E402


def load(ckpt_path, device="cpu", batch_size=256):
    device = torch.device(device)
    nets, config, attr_names = mad.load(ckpt_path, device)

    def chunks(images):
        return (x.to(device) for x in images.split(batch_size))

    def reconstruct(images):
        return torch.cat([mad.reconstruct(nets, x, config["stage"]).cpu() for x in chunks(images)])

    def encode(images):
        parts = [mad.encode(nets, x) for x in chunks(images)]
        return {name: torch.cat([p[name].cpu() for p in parts]) for name in mad.FACTORS}

    @torch.no_grad()
    def generate(attrs, seed=0):
        z = torch.randn(len(attrs), mad.code_dim(config), generator=torch.Generator().manual_seed(seed))
        return nets.g(z.to(device)).float().cpu()

    return types.SimpleNamespace(attr_names=list(attr_names), img_size=config["img_size"],
                                 crop=config["crop"], edit=None, reconstruct=reconstruct,
                                 encode=encode, generate=generate, conditional=False)
