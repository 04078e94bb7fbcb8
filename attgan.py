"""AttGAN: facial attribute editing by only changing what you want.

Paper: Zhenliang He, Wangmeng Zuo, Meina Kan, Shiguang Shan, Xilin Chen, "AttGAN: Facial Attribute
Editing by Only Changing What You Want", IEEE TIP 2019, https://arxiv.org/abs/1711.10678.
Code followed: LynnHo/AttGAN-Tensorflow at 4b00e6c (the TIP-paper "v1": models.py, train.py, data.py,
test.py, test_slide.py; its HEAD is a later "v2", unused), as the PyTorch port elvisyjlin/AttGAN-PyTorch.

The idea. An encoder G_enc turns a face x into feature maps z; a decoder G_dec redraws a face from z
and an attribute vector: given the face's own attributes a, x itself; given others, b, a face that a
classifier C reads as b and a critic D takes for a photo. Reconstruction keeps what the attributes do
not describe (identity, pose, background); C makes them change. z is left free (the paper's point
against "disentangled" encoders). D and C share a trunk.

Objective (WGAN-GP; a, b in {0, 1}^A; the paper's L_dis,cls and L_enc,dec, v1 train.py's weights)
    x̂_b = G_dec(G_enc(x), b')   x̂_a = G_dec(G_enc(x), a')   a' = (2a − 1)·thres_int (±0.5)
    L_D = D(x̂_b) − D(x) + λ_gp·(‖∇D(x̃)‖₂ − 1)² + λ_3·BCE(C(x), a),  x̃ = α·x + (1 − α)·x̂_b
    L_G = −D(x̂_b) + λ_2·BCE(C(x̂_b), b) + λ_1·‖x − x̂_a‖₁      λ_1 100, λ_2 10, λ_3 1, λ_gp 10
Each term is a mean (over images; BCE also over attributes, ‖·‖₁ over pixels) as in v1 train.py;
the paper sums over attributes and pixels, so the λ are on the code's scale, not the paper's.

Notation -> code
    x, a, b         img_real (B, 3, H, W) in [-1, 1], attr_src, attr_tgt (B, A) in {0, 1}
    a', b'          signed(attrs, thres_int): what G_dec sees;  λ_1, λ_2, λ_3: lambda_rec, _cls_g, _cls_d
    G_enc, G_dec    Generator.encode, Generator.decode;  G(x, a') = decode(encode(x), a')
    D, C            Discriminator(x) -> (critic score (B,), attribute logits (B, A))

Shapes (128 px; 5 layers, dim 64, max 1024, shortcut 1, inject 1 (v1's code: 0; its README: 1), A = 13)
    G_enc  x -> (B, 64, 64, 64) -> ... -> z (B, 1024, 4, 4)    conv 4x4 s2, BatchNorm, LeakyReLU
    G_dec  [z, b' tiled (B, 13, 4, 4)] -> (B, 1024, 8, 8) ++ enc (B, 512, 8, 8) ++ b' (B, 13, 8, 8)
           -> (B, 512, 16, 16) -> (B, 256, 32, 32) -> (B, 128, 64, 64) -> tanh (B, 3, 128, 128)
    D      x -> (B, 1024, 4, 4) (conv 4x4 s2, InstanceNorm, LeakyReLU) -> flatten (B, 16384)
           -> FC 1024, LeakyReLU -> FC 1 (critic);  FC 1024, LeakyReLU -> FC A (classifier)

Schedule (v1 train.py): Adam 2e-4, betas (0.5, 0.999); n_d = 5 D updates, then one G update, each on
its own batch; 200 epochs, lr × 0.1 from epoch 100; b = the batch's rows shuffled. Test (test.py): the
edited attribute at ±test_int (1.0), the rest ±thres_int, the rivals of one turned on off (data.py
check_attribute_conflict; v1 has no Mustache/No_Beard pair, c385855 removed it as "incorrect"; the
port kept it). edit --slide: test_slide.py's strip (10 values in −1..1, the rest the image's own;
here 9 in ±test_int, rivals off as in test.py).

Deviations, and why
* Data (common.py, for every method): the official split (162,770 train), not v1's images[:182000];
  a full permutation per epoch, not v1's 4,096-image shuffle buffer: a batch is a function of its
  step (exact resume, DDP shards). A centre 170 crop at every size (the port's CenterCrop(170); v1:
  x 3, y 26, and 148 at x 15, y 40 for 64 px). Resize bicubic in both; PIL's antialiases, TF 1's not.
* Init, norms: PyTorch's defaults, as the port's nn.py; v1's slim: Glorot-uniform weights, zero biases,
  BatchNorm decay 0.999, eps 1e-3, InstanceNorm eps 1e-6 (here momentum 0.1, eps 1e-5). cpu-demo and
  the README's numbers were tuned so; its 1,050 updates make 1,575 BatchNorm updates, after which
  decay 0.999 would still weigh the initial statistics by 21 % in eval mode.
* D scores real and fake in one batch (InstanceNorm is per image). G's step encodes x for each decode
  (v1 once; DDP syncs only through forward): the same z, but BatchNorm's statistics see x twice.
* CUDA: bf16 autocast, TF32, channels_last (v1 is fp32: --no-amp); the penalty is always fp32
  (benchmarks/gpu_check.sh compares). torchrun + DDP for several GPUs; --batch-size is global.
  CPU + demo set: cpu-demo (PRESETS: small nets, shortcut 2, n_d 1, lr 3e-3, λ_cls_g 20, test_int 3).

Run (more in README.md)
    python attgan.py                                # demo set; a CPU picks the cpu-demo preset
    torchrun --nproc_per_node 4 attgan.py --data ./celeba    # the paper's configuration
    python attgan.py edit --image me.jpg --set Eyeglasses=1 Blond_Hair=1.5    # or --slide Male
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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from common import InputError

PAPER_ATTRS = ["Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
               "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Young"]  # v1 train.py


@dataclasses.dataclass
class Args:
    """Train AttGAN (`python attgan.py edit --help` edits a face with a trained one)."""
    n_layers: int = 5  # conv layers of the encoder, the decoder and D (official: 5 each)
    enc_dim: int = 64  # channels of the first encoder conv, doubling per layer up to --max-dim
    dec_dim: int = 64  # channels of the last hidden decoder layer, doubling towards z
    dis_dim: int = 64  # channels of D's first conv, doubling per layer up to --max-dim
    max_dim: int = 1024  # cap on the channels of any conv layer (official: 1024)
    dis_fc_dim: int = 1024  # hidden units of each D head (official: 1024)
    shortcut_layers: int = 1  # U-Net shortcuts: encoder maps joined after the first K decoder layers
    inject_layers: int = 1  # attributes tiled again after the first K decoder layers
    thres_int: float = 0.5  # attributes reach G as (2a − 1)·thres_int in training
    test_int: float = 1.0  # the edited attribute's strength at test time (G sees ±test_int)
    lambda_rec: float = 100.0  # λ_1, weight of the reconstruction ‖x − x̂_a‖₁
    lambda_cls_g: float = 10.0  # λ_2, weight of the attribute loss on edits in L_G
    lambda_cls_d: float = 1.0  # λ_3, weight of the attribute loss on real images in L_D
    lambda_gp: float = 10.0  # weight of the WGAN-GP gradient penalty
    n_d: int = 5  # D updates per G update (each update on its own batch)
    lr: float = 2e-4  # Adam learning rate of G and D (betas 0.5, 0.999)
    epochs: float = 200.0  # training length, in epochs of the training split
    lr_decay_epoch: float = 100.0  # the learning rate drops ×0.1 from this epoch on
    batch_size: int = 32  # images per update (the global batch under torchrun)
    data: str = "demo"  # a CelebA folder (any layout common.py reads), 'demo' or 'demo:N'
    attrs: list = dataclasses.field(default_factory=list)  # attributes to edit (default: the paper's 13)
    allow_rare_attrs: bool = False  # train on attributes present on < 1 % or > 99 % of the training images
    img_size: int = 128  # image side in pixels, a multiple of 2^n_layers
    crop: int = 170  # centre square crop, in official 178x218 pixels, before resizing
    steps: int = 0  # stop after this many updates (0: all --epochs; the schedule follows --epochs)
    out: str = "runs/attgan"  # run folder: ckpt.pt, metrics.jsonl, losses.png, samples/
    seed: int = 0  # seed of the weights, the batches, the targets and the penalty's α
    device: str = "auto"  # 'auto' (cuda, mps, cpu), 'cuda', 'cuda:1', 'cpu', ...
    amp: bool = True  # bf16 autocast on CUDA (ignored elsewhere)
    compile: bool = False  # torch.compile G and D (CUDA; slow first steps while it compiles)
    preset: str = "auto"  # 'auto' (cpu-demo on a CPU with the demo set, else paper), 'paper', 'cpu-demo'
    log_every: int = 100  # print a line and append to metrics.jsonl every this many updates
    sample_every: int = 5000  # write samples/step_XXXXXX.png every this many updates, and at the end
    ckpt_every: int = 5000  # write ckpt.pt every this many updates, and at the end
    resume: bool = False  # continue the run in --out exactly where its checkpoint stopped
    smoke: bool = False  # a tiny end-to-end run on demo:16 (seconds on a CPU); tests use it


POSITIVE = ("n_layers", "enc_dim", "dec_dim", "dis_dim", "max_dim", "dis_fc_dim", "thres_int", "test_int", "n_d",
            "lr", "epochs", "batch_size", "img_size", "crop", "log_every", "sample_every", "ckpt_every")  # > 0
PRESETS = {  # applied to the fields the user did not type; README.md says what cpu-demo changes
    "smoke": dict(data="demo:16", img_size=32, n_layers=4, enc_dim=8, dec_dim=8, dis_dim=8,
                  max_dim=32, dis_fc_dim=32, batch_size=8, n_d=1, steps=6, lr_decay_epoch=0.11,
                  log_every=2, sample_every=3, ckpt_every=3, allow_rare_attrs=True),  # demo:16: no Bald
    "cpu-demo": dict(img_size=64, n_layers=4, enc_dim=16, dec_dim=12, dis_dim=16, max_dim=128, dis_fc_dim=128,
                     shortcut_layers=2, lambda_cls_g=20.0, test_int=3.0, n_d=1, lr=3e-3, epochs=7.0,
                     lr_decay_epoch=6.5, log_every=50, sample_every=400, ckpt_every=400),
}
RESUME_MUST_MATCH = ("data", "attrs", "img_size", "crop", "n_layers", "enc_dim", "dec_dim", "dis_dim", "max_dim",
                     "dis_fc_dim", "shortcut_layers", "inject_layers", "thres_int", "lambda_rec", "lambda_cls_g",
                     "lambda_cls_d", "lambda_gp", "n_d", "batch_size", "lr", "epochs", "lr_decay_epoch", "seed")


# Model -------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """G_enc + G_dec with U-Net shortcuts and attribute injection (shapes in the header)."""

    def __init__(self, num_attrs, n_layers=5, enc_dim=64, dec_dim=64, max_dim=1024,
                 shortcut_layers=1, inject_layers=1):
        super().__init__()
        self.shortcut_layers = min(shortcut_layers, n_layers - 1)  # n_layers − 1 decoder layers
        self.inject_layers = min(inject_layers, n_layers - 1)  # have an output to join
        enc_channels = [min(enc_dim * 2 ** i, max_dim) for i in range(n_layers)]  # 64 ... 1024
        self.encoder, in_ch = nn.ModuleList(), 3
        for out_ch in enc_channels:  # no conv bias before a BatchNorm: its shift makes it redundant
            self.encoder.append(nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),  # halves H, W
                nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2)))
            in_ch = out_ch
        self.decoder, in_ch = nn.ModuleList(), in_ch + num_attrs  # bottleneck: z ++ attributes
        for i in range(n_layers - 1):
            out_ch = min(dec_dim * 2 ** (n_layers - 1 - i), max_dim)  # 1024, 512, 256, 128
            self.decoder.append(nn.Sequential(
                nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),  # doubles
                nn.BatchNorm2d(out_ch), nn.ReLU()))
            in_ch = out_ch + (enc_channels[n_layers - 2 - i] if i < self.shortcut_layers else 0) \
                + (num_attrs if i < self.inject_layers else 0)  # ++ encoder map ++ attributes
        self.decoder.append(nn.Sequential(
            nn.ConvTranspose2d(in_ch, 3, 4, stride=2, padding=1), nn.Tanh()))  # (B, 3, H, W)

    def encode(self, images):
        """(B, 3, H, W) -> every encoder map, coarsest last: z = maps[-1], (B, 1024, H/32, W/32)."""
        maps = [images]
        for layer in self.encoder:
            maps.append(layer(maps[-1]))
        return maps[1:]

    def decode(self, maps, attr_input):
        """Encoder maps + the attributes as G sees them (B, A), e.g. ±thres_int -> (B, 3, H, W)."""
        tile = lambda size: attr_input[:, :, None, None].expand(-1, -1, *size)  # noqa: E731 (B, A, h, w)
        hidden = torch.cat([maps[-1], tile(maps[-1].shape[-2:])], 1)
        for i, layer in enumerate(self.decoder):
            hidden = layer(hidden)
            if i < self.shortcut_layers:  # (B, 1024, 8, 8) ++ (B, 512, 8, 8) for i = 0
                hidden = torch.cat([hidden, maps[len(maps) - 2 - i]], 1)
            if i < self.inject_layers:  # ++ (B, A, 8, 8) for i = 0
                hidden = torch.cat([hidden, tile(hidden.shape[-2:])], 1)
        return hidden

    def forward(self, images, attr_input):
        return self.decode(self.encode(images), attr_input)


class Discriminator(nn.Module):
    """One conv trunk, two FC heads: the critic D (a Wasserstein score) and the classifier C. Never
    BatchNorm here: batch statistics would make one image's score and gradient depend on the others."""

    def __init__(self, num_attrs, img_size=128, n_layers=5, dim=64, max_dim=1024, fc_dim=1024):
        super().__init__()
        layers, in_ch = [], 3
        for i in range(n_layers):
            out_ch = min(dim * 2 ** i, max_dim)
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
                       nn.InstanceNorm2d(out_ch, affine=True), nn.LeakyReLU(0.2)]
            in_ch = out_ch
        self.trunk = nn.Sequential(*layers, nn.Flatten())  # (B, 1024 * 4 * 4) at 128 px
        flat = in_ch * (img_size // 2 ** n_layers) ** 2
        self.adv_head, self.cls_head = (  # the critic's and the classifier's, each its own weights
            nn.Sequential(nn.Linear(flat, fc_dim), nn.LeakyReLU(0.2), nn.Linear(fc_dim, n)) for n in (1, num_attrs))

    def forward(self, images):
        """(B, 3, H, W) -> (critic score (B,), attribute logits (B, A))."""
        features = self.trunk(images)
        return self.adv_head(features).squeeze(1), self.cls_head(features)


def build_models(config, num_attrs):
    """(Generator, Discriminator) from a config dict (Args as a dict, or a checkpoint's)."""
    size, layers = config["img_size"], config["n_layers"]
    if size % 2 ** layers or size < 2 ** (layers + 1):
        raise InputError(f"--img-size {size}: expected a multiple of 2^n_layers = {2 ** layers}, "
                         f"at least {2 ** (layers + 1)} (InstanceNorm needs a 2x2 last map)")
    return (Generator(num_attrs, layers, *(config[k] for k in ("enc_dim", "dec_dim", "max_dim",
                                                               "shortcut_layers", "inject_layers"))),
            Discriminator(num_attrs, size, layers, config["dis_dim"], config["max_dim"], config["dis_fc_dim"]))


# Attributes: what G sees, the training targets, the test-time conflict rule ----------------------
def signed(attrs, intensity):
    """0/1 -> what G_dec sees, (2a − 1)·intensity. Why ±? "Absent" is then a signal as strong as
    "present"; and ±0.5 in training leaves headroom: ±1 at test time makes a clearer edit."""
    return (attrs * 2 - 1) * intensity


def target_attributes(attr_src, generator):
    """b: the batch's own attribute rows in a random order, so every target is a combination
    that occurs in real faces (v1 train.py: b = tf.random_shuffle(a)). No conflict rule here."""
    return attr_src[torch.randperm(len(attr_src), device=attr_src.device, generator=generator)]


# The rivals an attribute turned on switches off (v1 data.py check_attribute_conflict: no Mustache/No_Beard).
HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
RIVALS = {"Bald": ("Bangs",), "Receding_Hairline": ("Bangs",), "Bangs": ("Bald", "Receding_Hairline"),
          **{c: tuple(r for r in HAIR_COLOURS if r != c) for c in HAIR_COLOURS},
          "Straight_Hair": ("Wavy_Hair",), "Wavy_Hair": ("Straight_Hair",)}


def edit_inputs(attr_src, attr_names, thres_int, test_int, changes):
    """What G sees to edit rows attr_src (B, A) as asked by `changes` {column: value in label
    units, a number or a (B,) tensor: 0 absent, 1 present, 0.5 neutral}, as v1 test.py: a changed
    attribute at (2v − 1)·test_int, a rival of one turned on at −thres_int, the rest ±thres_int."""
    attr_tgt = attr_src.clone()
    for k, value in changes.items():
        turned_on = (torch.as_tensor(value, device=attr_src.device) > 0.5).expand(len(attr_src))
        for rival in RIVALS.get(attr_names[k], ()):
            if rival in attr_names and attr_names.index(rival) not in changes:
                attr_tgt[turned_on, attr_names.index(rival)] = 0.0
    inputs = signed(attr_tgt, thres_int)
    for k, value in changes.items():
        inputs[:, k] = signed(torch.as_tensor(value, dtype=inputs.dtype), test_int)
    return inputs


# Losses: one function per term of L_D and L_G ----------------------------------------------------
def loss_adv_d(score_real, score_fake):
    """L_adv_d = −(E[D(x)] − E[D(x̂_b)]), minus the Wasserstein estimate."""
    return score_fake.float().mean() - score_real.float().mean()


def loss_adv_g(score_fake):
    """L_adv_g = −E[D(x̂_b)]."""
    return -score_fake.float().mean()


def loss_cls(attr_logits, attrs):
    """BCE(C(·), attrs), the mean over images and attributes (the paper: a sum over attributes):
    L_cls_g on edits, L_cls_c on real images."""
    return F.binary_cross_entropy_with_logits(attr_logits.float(), attrs)


def loss_rec(img_recon, img_real):
    """L_rec = ‖x − x̂_a‖₁, as the mean absolute pixel difference (v1's; the paper's is a sum)."""
    return (img_recon.float() - img_real.float()).abs().mean()


def gradient_penalty(critic, img_real, img_fake, alpha):
    """WGAN-GP: E[(‖∇_x̃ D(x̃)‖₂ − 1)²] at x̃ = α·x + (1 − α)·x̂_b, α ~ U(0, 1) per image, on the line
    from a real image to its edit; it reaches D by a double backward, so `critic` is the eager D. The
    norm stays fp32: in bf16 (‖g‖ good to ~0.4 %), (‖g‖ − 1)² near its optimum would be mostly noise."""
    interp = (alpha * img_real + (1 - alpha) * img_fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(interp).float().sum(), interp, create_graph=True)
    with torch.autocast(interp.device.type, enabled=False):
        grad_norm = grad.float().flatten(1).norm(2, dim=1)  # (B,)
        return ((grad_norm - 1) ** 2).mean()


# Training steps: the loop hands each step the networks it runs ----------------------------------
def d_step(g, d, opt_d, img_real, attr_src, attr_tgt, alpha, args, critic=None):
    """One update of D and C on L_D -> dict of detached scalars (no host sync). The penalty's double
    backward goes through `critic`, the eager D the loop hands over (default: d itself)."""
    d.requires_grad_(True)
    with torch.no_grad():
        img_fake = g(img_real, signed(attr_tgt, args.thres_int)).to(img_real.dtype)
    score, attr_logits = d(torch.cat([img_real, img_fake]))  # InstanceNorm is per image: exact
    adv = loss_adv_d(*score.chunk(2))
    cls = loss_cls(attr_logits[:len(img_real)], attr_src)
    gp = gradient_penalty(lambda x: (d if critic is None else critic)(x)[0], img_real, img_fake, alpha)
    loss = adv + args.lambda_gp * gp + args.lambda_cls_d * cls
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    accuracy = ((attr_logits[:len(img_real)] > 0).float() == attr_src).float().mean()
    return {"d_loss": loss.detach(), "d_adv": adv.detach(), "gp": gp.detach(),
            "d_cls": cls.detach(), "d_acc": accuracy.detach()}


def g_step(g, d, opt_g, img_real, attr_src, attr_tgt, args):
    """One update of G on L_G -> dict of detached scalars. D is frozen (no gradient is computed
    for it); the loop hands it over with nothing to synchronise."""
    d.requires_grad_(False)
    img_fake = g(img_real, signed(attr_tgt, args.thres_int))   # x̂_b, the edit
    img_recon = g(img_real, signed(attr_src, args.thres_int))  # x̂_a, the reconstruction
    score_fake, logits_fake = d(img_fake)
    adv, cls, rec = loss_adv_g(score_fake), loss_cls(logits_fake, attr_tgt), loss_rec(img_recon, img_real)
    loss = adv + args.lambda_cls_g * cls + args.lambda_rec * rec
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    return {"g_loss": loss.detach(), "g_adv": adv.detach(), "g_cls": cls.detach(), "g_rec": rec.detach()}


def train_step(g, d, opt_g, opt_d, step, img_real, attr_src, args, rank=0, d_sync=None, critic=None):
    """Update `step` (0-based) of v1's alternation: G on every (n_d + 1)-th, D otherwise. b and α come
    from (seed, step, rank): a resumed run and every rank draw what an uninterrupted run would.
    D's update runs `d_sync` (what synchronises its gradients; default d), its penalty `critic`."""
    rng = torch.Generator(img_real.device).manual_seed((args.seed * 1_000_003 + step) * 1009 + rank)
    attr_tgt = target_attributes(attr_src, rng)
    if (step + 1) % (args.n_d + 1) == 0:
        return g_step(g, d, opt_g, img_real, attr_src, attr_tgt, args)
    alpha = torch.rand(len(img_real), 1, 1, 1, device=img_real.device, generator=rng)
    return d_step(g, d if d_sync is None else d_sync, opt_d, img_real, attr_src, attr_tgt, alpha, args, critic)


# Sampling and editing ----------------------------------------------------------------------------
@torch.no_grad()
def flip_grid(g, images, attr_src, attr_names, thres_int, test_int):
    """(R, 2 + A, 3, H, W), labels: per image its input, reconstruction, each attribute flipped."""
    columns = [images, g(images, signed(attr_src, thres_int))] + [g(images, edit_inputs(
        attr_src, attr_names, thres_int, test_int, {k: 1 - attr_src[:, k]})) for k in range(len(attr_names))]
    labels = ["input", "recon"] + [f"flip {name}" for name in attr_names]
    return torch.stack([c.float() for c in columns], 1), labels


@torch.no_grad()
def save_samples(g, samples, names, args, path, step):
    """The fixed validation faces with every attribute flipped, as a labelled grid PNG."""
    g.eval()
    with autocast(next(g.parameters()).device, args.amp):
        grid, labels = flip_grid(g, *samples, names, args.thres_int, args.test_int)
    g.train()
    with writing(path):
        common.save_grid(grid, path, col_labels=labels, title=f"AttGAN, step {step}")


def load(ckpt, device="cpu"):
    """A trained checkpoint -> (G, D in eval mode on `device`, config dict, attribute names)."""
    state = load_checkpoint(ckpt)
    g, d = build_models(state["config"], len(state["attr_names"]))
    g.load_state_dict(state["generator"]), d.load_state_dict(state["discriminator"])
    return g.to(device).eval(), d.to(device).eval(), state["config"], state["attr_names"]


@dataclasses.dataclass
class EditArgs:
    """Edit a photo (--image) or a validation image (--index) relative to the attributes D's C reads."""
    ckpt: str = "runs/attgan/ckpt.pt"  # checkpoint written by training
    image: str = None  # a photo (jpg/png), the face centred and filling most of the frame
    index: int = 0  # without --image: this image of the checkpoint's data set ('val' split)
    set: list = dataclasses.field(default_factory=list)  # Attr=v: G sees (2v − 1)·test_int (1 on, 0 off, 1.5 more)
    slide: str = None  # Attr: a strip of Attr at 9 strengths, G seeing −test_int .. +test_int (v1 test_slide.py)
    test_int: float = 0.0  # the edited attributes' scale (0: the checkpoint's, 1 paper, 3 cpu-demo; training saw ±0.5)
    out: str = None  # output PNG (default: edit.png beside the checkpoint)


@torch.no_grad()
def edit(args):
    """Print the attributes D reads, then write --slide's strip, --set's edit or every flip."""
    if args.out and Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise InputError(f"--out {args.out}: expected a .png or .jpg file name")
    check_writable(path := Path(args.out or Path(args.ckpt).parent / "edit.png"))
    g, d, config, names = load(args.ckpt, pick_device("auto"))
    size, crop, thres_int = config["img_size"], config["crop"], config["thres_int"]
    test_int = args.test_int or config["test_int"]
    for item in args.set:
        if not re.fullmatch(r"\w+=[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", item):
            raise InputError(f"--set {item!r}: expected Attr=value, e.g. Eyeglasses=1")
    changes = {names.index(common.resolve_attrs([item.partition("=")[0]], names)[0]):
               float(item.partition("=")[2]) for item in args.set}
    slide = names.index(common.resolve_attrs([args.slide], names)[0]) if args.slide else None
    if args.image:
        image, labels, source = common.load_photo(args.image, size, crop), None, args.image
    else:
        val = common.load_celeba(config["data"], names, "val", size, crop, verbose=False)
        if not 0 <= args.index < len(val.images):
            raise InputError(f"--index {args.index}: expected 0 .. {len(val.images) - 1} (val split)")
        image, labels = common.to_float(val.images[args.index:args.index + 1]), val.labels[args.index]
        source = f"{val.files[args.index]} (val #{args.index})"
    image = image.to(next(g.parameters()).device)
    probs = torch.sigmoid(d(image)[1].float())  # C's reading of the source attributes
    attr_src = (probs > 0.5).float()
    print(f"{source}: attributes read by the discriminator (P(present))")
    for k, name in enumerate(names):
        truth = f"   label {int(labels[k])}" if labels is not None else ""
        print(f"  {name:<22}{probs[0, k]:6.3f}  {'yes' if probs[0, k] > 0.5 else 'no '}{truth}")
    if slide is not None:  # test_slide.py's strip: the slid attribute from −test_int to +test_int
        inputs = [edit_inputs(attr_src, names, thres_int, test_int, {**changes, slide: v})
                  for v in torch.linspace(0, 1, 9).tolist()]  # label units: G sees (2v − 1)·test_int
        heads = ["input"] + [f"{names[slide]} {a[0, slide].item():+g}" for a in inputs]  # what G sees
        common.save_grid(torch.stack([image, *(g(image, a) for a in inputs)], 1).cpu(), path, col_labels=heads)
        print("columns: " + ", ".join(heads))
    elif changes:  # the edited face alone, at the model's size
        edited = g(image, edit_inputs(attr_src, names, thres_int, test_int, changes))
        torchvision.utils.save_image(edited[0].float().cpu() * 0.5 + 0.5, path)
    else:
        grid, labels = flip_grid(g, image, attr_src, names, thres_int, test_int)
        common.save_grid(grid.cpu(), path, col_labels=labels)
    print(f"wrote {path}")
    return path


# Training ----------------------------------------------------------------------------------------
def configure(args, device, world_size=1):
    """Presets, canonical --data and --attrs (the paper's 13; on the demo Gray_Hair for Bushy_Eyebrows)."""
    if args.preset not in ("auto", "paper", "cpu-demo"):
        raise InputError(f"--preset {args.preset!r}: expected auto, paper or cpu-demo")
    auto = "cpu-demo" if device.type == "cpu" and is_demo(args.data) else "paper"
    args.preset = "smoke" if args.smoke else auto if args.preset == "auto" else args.preset
    if args.preset in PRESETS:  # --preset paper keeps the paper's configuration anywhere
        apply_preset(args, PRESETS[args.preset], args.preset)
    args.data = args.data if is_demo(args.data) else str(Path(args.data).resolve())
    args.attrs = common.resolve_attrs(args.attrs or (list(PAPER_ATTRS) if not is_demo(args.data) else [
        a for a in common.DEMO_ATTRS if a in PAPER_ATTRS or a == "Gray_Hair"]))
    build_models(dataclasses.asdict(args), len(args.attrs))  # refuses a size it cannot build
    if args.batch_size % world_size:
        raise InputError(f"--batch-size {args.batch_size}: expected a multiple of {world_size} ranks")
    return args


def train(args):
    # Several GPUs, nanoGPT's way: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; rank 0 writes.
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    args, out, is_main = configure(args, device, world_size), Path(args.out), rank == 0
    lock = claim_run_folder(out, args.resume) if is_main else None  # noqa: F841 (held till exit)
    config = dataclasses.asdict(args)
    state = load_checkpoint(out / "ckpt.pt", config, RESUME_MUST_MATCH) if args.resume else None
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    data = common.load_celeba(args.data, args.attrs, "train", args.img_size, args.crop, verbose=is_main)
    data, names = common.to_device(data, device), common.check_attr_rates(data, args.allow_rare_attrs)
    val = common.load_celeba(args.data, names, "val", args.img_size, args.crop, verbose=False)
    samples = (common.to_float(val.images[:8]).to(device), val.labels[:8].to(device))
    per_epoch = len(data.images) / args.batch_size  # updates per epoch: each draws one batch
    total, decay_step = args.steps or math.ceil(args.epochs * per_epoch), round(args.lr_decay_epoch * per_epoch)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    g, d = (m.to(device) for m in build_models(config, len(names)))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.5, 0.999)) for m in (g, d))
    for module, key in ((g, "generator"), (d, "discriminator"), (opt_g, "opt_g"), (opt_d, "opt_d")):
        module.load_state_dict(state[key]) if state else None  # --resume: continue exactly
    if (start := state["step"] if state else 0) >= total:
        raise InputError(f"--resume: the checkpoint is at step {start}, this run ends at {total}; "
                         f"expected a larger --steps or --epochs")
    channels_last = device.type == "cuda"  # faster convolutions on tensor cores
    g, d = (m.to(memory_format=torch.channels_last) if channels_last else m for m in (g, d))
    # Wrapped once: G's step calls d_fast (nothing to sync), D's update d_run, the penalty the eager d.
    g_run, d_fast = (torch.compile(g), torch.compile(d)) if args.compile else (g, d)
    ids = [device.index] if device.type == "cuda" else None
    g_run, d_run = (DDP(g_run, device_ids=ids), DDP(d_fast, device_ids=ids)) if world_size > 1 else (g_run, d_fast)
    if is_main:
        trim_jsonl(out / "metrics.jsonl", start)
        print(f"AttGAN {args.img_size} px, {', '.join(names)}; {len(data.images)} training images; "
              f"updates {start}..{total} ({total / per_epoch:.3g} epochs); {device} x {world_size}; "
              f"G {sum(p.numel() for p in g.parameters()):,}, D {sum(p.numel() for p in d.parameters()):,} "
              f"parameters; {args.preset}")
    totals, clock, since = {}, time.time(), start
    for step, stop in training_steps(start, total, out / "ckpt.pt"):  # stop: SIGINT/SIGTERM came
        # TRY NOT TO MODIFY: the batch is a pure function of the step (exact resume, DDP shards).
        img_real, attr_src, _ = common.get_batch(data, step, args.batch_size // world_size, args.seed,
                                                 device, rank, world_size, channels_last=channels_last)
        # ALGO LOGIC: the learning-rate schedule, then one D or G update.
        lr = args.lr * (0.1 if step >= decay_step else 1.0)
        for group in [*opt_g.param_groups, *opt_d.param_groups]:
            group["lr"] = lr
        with autocast(device, args.amp):
            stats = train_step(g_run, d_fast, opt_g, opt_d, step, img_real, attr_src, args, rank, d_run, d)
        # TRY NOT TO MODIFY: logging, samples and checkpoints (rank 0 writes).
        for key, value in stats.items():  # detached tensors: no host sync until a log step
            totals.setdefault(key, []).append(value)
        done, saving = step + 1, time.time()
        if done % args.log_every == 0 or done == total:
            if is_main:
                log_progress(out, done, total, lr, totals, (done - since) / (saving - clock), args, g, d)
            totals, clock, since = {}, time.time(), done
        if is_main and (done % args.sample_every == 0 or done == total):
            save_samples(g, samples, names, args, out / "samples" / f"step_{done:06d}.png", done)
        if is_main and (done % args.ckpt_every == 0 or done == total or stop):
            check_finite(done, {}, g, d)  # a diverged run never overwrites the last good one
            save_checkpoint(out / "ckpt.pt", {
                "generator": g.state_dict(), "discriminator": d.state_dict(), "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(), "step": done, "config": config, "attr_names": names})
        clock += time.time() - saving  # img/s counts training, not the time spent writing files
    if world_size > 1:
        report_rank_disagreement(g, d)
        dist.barrier()  # no rank closes its connections while another still reads from them
        dist.destroy_process_group()
    if is_main:
        with writing(out / "losses.png"):
            common.plot_metrics(out / "metrics.jsonl", out / "losses.png")
        print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png")
    return out


def log_progress(out, done, total, lr, totals, steps_per_s, args, g, d):
    """Rank 0's interval means: stop if anything is not finite, else log them to metrics.jsonl and stdout."""
    means = {k: torch.stack(v).float().mean().item() for k, v in sorted(totals.items())}
    record = {"step": done, "lr": lr, **means, "img_per_s": steps_per_s * args.batch_size}
    check_finite(done, record, g, d)
    with writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"step {done}/{total}  " + "  ".join(f"{k} {v:.4g}" for k, v in means.items()) + f"  lr {lr:.1e}  "
          f"{record['img_per_s']:.0f} img/s  ETA {(total - done) / steps_per_s / 60:.1f} min", flush=True)


def report_rank_disagreement(g, d):
    """Print the largest difference of any parameter between two ranks: 0 when DDP synchronises."""
    high = torch.cat([p.detach().reshape(-1) for p in [*g.parameters(), *d.parameters()]])
    low = high.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX), dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if dist.get_rank() == 0:
        print(f"DDP check: {dist.get_world_size()} ranks, largest parameter difference between ranks "
              f"{(high - low).abs().max().item()!r}")


