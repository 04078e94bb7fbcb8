"""Features Changer: autoencoders whose codes hold attribute directions (smile, glasses, blond hair).

Follows Cc618/Feature-Changer (MIT, commit 7ab82f5; no paper). An autoencoder learns a code z per
face; the mean code of faces WITH an attribute minus that of faces WITHOUT it is a direction v
(src/stats.py): decoding z + 1.5·v adds the attribute (src/main.py all_feat); the original removes
one only in its GIFs, which walk to z − 2·v (src/main.py media). Two autoencoders (src/net.py):
dcae, the original's `Net3` (32 px, 100 numbers; src/params.py), and pgae, its fully convolutional
`PGAE`, grown as in Karras et al., "Progressive Growing of GANs for Improved Quality, Stability,
and Variation", ICLR 2018, arXiv:1710.10196 (no GAN here). Both learn with the loss of Hou, Shen,
Sun, Qiu, "Deep Feature Consistent Variational Autoencoder", WACV 2017, arXiv:1610.00291 (§3.2,
without the KL term; src/vgg_loss.py after ku2482/vae.pytorch).

Objective (tensors hold [-1, 1]; the losses see u(x) = (x + 1) / 2, the original's ToTensor [0, 1])
    x̂ = D(E(x))
    L_dfc = Σ_{l ∈ relu1_1, relu2_1, relu3_1} mean((Φ_l(u(x̂)) − Φ_l(u(x)))²)   src/vgg_loss.py 'vae-123'
            Φ: ImageNet VGG19 fed raw [0, 1] images (no mean/std), always in fp32
    L_mse = mean((u(x̂) − u(x))²)    pgae below 32 px (src/train.py feature_loss_step 3), --loss mse
    v_a = mean_{a(x)=1} E(x) − mean_{a(x)=0} E(x)     ≤ 1000 images per side (src/data.py, stats.py)
    grid: D(E(x) ± 1.5·v_a)        lerp GIF: D((1 − t)·z + t·(z ± 2·v_a)), 20 frames at 256 px
    pgae, resolution R fading in, α: 0 -> 1 over one phase (src/net.py PGAE.encode, .decode):
        h = α·EBlock_R(fromRGB_R(x)) + (1 − α)·fromRGB_{R/2}(avgpool2(x))
        x̂ = α·toRGB_R(DBlock_R(h')) + (1 − α)·nearest_x2(toRGB_{R/2}(h'))
Notation -> code: E, D = model.encode, .decode; Φ_l = the taps in loss_dfc; v_a = attribute_vectors;
α, R = pg_schedule; widths nef = 32 (Net3), chan = 8 (PGAE): constructor arguments.

Shapes. dcae, 32 px (each block conv, LeakyReLU 0.2, BatchNorm: the original's order)
    E: (B, 3, 32, 32) -> (B, 32, 16, 16) -> (B, 64, 8, 8) -> (B, 128, 4, 4) -> Linear -> z (B, 100)
    D: z -> Linear, ReLU -> (B, 128, 4, 4) -> 3x [nearest x2, conv 3x3] -> (B, 3, 32, 32), bare conv
pgae, 64 px (EBlock: 2x [conv 3x3, LeakyReLU, BN], max-pool; DBlock: bilinear x2, the same)
    E at 64 px: fromRGB (B, 8, 64, 64) -> (B, 16, 32, 32) -> ... -> (B, 128, 4, 4) = z, flattened
    E at 8 px:  fromRGB (B, 64, 8, 8) -> (B, 128, 4, 4);  D mirrors E;  fromRGB, toRGB: bare 1x1 conv
Schedule (src/main.py, src/train.py): Adam lr 1e-3; dcae batch 256, 1 epoch; pgae batch 128, 5
phases of [1, 1, 1, 1, 2] epochs: 8 px, then 16, 32 and 64 px each faded in over one epoch (α =
(b + 1)/n; no stable phase between), then 2 epochs at 64 px. Here an epoch is len(train) // batch
steps (--steps 0 and --phase-steps 0 keep the original's); the phase is a pure function of the step.

Deviations from the original, and why
* Data: the official partition (the original cuts its csv by position, src/data.py); vectors from
  training images only (it samples all, test included). Epochs drop the partial last batch (the
  original's DataLoader keeps it): dcae's is 635 steps (162,770 // 256), the original's 752
  (⌈192,464 / 256⌉). The whole 178x218 frame is squashed to a square as its Resize((32, 32)),
  but bicubic (PIL's bilinear there), once at the final size; pgae's lower sizes are pooled from it.
* Images hold [-1, 1] in and out (the original: ToTensor's [0, 1]), as common.py gives all methods:
  the same model up to an affine change of the weights of the bare output convs and of pgae's 1x1
  fromRGBs (not the same init or Adam steps); dcae's first conv pads 0: mid-grey here, black there.
  The grid adds a reconstruction and −v columns (src/main.py: +1.5·v only); default attributes:
  the original's five (src/main.py) and three more; no image-to-image GIFs.
* The DFC loss stays fp32 under bf16 autocast (CUDA; the original is fp32 throughout). VGG19
  weights are never downloaded (--vgg-weights PATH or torch.hub's cache); --loss auto is dfc, but
  mse on the cpu-demo preset without the file. vectors.pt is keyed by a hash of the weights.

Commands (more in README.md)
    python feature_ae.py                               # dcae on the demo set (cpu-demo on a CPU)
    python feature_ae.py --arch pgae --out runs/pgae   # progressive 8 -> 64 px
    python feature_ae.py --data ./celeba --vgg-weights ~/vgg19-dcbb9e9d.pth
    python feature_ae.py show --ckpt runs/feature_ae/ckpt.pt     # grid.png and the lerp GIFs
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import io
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import types
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

import common
from common import InputError

SCRIPT = "feature_ae.py"  # the program name in --help
# The original's attributes (src/main.py: all_feat and media) and three more the demo set draws.
FEATURE_ATTRS = ["Smiling", "Blond_Hair", "Eyeglasses", "Male", "Mustache", "Bangs", "Black_Hair", "Wearing_Hat"]
STRENGTH = 1.5  # z ± 1.5·v in the grids and the evaluation edits (src/main.py all_feat: z + 1.5·v)
VECTOR_IMAGES = 1000  # images with / without an attribute averaged into its vector (src/data.py)
SAMPLE_VECTOR_IMAGES = 250  # the same for the training grids: fewer, so that they are quick
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/" + VGG19_FILE
DFC_MIN_SIZE = 32  # src/train.py: the feature loss from PGAE step 3 (32 px) up; below, pixel MSE


# ======== Config =================================================================================
@dataclasses.dataclass
class Args:
    """Train a Features Changer autoencoder (`python feature_ae.py show --help`: its pictures)."""
    arch: str = "dcae"  # 'dcae' (the original's Net3, 32 px) or 'pgae' (progressive, 8 -> 64 px)
    img_size: int = 0  # final image side (0: the original's, dcae 32, pgae 64)
    z_size: int = 100  # dcae code size (original: 100); the pgae code is a (128, 4, 4) map
    loss: str = "auto"  # 'dfc', 'mse', or 'auto': dfc, but mse on cpu-demo without the VGG19 file
    vgg_weights: str = None  # torchvision's VGG19 ImageNet file (default: torch.hub's cache)
    batch_size: int = 0  # images per step (0: the original's, dcae 256, pgae 128)
    lr: float = 1e-3  # Adam learning rate (original: 1e-3)
    steps: int = 0  # training steps (0: the original's epochs: dcae 1, pgae 6 in 5 phases)
    phase_steps: int = 0  # pgae: steps per epoch of its schedule (0: one epoch, the original's)
    data: str = "demo"  # a CelebA folder (any layout common.py reads), 'demo' or 'demo:N'
    attrs: list = dataclasses.field(default_factory=list)  # attributes of the sample grids
    allow_rare_attrs: bool = False  # use attributes present on < 1 % or > 99 % of the training images
    out: str = "runs/feature_ae"  # run folder: ckpt.pt, metrics.jsonl, losses.png, samples/
    seed: int = 0  # seed of the weights and the batches
    device: str = "auto"  # 'auto' (cuda, mps, cpu), 'cuda', 'cpu', ...
    amp: bool = True  # bf16 autocast of the autoencoder on CUDA (the DFC loss stays fp32)
    compile: bool = False  # torch.compile the dcae on CUDA (pgae changes resolution: never)
    preset: str = "auto"  # 'auto' (cpu-demo on a CPU with the demo set, else paper), 'paper', 'cpu-demo'
    log_every: int = 100  # print a line and append to metrics.jsonl every this many steps
    sample_every: int = 2000  # write samples/step_XXXXXX.png every this many steps, and at the end
    ckpt_every: int = 2000  # write ckpt.pt every this many steps, and at the end
    resume: bool = False  # continue the run in --out exactly where its checkpoint stopped
    smoke: bool = False  # a tiny end-to-end run on demo:16 with a random VGG (seconds); tests use it


POSITIVE = ("z_size", "lr", "log_every", "sample_every", "ckpt_every")  # > 0 (0 elsewhere: the original's)
RESUME_MUST_MATCH = ("arch", "img_size", "z_size", "loss", "vgg_weights", "batch_size", "lr", "phase_steps",
                     "data", "attrs", "seed")  # --steps may grow
ORIGINAL = {"dcae": dict(img_size=32, batch_size=256), "pgae": dict(img_size=64, batch_size=128)}
PRESETS = {  # applied to the fields not typed; smoke's pgae: 8 px (steps 0-1), 16 then 32 px fading in (2-3, 4-5)
    "cpu-demo": dict(batch_size=64, steps={"dcae": 1500, "pgae": 900}, phase_steps=150, log_every=50,
                     sample_every=500, ckpt_every=500),
    "smoke": dict(data="demo:16", img_size=32, z_size=16, batch_size=8, vgg_weights="random", steps=6,
                  phase_steps=2, log_every=2, sample_every=3, ckpt_every=3),
}


# ======== Model ==================================================================================
class DCAE(nn.Module):
    """The original's Net3 (src/net.py): three 4x4 stride-2 convs to (4·nef, S/8, S/8), a Linear
    code of z_size numbers, three nearest-upsampling 3x3 convs back, the last one bare."""

    def __init__(self, img_size=32, z_size=100, nef=32):
        super().__init__()
        self.sizes = [img_size]  # one resolution (encode/decode take pgae's size and alpha too)
        self.code_shape = (4 * nef, img_size // 8, img_size // 8)
        down = lambda c_in, c_out: [  # noqa: E731  halves H, W
            nn.Conv2d(c_in, c_out, 4, 2, padding=1), nn.LeakyReLU(0.2), nn.BatchNorm2d(c_out)]
        up = lambda c_in, c_out: [  # noqa: E731  doubles H, W; BatchNorm eps 1e-3 as the original
            nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.2),
            nn.BatchNorm2d(c_out, eps=1e-3)]
        self.encoder = nn.Sequential(*down(3, nef), *down(nef, 2 * nef), *down(2 * nef, 4 * nef))
        self.to_z = nn.Linear(math.prod(self.code_shape), z_size)  # (B, 2048) -> (B, 100)
        self.from_z = nn.Sequential(nn.Linear(z_size, math.prod(self.code_shape)), nn.ReLU())
        self.decoder = nn.Sequential(*up(4 * nef, 2 * nef), *up(2 * nef, nef),
                                     nn.Upsample(scale_factor=2, mode="nearest"),
                                     nn.Conv2d(nef, 3, 3, padding=1))  # no tanh: the original's

    def encode(self, images, alpha=1.0):
        """(B, 3, S, S) -> (B, 128, 4, 4) -> flattened (B, 2048) -> z (B, z_size)."""
        return self.to_z(self.encoder(images).flatten(1))

    def decode(self, z, size=None, alpha=1.0):
        """z (B, z_size) -> (B, 3, S, S), about [-1, 1]."""
        return self.decoder(self.from_z(z).view(-1, *self.code_shape))

    def forward(self, images, alpha=1.0):
        return self.decode(self.encode(images))


def conv_pair(c_in, c_out):
    """The original's EConv / DConv: 2x [conv 3x3, LeakyReLU 0.2, BatchNorm], sizes unchanged."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.2), nn.BatchNorm2d(c_out),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2), nn.BatchNorm2d(c_out))


