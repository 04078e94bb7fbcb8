"""MAD: an adversarial autoencoder whose 99-d code is disentangled into pose, identity, style, expression.

Paper: B. Browatzki, C. Wallraven, "Robust Discrimination and Generation of Faces using Compact,
Disentangled Embeddings", ICCV Workshops (RSL-CV) 2019. Code followed: github.com/browatbn2/MAD at
5bb5a8e (networks/saae.py, archs.py, resnet_ae.py, invresnet.py; utils/nn.py; train.py; config.py).
The paper is not stored here, so the terms below cite the code, not equation numbers.

Idea. An adversarial autoencoder E -> z (99) -> G: a latent critic D_z pulls z towards N(0, I), an
image critic D_x sharpens G's output. Two MLPs sit on z: E_dis splits it into factors f = (pose 3,
identity 32, style 32, expression 32; the last three unit vectors), G_dis maps f back, and G reads
G_dis(E_dis(z)). Each step supervises ONE factor k and runs a cycle: give every image another's f_k,
decode, re-encode; identity, style and expression (f_k included, pose never) must come back, and f_k
must carry the new labels (saae.py). Style is what changes between VoxCeleb clips of one person.

Objective (x in [-1, 1]; z = E(x); z^ = G_dis(E_dis(z)), z^ = z in stage ae; z_p ~ N(0, I); sp = softplus)
  L_Dz  = sp(-D_z(z_p)) + sp(D_z(z))       every 2nd step, lr        (train.py _run_batch)
  L_Dx  = sp(-D_x(x)) + sp(D_x(G(z^)))     every 4th step, lr / 2 = 1e-5   (no prior decodes: --no-lgen)
  L_AE  = lam_rec |x - G(z^)|_1 + sp(-D_z(z)) + sp(-D_x(G(z^)))
  L_dis = 5 [4 |z - z^|_1 + L_k(f_k, y) + |f~ - f'|_1 (pose excluded) + L_k(f'_k, y o pi)]  (saae.py)
      f~ = f detached with f_k <- f_k o pi (pi a random permutation), f' = E_dis(E(G(G_dis(f~))))
  L_pose = ||f_pose - theta||^2 (radians); L_id,style,expr = mean clamp(d(a,p) - d(a,n) + 0.2, 0, 0.4),
      d = sqrt(||.||^2 + 1e-8), (a, p, n) mined per batch (mine_triplets: utils/nn.py make_triplets);
      L_expr counts twice. lam_rec = 127.5: train.py's 255 |x - x^|_1 on [0, 1] images, on [-1, 1].
  Adam: E, G, D_z, D_x lr 2e-5, betas (0, 0.999) (train.py); E_dis, G_dis 8e-5, (0.9, 0.999) (saae.py).
Stages (--stage): ae trains E, G, D_z, D_x (train.py --disent 0) -> disentangle trains E_dis, G_dis
on L_dis with E, G, D_z, D_x frozen in eval mode (--disent 2 --train-ae 0) -> joint trains all six.

Notation -> code: E Encoder (resnet_ae.resnet18, "Q"), G Decoder (invresnet.InvResNet, "P"), D_z
LatentDiscriminator (archs.D_net_gauss), D_x ImageDiscriminator (archs.Discriminator), E_dis
FactorEncoder (archs.EncoderLvlParallel), G_dis FactorDecoder (archs.DecoderLvlParallel).
Shapes (256 px): x (B, 3, 256, 256) -> E: conv7x7 s2, maxpool (B, 64, 64, 64), residual stages 64,
64/2, 128/2, 256/2, 512/2 (B, 512, 4, 4), avgpool, fc -> z (B, 99) -> E_dis (1000) -> f -> G_dis
(1000) -> (B, 99) -> G: fc, convT (B, 512, 4, 4), up blocks 256 ... 64 (B, 64, 128, 128), convT, tanh.

Deviations, and why
* Data: CelebA / the demo set stand in for VGGFace2, AffectNet, VoxCeleb; the demo set gives true
  angles and identities. Identity: identity_CelebA. Pose: from the 5 landmarks (off without them),
  (yaw, pitch, roll) where the original orders (pitch, yaw, roll). Style: a person with one key of
  STYLE_ATTRS (per-photo looks, not traits such as Male) plays a clip; the negative is the same
  person with another key (make_triplets' [ids, vids] branch: another clip), the positive shares
  the key but, where the batch has one, not the person (the original: the same clip), since our
  coarse key cannot hold a clip's lighting or set. Batches after ae are B/2 same-person pairs that
  differ in key where they can (train.py's macro-batches of clips of 5 people need
  --macro-batchsize > 0; default 0). Expression: the 4 classes of (Smiling, Mouth_Slightly_Open),
  mined like identity; the original ranks by class and AffectNet's valence/arousal, no embedding
  term (positive rank 1, negative a random rank >= 10), which needs the continuous labels.
* No pretrained weights offline: E starts from random He init, not ImageNet (resnet_ae.py model_urls).
* One Adam step of E per batch (train.py steps Q twice, and the second step still holds the latent
  term's gradient: it counts twice there); BCE on logits (the original: -log(sigmoid + 1e-8)); fewer
  D_x convs below 128 px; no emotion classifier ZNet (trained on detached codes: it reads f_expr,
  never shapes it); no flips (face_processing.RandomHorizontalFlip, p 0.5, negates yaw, not roll).
* --preset cpu-demo (auto on a CPU with demo data): 64 px, narrow widths, 10x the learning rates,
  batch 16, 400 steps a stage, so that each stage shows something within minutes.

    python mad.py --stage ae && python mad.py --stage disentangle && python mad.py --stage joint
    python mad.py --data ./celeba --stage ae --out runs/mad_celeba          # 256 px, batch 50
    python mad.py swap --ckpt runs/mad/joint/ckpt.pt                        # factor-swap grid
    python mad.py --smoke --stage ae --out /tmp/mad_smoke                   # seconds, end to end
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
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
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import InputError

FACTORS = ("pose", "identity", "style", "expression")  # the order of f, and of E_dis's heads
POSE_DIM = 3  # yaw, pitch, roll (saae.py dim_pose; the original's order: pitch, yaw, roll)
# One factor per step (saae.py: available_factors[iter % len]): per 4 rounds pose 2, identity 3, expression
# 3, style 2 (VGGFace2 [0,1,1,1], AffectNet [0,3,3,3], VoxCeleb [2] every other round: train.py).
FACTOR_CYCLE = ("pose", "identity", "expression", "style", "identity", "expression", "pose",
                "identity", "expression", "style")
STAGES = ("ae", "disentangle", "joint")
PREVIOUS_STAGE = {"disentangle": "ae", "joint": "disentangle"}
EXPRESSION_ATTRS = ["Smiling", "Mouth_Slightly_Open"]
STYLE_ATTRS = ["Eyeglasses", "Bangs", "Wearing_Hat"]  # change between photos of one person, as clips do
NOSE_DEPTH, PITCH_GAIN, FRONTAL_V = 0.33, 3.0, 0.575  # pose_from_landmarks' geometry


@dataclass
class Args:
    """Train MAD one stage at a time (sub-commands: train (default), swap)."""
    factor_dim: int = 32  # size of f_id, f_style, f_expr (config.py EXPRESSION_DIMS); z: 3 + 3 x this
    img_size: int = 256  # image side in pixels (config.py INPUT_SIZE 256); a power of two >= 32
    enc_dim: int = 64  # channels of E's stem, doubling per stage (ResNet-18: 64 ... 512)
    dec_dim: int = 64  # channels of G's last blocks (InvResNet: 512, 256, 128, 64, 64, 64)
    dis_dim: int = 32  # channels of D_x's first conv, doubling up to 8x (archs.Discriminator ndf 32)
    hidden_dim: int = 1000  # hidden units of D_z, E_dis and G_dis (archs.py N = 1000)
    lambda_rec: float = 127.5  # weight of |x - G(z^)|_1: train.py's 255 x L1 on [0, 1] images, for [-1, 1]
    w_disent: float = 5.0  # weight of the whole disentanglement loss (config.py W_DISENT)
    w_z_recon: float = 4.0  # weight of |z - G_dis(E_dis(z))|_1 (config.py W_Z_RECON)
    w_expression: float = 2.0  # extra factor on the expression triplet losses (saae.py calc_feature_loss)
    margin: float = 0.2  # triplet margin; hinges clamped at 2 x margin (utils/nn.py calc_triplet_loss)
    lr: float = 2e-5  # Adam lr of E, G, D_z (D_x: half), betas (0, 0.999) (train.py --lr)
    lr_dis: float = 8e-5  # Adam learning rate of E_dis and G_dis, betas (0.9, 0.999) (saae.py lr_l)
    dz_every: int = 2  # update D_z every this many steps (train.py: every 2nd iteration)
    dx_every: int = 4  # update D_x every this many steps (config.py UPDATE_DISCRIMINATOR_FREQ)
    batch_size: int = 50  # images per step (train.py at 256 px); after 'ae' B/2 same-identity pairs
    data: str = "demo"  # a CelebA folder (any layout common.py reads), 'demo' or 'demo:N'
    out: str = "runs/mad"  # each stage writes <out>/<stage>/: ckpt.pt, metrics.jsonl, losses.png, samples/
    stage: str = "ae"  # 'ae' (autoencoder + critics), 'disentangle' (E_dis, G_dis only), 'joint' (everything)
    init: str = None  # checkpoint a fresh stage starts from (default: <out>/<previous stage>/ckpt.pt)
    attrs: list = field(default_factory=list)  # attributes (default: EXPRESSION_ATTRS, which define expression, + STYLE_ATTRS)
    crop: int = 170  # centre square crop in official 178x218 pixels before resizing
    steps: int = 100_000  # training steps of this stage
    seed: int = 0  # seed of the weights, batches, prior samples, triplets and permutations
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cuda', 'cpu', ...
    amp: bool = True  # bf16 autocast on CUDA (the original is fp32; ignored elsewhere)
    preset: str = "auto"  # 'auto' (cpu-demo on a CPU with demo data, else paper), 'paper' or 'cpu-demo'
    log_every: int = 100  # print a progress line and append to metrics.jsonl every this many steps
    sample_every: int = 5000  # write a sample grid every this many steps (and at the end)
    ckpt_every: int = 5000  # write ckpt.pt every this many steps (and at the end)
    resume: bool = False  # continue from <out>/<stage>/ckpt.pt exactly (its configuration must match)
    allow_rare_attrs: bool = False  # train on attributes present on < 1 % or > 99 % of the training images
    smoke: bool = False  # a tiny end-to-end run on demo:16 (seconds on a CPU); tests use it


POSITIVE = ("factor_dim", "img_size", "enc_dim", "dec_dim", "dis_dim", "hidden_dim", "lambda_rec", "margin",
            "lr", "lr_dis", "dz_every", "dx_every", "batch_size", "crop", "steps", "log_every",
            "sample_every", "ckpt_every")  # > 0
PRESETS = {  # applied to the fields the user did not type; the header says what cpu-demo changes
    "smoke": dict(data="demo:16", img_size=32, enc_dim=4, dec_dim=4, dis_dim=4, hidden_dim=32,
                  batch_size=8, steps=4, log_every=2, sample_every=4, ckpt_every=2,
                  allow_rare_attrs=True),  # demo:16 draws no Gray_Hair
    "cpu-demo": dict(img_size=64, enc_dim=16, dec_dim=16, dis_dim=16, lr=2e-4, lr_dis=8e-4,
                     batch_size=16, steps=400, log_every=50, sample_every=200, ckpt_every=200)}
RUN_SETTINGS = ("init", "steps", "device", "amp", "preset", "log_every", "sample_every", "ckpt_every",
                "resume", "out")  # may differ on --resume
RESUME_MUST_MATCH = tuple(f.name for f in dataclasses.fields(Args) if f.name not in RUN_SETTINGS)
INIT_MUST_MATCH = ("factor_dim", "img_size", "enc_dim", "dec_dim", "dis_dim", "hidden_dim", "crop")


# === Model ========================================================================================
class ResBlock(nn.Module):
    """resnet_ae.BasicBlock: conv3x3 (stride s), BN, ReLU, conv3x3, BN, + shortcut, ReLU. H -> H/s"""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.skip = nn.Identity() if stride == 1 and in_ch == out_ch else nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        return F.relu(self.main(x) + self.skip(x))


class Encoder(nn.Module):
    """E, a ResNet-18 with a 99-d output (resnet_ae.resnet18(num_classes=99)). Above 128 px it
    adds one stride-2 stage of `dim` channels per doubling (resnet_ae's layer0 at 256 px)."""

    def __init__(self, img_size=256, code_dim=99, dim=64):
        super().__init__()
        plan = [(dim, 1)] + [(dim, 2)] * max(0, int(math.log2(img_size)) - 7)
        plan += [(dim * 2, 2), (dim * 4, 2), (dim * 8, 2)]  # 2 blocks per stage, as ResNet-18
        layers = [nn.Conv2d(3, dim, 7, 2, 3, bias=False), nn.BatchNorm2d(dim), nn.ReLU(),
                  nn.MaxPool2d(3, 2, 1)]  # (B, 64, H/4, W/4)
        in_ch = dim
        for out_ch, stride in plan:
            layers += [ResBlock(in_ch, out_ch, stride), ResBlock(out_ch, out_ch)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 512)
        self.fc = nn.Linear(in_ch, code_dim)
        for m in self.modules():  # resnet_ae.py: He-normal convs (fan-out), BN weight 1
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images):
        return self.fc(self.features(images))  # (B, 99)