# Plumbing: command line, device, run folder, checkpoints, logs. Copied verbatim into the other
# method files, where tests/test_copies.py keeps each copy identical to this one. --------------------
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


def apply_preset(args, preset, name):
    """Set the preset's values on the fields the user did not type, and say which changed."""
    changed = {k: v for k, v in preset.items() if k not in args.given and getattr(args, k) != v}
    for key, value in changed.items():
        setattr(args, key, value)
    if changed:
        print(f"note: {name} preset: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                  for k, v in changed.items()), file=sys.stderr)


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


def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU runs stay in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


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


def check_writable(*paths):
    """Refuse, before the work that produces them, output files in a folder this user cannot write."""
    for path in map(Path, paths):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path.parent).close()
        except OSError as err:
            raise InputError(f"{path}: expected a file this user can write ({err.strerror})") from None


@contextlib.contextmanager
def writing(path, kept=""):
    """A failed write inside (disk full, quota, read-only) -> an OSError naming `path` and its cause
    (run_main prints it as one line)."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, f"could not write it ({err.strerror or err}){kept}", str(path)) from None


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


def save_checkpoint(path, state):
    """Save `state`, tagged with this script's name, atomically (serialised in memory first, so that
    a failed write names its cause: torch.save's own error would not)."""
    data = io.BytesIO()
    torch.save({**state, "script": Path(__file__).name}, data)
    replace_file(path, data.getbuffer(), "; the previous checkpoint is kept")


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


def check_finite(step, stats, *modules):
    """FloatingPointError at the first non-finite loss, parameter or buffer (a BatchNorm variance can
    overflow while the loss looks fine), before it reaches a checkpoint. Call it at log steps."""
    tensors = [torch.as_tensor(v).float().reshape(-1).cpu() for v in stats.values()] + [
        t.detach().float().reshape(-1).cpu() for m in modules for t in [*m.parameters(), *m.buffers()]]
    if not bool(torch.cat(tensors).isfinite().all()):
        bad = [k for k, v in stats.items() if not math.isfinite(float(v))] or ["weights"]
        raise FloatingPointError(f"step {step}: non-finite {', '.join(bad)}; the run stopped and "
                                 f"the last checkpoint written is kept (a smaller --lr may help)")


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


def is_demo(data):
    """'demo' / 'demo:N' name the synthetic set; anything else is a folder."""
    return data == "demo" or data.startswith("demo:")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "edit") else "train"
    if command == "edit":
        return edit(parse_dataclass(EditArgs, argv, "attgan.py edit"))
    return train(parse_dataclass(Args, argv, "attgan.py [train]", positive=POSITIVE))


if __name__ == "__main__":
    run_main(main)