class PGAE(nn.Module):
    """The original's PGAE (src/net.py). Encoder k reads side img_size / 2^k: [from_rgb[k], a bare
    1x1 conv], conv pair chan·2^k -> chan·2^(k+1), max-pool. Decoder j writes side 8·2^j: bilinear
    x2, conv pair, [to_rgb[j]]. At resolution R the image enters by the encoder of side R and leaves
    by the decoder of side R; the code is always the (chan·2^n, 4, 4) map, flattened."""

    def __init__(self, img_size=64, chan=8):
        super().__init__()
        n = img_size.bit_length() - 3  # blocks from img_size down to 4x4 (64 px: 4, the original)
        self.sizes = [img_size >> k for k in range(n - 1, -1, -1)]  # [8, 16, 32, 64]
        self.code_shape = (chan * 2 ** n, 4, 4)  # (128, 4, 4)
        width = [chan * 2 ** k for k in range(n + 1)]  # [8, 16, 32, 64, 128]
        self.from_rgb = nn.ModuleList(nn.Conv2d(3, width[k], 1) for k in range(n))
        self.enc = nn.ModuleList(conv_pair(width[k], width[k + 1]) for k in range(n))
        self.dec = nn.ModuleList(conv_pair(width[n - j], width[n - j - 1]) for j in range(n))
        self.to_rgb = nn.ModuleList(nn.Conv2d(width[n - j - 1], 3, 1) for j in range(n))

    def encode(self, images, alpha=1.0):
        """(B, 3, R, R), R in self.sizes -> z (B, 2048). alpha < 1: R is fading in."""
        k = len(self.sizes) - 1 - self.sizes.index(images.shape[-1])  # the encoder of side R
        hidden = F.max_pool2d(self.enc[k](self.from_rgb[k](images)), 2)  # (B, 2·width[k], R/2, R/2)
        if alpha < 1:  # blend in the previous entry: its fromRGB on the pooled image, same shape
            hidden = alpha * hidden + (1 - alpha) * self.from_rgb[k + 1](F.avg_pool2d(images, 2))
        for block in self.enc[k + 1:]:
            hidden = F.max_pool2d(block(hidden), 2)
        return hidden.flatten(1)  # (B, 128, 4, 4) -> (B, 2048)

    def decode(self, z, size=None, alpha=1.0):
        """z (B, 2048) -> (B, 3, size, size) (size: default the largest)."""
        j = self.sizes.index(size or self.sizes[-1])  # the decoder of side R
        hidden = z.view(-1, *self.code_shape)  # (B, 128, 4, 4)
        for block in self.dec[:j]:
            hidden = block(F.interpolate(hidden, scale_factor=2, mode="bilinear"))  # (B, C, R/2, R/2)
        image = self.to_rgb[j](self.dec[j](F.interpolate(hidden, scale_factor=2, mode="bilinear")))
        if alpha < 1:  # blend in the previous picture: its toRGB, upsampled (nearest)
            old = F.interpolate(self.to_rgb[j - 1](hidden), scale_factor=2, mode="nearest")
            image = alpha * image + (1 - alpha) * old  # (B, 3, R, R)
        return image

    def forward(self, images, alpha=1.0):
        return self.decode(self.encode(images, alpha), images.shape[-1], alpha)