class UpBlock(nn.Module):
    """invresnet.InvBasicBlock: convT4x4 s2, BN, ReLU, conv3x3, BN, + convT shortcut, ReLU. H -> 2H"""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(), nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch))
        self.skip = nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=False),
                                  nn.BatchNorm2d(out_ch))

    def forward(self, x):
        return F.relu(self.main(x) + self.skip(x))


class Decoder(nn.Module):
    """G (invresnet.InvResNet, one block per level): z -> fc -> convT to 4x4 -> up blocks
    (4d, 2d, d, d, ...) -> convT4x4 s2 -> tanh. (B, 99) -> (B, 3, H, W) in [-1, 1]."""

    def __init__(self, img_size=256, code_dim=99, dim=64):
        super().__init__()
        levels = int(math.log2(img_size // 4)) - 1  # 5 at 256 px: 4 -> 128, the last convT -> 256
        widths = [dim * 8] + [max(dim, dim * 4 >> i) for i in range(levels)]  # 512, 256, 128, 64, ...
        self.fc = nn.Linear(code_dim, widths[0])
        self.stem = nn.Sequential(nn.ConvTranspose2d(widths[0], widths[0], 4, 1, 0, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())  # (B, 512, 4, 4)
        self.blocks = nn.Sequential(*[UpBlock(a, b) for a, b in zip(widths, widths[1:])])
        self.out = nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1, bias=False)
        for m in self.modules():  # invresnet.py: He-normal (fan-out) 3x3 convs; convTs keep the default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, z):
        hidden = self.stem(self.fc(z)[:, :, None, None])  # (B, 512, 4, 4)
        return torch.tanh(self.out(self.blocks(hidden)))  # (B, 3, H, W)


class ImageDiscriminator(nn.Module):
    """D_x (archs.Discriminator): conv4x4 s2 + LReLU, then conv4x4 s2 + BN + LReLU (d, 2d, 4d, 8d,
    8d), a final conv4x4 to one channel, averaged -> logits (B,)."""

    def __init__(self, img_size=256, dim=32):
        super().__init__()
        downs = min(5, int(math.log2(img_size // 4)))  # to 8x8 at 256 px, 4x4 at 128 and below
        widths = [3] + [dim * min(8, 2 ** i) for i in range(downs)]
        layers = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False)] + ([nn.BatchNorm2d(b)] if i else [])
            layers.append(nn.LeakyReLU(0.2))
        self.net = nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images):
        return self.net(images).squeeze(1)  # (B,) logits


class LatentDiscriminator(nn.Module):
    """D_z (archs.D_net_gauss): 99 -> 1000 -> 1000 -> 1, ReLU, dropout 0.2 -> logits (B,)."""

    def __init__(self, code_dim=99, hidden=1000):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(code_dim, hidden), nn.Dropout(0.2), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.Dropout(0.2), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, z):
        return self.net(z).squeeze(1)  # (B,)


class FactorEncoder(nn.Module):
    """E_dis (archs.EncoderLvlParallel): z -> Linear 1000, LeakyReLU -> one linear head per factor;
    identity, style and expression are L2-normalised. (B, 99) -> {factor: (B, 3 or 32)}"""

    def __init__(self, code_dim=99, factor_dim=32, hidden=1000):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(code_dim, hidden), nn.LeakyReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, POSE_DIM if name == "pose" else factor_dim)
                                    for name in FACTORS})

    def forward(self, z):
        hidden = self.trunk(z)
        return {name: head(hidden) if name == "pose" else F.normalize(head(hidden), dim=1)
                for name, head in self.heads.items()}


