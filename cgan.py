"""Conditional GAN: draw a face from a list of attributes; find a given face's code to edit it.

Reimplements DeepLearning_FaceGen (Chiao-Yun Tu et al., "Face Generation with Attributes", 2017;
TensorFlow 1 notebooks, github.com/chiaoyuntu/DeepLearning_FaceGen at 7038329, whose file names
are cited below): a DCGAN (Radford et al. 2016, arXiv:1511.06434) conditioned on CelebA attributes,
with the matching-aware discriminator of GAN-CLS (Reed et al. 2016, arXiv:1605.05396).

Objective (every generate_face*.ipynb, `_init_ops`; CE = sigmoid cross-entropy on D's logit)
    L_D = CE(D(x, a), 1) + CE(D(G(z, a), a), 0) + CE(D(x, ã), 0)     ã = 1 − a (all flipped)
    L_G = CE(D(G(z, a), a), 1)
    latent optimisation (defined by generate_face_mismatch.ipynb's `reconstruct_one_sample`, run by
    no notebook): z* = argmin_z ½‖G(z, a) − x‖² (tf.nn.l2_loss, [0, 1] pixels), Adam lr 1e-2, 100
    steps from z ~ U[0, 1); G(z*, a') then redraws that face with other attributes a'.
With a tiled onto D's input, the mismatch term makes D judge whether face and attributes belong
together, and L_G passes that judgement to G. With --attr-join last (dcgan1) D's logit is
w·f(x) + v·a + b: ∂D/∂x does not depend on a (a only scales each face's L_G gradient), so G gets no
signal to obey a (FaceGen README, DCGAN 1: the output "doesn't show the male attribute"). Code:
x img_real (B, 3, H, W) in [−1, 1], a attr_real (B, A) 0/1, ã attr_wrong, z noise, z* invert().

Networks at 32 px (the notebooks' `_generator`, `_discriminator`: convs 4x4 stride 2, LReLU 0.2,
BatchNorm decay 0.99 eps 1e-3, weights N(0, 0.02), biases 0)
  G vector: [z (B, 100) ~ N(0, 1), a] -> FC -> (B, 128, 4, 4) BN LReLU -> deconv (B, 64, 8, 8)
     BN LReLU -> deconv (B, 32, 16, 16) BN LReLU -> deconv (B, 3, 32, 32) -> tanh
  G cube (generate_face_interactive_1122.ipynb): z is a noise image (B, 3, 32, 32), a is tiled to
     (B, A, 32, 32), both flattened (B, 1024·(3+A)) into the same FC. It has no encoder.
  D: conv (B, 32, 16, 16) LReLU -> conv (B, 64, 8, 8) BN LReLU -> conv (B, 128, 4, 4) BN LReLU -> FC.
     --attr-join input: a tiled onto x (B, 3+A, 32, 32) (generate_face_cube, _1122, _interactive_1122);
     last: FC on [flatten, a] (generate_face, _mismatch). Real, fake, mismatched pairs: 3 calls, as there.
  --arch fc (README "Baseline Model"): G [z ~ U(−1, 1) (B, 100), a] -> FC 128 ReLU -> FC 3HW
     (cgan_d1107.ipynb); D [flatten(x), a] -> FC 128 ReLU -> FC (the README's 2-layer FC).
Defaults: generate_face1122.ipynb (DCGAN 2: its 8 attributes, Adam 2e-4 β1 0.5, batch 32, the first
20,000 training files (`num_of_img` and the printed shapes; README: 202,599), 50 epochs = 31,250
steps); --preset dcgan1 | cube: 10 epochs of those; fc: 1,000 steps of 16 on the first 10,000.

Deviations, and why
* tanh on [−1, 1] images (every method here; the notebooks: sigmoid on pixels/255), not the same
  model: tanh(t) = 2σ(2t) − 1 doubles G's last pre-activation against theirs, and D's first conv sees
  2x − 1, absorbed by its weights and bias except where zero padding enters (black there, grey here).
* 0/1 attributes as the DCGAN notebooks (their flip maps 0 -> 1, else -> 0; their sample vectors
  are 0/1); cgan_d1107.ipynb samples ±1. fc runs the DCGAN notebooks' loop (1 D : 1 G, mismatch
  term); cgan_d1107.ipynb alternates 4 D : 1 G, has no mismatch term, and a 3-conv 5x5 D.
* Order: the DCGAN notebooks walk their files in order, the same batches every epoch, and
  cgan_d1107.ipynb's `next_batch` draws 16 at random; here each epoch is a fresh permutation
  (common.get_batch) and z is drawn from (seed, step), so a resume is exact. `reconstruct` never
  ran (nor fed the attributes its G needs): we invert with the face's own attributes.
* Layers only the FaceGen README shows (no stored notebook has them): its 23-attribute D had a 4th
  conv (256, to 2x2; --attrs notebook23 keeps 3), its 64 px G and D 3 deconvs and 3 convs (FC to
  8x8x128; D's FC on 8·8·128); --img-size 64 adds a stage to each (4x4x256, 4 deconvs, 4 convs).
* Ours, as options: --crop 170 (this repository's face crop; the default 0 squashes the whole
  218x178 frame to 32x32, as the notebooks' `transform`); --mismatch roll (with many attributes a
  flipped-all vector is implausible by itself, so D can reject it without looking at the face).
* Not here: the README's interactive models 4, 5 (image input, reconstruction loss 0.5; their
  notebook generate_face_interactive_32pix_1126.ipynb is not in the stored snapshot), actmax.

    python cgan.py                                  # demo set; a CPU runs the cpu-demo preset
    python cgan.py --data ./celeba --preset cube    # another notebook; --attrs notebook23: its 23
    python cgan.py --smoke --out /tmp/cgan_smoke    # seconds, end to end
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

# generate_face1122.ipynb `cols`: the 8 attributes of DCGAN 2 (our default)
EIGHT_ATTRS = ["Black_Hair", "Blond_Hair", "Eyeglasses", "Male", "No_Beard", "Smiling",
               "Wearing_Hat", "Young"]
# generate_face.ipynb and cgan_d1107.ipynb `cols`: the 23 "non-sparse" attributes (--attrs notebook23)
NOTEBOOK_23 = ["Arched_Eyebrows", "Bags_Under_Eyes", "Bangs", "Big_Lips", "Big_Nose", "Black_Hair",
               "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses", "Heavy_Makeup", "High_Cheekbones",
               "Male", "Mouth_Slightly_Open", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pointy_Nose",
               "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Hat", "Young"]
# Numbers that must be above 0 (parse_dataclass refuses them before any work; the others: >= 0)
POSITIVE = ("noise_dim", "width", "fc_hidden", "batch_size", "lr", "steps", "log_every", "sample_every", "ckpt_every")
INVERT_STEPS, INVERT_LR = 100, 1e-2  # generate_face_mismatch.ipynb: recon_steps, vis_learning_rate
CHOICES = dict(arch=("dcgan", "fc"), g_input=("vector", "cube"), attr_join=("input", "last"),
               mismatch=("complement", "roll"), optimizer=("adam", "rmsprop"))


# Config ===========================================================================================
@dataclass
class Args:
    """Train a conditional GAN that draws faces from attributes; samples invert faces too."""
    arch: str = "dcgan"  # 'dcgan' (the DCGAN notebooks) or 'fc' (the README's 2-layer FC baseline)
    g_input: str = "vector"  # dcgan G: 'vector' (z of --noise-dim) or 'cube' (3xSxS noise + attribute planes)
    attr_join: str = "input"  # dcgan D: attributes tiled onto the image ('input') or at the last FC ('last')
    attrs: list = field(default_factory=lambda: list(EIGHT_ATTRS))  # names, or 'notebook23' (the notebooks' 23)
    mismatch: str = "complement"  # ã: 'complement' (all flipped, the notebooks) or 'roll' (another row's, ours)
    img_size: int = 32  # image side (dcgan: a power of two, 32 as the notebooks); fc: 0 = unresized 218x178
    crop: int = 0  # centre square crop in official 178x218 pixels; 0 = whole frame squashed (the notebooks)
    noise_dim: int = 100  # length of z for --g-input vector and fc
    width: int = 32  # dcgan: channels of D's first conv and G's last deconv, x2 per stage (notebooks: 32)
    fc_hidden: int = 128  # fc: hidden units of G and D (cgan_d1107.ipynb h_dim: 128)
    optimizer: str = "adam"  # 'adam' (betas 0.5, 0.999) or 'rmsprop' (TensorFlow 1's: decay 0.9, v from 1)
    lr: float = 2e-4  # learning rate of G and D
    batch_size: int = 32  # images per step
    max_images: int = 20000  # train on the first N training images in file order (`num_of_img`); 0 = all
    steps: int = 31250  # training steps (50 epochs of the first 20,000 images at batch 32)
    data: str = "demo"  # CelebA folder (any layout common.py reads), or 'demo' / 'demo:N' (synthetic)
    out: str = "runs/cgan"  # output folder: ckpt.pt, metrics.jsonl, losses.png, d_outputs.png, samples/
    preset: str = "auto"  # auto (cpu-demo on a CPU with demo data, else paper), paper, dcgan1, cube, fc
    seed: int = 0  # seed for the weights and batches; z and ã are drawn from (seed, step)
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cuda', 'cpu', ...
    amp: bool = True  # bf16 autocast on CUDA (ignored elsewhere; the notebooks are fp32)
    log_every: int = 50  # print a progress line and append to metrics.jsonl every this many steps
    sample_every: int = 1000  # write sample grids every this many steps (and at the end)
    ckpt_every: int = 1000  # write ckpt.pt every this many steps (and at the end)
    resume: bool = False  # continue from <out>/ckpt.pt (its configuration must match)
    allow_rare_attrs: bool = False  # train on attributes present on < 1 % or > 99 % of the training images
    smoke: bool = False  # tiny end-to-end run: demo:16, narrow networks, 4 steps (seconds on a CPU)


# The notebooks (paper = the defaults, generate_face1122.ipynb) and two of ours. A preset never
# overrides an option given on the command line. An epoch of 20,000 images at batch 32: 625 steps.
PRESETS = {
    "paper": {},
    "dcgan1": dict(g_input="vector", attr_join="last", optimizer="rmsprop", lr=1e-4,
                   attrs=["Male"], steps=6250),  # generate_face.ipynb, generate_face_mismatch.ipynb
    "cube": dict(g_input="cube", attr_join="input", lr=8e-5, attrs=["Male", "Smiling"],
                 steps=6250),  # generate_face_interactive_1122.ipynb
    "fc": dict(arch="fc", img_size=0, lr=8e-5, batch_size=16, attrs=["notebook23"], max_images=10000,
               steps=1000),  # cgan_d1107.ipynb (Adam 8e-5, beta1 0.5, batch 16, 1000 iterations)
    "cpu-demo": dict(steps=1000, sample_every=500, ckpt_every=500),  # the same model, fewer steps
    "smoke": dict(data="demo:16", width=8, noise_dim=16, fc_hidden=16, batch_size=8, steps=4,
                  log_every=1, sample_every=2, ckpt_every=2, allow_rare_attrs=True),  # demo:16: no Bald
}
# Fields a resumed run must share with its checkpoint (the model, the data, the batches).
RESUME_MUST_MATCH = ("arch", "g_input", "attr_join", "attrs", "mismatch", "img_size", "crop", "noise_dim",
                     "width", "fc_hidden", "optimizer", "lr", "batch_size", "max_images", "data", "seed")


# Model ============================================================================================
def batch_norm(channels):
    """TensorFlow's batch_norm as the notebooks call it: moving averages with decay 0.99, eps 1e-3."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class DCGenerator(nn.Module):
    """FC -> 4x4 -> (deconv, BN, LReLU)* -> deconv -> tanh. `cube`: z is a noise image."""

    def __init__(self, num_attrs, img_size=32, width=32, noise_dim=100, cube=False):
        super().__init__()
        stages = int(math.log2(img_size)) - 2  # 32 px: 3 deconvs
        self.base, self.cube, self.img_size = width * 2 ** (stages - 1), cube, img_size  # 128 at 32 px
        self.noise_shape = (3, img_size, img_size) if cube else (noise_dim,)
        in_features = img_size * img_size * (3 + num_attrs) if cube else noise_dim + num_attrs
        self.fc = nn.Linear(in_features, self.base * 16)
        layers, channels = [batch_norm(self.base), nn.LeakyReLU(0.2)], self.base
        for _ in range(stages - 1):  # each doubles the side and halves the channels
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1),
                       batch_norm(channels // 2), nn.LeakyReLU(0.2)]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, 3, 4, 2, 1), nn.Tanh()]  # the notebooks: sigmoid
        self.up = nn.Sequential(*layers)

    def forward(self, noise, attrs):
        if self.cube:  # noise (B, 3, S, S) beside the attribute planes, flattened
            planes = attrs[:, :, None, None].expand(-1, -1, *noise.shape[2:])  # (B, A, S, S)
            inputs = torch.cat([noise, planes.to(noise.dtype)], 1).flatten(1)  # (B, S·S·(3+A))
        else:
            inputs = torch.cat([noise, attrs.to(noise.dtype)], 1)  # (B, noise_dim + A)
        hidden = self.fc(inputs).view(-1, self.base, 4, 4)  # (B, 128, 4, 4)
        return self.up(hidden)  # (B, 3, S, S)


class DCDiscriminator(nn.Module):
    """conv LReLU -> (conv, BN, LReLU)* -> FC, with a tiled onto the input ('input') or joined to the
    features ('last': the FC is w·f + v·a + b, so a shifts every face's logit alike: no match test)."""

    def __init__(self, num_attrs, img_size=32, width=32, attr_join="input"):
        super().__init__()
        stages = int(math.log2(img_size)) - 2
        self.attr_join = attr_join
        channels = 3 + (num_attrs if attr_join == "input" else 0)
        layers = []
        for i in range(stages):  # 32 px: (B, 32, 16, 16) -> (B, 64, 8, 8) -> (B, 128, 4, 4)
            layers.append(nn.Conv2d(channels, width * 2 ** i, 4, 2, 1))
            layers += [batch_norm(width * 2 ** i)] if i > 0 else []  # no BN after conv1
            layers.append(nn.LeakyReLU(0.2))
            channels = width * 2 ** i
        self.convs = nn.Sequential(*layers)
        features = channels * 16 + (num_attrs if attr_join == "last" else 0)
        self.head = nn.Linear(features, 1)

    def forward(self, images, attrs):
        attrs = attrs.to(images.dtype)
        if self.attr_join == "input":
            planes = attrs[:, :, None, None].expand(-1, -1, *images.shape[2:])  # the "cube"
            images = torch.cat([images, planes], 1)  # (B, 3+A, S, S)
        features = self.convs(images).flatten(1)  # (B, 2048) at 32 px
        if self.attr_join == "last":
            features = torch.cat([features, attrs], 1)  # (B, 2048 + A)
        return self.head(features).squeeze(1)  # (B,) logits


class FCGenerator(nn.Module):
    """The baseline's G (cgan_d1107.ipynb): [z, a] -> FC -> ReLU -> FC -> tanh -> image."""

    def __init__(self, num_attrs, img_hw, hidden=128, noise_dim=100):
        super().__init__()
        self.img_hw, self.noise_shape = tuple(img_hw), (noise_dim,)
        self.net = nn.Sequential(nn.Linear(noise_dim + num_attrs, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 3 * self.img_hw[0] * self.img_hw[1]), nn.Tanh())

    def forward(self, noise, attrs):
        return self.net(torch.cat([noise, attrs.to(noise.dtype)], 1)).view(-1, 3, *self.img_hw)


class FCDiscriminator(nn.Module):
    """The baseline's D as the README describes it: [flatten(x), a] -> FC -> ReLU -> FC -> logit."""

    def __init__(self, num_attrs, img_hw, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * img_hw[0] * img_hw[1] + num_attrs, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, images, attrs):
        return self.net(torch.cat([images.flatten(1), attrs.to(images.dtype)], 1)).squeeze(1)


def init_weights(module, fc_baseline=False):
    """DCGAN notebooks: every weight N(0, 0.02), biases 0, BN scale 1 and shift 0 (TF's defaults).
    fc: cgan_d1107.ipynb's `xavier_init`, N(0, 2 / fan_in)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        std = math.sqrt(2 / module.weight.shape[1]) if fc_baseline else 0.02
        nn.init.normal_(module.weight, 0.0, std)
        nn.init.zeros_(module.bias)


def image_geometry(config):
    """((H, W), crop or None) of a config dict."""
    if config["img_size"] == 0:  # fc: the whole frame, unresized (cgan_d1107.ipynb)
        return common.OFFICIAL_SIZE, None
    return (config["img_size"], config["img_size"]), config["crop"] or None


def build_models(config, num_attrs):
    """(generator, discriminator) for a config dict (Args as a dict)."""
    if config["arch"] == "fc":
        img_hw, _ = image_geometry(config)
        generator = FCGenerator(num_attrs, img_hw, config["fc_hidden"], config["noise_dim"])
        discriminator = FCDiscriminator(num_attrs, img_hw, config["fc_hidden"])
    else:
        size, width = config["img_size"], config["width"]
        generator = DCGenerator(num_attrs, size, width, config["noise_dim"], config["g_input"] == "cube")
        discriminator = DCDiscriminator(num_attrs, size, width, config["attr_join"])
    for model in (generator, discriminator):
        model.apply(lambda m: init_weights(m, config["arch"] == "fc"))
    return generator, discriminator


def sample_noise(config, count, generator=None, device="cpu"):
    """z as each notebook draws it: N(0, 1) vectors (DCGAN), a N(0, 1) image (cube), U(−1, 1) (fc)."""
    if config["arch"] == "fc":
        return (torch.rand(count, config["noise_dim"], generator=generator) * 2 - 1).to(device)
    shape = (3, config["img_size"], config["img_size"]) if config["g_input"] == "cube" else (config["noise_dim"],)
    return torch.randn(count, *shape, generator=generator).to(device)


def mismatched_attributes(attrs, how="complement", rng=None):
    """ã (B, A), never equal to a on any row. 'complement': every attribute flipped, as the notebooks'
    loop. 'roll' (ours): the next row's attributes, a realistic combination, so D must look at the
    face to reject it; a row equal to its own a gets one random attribute flipped."""
    if how == "complement":
        return 1 - attrs
    wrong = attrs.roll(1, 0)
    column = torch.randint(attrs.shape[1], (len(attrs),), generator=rng).to(attrs.device)
    same = (wrong == attrs).all(1, keepdim=True) & F.one_hot(column, attrs.shape[1]).bool()
    return torch.where(same, 1 - wrong, wrong)


# Losses (one per term; logits in, scalar out) =====================================================
def loss_d_real(logit_real):
    """CE(D(x, a), 1): a real face with its own attributes is real."""
    return F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))


def loss_d_fake(logit_fake):
    """CE(D(G(z, a), a), 0): a generated face is fake."""
    return F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))


def loss_d_mismatch(logit_mismatch):
    """CE(D(x, ã), 0): a real face with wrong attributes is rejected too (matching-aware D)."""
    return F.binary_cross_entropy_with_logits(logit_mismatch, torch.zeros_like(logit_mismatch))


def loss_g(logit_fake):
    """L_G = CE(D(G(z, a), a), 1): the non-saturating generator loss."""
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


def loss_latent(img_gen, img_target):
    """½‖G(z, a) − x‖² summed over pixels, on [0, 1] pixels as the notebook's tf.nn.l2_loss
    ([−1, 1] -> [0, 1] halves every difference). Summed over the batch: each face's z gets the
    gradient of its own term only, so a batch is inverted exactly as faces one by one."""
    return ((img_gen.float() - img_target.float()) / 2).pow(2).sum() / 2


# Training steps ===================================================================================
def make_optimizer(params, args):
    """Adam (β1 0.5, β2 0.999: every Adam notebook) or TF 1's RMSProp: v ← 0.9·v + 0.1·g², v from 1
    (PyTorch's starts at 0: first steps ≈ 3·lr·sign(g), so we fill the state). TF steps lr·g/√(v + ε),
    PyTorch lr·g/(√v + ε), ε = 1e-10: they differ by over 1 % only where v < 5e-9."""
    params = list(params)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, args.lr, betas=(0.5, 0.999))
    optimizer = torch.optim.RMSprop(params, lr=args.lr, alpha=0.9, eps=1e-10)
    for param in params:
        optimizer.state[param] = {"step": torch.tensor(0.0), "square_avg": torch.ones_like(param)}
    return optimizer


def d_step(discriminator, opt_d, img_real, attr_real, attr_wrong, img_fake, amp_ctx):
    """One update of D on L_D -> dict of detached scalars. D sees real, fake and mismatched pairs
    in three calls (three sets of BatchNorm statistics), as the notebooks' three graph calls."""
    with amp_ctx():
        logit_real = discriminator(img_real, attr_real).float()
        logit_fake = discriminator(img_fake, attr_real).float()
        logit_mismatch = discriminator(img_real, attr_wrong).float()
    d_real, d_fake, d_mismatch = loss_d_real(logit_real), loss_d_fake(logit_fake), loss_d_mismatch(logit_mismatch)
    d_loss = d_real + d_fake + d_mismatch  # plain sum, as the notebooks
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    stats = dict(d_loss=d_loss, d_real=d_real, d_fake=d_fake, d_mismatch=d_mismatch, p_real=logit_real,
                 p_fake=logit_fake, p_mismatch=logit_mismatch)  # p_*: the notebooks' D_*_prob curves
    return {k: (v.sigmoid().mean() if k[0] == "p" else v).detach() for k, v in stats.items()}


def g_step(generator, discriminator, opt_g, noise, attr_real, amp_ctx):
    """One update of G on L_G (D gets gradients but only opt_g steps) -> dict of detached scalars."""
    with amp_ctx():
        g_loss = loss_g(discriminator(generator(noise, attr_real), attr_real).float())
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {"g_loss": g_loss.detach()}


def train_step(generator, discriminator, opt_g, opt_d, img_real, attr_real, noise, args, amp_ctx, rng=None):
    """D first, on fakes drawn without gradients; then G against the updated D, redrawing the
    fakes from the same z (the notebooks run G once per update too). rng: for --mismatch roll."""
    attr_wrong = mismatched_attributes(attr_real, args.mismatch, rng)
    with torch.no_grad(), amp_ctx():
        img_fake = generator(noise, attr_real)
    stats = d_step(discriminator, opt_d, img_real, attr_real, attr_wrong, img_fake, amp_ctx)
    stats.update(g_step(generator, discriminator, opt_g, noise, attr_real, amp_ctx))
    return stats


# Sampling, latent optimisation, editing; checkpoints and loading ==================================
def invert(generator, images, attrs, steps=INVERT_STEPS, lr=INVERT_LR, seed=0):
    """Latent optimisation (generate_face_mismatch.ipynb): z from U[0, 1), then `steps` Adam steps on
    loss_latent(G(z, a), x), G frozen; pass G in eval mode (is_train False) -> (z, G(z, a), losses)."""
    noise = torch.rand(len(images), *generator.noise_shape, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(images.device).requires_grad_(True)  # the notebook: np.random.random
    optimizer = torch.optim.Adam([noise], lr)  # TF's defaults: betas 0.9, 0.999, eps 1e-8
    generator.requires_grad_(False)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_latent(generator(noise, attrs), images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    generator.requires_grad_(True)
    with torch.no_grad():
        return noise.detach(), generator(noise, attrs), losses


@torch.no_grad()
def flip_grid(generator, noise, attrs, attr_names, path, first=(), first_labels=(), title=None):
    """Rows = fixed z, each with one validation face's attributes; columns = `first` (e.g. the
    input faces), G(z, a), then G(z, a) with each attribute switched: one column, one attribute."""
    columns = list(first) + [generator(noise, attrs)]
    one_hot = torch.eye(len(attr_names), device=attrs.device)
    columns += [generator(noise, (attrs - one_hot[k]).abs()) for k in range(len(attr_names))]  # |a − e_k|: a with a_k switched
    rows = [" ".join(n[:5] for n, v in zip(attr_names, row) if v > 0.5) or "-" for row in attrs.tolist()]
    common.save_grid(torch.stack(columns, 1).float(), path, row_labels=rows, title=title,
                     col_labels=list(first_labels) + ["G(z, a)"] + [f"flip {n}" for n in attr_names])


def fixed_sample_inputs(config, data, device, rows=8):
    """(z from seed + 1, faces, attributes) of the first validation images (else training images)."""
    img_hw, crop = image_geometry(config)
    val = common.load_celeba(config["data"], data.attr_names, "val", img_hw, crop, verbose=False)
    val = val if len(val.images) else data
    noise = sample_noise(config, min(rows, len(val.images)), torch.Generator().manual_seed(config["seed"] + 1))
    return noise.to(device), common.to_float(val.images[:rows]).to(device), val.labels[:rows].to(device)


def save_samples(generator, fixed, attr_names, folder, step):
    """samples/step_N.png: flip_grid of fixed z; invert_step_N.png: of z* for validation faces."""
    noise, images, attrs = fixed
    generator.eval()
    flip_grid(generator, noise, attrs, attr_names, folder / f"step_{step:06d}.png", title=f"step {step}")
    code, _, losses = invert(generator, images, attrs)  # z* for each validation face
    flip_grid(generator, code, attrs, attr_names, folder / f"invert_step_{step:06d}.png", [images],
              ["input"], f"step {step}: G(z*, a), z* by latent optimisation")
    print(f"  latent optimisation, {len(images)} validation faces: ½‖G(z, a) − x‖² per face "
          f"{losses[0] / len(images):.1f} -> {losses[-1] / len(images):.1f}")
    generator.train()


def load(ckpt_path, device="cpu"):
    """(generator in eval mode, config dict, attribute names) from a checkpoint of this script."""
    state = load_checkpoint(ckpt_path)  # refuses another script's file in one line
    generator, _ = build_models(state["config"], len(state["attr_names"]))
    generator.load_state_dict(state["generator"])
    return generator.to(device).eval(), state["config"], state["attr_names"]


# Training: presets, argument checks, train(args), main() ==========================================
def configure(args, device):
    """The preset (then --smoke) on the fields not typed, canonical --data and --attrs, checks."""
    if args.preset not in ("auto", *PRESETS) or args.preset == "smoke":
        raise InputError(f"--preset {args.preset!r}: expected auto, paper, dcgan1, cube, fc or cpu-demo")
    if args.preset == "auto":
        args.preset = "cpu-demo" if device.type == "cpu" and is_demo(args.data) else "paper"
    for name in [args.preset] + ["smoke"] * args.smoke:
        apply_preset(args, PRESETS[name], name)
    for name, allowed in CHOICES.items():
        if getattr(args, name) not in allowed:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)!r}: expected {allowed}")
    if args.arch == "dcgan" and (args.img_size < 8 or args.img_size & (args.img_size - 1)):
        raise InputError(f"--img-size {args.img_size}: dcgan needs a power of two >= 8 (32, 64)")
    args.data = args.data if is_demo(args.data) else str(Path(args.data).resolve())
    args.attrs = common.resolve_attrs(NOTEBOOK_23 if [a.lower() for a in args.attrs] == ["notebook23"] else args.attrs)
    return args


def train(args):
    device = pick_device(args.device)
    args, out = configure(args, device), Path(args.out)
    lock = claim_run_folder(out, args.resume)  # noqa: F841 (held until the run ends)
    config = dataclasses.asdict(args)
    state = load_checkpoint(out / "ckpt.pt", config, RESUME_MUST_MATCH) if args.resume else None
    img_hw, crop = image_geometry(config)
    data = common.load_celeba(args.data, args.attrs, "train", img_hw, crop)  # rows in file order
    first = {k: v[:args.max_images or None] for k in ("images", "labels", "files", "identities", "landmarks")
             if (v := getattr(data, k)) is not None}  # the notebooks' first `num_of_img` files
    data = common.to_device(dataclasses.replace(data, **first), device)
    common.check_attr_rates(data, args.allow_rare_attrs)
    attr_names, fixed = data.attr_names, fixed_sample_inputs(config, data, device)
    torch.manual_seed(args.seed)
    channels_last = device.type == "cuda" and args.arch == "dcgan"  # faster convs, no flag needed
    generator, discriminator = (m.to(device, memory_format=torch.channels_last if channels_last else
                                     torch.preserve_format) for m in build_models(config, len(attr_names)))
    opt_g, opt_d = (make_optimizer(m.parameters(), args) for m in (generator, discriminator))
    for module, key in ((generator, "generator"), (discriminator, "discriminator"), (opt_g, "opt_g"), (opt_d, "opt_d")):
        module.load_state_dict(state[key]) if state else None  # --resume: continue exactly
    if (start := state["step"] if state else 0) >= args.steps:
        raise InputError(f"--resume: the checkpoint is at step {start}, this run ends at "
                         f"{args.steps}; expected a larger --steps")
    trim_jsonl(out / "metrics.jsonl", start)
    size_g, size_d = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (generator, discriminator))
    print(f"{args.arch}, preset {args.preset}: G {size_g:.2f} M, D {size_d:.2f} M parameters; "
          f"{len(data.images)} images, {img_hw} px, {len(attr_names)} attributes, {device}; steps {start}..{args.steps}")
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731
    totals, logged, clock = {}, start, time.time()
    for step, stop in training_steps(start, args.steps, out / "ckpt.pt"):  # stop: SIGINT/SIGTERM came
        # ALGO LOGIC: a batch and one z per face (pure functions of seed and step), one D then one G update
        img_real, attr_real, _ = common.get_batch(data, step, args.batch_size, args.seed, device, channels_last=channels_last)
        rng = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        noise = sample_noise(config, len(img_real), rng, device)
        stats = train_step(generator, discriminator, opt_g, opt_d, img_real, attr_real, noise, args, amp_ctx, rng)

        # TRY NOT TO MODIFY: logging, samples, checkpoints
        totals = {k: totals.get(k, 0) + v for k, v in stats.items()}  # no host sync until logged
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed, n = time.time() - clock, done - logged
            record = {"step": done, "img_per_s": n * args.batch_size / max(elapsed, 1e-9),
                      **{k: (v / n).item() for k, v in totals.items()}}
            check_finite(done, record, generator, discriminator)
            with writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"step {done}/{args.steps} " + " ".join(f"{k} {v:.3f}" for k, v in record.items()
                  if k not in ("step", "img_per_s")) + f"  {record['img_per_s']:.0f} img/s  ETA "
                  f"{(args.steps - done) * elapsed / n / 60:.1f} min", flush=True)
            totals, logged = {}, done
        if done % args.sample_every == 0 or done == args.steps:
            with writing(out / "samples"):
                save_samples(generator, fixed, attr_names, out / "samples", done)
        if done % args.ckpt_every == 0 or done == args.steps or stop:
            check_finite(done, {}, generator, discriminator)  # never overwrite a good checkpoint
            save_checkpoint(out / "ckpt.pt", {"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                                              "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": done,
                                              "config": config, "attr_names": attr_names})
        if not totals:
            clock = time.time()  # time the next interval without the saving
    with writing(out / "losses.png"):
        common.plot_metrics(out / "metrics.jsonl", out / "losses.png",
                            keys=["d_loss", "d_real", "d_fake", "d_mismatch", "g_loss"])
    with writing(out / "d_outputs.png"):
        common.plot_metrics(out / "metrics.jsonl", out / "d_outputs.png", keys=["p_real", "p_fake", "p_mismatch"])
    print(f"done: {out / 'ckpt.pt'}, samples/ (step_*: G(z, a); invert_step_*: G(z*, a)), losses.png")
    return out


# Plumbing: command line, device, run folder, checkpoints, logs (verbatim copies of attgan.py's;
# tests/test_copies.py keeps them identical) ---------------------------------------------------------
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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    return train(parse_dataclass(Args, argv, "cgan.py", positive=POSITIVE))


if __name__ == "__main__":
    run_main(main)