def build_model(config):  # config: Args as a dict, or a checkpoint's
    return PGAE(config["img_size"]) if config["arch"] == "pgae" else DCAE(config["img_size"], config["z_size"])


def pg_schedule(step, n_sizes, phase_steps):
    """(resolution index, α) at step `step` (0-based), a pure function of the step as a resume needs.
    Phase p = step // phase_steps: 0 trains the first resolution; p < n_sizes fades resolution p in,
    α = (t + 1) / phase_steps at its step t (the original's (b + 1) / n_batch); then the last, α = 1."""
    phase, into = divmod(step, phase_steps)
    if phase == 0 or phase >= n_sizes:
        return min(phase, n_sizes - 1), 1.0
    return phase, (into + 1) / phase_steps


# ======== Losses =================================================================================
def load_vgg(weights, device):
    """VGG19's features[:12] (conv1_1 ... relu3_1; torchvision's layout, so the ImageNet file's
    'features.N.*' load), frozen, with the weights of the file `weights` (None: torch.hub's cache)
    or random ones (seed 0, a warning) for 'random'. Never downloads."""
    with torch.random.fork_rng(devices=[]):  # leaves the training RNG untouched
        torch.manual_seed(0)
        vgg = make_layers(cfgs["E"])[:12].requires_grad_(False).eval()  # no BN, no dropout in it
    default = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
    path = Path(weights or default).expanduser()
    if weights == "random":
        print("warning: --vgg-weights random: the DFC loss uses a RANDOM VGG19 (for tests only)")
    elif not path.is_file():
        raise InputError(f"the DFC loss needs VGG19 ImageNet weights and {path} is missing: download "
                         f"{VGG19_URL} by hand into {default.parent} or pass --vgg-weights PATH "
                         f"(or train with --loss mse)")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            vgg.load_state_dict({key: state[f"features.{key}"] for key in vgg.state_dict()})
        except Exception as err:
            raise InputError(f"{path} is not torchvision's VGG19 file ({VGG19_FILE}): {err!r}") from err
    return vgg.to(device)