class FactorDecoder(nn.Module):
    """G_dis (archs.DecoderLvlParallel): concat(f) (B, 99) -> Linear 1000, LeakyReLU -> Linear 99."""

    def __init__(self, code_dim=99, hidden=1000):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(code_dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, code_dim))

    def forward(self, factors):
        return self.net(torch.cat([factors[name] for name in FACTORS], 1))  # (B, 99)


def code_dim(config):
    return POSE_DIM + 3 * config["factor_dim"]  # saae.py: z_dim = dim_ft * 3 + 3 = 99


def build_models(config):
    """The six networks from a config dict (sizes only) -> nn.ModuleDict: nets.e, .g, .dz, ..."""
    size, dim, hidden = config["img_size"], code_dim(config), config["hidden_dim"]
    return nn.ModuleDict(dict(
        e=Encoder(size, dim, config["enc_dim"]), g=Decoder(size, dim, config["dec_dim"]),
        dz=LatentDiscriminator(dim, hidden), dx=ImageDiscriminator(size, config["dis_dim"]),
        e_dis=FactorEncoder(dim, config["factor_dim"], hidden), g_dis=FactorDecoder(dim, hidden)))


def check_config(config):
    """Refuse settings the networks or the batches cannot be built with, in one clear line."""
    size, batch, stage = config["img_size"], config["batch_size"], config["stage"]
    if size < 32 or size & (size - 1) or stage not in STAGES or batch < 4 or batch % 2:
        raise InputError(f"--img-size {size} --stage {stage} --batch-size {batch}: expected a power "
                         f"of two >= 32, one of {', '.join(STAGES)} and an even number >= 4")