def to_unit(images):
    """[-1, 1] -> [0, 1]: what the original's losses and VGG see (its ToTensor images)."""
    return (images.float() + 1) / 2


def loss_mse(img_recon, img_real):
    """L_mse = mean((u(x̂) − u(x))²) over pixels and channels (src/train.py F.mse_loss)."""
    return F.mse_loss(to_unit(img_recon), to_unit(img_real))


def loss_dfc(vgg, img_recon, img_real):
    """L_dfc = Σ_{l ∈ relu1_1, relu2_1, relu3_1} mean((Φ_l(u(x̂)) − Φ_l(u(x)))²) (src/vgg_loss.py
    FLPLoss, 'mean' as src/train.py), Φ fed u(x) NOT ImageNet-normalised (as the original). fp32:
    autocast is off in here. x̂'s gradient flows through the frozen VGG; the target's is not needed."""

    def features(images):  # [relu1_1 (B, 64, H, W), relu2_1 (B, 128, H/2, W/2), relu3_1 (B, 256, H/4, W/4)]
        taps = []
        for index, layer in enumerate(vgg):
            images = layer(images)
            taps += [images] if index in (1, 6, 11) else []
        return taps

    with torch.autocast(img_real.device.type, enabled=False):
        with torch.no_grad():
            target = features(to_unit(img_real))
        return sum(F.mse_loss(a, b) for a, b in zip(features(to_unit(img_recon)), target))


# ======== Training step ==========================================================================
def train_step(model, optimizer, img_real, alpha, vgg, amp_ctx):
    """One Adam step at the batch's own resolution: L_dfc with a VGG, else L_mse -> detached scalars."""
    with amp_ctx():
        img_recon = model(img_real, alpha)
    mse = loss_mse(img_recon, img_real)  # fp32, outside autocast
    loss = loss_dfc(vgg, img_recon, img_real) if vgg is not None else mse
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    stats = {"loss": loss.detach(), "mse": mse.detach(), "psnr": -10 * mse.detach().log10()}  # dB
    return {**stats, "dfc": loss.detach()} if vgg is not None else stats


# ======== Attribute vectors and the pictures =====================================================
@torch.no_grad()
def attribute_vectors(encode, images, labels, max_per_side=1000, seed=0, device=None):
    """v_a = mean E(x with a) − mean E(x without a), over at most max_per_side images per side in
    a fixed random order from `seed` (src/stats.py). images (N, 3, H, W) uint8 or float, labels
    (N, A) 0/1 -> (vectors (A, Z) on the CPU, counts (A, 2) with, without); one side empty: 0."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    labels = labels.cpu()[order] > 0.5
    picks = [(order[on][:max_per_side], order[~on][:max_per_side]) for on in labels.T]  # (with, without)
    needed = torch.unique(torch.cat([torch.cat(p) for p in picks]))  # each image encoded once
    chunks = (c.to(device) if device is not None else c for c in images[needed.to(images.device)].split(256))
    codes = torch.cat([encode(common.to_float(c) if c.dtype == torch.uint8 else c).float().cpu() for c in chunks])
    every = torch.zeros(len(images), codes.shape[1]).index_copy_(0, needed, codes)  # (N, Z), 0 if unused
    vectors = [every[on].mean(0) - every[off].mean(0) if len(on) * len(off) else every[0] * 0 for on, off in picks]
    return torch.stack(vectors), torch.tensor([[len(on), len(off)] for on, off in picks])


def edit_codes(z, vectors, attr_src, attr_tgt, strength=STRENGTH):
    """z + strength·Σ_a (tgt_a − src_a)·v_a: z (B, Z), vectors (A, Z), attributes (B, A) 0/1."""
    return z + strength * (attr_tgt.float() - attr_src.float()) @ vectors.to(z)


@torch.no_grad()
def feature_grid(model, images, vectors, strength, size, alpha):
    """(R, 2 + 2A, 3, size, size): input | reconstruction | D(z + s·v_a), D(z − s·v_a) for each
    attribute; images (R, 3, H, H) in [-1, 1], pooled to the model's current resolution."""
    images = F.adaptive_avg_pool2d(images, size)
    z = model.encode(images, alpha)
    columns = [images, model.decode(z, size, alpha)]
    for vector in vectors.to(z):
        columns += [model.decode(z + sign * strength * vector, size, alpha) for sign in (1, -1)]
    return torch.stack([c.float().clamp(-1, 1) for c in columns], 1)


def grid_labels(attr_names):
    return ["input", "recon"] + [f"{sign}{name}" for name in attr_names for sign in "+-"]