# === Supervision: pose from landmarks, labels per factor, the factor schedule, triplet mining =====
def pose_from_landmarks(landmarks):
    """(N, 5, 2) CelebA landmarks (x, y) in pixels (eyes, nose, mouth corners) -> (N, 3) (yaw,
    pitch, roll), degrees. roll = the eye line's angle; after undoing roll, in inter-ocular units:
    yaw = atan(u / NOSE_DEPTH), u = the nose's offset from the eye midpoint (orthographic camera);
    pitch = atan((FRONTAL_V - v) PITCH_GAIN), v = (nose - eyes) / (mouth - eyes) vertically.
    On the demo set's 1,440 true angles: correlation 0.97 (yaw), 0.69 (pitch), 0.96 (roll)."""
    points = landmarks.float()
    eye_l, eye_r, nose, mouth = points[:, 0], points[:, 1], points[:, 2], (points[:, 3] + points[:, 4]) / 2
    eye_mid, eye_vec = (eye_l + eye_r) / 2, eye_r - eye_l
    roll = torch.atan2(eye_vec[:, 1], eye_vec[:, 0])  # (N,)
    iod = eye_vec.norm(dim=1).clamp_min(1e-6)
    cos, sin = torch.cos(roll), torch.sin(roll)

    def derotate(p):  # rotate by -roll about the eye midpoint, in inter-ocular units -> (N, 2)
        dx, dy = (p - eye_mid).unbind(1)
        return torch.stack([dx * cos + dy * sin, dy * cos - dx * sin], 1) / iod[:, None]

    nose_n, mouth_n = derotate(nose), derotate(mouth)
    yaw = torch.atan(nose_n[:, 0] / NOSE_DEPTH)
    pitch = torch.atan((FRONTAL_V - nose_n[:, 1] / mouth_n[:, 1].clamp_min(1e-6)) * PITCH_GAIN)
    return torch.rad2deg(torch.stack([yaw, pitch, roll], 1))


def build_factors(data, args, demo, say=print):
    """Labels of a split -> {factor: tensor or None}: pose (N, 3) radians (the original's unit),
    identity (N, 1), expression (N, E) 0/1 keys (rows equal = same label), style (N, 1 + S): the
    person, then the STYLE_ATTRS key (mine_triplets' by_person)."""
    expr_cols = [k for k, a in enumerate(data.attr_names) if a in EXPRESSION_ATTRS]
    style_cols = [k for k, a in enumerate(data.attr_names) if a not in EXPRESSION_ATTRS]
    factors = {"pose": None, "identity": None, "expression": data.labels[:, expr_cols] if expr_cols else None}
    if demo:  # the true render parameters
        params = common.load_demo_params(data.root)
        rows = [params[name] for name in data.files]
        factors["pose"] = torch.tensor([[p["yaw"], p["pitch"], p["roll"]] for p in rows]).float()
        factors["identity"] = torch.tensor([[p["identity"]] for p in rows])
    else:
        if data.landmarks is not None:
            factors["pose"] = pose_from_landmarks(data.landmarks.cpu())
        if data.identities is not None:
            factors["identity"] = data.identities.cpu()[:, None]
    for name, source in (("pose", "list_landmarks_align_celeba"), ("identity", "identity_CelebA")):
        if factors[name] is None:
            say(f"warning: {args.data} has no {source} file: the {name} loss is off"
                + " (so is style's: it mines within a person)" * (name == "identity"))
    person, looks = factors["identity"], data.labels[:, style_cols].cpu()  # style: the person, then the key
    factors["style"] = torch.cat([person, looks], 1).long() if person is not None and style_cols else None
    if factors["pose"] is not None:
        factors["pose"] = torch.deg2rad(factors["pose"])
    return {k: None if v is None else v.to(data.images.device) for k, v in factors.items()}