# ======== Checkpoints, a trained model, the vectors of exactly its weights =======================
def load(ckpt_path, device="cpu"):
    """A trained model: namespace(model (eval), config, attr_names, step, size and α reached, weights_hash, ckpt)."""
    state = load_checkpoint(ckpt_path)  # refuses a file that another script wrote, in one line
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    # A hash of every weight and buffer: vectors.pt is reused only for the weights it came from (a
    # step count cannot tell them apart: a new run into the same folder reaches the same steps).
    weights_hash = hashlib.sha256(b"".join(k.encode() + t.cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
                                           for k, t in sorted(state["model"].items()))).hexdigest()[:20]
    return types.SimpleNamespace(model=model.to(device).eval(), config=state["config"],
                                 attr_names=list(state["attr_names"]), step=state["step"],
                                 size=state["phase"]["size"], alpha=state["phase"]["alpha"],
                                 weights_hash=weights_hash, ckpt=Path(ckpt_path))


def vectors_for(trained, attr_names, device="cpu"):
    """(A, Z): vectors.pt's when made from exactly these weights and complete, else computed and saved."""
    path, config = trained.ckpt.parent / "vectors.pt", trained.config
    saved = load_checkpoint(path) if path.is_file() else {}
    if saved and not {"weights_hash", "vectors"} <= set(saved):
        raise InputError(f"{path}: expected the attribute vectors that {SCRIPT} show writes, found "
                         f"{', '.join(sorted(set(saved) - {'script'}))}; move it away to compute them anew")
    if saved.get("weights_hash") == trained.weights_hash and set(attr_names) <= set(saved["vectors"]):
        return torch.stack([saved["vectors"][n] for n in attr_names])
    names = list(dict.fromkeys([*trained.attr_names, *attr_names]))  # the checkpoint's and those asked
    faces = common.load_celeba(config["data"], names, "train", config["img_size"], None, verbose=False)
    vectors, counts = attribute_vectors(
        lambda x: trained.model.encode(F.adaptive_avg_pool2d(x, trained.size), trained.alpha),
        faces.images, faces.labels, VECTOR_IMAGES, config["seed"], device)
    save_checkpoint(path, {"weights_hash": trained.weights_hash, "step": trained.step,
                           "vectors": dict(zip(names, vectors)), "counts": dict(zip(names, counts.tolist()))})
    print(f"wrote {path} (images with / without: {dict(zip(names, counts.tolist()))})")
    return vectors[[names.index(n) for n in attr_names]]


# ======== Sub-command: show (the original's pictures) ============================================
@dataclasses.dataclass
class ShowArgs:
    """The feature grid (rows: test images or your photo; columns: input | reconstruction |
    D(z ± 1.5·v) per attribute) and GIFs z -> z ± 2·v of the first row (src/main.py all_feat, media)."""
    ckpt: str = "runs/feature_ae/ckpt.pt"  # checkpoint written by training
    attrs: list = dataclasses.field(default_factory=list)  # attributes (default: the checkpoint's)
    count: int = 8  # grid rows: the first images of the test split
    image: str = None  # your own photo (jpg/png) instead: one row, and its GIFs
    frames: int = 20  # frames per GIF, 0 (none) or at least 2 (original: 20)
    out: str = None  # output folder (default: the checkpoint's): grid.png, lerp_<attr>_{add,remove}.gif
    device: str = "auto"  # device to run the model on


@torch.no_grad()
def show_command(args):
    """grid.png and two 256-px GIFs per attribute at 10 frames/s (the original's media)."""
    if args.frames == 1:
        raise InputError("--frames 1: expected 0 (no GIFs) or at least 2")
    trained = load(args.ckpt, device := pick_device(args.device))
    config, size, alpha, folder = trained.config, trained.size, trained.alpha, Path(args.out or trained.ckpt.parent)
    attr_names = common.resolve_attrs(args.attrs) if args.attrs else trained.attr_names
    gifs = [folder / f"lerp_{name}_{word}.gif" for name in attr_names for word in ("add", "remove")] * bool(args.frames)
    check_writable(folder / "grid.png", trained.ckpt.parent / "vectors.pt", *gifs)  # before any work
    images = common.load_photo(args.image, config["img_size"], None) if args.image else common.to_float(
        common.load_celeba(config["data"], [], "test", config["img_size"], None, verbose=False).images[:args.count])
    vectors = vectors_for(trained, attr_names, device).to(device)
    grid = feature_grid(trained.model, images.to(device), vectors, STRENGTH, size, alpha)
    paths = [folder / "grid.png"]
    common.save_grid(grid.cpu(), paths[0], col_labels=grid_labels(attr_names), title=f"z ± {STRENGTH}·v, {size} px")
    z = trained.model.encode(grid[:1, 0].to(device), alpha)  # the first row's input, at `size`
    for name, vector in zip(attr_names, vectors) if args.frames else ():
        for word, sign in (("add", 1), ("remove", -1)):  # the original's z_end = z ± 2·v
            t = torch.linspace(0, 1, args.frames, device=device)[:, None]  # D((1 − t)·z + t·(z ± 2·v))
            frames = trained.model.decode(z + t * sign * 2 * vector, size, alpha).clamp(-1, 1)
            paths.append(folder / f"lerp_{name}_{word}.gif")
            common.save_gif(F.interpolate(frames, size=(256, 256), mode="bilinear").cpu(), paths[-1], fps=10)
    print("wrote " + ", ".join(map(str, paths)))
    return paths


# ======== train(args) and main() =================================================================
def configure(args, device):
    """Preset (smoke, or cpu-demo on a CPU with the demo set), the original's sizes, --loss auto,
    canonical --data and --attrs, checks -> args."""
    if (args.preset not in ("auto", "paper", "cpu-demo") or args.arch not in ORIGINAL
            or args.loss not in ("auto", "dfc", "mse")):
        raise InputError(f"--preset {args.preset!r} / --arch {args.arch!r} / --loss {args.loss!r}: expected "
                         f"auto, paper or cpu-demo / dcae or pgae / auto, dfc or mse")
    auto = "cpu-demo" if device.type == "cpu" and is_demo(args.data) else "paper"
    args.preset = "smoke" if args.smoke else auto if args.preset == "auto" else args.preset
    if args.preset in PRESETS:  # --preset paper keeps the original's configuration anywhere
        apply_preset(args, {k: v[args.arch] if isinstance(v, dict) else v for k, v in PRESETS[args.preset].items()},
                     args.preset)
    for name, value in ORIGINAL[args.arch].items():
        setattr(args, name, getattr(args, name) or value)
    if args.img_size < 8 or (args.img_size % 8 if args.arch == "dcae" else args.img_size & (args.img_size - 1)):
        expected = "a multiple of 8" if args.arch == "dcae" else "a power of 2 from 8"
        raise InputError(f"--img-size {args.img_size}: {args.arch} expects {expected}")
    if args.loss == "auto":
        default = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
        found = args.vgg_weights == "random" or Path(args.vgg_weights or default).expanduser().is_file()
        args.loss = "mse" if args.preset == "cpu-demo" and not found else "dfc"
        if args.loss == "mse":
            print(f"note: cpu-demo preset without VGG19 weights ({default} is missing): --loss mse, not dfc "
                  f"(download {VGG19_URL} by hand for dfc)", file=sys.stderr)
    args.data = args.data if is_demo(args.data) else str(Path(args.data).resolve())
    args.attrs = common.resolve_attrs(args.attrs or [a for a in FEATURE_ATTRS
                                                     if not is_demo(args.data) or a in common.DEMO_ATTRS])
    return args


def train(args):
    device = pick_device(args.device)
    args, out = configure(args, device), Path(args.out)
    lock = claim_run_folder(out, args.resume)  # noqa: F841 (held till exit; before any data loads)
    config, metrics = dataclasses.asdict(args), out / "metrics.jsonl"
    state = load_checkpoint(out / "ckpt.pt", config, RESUME_MUST_MATCH) if args.resume else None
    torch.manual_seed(args.seed)
    model = build_model(config).to(device)
    vgg = load_vgg(args.vgg_weights, device) if args.loss == "dfc" and model.sizes[-1] >= DFC_MIN_SIZE else None
    data = common.load_celeba(args.data, args.attrs, "train", args.img_size, None)  # the whole frame, squashed
    if len(data.images) < args.batch_size:
        raise InputError(f"{len(data.images)} training images, fewer than --batch-size {args.batch_size}")
    common.check_attr_rates(data, args.allow_rare_attrs)
    epoch = len(data.images) // args.batch_size  # src/main.py: dcae 1 epoch; pgae 1 per phase, 2 at the end
    phase_steps = args.phase_steps or epoch
    steps = args.steps or (epoch if args.arch == "dcae" else phase_steps * (len(model.sizes) + 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)  # betas (0.9, 0.999): src/train.py
    for module, key in ((model, "model"), (optimizer, "optimizer")):
        module.load_state_dict(state[key]) if state else None  # --resume: continue exactly
    if (first := state["step"] if state else 0) >= steps:
        raise InputError(f"--resume: the checkpoint is at step {first}, --steps {steps}; expected a larger --steps")
    val = common.load_celeba(args.data, args.attrs, "val", args.img_size, None, verbose=False)
    data, samples = common.to_device(data, device), common.to_float(val.images[:8]).to(device)
    trim_jsonl(metrics, first)
    if on_cuda := device.type == "cuda":  # channels-last memory and bf16 autocast (--amp)
        model.to(memory_format=torch.channels_last)
    model_train = torch.compile(model) if args.compile and args.arch == "dcae" else model
    print(f"Features Changer {args.arch} {' -> '.join(map(str, model.sizes))} px, loss {args.loss}, {len(data.images)} "
          f"training images, steps {first}..{steps} (phases of {phase_steps}), {device}, {args.preset}")
    totals, clock, since = {}, time.time(), first
    for step, stop in training_steps(first, steps, out / "ckpt.pt"):  # stop: SIGINT/SIGTERM came
        # ALGO LOGIC: the phase, a batch at its resolution, one update (L_dfc from 32 px up)
        index, alpha = pg_schedule(step, len(model.sizes), phase_steps)
        size = model.sizes[index]
        batch = common.get_batch(data, step, args.batch_size, args.seed, device, channels_last=on_cuda)
        stats = train_step(model_train, optimizer, F.adaptive_avg_pool2d(batch[0], size), alpha,
                           vgg if size >= DFC_MIN_SIZE else None, lambda: autocast(device, args.amp))
        # TRY NOT TO MODIFY: logging, samples, checkpoints
        totals = {k: totals.get(k, 0) + v for k, v in stats.items()}  # tensors: no sync until a log
        done, saving = step + 1, time.time()
        if done % args.log_every == 0 or done == steps:
            steps_per_s = (done - since) / (saving - clock)
            record = {"step": done, **{k: v.item() / (done - since) for k, v in totals.items()}, "res": size,
                      "alpha": alpha, "img_per_s": steps_per_s * args.batch_size}
            check_finite(done, record, model)  # FloatingPointError: stop, keep the last checkpoint
            with writing(metrics), open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"step {done}/{steps}  {size} px α {alpha:.2f}  loss {record['loss']:.4f}  psnr {record['psnr']:.2f} "
                  f"dB  {record['img_per_s']:.0f} img/s  ETA {(steps - done) / steps_per_s / 60:.1f} min", flush=True)
            totals, clock, since = {}, time.time(), done
        if done % args.sample_every == 0 or done == steps:  # validation images, training-set vectors
            model.eval()
            vectors = attribute_vectors(lambda x: model.encode(F.adaptive_avg_pool2d(x, size), alpha),
                                        data.images, data.labels, SAMPLE_VECTOR_IMAGES, args.seed)[0]
            with writing(path := out / "samples" / f"step_{done:06d}.png"):
                common.save_grid(feature_grid(model, samples, vectors, STRENGTH, size, alpha), path,
                                 col_labels=grid_labels(data.attr_names),
                                 title=f"{args.arch} step {done}, {size} px, α {alpha:.2f}")
            model.train()
        if done % args.ckpt_every == 0 or done == steps or stop:
            check_finite(done, {}, model)  # a diverged run never overwrites the last good checkpoint
            save_checkpoint(out / "ckpt.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done, "config": config,
                "phase": {"size": size, "alpha": alpha}, "schedule": {"steps": steps, "phase_steps": phase_steps},
                "attr_names": data.attr_names})
        clock += time.time() - saving  # img/s counts training, not the time spent writing files
    with writing(out / "losses.png"):
        common.plot_metrics(metrics, out / "losses.png")
    print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png")
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "show") else "train"
    if command == "show":
        return show_command(parse_dataclass(ShowArgs, argv, f"{SCRIPT} show", positive=("count",)))
    return train(parse_dataclass(Args, argv, f"{SCRIPT} [train]", positive=POSITIVE))