def factor_of_step(step, available):
    """The one factor supervised at `step`: FACTOR_CYCLE without the factors lacking labels."""
    cycle = [name for name in FACTOR_CYCLE if name in available]
    if not cycle:
        raise InputError("the data have no labels for any factor (pose, identity, style, expression)")
    return cycle[step % len(cycle)]


def mine_triplets(codes, keys, generator, by_person=False):
    """(positive, negative) index per anchor, each (B,) (utils/nn.py make_triplets); a label is a row
    of `keys`. The positive: a random image of the best non-empty tier of same-label images, else
    itself; the negative: one of the 5 nearest in f (the farthest of them when fewer) of the best tier
    with another label (HARD_TRIPLETS_FOR_IDENTITY). Style (by_person: column 0 is the person, see the
    header): positives of another person first, negatives of the same person first."""
    keys = keys.reshape(len(keys), -1)
    person, keys = (keys[:, 0], keys[:, 1:]) if by_person else (keys.new_zeros(len(keys)), keys)
    other = (keys[:, None, :] != keys[None, :, :]).any(-1).long()  # (B, B)
    same_person = (person[:, None] == person[None, :]).long()
    itself = torch.eye(len(keys), dtype=torch.bool, device=keys.device)
    pos_tier = (3 * other + same_person * by_person).masked_fill(itself, 2)  # 0 key & other person
    neg_tier = (3 * (1 - other) + (1 - same_person)).masked_fill(itself, 9)  # 0 other key, same person
    distance = torch.cdist(codes.detach().float(), codes.detach().float())
    draw = torch.rand(len(keys), len(keys) + 1, generator=generator).to(codes.device)
    positive = (pos_tier + draw[:, 1:]).argmin(1)  # a random one of the best tier
    order = torch.argsort(neg_tier * (distance.max() + 1) + distance, dim=1, stable=True)
    n_best = (neg_tier == neg_tier.gather(1, order[:, :1])).sum(1)  # size of the best tier
    neg_rank = torch.minimum((draw[:, 0] * 5).long(), n_best - 1)
    return positive, order.gather(1, neg_rank[:, None])[:, 0]


# === Losses (one function per term) ===============================================================
def loss_rec(img_recon, img_real):
    """Pixel reconstruction |x - G(z^)|_1, the mean absolute difference (weighted by lambda_rec)."""
    return (img_recon.float() - img_real.float()).abs().mean()


def loss_gan_d(logits_real, logits_fake):
    """Critic BCE: sp(-D(real)) + sp(D(fake)) = -log sigma(D(real)) - log(1 - sigma(D(fake)))."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def loss_gan_g(logits_fake):
    """Non-saturating generator (encoder) loss: sp(-D(fake)) = -log sigma(D(fake))."""
    return F.softplus(-logits_fake.float()).mean()


def loss_z_recon(z_recon, z_code):
    """|z - G_dis(E_dis(z))|_1, mean (saae.py loss_z_recon)."""
    return (z_recon - z_code).abs().mean()


def loss_pose(f_pose, pose_rad):
    """||f_pose - theta||^2, mean over images and angles (saae.py: F.mse_loss, radians)."""
    return F.mse_loss(f_pose, pose_rad.to(f_pose.dtype))


def loss_triplet(anchor, positive, negative, margin=0.2):
    """mean clamp(d(a, p) - d(a, n) + margin, 0, 2 margin), d = sqrt(||.||^2 + 1e-8)
    (utils/nn.py calc_triplet_loss: the clamp keeps hopeless triplets from dominating)."""
    d_pos = ((anchor - positive).pow(2).sum(1) + 1e-8).sqrt()
    d_neg = ((anchor - negative).pow(2).sum(1) + 1e-8).sqrt()
    return (d_pos - d_neg + margin).clamp(0, 2 * margin).mean()


def loss_factor(name, codes, labels, args, generator):
    """Pose regression, or a mined triplet loss (x w_expression: saae.py calc_feature_loss)."""
    if name == "pose":
        return loss_pose(codes, labels)
    positive, negative = mine_triplets(codes, labels, generator, by_person=name == "style")
    loss = loss_triplet(codes, codes[positive], codes[negative], args.margin)
    return loss * args.w_expression if name == "expression" else loss


def loss_cycle(factors_swapped, factors_cycled):
    """|f~ - f'|_1 over identity, style and expression, the mean (saae.py: cat(f)[:, 3:], pose out)."""
    a = torch.cat([factors_swapped[name] for name in FACTORS[1:]], 1)
    b = torch.cat([factors_cycled[name] for name in FACTORS[1:]], 1)
    return (a - b).abs().mean()