# ======== Plumbing: verbatim copies from attgan.py (tests/test_copies.py checks them) ============
# Copied from attgan.py
def parse_dataclass(cls, argv=None, prog=None, positive=()):
    """A dataclass's command line (--field-name, help = the field's trailing comment) -> an instance
    vetted before any work: numbers finite, at least 0, those in `positive` above 0; no list value
    repeated. `.given` keeps the fields the user typed, which no preset overrides."""
    docs = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    for name, default in defaults.items():
        option = dict(default=argparse.SUPPRESS, help=f"{docs.get(name, '')} (default: {default})"
                      .replace("%", "%%"))  # SUPPRESS: an option not typed stays out of `given`
        if isinstance(default, bool):
            option["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            option.update(nargs="*", action="extend")
        else:
            option["type"] = str if default is None else type(default)
        parser.add_argument("--" + name.replace("_", "-"), **option)
    given = vars(parser.parse_args(argv))
    args = cls(**{**defaults, **given})
    for name, value in dataclasses.asdict(args).items():
        flag = "--" + name.replace("_", "-")
        if type(value) in (int, float) and not (math.isfinite(value) and (value > 0 or value == 0
                                                                          and name not in positive)):
            raise InputError(f"{flag} {value}: expected a finite number "
                             f"{'above' if name in positive else 'of at least'} 0")
        if isinstance(value, list) and len({str(v).lower() for v in value}) < len(value):
            raise InputError(f"{flag} {' '.join(map(str, value))}: a value is repeated")
    args.given = set(given)
    return args


# Copied from attgan.py
def apply_preset(args, preset, name):
    """Set the preset's values on the fields the user did not type, and say which changed."""
    changed = {k: v for k, v in preset.items() if k not in args.given and getattr(args, k) != v}
    for key, value in changed.items():
        setattr(args, key, value)
    if changed:
        print(f"note: {name} preset: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                  for k, v in changed.items()), file=sys.stderr)


# Copied from attgan.py
def pick_device(name):
    """'auto' takes CUDA, then Apple's MPS, then the CPU; CUDA gets TF32 and cuDNN autotune."""
    available = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    try:
        device = torch.device(("cuda" if "cuda" in available else available[-1]) if name == "auto" else name)
    except RuntimeError:
        device = torch.device("meta")  # not a device name at all
    if device.type not in available or (device.index or 0) >= max(torch.cuda.device_count(), 1):
        raise InputError(f"--device {name}: not on this machine; expected auto or {', '.join(available)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    return device


# Copied from attgan.py
def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU runs stay in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


# Copied from attgan.py
def claim_run_folder(out, resume):
    """Make `out` this process's run folder before any data loads -> its lock: keep a reference, the
    folder stays locked (the folder itself: no lock file in it) until the lock is dropped, and then
    the folders made for a run that wrote nothing are removed. Refused: a file, an unwritable
    folder, another live run's folder, a run's folder unless --resume. Nothing is written there
    before training starts; a crashed save's temporary files are removed."""
    out = Path(out)
    made = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunFolderLock(out, made)
        fcntl.flock(lock.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the OS drops it when the process ends
    except BlockingIOError:
        raise InputError(f"--out {out}: another run is writing there; expected a free folder") from None
    except OSError as err:
        raise InputError(f"--out {out}: expected a folder this user can write ({err.strerror})") from None
    for stale in out.glob("*.[0-9]*.tmp"):  # <file>.<pid>.tmp: no live run writes here (the lock)
        stale.unlink()
    held = [n for n in ("ckpt.pt", "metrics.jsonl", "samples") if (out / n).exists()]
    if resume and "ckpt.pt" not in held or held and not resume:
        lock.release()
        raise InputError(f"--resume: expected a checkpoint {out / 'ckpt.pt'} to continue" if resume
                         else f"--out {out} holds a run ({', '.join(held)}): continue it with "
                         f"--resume or choose another --out (nothing was changed)")
    return lock


# Copied from attgan.py
class RunFolderLock:
    """An flock on the run folder itself (no lock file in it), held while this object is referenced;
    then the folders its claim made are removed if nothing was written into them."""

    def __init__(self, out, made):
        self.fd = os.open(out, os.O_RDONLY)
        self.release = weakref.finalize(self, RunFolderLock.unlock, self.fd, made)  # also at exit

    @staticmethod
    def unlock(fd, made):
        os.close(fd)
        for folder in made:  # innermost first; rmdir removes only an empty folder
            with contextlib.suppress(OSError):
                folder.rmdir()


# Copied from attgan.py
def check_writable(*paths):
    """Refuse, before the work that produces them, output files in a folder this user cannot write."""
    for path in map(Path, paths):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path.parent).close()
        except OSError as err:
            raise InputError(f"{path}: expected a file this user can write ({err.strerror})") from None


# Copied from attgan.py
@contextlib.contextmanager
def writing(path, kept=""):
    """A failed write inside (disk full, quota, read-only) -> an OSError naming `path` and its cause
    (run_main prints it as one line)."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, f"could not write it ({err.strerror or err}){kept}", str(path)) from None


# Copied from attgan.py
def replace_file(path, data, kept=""):
    """Write `data` (bytes) to a temporary file, then rename it over `path`: a failed or interrupted
    write keeps the previous file, and the temporary one is removed."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    with writing(path, kept):
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


# Copied from attgan.py
def save_checkpoint(path, state):
    """Save `state`, tagged with this script's name, atomically (serialised in memory first, so that
    a failed write names its cause: torch.save's own error would not)."""
    data = io.BytesIO()
    torch.save({**state, "script": Path(__file__).name}, data)
    replace_file(path, data.getbuffer(), "; the previous checkpoint is kept")


# Copied from attgan.py
def load_checkpoint(path, config=None, must_match=()):
    """A checkpoint of this script (tensors and plain values only: weights_only=True); with
    `config`, one whose saved config differs on a field of `must_match` is refused by name."""
    path, script = Path(path), Path(__file__).name
    if not path.is_file():
        raise InputError(f"{path}: expected a checkpoint written by {script}; there is no such file")
    try:  # (torch's own message would advise weights_only=False: never for a file of unknown origin)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = None
    if not isinstance(state, dict) or state.get("script") != script:
        found = state.get("script", "another program") if isinstance(state, dict) else "not a checkpoint"
        raise InputError(f"{path}: expected a checkpoint written by {script}, found {found}")
    for name in must_match if config is not None else ():
        if state["config"].get(name) != config.get(name):
            raise InputError(f"{path} was trained with {name}={state['config'].get(name)!r}, this run "
                             f"has {name}={config.get(name)!r}; use the same setting or another --out")
    return state


# Copied from attgan.py
def check_finite(step, stats, *modules):
    """FloatingPointError at the first non-finite loss, parameter or buffer (a BatchNorm variance can
    overflow while the loss looks fine), before it reaches a checkpoint. Call it at log steps."""
    tensors = [torch.as_tensor(v).float().reshape(-1).cpu() for v in stats.values()] + [
        t.detach().float().reshape(-1).cpu() for m in modules for t in [*m.parameters(), *m.buffers()]]
    if not bool(torch.cat(tensors).isfinite().all()):
        bad = [k for k, v in stats.items() if not math.isfinite(float(v))] or ["weights"]
        raise FloatingPointError(f"step {step}: non-finite {', '.join(bad)}; the run stopped and "
                                 f"the last checkpoint written is kept (a smaller --lr may help)")


# Copied from attgan.py
def trim_jsonl(path, max_step):
    """On resume, keep the lines logged up to the checkpoint's step, drop a torn one (a write cut
    short) and the later ones (logged again), and replace the file atomically."""
    if not Path(path).is_file():
        return  # a fresh run: metrics.jsonl appears with its first line
    kept = []
    for line in Path(path).read_text().splitlines():
        try:
            kept += [line + "\n"] if json.loads(line)["step"] <= max_step else []
        except (ValueError, KeyError, TypeError):
            pass
    replace_file(path, "".join(kept).encode())


# Copied from attgan.py
def training_steps(start, end, ckpt, resume=True):
    """range(start, end) as (step, stop): SIGINT and SIGTERM only set a flag meanwhile, read at each
    step boundary (the DDP ranks agree on it by one all_reduce; a single process never syncs). The
    loop saves `ckpt` after a `stop` update, then the run ends with one line and exit 130 / 143; a
    second Ctrl-C meanwhile is ignored, so the save completes."""
    caught, stop, step = [], False, start - 1
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
    previous = {n: signal.signal(n, lambda number, _: caught.append(number)) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in range(start, end):
            stop = bool(caught)
            if ddp:  # one rank's signal stops them all
                flag = torch.tensor(float(stop), device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
                torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
                stop = bool(flag)
            yield step, stop
            if stop:
                break
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught or stop:  # here, or on another rank
        number, command = (caught or [signal.SIGTERM])[0], shlex.join(
            ["python", *sys.argv] + ["--resume"] * (resume and "--resume" not in sys.argv))
        if ddp:
            torch.distributed.barrier()  # rank 0 has written the checkpoint
        if not ddp or torch.distributed.get_rank() == 0:
            print(f"{signal.Signals(number).name}: stopped after step {step + 1}; {ckpt} holds it; "
                  + (f"continue with: {command}" if step + 1 < end else "training had finished"), file=sys.stderr)
        sys.exit(128 + number)


# Copied from attgan.py
def run_main(main):
    """Run a command line; a refused input, a diverged run or a failed write ends with one line
    (exit 1), Ctrl-C outside a training loop with its message (exit 130): never a traceback."""
    try:
        main()
    except (InputError, FloatingPointError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:
        sys.exit(f"error: {err.filename + ': ' if err.filename else ''}{err.strerror or err}")
    except KeyboardInterrupt as err:
        print(f"interrupted{': ' if str(err) else ''}{err}", file=sys.stderr)
        sys.exit(130)


# Copied from attgan.py
def is_demo(data):
    """'demo' / 'demo:N' name the synthetic set; anything else is a folder."""
    return data == "demo" or data.startswith("demo:")


if __name__ == "__main__":
    run_main(main)