# === Training steps ===============================================================================
def d_step(nets, optimizers, step, img_real, img_recon, z_code, z_prior, args, amp_ctx):
    """D_z (every dz_every steps) and D_x (every dx_every) on the codes and reconstructions the AE
    step optimises, detached: E and G are untouched. -> {"d_z": float, "d_x": float} (those run)"""
    stats = {}
    for name, every, real, fake in (("z", args.dz_every, z_prior, z_code),
                                    ("x", args.dx_every, img_real, img_recon)):
        if step % every == 0:
            critic, opt = nets[f"d{name}"], optimizers[f"opt_d{name}"]
            critic.requires_grad_(True)
            with amp_ctx():  # real and fake pass separately (train.py: BatchNorm statistics per kind)
                loss = loss_gan_d(critic(real), critic(fake.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stats[f"d_{name}"] = loss.item()
    return stats


def disentangle_losses(nets, z_code, labels, factor, args, amp_ctx, generator):
    """L_dis for the step's factor -> (z^ (B, 99), {term: loss tensor}). The cycle decodes the
    swapped factors with G and re-encodes them with E (frozen in 'disentangle', training in 'joint')."""
    factors = nets.e_dis(z_code)
    z_recon = nets.g_dis(factors)
    losses = {"z_rec": loss_z_recon(z_recon, z_code),
              f"f_{factor}": loss_factor(factor, factors[factor], labels, args, generator)}
    perm = torch.randperm(len(z_code), generator=generator).to(z_code.device)
    swapped = {name: f.detach() for name, f in factors.items()}  # saae.py detaches all four
    swapped[factor] = swapped[factor][perm]  # (B, d): another image's factor k
    with amp_ctx():
        img_swapped = nets.g(nets.g_dis(swapped))  # (B, 3, H, W)
        cycled = nets.e_dis(nets.e(img_swapped).float())
    losses["cycle"] = loss_cycle(swapped, cycled)
    losses[f"aug_{factor}"] = loss_factor(factor, cycled[factor].float(), labels[perm], args, generator)
    return z_recon, losses


def train_step(nets, optimizers, step, img_real, targets, args, amp_ctx, generator):
    """One step of the stage (train.py _run_batch): E, then L_dis, G, the critics' updates, and one
    update of what the stage trains on L_AE + w_disent L_dis. -> dict of floats."""
    z_prior = torch.randn(len(img_real), code_dim(vars(args)), generator=generator).to(img_real.device)
    frozen = args.stage == "disentangle"
    stats = {}
    with torch.set_grad_enabled(not frozen), amp_ctx():
        z_code = nets.e(img_real).float()  # (B, 99): the step's one encoder pass
    z_dec, loss = z_code, 0.0
    if args.stage != "ae":
        factor = factor_of_step(step, [k for k, v in targets.items() if v is not None])
        z_dec, terms = disentangle_losses(nets, z_code, targets[factor], factor, args, amp_ctx, generator)
        loss = args.w_disent * (args.w_z_recon * terms["z_rec"] + terms[f"f_{factor}"]  # config.py:
                                + terms["cycle"] + terms[f"aug_{factor}"])  # W_FEAT, W_CYCLE, W_AUG 1
        stats.update({k: v.item() for k, v in terms.items()})
    if not frozen:
        with amp_ctx():
            img_recon = nets.g(z_dec)  # (B, 3, H, W)
        stats.update(d_step(nets, optimizers, step, img_real, img_recon, z_code, z_prior, args, amp_ctx))
        for critic in (nets.dz, nets.dx):  # only E, G (and E_dis, G_dis) learn below
            critic.requires_grad_(False)
        with amp_ctx():
            rec, adv_z, adv_x = (loss_rec(img_recon, img_real), loss_gan_g(nets.dz(z_code)),
                                 loss_gan_g(nets.dx(img_recon)))
        loss = loss + args.lambda_rec * rec + adv_z + adv_x
        stats.update(rec=rec.item(), adv_z=adv_z.item(), adv_x=adv_x.item())
    generator_side = [opt for name, opt in optimizers.items() if name in ("opt_ae", "opt_dis")]
    for opt in generator_side:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in generator_side:
        opt.step()
    stats["loss"] = loss.item()
    return stats


def configure_stage(nets, stage, args):
    """Train/eval modes, requires_grad and the optimizers of a stage -> {name: Adam}.
    disentangle: E, G, D_z, D_x frozen and in eval mode (train.py --train-ae 0: saae.train(False))."""
    trained = {"ae": ("e", "g", "dz", "dx"), "disentangle": ("e_dis", "g_dis"),
               "joint": ("e", "g", "dz", "dx", "e_dis", "g_dis")}[stage]
    for name, module in nets.items():
        module.train(name in trained or stage == "ae")  # E_dis, G_dis unused in stage ae
        module.requires_grad_(name in trained)
    adam = lambda names, lr, betas: torch.optim.Adam(  # noqa: E731
        [p for name in names for p in nets[name].parameters()], lr=lr, betas=betas)
    optimizers = {}
    if "e" in trained:  # train.py: betas (0, 0.999) for the autoencoder and both critics
        optimizers.update(opt_ae=adam(("e", "g"), args.lr, (0.0, 0.999)),
                          opt_dz=adam(("dz",), args.lr, (0.0, 0.999)),
                          opt_dx=adam(("dx",), args.lr / 2, (0.0, 0.999)))  # D_x: lr * 0.5
    if "e_dis" in trained:  # saae.py: optimizer_E, optimizer_G
        optimizers["opt_dis"] = adam(("e_dis", "g_dis"), args.lr_dis, (0.9, 0.999))
    return optimizers


def step_generator(seed, step, stage):
    """A CPU generator for a step's prior samples, triplets and permutation: exact resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + STAGES.index(stage))


def make_batch(data, factors, pairs, step, args, device):
    """Images (B, 3, H, W) in [-1, 1] and labels of `step`; with `pairs`, B/2 same-identity pairs."""
    idx = common.batch_indices(len(data.images), step, args.batch_size, args.seed)
    if pairs is not None:
        idx = pairs[common.batch_indices(len(pairs), step, args.batch_size // 2, args.seed)].T.flatten()
    images = common.to_float(data.images[idx.to(data.images.device)].to(device)).contiguous(
        memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    return images, {k: None if v is None else v[idx.to(v.device)].to(device) for k, v in factors.items()}


# === Sampling and editing =========================================================================
@torch.no_grad()
def encode(nets, images):
    """E_dis(E(x)) -> {factor: (B, d)} (after stage ae: E_dis at its initialisation)."""
    return {k: v.float() for k, v in nets.e_dis(nets.e(images).float()).items()}


@torch.no_grad()
def reconstruct(nets, images, stage):
    """G(E(x)) at stage ae; G(G_dis(E_dis(E(x)))) after it (saae.py forward)."""
    z = nets.e(images).float()
    return nets.g(z if stage == "ae" else nets.g_dis(nets.e_dis(z))).float()


@torch.no_grad()
def swap_grid(nets, img_a, img_b, stage):
    """Rows A, B, recon A, A with B's pose / identity / style / expression -> (7, P, 3, H, W)."""
    f_a, f_b = encode(nets, img_a), encode(nets, img_b)
    rows = [img_a, img_b, reconstruct(nets, img_a, stage)]
    for name in FACTORS:  # decode G(G_dis(f)) of A's factors with B's `name`
        rows.append(nets.g(nets.g_dis({k: (f_b if k == name else f_a)[k] for k in FACTORS})))
    return torch.stack([r.float() for r in rows])


SWAP_ROWS = ["A", "B", "recon A", *[f"A + B's {f}" for f in FACTORS]]


def save_samples(nets, images, stage, path):
    """The training sample grid: swap_grid of the fixed validation faces with their next ones."""
    modes = {name: module.training for name, module in nets.items()}
    nets.eval()
    grid = swap_grid(nets, images, images.roll(-1, 0), stage)
    for name, module in nets.items():
        module.train(modes[name])
    common.save_grid(grid.cpu(), path, row_labels=SWAP_ROWS, title=f"MAD {stage}: {path.stem}")


# === Checkpoint and loading =======================================================================
def checkpoint_state(nets, optimizers, step, args, attr_names):
    """The whole training state of a stage as one dict (weights_only-loadable)."""
    return {"nets": nets.state_dict(), **{name: opt.state_dict() for name, opt in optimizers.items()},
            "step": step, "stage": args.stage, "config": dataclasses.asdict(args),
            "attr_names": list(attr_names)}


def load(ckpt_path, device="cpu"):
    """(nets in eval mode, config with the checkpoint's "stage", attr_names) from a checkpoint."""
    state = load_checkpoint(ckpt_path)
    config = dict(state["config"], stage=state["stage"])
    nets = build_models(config)
    nets.load_state_dict(state["nets"])
    return nets.to(device).eval(), config, state["attr_names"]


def load_split(data, config, attr_names, split):
    """A split at the checkpoint's size (an empty one falls back to 'train': tiny demo sets)."""
    loaded = common.load_celeba(data, attr_names, split, config["img_size"], config["crop"], verbose=False)
    return loaded if len(loaded.images) >= 2 else load_split(data, config, attr_names, "train")


# === Sub-command: swap ============================================================================
@dataclass
class SwapArgs:
    """Factor swap: for pairs (A, B), decode A's factors with one taken from B."""
    ckpt: str = "runs/mad/joint/ckpt.pt"  # checkpoint written by training
    split: str = "test"  # split of the checkpoint's dataset to draw the faces from
    pairs: int = 8  # number of (A, B) pairs, the columns: 2 x pairs images evenly spread over the split
    out: str = None  # output PNG (default: swap.png beside the checkpoint)


def swap(args):
    """Write the factor-swap grid -> its path."""
    if args.out and Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise InputError(f"--out {args.out}: expected a .png or .jpg file name")
    check_writable(path := Path(args.out or Path(args.ckpt).parent / "swap.png"))
    nets, config, attr_names = load(args.ckpt)
    data = load_split(config["data"], config, attr_names, args.split)
    pairs = min(args.pairs, len(data.images) // 2)  # spread over the split: other people
    images = common.to_float(data.images[torch.linspace(0, len(data.images) - 1, 2 * pairs).long()])
    grid = swap_grid(nets, images[:pairs], images[pairs:], config["stage"])
    common.save_grid(grid.cpu(), path, row_labels=SWAP_ROWS, col_labels=[f"pair {k}" for k in range(pairs)],
                     title=f"MAD ({config['stage']}): A's factors with one taken from B")
    print(f"wrote {path}")
    return path


# === train and main ===============================================================================
def configure(args, device):
    """Presets, canonical --data and --attrs, checks -> args."""
    if args.preset not in ("auto", "paper", "cpu-demo"):
        raise InputError(f"--preset {args.preset!r}: expected auto, paper or cpu-demo")
    auto = "cpu-demo" if device.type == "cpu" and is_demo(args.data) else "paper"
    args.preset = "smoke" if args.smoke else auto if args.preset == "auto" else args.preset
    if args.preset in PRESETS:  # --preset paper keeps the original's configuration anywhere
        apply_preset(args, PRESETS[args.preset], args.preset)
    args.data = args.data if is_demo(args.data) else str(Path(args.data).resolve())
    args.attrs = common.resolve_attrs(args.attrs or EXPRESSION_ATTRS + STYLE_ATTRS)
    check_config(dataclasses.asdict(args))
    return args


def setup_run(args, device):
    """Vet the checkpoints, claim the run folder, load the data -> (lock, state, init_state, data,
    factors, pairs, sample images)."""
    config, out = dataclasses.asdict(args), Path(args.out) / args.stage
    init_state = None  # a fresh stage starts from the previous one's weights
    if not args.resume and (args.init or args.stage in PREVIOUS_STAGE):
        init_path = args.init or Path(args.out) / PREVIOUS_STAGE[args.stage] / "ckpt.pt"
        init_state = load_checkpoint(init_path, config, INIT_MUST_MATCH)
        print(f"stage {args.stage}: starting from {init_path} (stage {init_state['stage']}, "
              f"step {init_state['step']})")
    lock = claim_run_folder(out, args.resume)
    state = load_checkpoint(out / "ckpt.pt", config, RESUME_MUST_MATCH) if args.resume else None
    if state and state["step"] >= args.steps:
        raise InputError(f"--resume: the checkpoint is at step {state['step']}; expected a larger --steps")
    data = common.to_device(common.load_celeba(args.data, args.attrs, "train", args.img_size,
                                               args.crop), device)
    common.check_attr_rates(data, args.allow_rare_attrs)
    factors = build_factors(data, args, is_demo(args.data))
    pairs = None  # after 'ae': batches of same-person pairs, which differ in style where they can, so
    if args.stage != "ae" and factors["identity"] is not None:  # identity has positives, style negatives
        style, ids = factors["style"], factors["identity"].view(-1).cpu()
        pairs = common.identity_pairs(ids, None if style is None else style[:, 1:].cpu())
        pairs = pairs if len(pairs) else common.identity_pairs(ids, require_diff=False)
    val = load_split(args.data, config, data.attr_names, "val")
    spread = torch.linspace(0, len(val.images) - 1, 8).long()  # 8 faces, most of them other people
    return lock, state, init_state, data, factors, pairs, common.to_float(val.images[spread]).to(device)


def train(args):
    device = pick_device(args.device)
    args = configure(args, device)
    lock, state, init_state, data, factors, pairs, samples = setup_run(args, device)  # noqa: F841
    out, start = Path(args.out) / args.stage, state["step"] if state else 0
    torch.manual_seed(args.seed)
    nets = build_models(dataclasses.asdict(args))
    nets.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    optimizers = configure_stage(nets, args.stage, args)
    if state or init_state:
        nets.load_state_dict((state or init_state)["nets"])
    for name, opt in optimizers.items() if state else ():
        opt.load_state_dict(state[name])
    trim_jsonl(out / "metrics.jsonl", start)
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731
    sizes = ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}" for k, m in nets.items())
    print(f"MAD stage {args.stage}, steps {start}..{args.steps}: {args.img_size} px; parameters (M) {sizes}; "
          f"trains {sorted(optimizers)}; {len(data.images)} images; {device}; {args.preset}")
    totals, clock, since = {}, time.time(), start
    for step, stop in training_steps(start, args.steps, out / "ckpt.pt"):  # stop: SIGINT/SIGTERM came
        # ALGO LOGIC: one batch, one step of the stage. Every random draw is a function of (seed,
        # step, stage): the batch, the generator's draws, and D_z's dropout (the global RNG).
        rng = step_generator(args.seed, step, args.stage)
        torch.manual_seed(rng.initial_seed())
        img_real, targets = make_batch(data, factors, pairs, step, args, device)
        stats = train_step(nets, optimizers, step, img_real, targets, args, amp_ctx, rng)
        # TRY NOT TO MODIFY: logging, samples, checkpoints
        for key, value in stats.items():
            totals.setdefault(key, []).append(value)
        done, saving = step + 1, time.time()
        if done % args.log_every == 0 or done == args.steps:
            steps_per_s = (done - since) / (saving - clock)
            record = {"step": done, **{k: sum(v) / len(v) for k, v in sorted(totals.items())},
                      "img_per_s": steps_per_s * args.batch_size}
            check_finite(done, record, nets)
            with writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"step {done}/{args.steps} [{args.stage}]  " + "  ".join(
                f"{k} {v:.3f}" for k, v in list(record.items())[1:-1]) + f"  {record['img_per_s']:.0f} "
                f"img/s  ETA {(args.steps - done) / steps_per_s / 60:.1f} min", flush=True)
            totals, clock, since = {}, time.time(), done
        if done % args.sample_every == 0 or done == args.steps:
            with amp_ctx(), writing(path := out / "samples" / f"step_{done:06d}.png"):
                save_samples(nets, samples, args.stage, path)
        if done % args.ckpt_every == 0 or done == args.steps or stop:
            check_finite(done, {}, nets)  # a diverged run never overwrites the last good one
            save_checkpoint(out / "ckpt.pt", checkpoint_state(nets, optimizers, done, args, data.attr_names))
        clock += time.time() - saving  # img/s counts training, not the time spent writing files
    with writing(out / "losses.png"):
        common.plot_metrics(out / "metrics.jsonl", out / "losses.png")
    print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png")
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "swap") else "train"
    if command == "swap":
        return swap(parse_dataclass(SwapArgs, argv, "mad.py swap", positive=("pairs",)))
    return train(parse_dataclass(Args, argv, "mad.py [train]", positive=POSITIVE))


# === Plumbing: verbatim copies of attgan.py's helpers (tests/test_copies.py checks them) =========
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
