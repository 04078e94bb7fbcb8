"""Conditional GAN: generate a face from attributes, then refine it by changing attributes.

Reimplements **DeepLearning_FaceGen** (Chiao-Yun Tu et al., "Face Generation with Attributes",
TensorFlow notebooks, https://github.com/chiaoyuntu/DeepLearning_FaceGen), itself built on
DCGAN (Radford, Metz, Chintala 2016, https://arxiv.org/abs/1511.06434) with the
matching-aware discriminator of GAN-CLS (Reed et al. 2016, https://arxiv.org/abs/1605.05396).
Given a binary attribute vector a (Male, Smiling, ...) and noise z, G(z, a) draws a face that
carries those attributes. The original's models 4 and 5 add an encoder E so a user can refine a
first guess: G(E(x), a') redraws the face x with the changed attributes a'.

Objective (the original's; D outputs a logit, σ is the sigmoid, CE the binary cross-entropy)
-------------------------------------------------------------------------------------------
    D_real     = CE(D(x, a), 1)            a real face with its own attributes
    D_fake     = CE(D(G(z, a), a), 0)      a generated face with the attributes it was asked for
    D_mismatch = CE(D(x, ã), 0)            a real face with WRONG attributes ã ≠ a
    D_loss     = D_real + D_fake + D_mismatch                    (summed, as the original)
    G_loss     = CE(D(G(z, a), a), 1)                            (models 1-3; non-saturating)
    --refine (models 4, 5):
    G_loss     = CE(D(fakes), 1) + λ_rec·Recon_loss + λ_cls·Attr_loss
    Recon_loss = ‖x − G(E_z(x), a)‖₁       a face regenerated under unchanged attributes
    fakes      = G(z, a) and the edits G(E_z(x), ã); D_fake covers both
    Attr_loss  = CE(E_a(x), a)             (our addition, see deviations)

The mismatch term is what makes D *matching-aware*: without it D only judges realism, and G can
ignore a as long as its faces look real. D_mismatch teaches D that "Male=1" on a woman's photo is
wrong, and that knowledge reaches G through D_fake.

Paper notation -> code
----------------------
    z (noise, 100)         noise            (B, noise_dim) ~ N(0, I)
    a (attributes)         attrs            (B, A) in {0, 1}; networks see 2a − 1 in {−1, +1},
                                            the original's ±1 coding
    ã (wrong attributes)   attrs_wrong      mismatched_attributes(attrs), never equal to attrs
    G, D, E                generator, discriminator, encoder
    D_real/D_fake/...      loss_d_real, loss_d_fake, loss_d_mismatch, loss_g_adv, loss_recon

Architectures (--arch) and shapes, A = number of attributes, 32 px, --width 64
-----------------------------------------------------------------------------
fc (the original's baseline, "2-layer fully connected G and D"):
    G: [z, a] (B, 100+A) -> Linear -> ReLU (B, hidden) -> Linear -> tanh -> (B, 3, H, W)
    D: [flatten(x), a] (B, 3HW+A) -> Linear -> LeakyReLU (B, hidden) -> Linear -> (B,) logit
dcgan (Radford-style; the original's DCGAN model 1):
    G: [z, a] (B, 100+A) -> Linear -> (B, 256, 4, 4) -> BN, ReLU
       -> ConvT (B, 128, 8, 8) -> ConvT (B, 64, 16, 16) -> ConvT, tanh (B, 3, 32, 32)
    D: x (B, 3, 32, 32) -> Conv, LReLU (B, 64, 16, 16) -> (B, 128, 8, 8) -> (B, 256, 4, 4)
       --attr-join last : [flatten, a] (B, 4096+A) -> Linear, LReLU (B, 256) -> Linear (B,)
       --attr-join input: a tiled to (B, A, 32, 32) and stacked on x (B, 3+A, 32, 32) before
                          the first conv; the head is a single Linear (B, 4096) -> (B,)
    64 px (--img-size 64) adds one up/down-sampling stage (4 deconvs, 4 convs).
    E (--refine): the D conv stack on x alone -> Linear -> (z (B, 100), attribute logits (B, A)).

Deviations from the original, and why
-------------------------------------
* The original notebooks are TensorFlow; this is PyTorch with the same losses and settings
  (RMSProp, lr 1e-4, batch 32, noise 100). z ~ N(0, I) (the notebooks' distribution is not
  stated in its README).
* --attr-join last: the original's model 1 concatenated the attributes at D's final FC layer.
  A single linear layer on [features, a] computes w·f + v·a + b: the attributes only shift the
  logit by a constant, so D cannot tell whether an image MATCHES them and D_mismatch cannot be
  learned. We put one hidden layer (256, LeakyReLU) after the join so image and attributes can
  interact. --attr-join input (tiling a onto the image) lets every conv see both.
* No BatchNorm in D: real, fake and mismatched pairs go through D in separate batches, and
  per-batch statistics would let D tell the batches apart by their statistics instead of their
  content (the original's D is "conv + leaky relu" only). G keeps BatchNorm, as DCGAN.
* Mismatched attributes ã: the batch's attribute rows rolled by one (so ã is a realistic
  combination, as GAN-CLS draws another sample's text); a row that still equals its own a
  (a duplicate combination, frequent with few attributes) gets one random attribute flipped.
  So ã ≠ a on every row, always (tests/test_cgan.py checks it).
* --refine: the original README gives G_loss = CE(D_fake, ones) + Recon_loss without saying what
  the fakes or the reconstruction distance are. Ours: Recon_loss is the L1 distance between x and
  G(E_z(x), a); the edits G(E_z(x), ã) join the fakes that D judges (otherwise nothing would push
  an edited face to carry its new attributes: G could copy x and ignore ã); λ_rec = 1 (the
  original's plain sum). E also predicts the attributes of x (Attr_loss, λ_cls = 1), so a face
  can be reconstructed from the image alone (load_for_eval's `reconstruct`); it is a linear head
  on E's features and does not change the generator.
* Image framing. The original fed the whole 178x218 frame to the FC baseline, and 32 px (or
  64 px) resized images to the DCGANs. Default here, both archs: the centre 170x170 crop
  resized to 32x32 (the shared convention of this repository; background is cut away, so a small
  model spends its capacity on the face). --full-frame (fc only) feeds the uncropped 218x178
  frame like the original baseline: 116,412 inputs per image, so the FC layers hold ~30 M
  weights each at --fc-hidden 256.
* --attrs nonsparse23: the original hand-picked 23 "non-sparse" attributes from a histogram; we
  rank the 40 by how close their positive rate in the training labels is to 50 % and keep the
  top 23 (printed with their rates). On the synthetic demo set many attributes are constant
  (rate 0 or 1): they simply rank last.
* Default steps: 15,000 (about the original DCGAN 1 run: 10 epochs of 50,000 images at batch
  32). On the CPU with --data demo and --steps left alone, a preset (CPU_DEMO_PRESET) trains
  a smaller model for fewer steps so `python cgan.py` finishes in a few minutes; it says so.
* Evaluation: the original judged faces by eye. `eval` trains a small attribute classifier on the
  real training split and reports how often generated faces carry the requested attributes.

Commands
--------
    python cgan.py                                   # dcgan on the synthetic demo (CPU preset)
    python cgan.py --data ./celeba --arch dcgan --img-size 64 --attrs nonsparse23
    python cgan.py --data ./celeba --arch fc --full-frame --out runs/cgan_fc
    python cgan.py --data ./celeba --refine --out runs/cgan_refine     # encoder for refinement
    python cgan.py --data ./celeba --resume                          # continue runs/cgan/ckpt.pt
    python cgan.py --smoke --out /tmp/cgan_smoke                     # seconds, end to end
    python cgan.py eval --ckpt runs/cgan/ckpt.pt                     # attribute agreement
    printf '+Male -Smiling\\n+Smiling\\nBlond_Hair=1\\n' | python cgan.py play --ckpt runs/cgan/ckpt.pt

`play` reads lines from standard input: the first gives the starting attributes (`Male=1
Smiling=0` or `+Male -Smiling`; unnamed attributes start at 0), each further line an edit
(`+Smiling -Male`, `Smiling=1`, `Young=0`). Every step keeps the same face: the same z, or, for a
--refine model, the encoding of the current image. It writes play/step_000.png, step_001.png, ...
and play/history.png (the whole history, labelled with each line).

Outputs in --out: ckpt.pt (full state), metrics.jsonl, losses.png, d_outputs.png (D's mean
probability on real, fake and mismatched pairs over training, as the original plotted),
samples/step_XXXXXX.png (rows = fixed noise vectors with the attributes of the first validation
faces, columns = the base attributes then each attribute flipped in turn) and, with --refine,
samples/edit_step_XXXXXX.png (rows = validation faces: input | reconstruction | each attribute
flipped through G(E(x), ã)).

Evaluation contract (benchmarks/evaluate.py): load_for_eval(ckpt_path, device) returns a
namespace with attr_names, img_size, crop, generate(attrs, seed) always; edit(images, attr_src,
attr_tgt) and reconstruct(images) for --refine models (None otherwise); encode = None.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import InputError

DEFAULT_ATTRS = ["Black_Hair", "Blond_Hair", "Male", "Smiling", "Young"]
NONSPARSE_KEY = "nonsparse23"  # --attrs nonsparse23: the 23 attributes closest to 50 % positive
NONSPARSE_COUNT = 23


# ================================================================================================
# Config
# ================================================================================================
@dataclass
class Args:
    """Train a conditional GAN that draws faces from attributes (sub-commands: train (default),
    play, eval; `python cgan.py play --help`)."""
    data: str = "demo"
    """CelebA folder (any layout common.py reads), or 'demo' / 'demo:N' for the synthetic set"""
    out: str = "runs/cgan"
    """output folder: ckpt.pt, metrics.jsonl, losses.png, d_outputs.png, samples/"""
    arch: str = "dcgan"
    """'dcgan' (convolutional, the original's models 1-5) or 'fc' (the 2-layer FC baseline)"""
    attrs: list = field(default_factory=lambda: list(DEFAULT_ATTRS))
    """attribute names to condition on, or 'nonsparse23' (the 23 closest to 50 % positive)"""
    attr_join: str = "last"
    """dcgan D: join the attributes at the last FC layers ('last', as model 1) or tile them onto
    the input image ('input')"""
    img_size: int = 32
    """image side in pixels (dcgan: a power of two, 32 as the original or 64)"""
    crop: int = 170
    """centre square crop in official 178x218 pixels before resizing"""
    full_frame: bool = False
    """fc only: the whole uncropped 218x178 frame as the original baseline (ignores --img-size,
    --crop)"""
    noise_dim: int = 100
    """length of the noise vector z (original: 100)"""
    width: int = 64
    """dcgan: channels of the first D conv / last G deconv (doubling per stage)"""
    fc_hidden: int = 256
    """fc: hidden units of G, D (and E)"""
    refine: bool = False
    """train an encoder E too, so G(E(x), a') can redraw a given face with new attributes"""
    lambda_rec: float = 1.0
    """--refine: weight of the L1 reconstruction loss ‖x − G(E(x), a)‖₁"""
    lambda_cls: float = 1.0
    """--refine: weight of E's attribute-prediction loss"""
    batch_size: int = 32
    """images per step (original: 32)"""
    steps: int = 15000
    """training steps (about the original's 10 epochs of 50,000 images at batch 32)"""
    lr: float = 1e-4
    """RMSProp learning rate for G (and E) and D (original: 1e-4)"""
    seed: int = 0
    """seed for the weights, noise, batches and the fixed sample noise"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cuda', 'cpu', ..."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored elsewhere)"""
    channels_last: bool = True
    """channels-last memory format for the dcgan convolutions on CUDA"""
    compile: bool = False
    """torch.compile the networks (CUDA; the first steps are slow while it compiles)"""
    log_every: int = 50
    """print a progress line and append to metrics.jsonl every this many steps"""
    sample_every: int = 1000
    """write a sample grid every this many steps (and at the end)"""
    ckpt_every: int = 1000
    """write ckpt.pt every this many steps (and at the end)"""
    resume: bool = False
    """continue from <out>/ckpt.pt (its configuration must match)"""
    smoke: bool = False
    """tiny end-to-end run: demo:16, small widths, 4 steps (seconds on a CPU)"""


# Fields that a resumed run must share with its checkpoint (anything that changes the model
# shapes, the data or the batches).
RESUME_MUST_MATCH = ("data", "arch", "attrs", "attr_join", "img_size", "crop", "full_frame",
                     "noise_dim", "width", "fc_hidden", "refine", "batch_size", "seed")

# --smoke: applied to the fields still at their defaults (so `--smoke --steps 2` runs 2 steps).
SMOKE = dict(data="demo:16", width=8, fc_hidden=32, batch_size=16, steps=4, log_every=1,
             sample_every=2, ckpt_every=2)

# `python cgan.py` on a CPU with the demo data: a smaller model and fewer steps, so the default
# command finishes in a few minutes on two cores. Applied only with --data demo on a CPU device
# and --steps left at its default; the run prints that it applies.
CPU_DEMO_PRESET = dict(width=32, steps=2000, sample_every=500, ckpt_every=500)


@dataclass
class PlayArgs:
    """Interactive refinement: read starting attributes, then edits, from standard input (one per
    line), and draw the same face after each (python cgan.py play --ckpt runs/cgan/ckpt.pt)."""
    ckpt: str = "runs/cgan/ckpt.pt"
    """checkpoint written by training"""
    out: str = None
    """folder for step_XXX.png and history.png (default: <ckpt folder>/play)"""
    seed: int = 0
    """which face: the seed of the noise vector z"""
    device: str = "cpu"
    """device to run G (and E) on"""


@dataclass
class EvalArgs:
    """How often generated faces carry the requested attributes, judged by an attribute
    classifier trained on the real training split (python cgan.py eval --ckpt runs/cgan/ckpt.pt)."""
    ckpt: str = "runs/cgan/ckpt.pt"
    """checkpoint written by training"""
    data: str = None
    """dataset for the classifier and the requested attribute combinations (default: the
    checkpoint's)"""
    classifier: str = None
    """classifier checkpoint: loaded if it exists (and fits), else trained and written there
    (default: <ckpt folder>/attr_classifier.pt)"""
    classifier_steps: int = 400
    """training steps of the classifier (Adam 1e-3, batch 64)"""
    num_samples: int = 512
    """generated faces to judge (their attributes: the validation labels, cycled)"""
    seed: int = 0
    """seed for the noise and the classifier"""
    device: str = "auto"
    """'auto', 'cuda', 'cpu', ..."""


# ================================================================================================
# Shared boilerplate (verbatim copies of attgan.py; tests/test_copies.py keeps them identical)
# ================================================================================================
# Copied from attgan.py
def parse_dataclass(cls, argv=None, prog=None):
    """Build the command line from a dataclass and return an instance of it.

    Every field becomes `--field-name`, with the field's default and the docstring written under
    the field (read from the class source) as its --help text. Booleans get `--flag/--no-flag`,
    list fields take several values, and a field whose default is None reads a string.
    """
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip(),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        option = dict(default=default, help=docs.get(f.name, " "))
        if isinstance(default, bool):
            option["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            option.update(nargs="*", type=type(default[0]) if default else str)
        else:
            option["type"] = str if default is None else type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), **option)
    return cls(**vars(parser.parse_args(argv)))


# Copied from attgan.py
def pick_device(name):
    """'auto' takes CUDA, then Apple's MPS, then the CPU; CUDA gets TF32 matmuls and cuDNN autotune."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    return device


# Copied from attgan.py
def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU runs stay in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


# Copied from attgan.py
def rng_state():
    """Every random-number generator the training loop draws from, for an exact resume."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# Copied from attgan.py
def set_rng_state(state):
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Copied from attgan.py
def save_checkpoint(path, state):
    """Write `state` to a temporary file, then rename it over `path`: the rename is atomic, so a
    crash mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# Copied from attgan.py
def load_checkpoint(path, config=None, must_match=()):
    """Read a checkpoint (tensors and plain values only: weights_only=True). With `config` (a dict),
    refuse a checkpoint whose saved config differs on any field in `must_match`, naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path} (expected a ckpt.pt written by training)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"cannot read checkpoint {path}: {err}") from err
    for name in must_match if config is not None else ():
        saved, wanted = state["config"].get(name), config.get(name)
        if saved != wanted:
            raise InputError(f"checkpoint {path} was trained with {name}={saved!r}, but this run "
                             f"has {name}={wanted!r}; use the same setting or another --out")
    return state


# Copied from attgan.py
def append_jsonl(path, record):
    """Append one JSON line (metrics.jsonl: one line per logged step)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# Copied from attgan.py
def trim_jsonl(path, max_step):
    """On resume, drop lines logged after the checkpoint's step (they will be logged again)."""
    path = Path(path)
    if path.is_file():
        lines = [line for line in path.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= max_step]
        path.write_text("".join(line + "\n" for line in lines))


# ================================================================================================
# Model
# ================================================================================================
def signed(attrs):
    """0/1 attributes -> −1/+1, the original's coding: an absent attribute is an input too."""
    return attrs * 2 - 1


class FCGenerator(nn.Module):
    """The original baseline's generator: [z, a] -> FC -> ReLU -> FC -> tanh -> image."""

    def __init__(self, noise_dim, num_attrs, img_hw, hidden):
        super().__init__()
        self.img_hw = tuple(img_hw)
        self.net = nn.Sequential(
            nn.Linear(noise_dim + num_attrs, hidden), nn.ReLU(),
            nn.Linear(hidden, 3 * self.img_hw[0] * self.img_hw[1]), nn.Tanh())

    def forward(self, noise, attrs):
        flat = self.net(torch.cat([noise, signed(attrs)], dim=1))  # (B, 3*H*W)
        return flat.view(-1, 3, *self.img_hw)  # (B, 3, H, W)


class FCDiscriminator(nn.Module):
    """The original baseline's discriminator: [flatten(x), a] -> FC -> LeakyReLU -> FC -> logit.
    Image and attributes meet at the input, so the hidden layer can judge whether they match."""

    def __init__(self, num_attrs, img_hw, hidden):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3 * img_hw[0] * img_hw[1] + num_attrs, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1))

    def forward(self, images, attrs):
        return self.net(torch.cat([images.flatten(1), signed(attrs)], dim=1)).squeeze(1)  # (B,)


class FCEncoder(nn.Module):
    """--refine with fc: flatten(x) -> FC -> LeakyReLU -> FC -> (z, attribute logits)."""

    def __init__(self, noise_dim, num_attrs, img_hw, hidden):
        super().__init__()
        self.noise_dim = noise_dim
        self.net = nn.Sequential(nn.Linear(3 * img_hw[0] * img_hw[1], hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, noise_dim + num_attrs))

    def forward(self, images):
        out = self.net(images.flatten(1))  # (B, noise_dim + A)
        return out[:, :self.noise_dim], out[:, self.noise_dim:]


def num_stages(img_size):
    """Up/down-sampling stages between 4x4 and img_size (32 -> 3, 64 -> 4)."""
    return int(math.log2(img_size)) - 2


def conv_stack(in_channels, width, stages):
    """DCGAN discriminator body: stride-2 4x4 convs with LeakyReLU(0.2), channels doubling,
    (B, in, S, S) -> (B, width·2^(stages−1), 4, 4). No BatchNorm (see the header)."""
    layers, channels = [], in_channels
    for i in range(stages):
        out = width * 2 ** i
        layers += [nn.Conv2d(channels, out, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = out
    return nn.Sequential(*layers)


class DCGenerator(nn.Module):
    """Radford et al.'s generator: [z, a] -> FC -> 4x4 -> (ConvT stride 2, BN, ReLU)* -> tanh."""

    def __init__(self, noise_dim, num_attrs, img_size, width):
        super().__init__()
        stages = num_stages(img_size)
        self.base = width * 2 ** (stages - 1)  # channels at 4x4: 256 for 32 px, 512 for 64 px
        self.project = nn.Sequential(nn.Linear(noise_dim + num_attrs, self.base * 16, bias=False),
                                     nn.Unflatten(1, (self.base, 4, 4)),
                                     nn.BatchNorm2d(self.base), nn.ReLU())
        layers, channels = [], self.base
        for _ in range(stages - 1):  # each doubles the side and halves the channels
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(channels // 2), nn.ReLU()]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, 3, 4, 2, 1), nn.Tanh()]  # no BN on the output
        self.upsample = nn.Sequential(*layers)

    def forward(self, noise, attrs):
        hidden = self.project(torch.cat([noise, signed(attrs)], dim=1))  # (B, base, 4, 4)
        return self.upsample(hidden)  # (B, 3, S, S)


class DCDiscriminator(nn.Module):
    """Convs (LeakyReLU) then FC; the attributes join at the last FC layers ('last') or are
    tiled onto the image as extra input channels ('input')."""

    def __init__(self, num_attrs, img_size, width, attr_join="last", head_hidden=256):
        super().__init__()
        stages = num_stages(img_size)
        self.attr_join = attr_join
        in_channels = 3 + (num_attrs if attr_join == "input" else 0)
        self.features = conv_stack(in_channels, width, stages)
        feature_dim = width * 2 ** (stages - 1) * 16
        if attr_join == "last":
            # A hidden layer after the join: a lone Linear on [f, a] is w·f + v·a + b, in which the
            # attributes cannot interact with the image (see the header).
            self.head = nn.Sequential(nn.Linear(feature_dim + num_attrs, head_hidden),
                                      nn.LeakyReLU(0.2), nn.Linear(head_hidden, 1))
        else:
            self.head = nn.Linear(feature_dim, 1)

    def forward(self, images, attrs):
        codes = signed(attrs)
        if self.attr_join == "input":
            planes = codes[:, :, None, None].expand(-1, -1, *images.shape[2:])  # (B, A, S, S)
            images = torch.cat([images, planes.to(images.dtype)], dim=1)  # (B, 3+A, S, S)
        features = self.features(images).flatten(1)  # (B, C·16)
        if self.attr_join == "last":
            features = torch.cat([features, codes.to(features.dtype)], dim=1)  # (B, C·16 + A)
        return self.head(features).squeeze(1)  # (B,) logits


class DCEncoder(nn.Module):
    """--refine with dcgan: D's conv body on x alone -> Linear -> (z (B, noise), logits (B, A))."""

    def __init__(self, noise_dim, num_attrs, img_size, width):
        super().__init__()
        stages = num_stages(img_size)
        self.noise_dim = noise_dim
        self.features = conv_stack(3, width, stages)
        self.out = nn.Linear(width * 2 ** (stages - 1) * 16, noise_dim + num_attrs)

    def forward(self, images):
        out = self.out(self.features(images).flatten(1))  # (B, noise_dim + A)
        return out[:, :self.noise_dim], out[:, self.noise_dim:]


def dcgan_init(module):
    """Radford et al.: conv weights ~ N(0, 0.02), BatchNorm scales ~ N(1, 0.02), shifts 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def image_geometry(config):
    """(img_size as (H, W), crop) for a config dict: --full-frame is the uncropped 218x178 frame."""
    if config["full_frame"]:
        return common.OFFICIAL_SIZE, None
    return (config["img_size"], config["img_size"]), config["crop"]


def check_config(args):
    """Reject settings the models cannot build, with one line naming what is expected."""
    if args.arch not in ("fc", "dcgan"):
        raise InputError(f"unknown --arch {args.arch!r}; expected 'fc' or 'dcgan'")
    if args.attr_join not in ("last", "input"):
        raise InputError(f"unknown --attr-join {args.attr_join!r}; expected 'last' or 'input'")
    if args.arch == "dcgan":
        if args.full_frame:
            raise InputError("--full-frame is for --arch fc (the DCGAN needs a square power-of-two "
                             "image); use --img-size 32 or 64 with dcgan")
        if args.img_size < 8 or args.img_size & (args.img_size - 1):
            raise InputError(f"--img-size {args.img_size}: dcgan needs a power of two >= 8 (32, 64)")
    if not args.attrs:
        raise InputError("--attrs is empty; give attribute names or 'nonsparse23'")


def build_models(config, num_attrs):
    """(generator, discriminator, encoder or None) for a config dict (Args as a dict)."""
    img_hw, _ = image_geometry(config)
    if config["arch"] == "fc":
        generator = FCGenerator(config["noise_dim"], num_attrs, img_hw, config["fc_hidden"])
        discriminator = FCDiscriminator(num_attrs, img_hw, config["fc_hidden"])
        encoder = (FCEncoder(config["noise_dim"], num_attrs, img_hw, config["fc_hidden"])
                   if config["refine"] else None)
    else:
        size, width = config["img_size"], config["width"]
        generator = DCGenerator(config["noise_dim"], num_attrs, size, width)
        discriminator = DCDiscriminator(num_attrs, size, width, config["attr_join"])
        encoder = DCEncoder(config["noise_dim"], num_attrs, size, width) if config["refine"] else None
        for model in (generator, discriminator, encoder):
            if model is not None:
                model.apply(dcgan_init)
    return generator, discriminator, encoder


# ================================================================================================
# Attribute selection and mismatched attributes
# ================================================================================================
def select_nonsparse(labels, names, count=NONSPARSE_COUNT):
    """The `count` attributes whose positive rate is closest to 50 % -> (names in their dataset
    order, [(name, rate)] ranked). Ties keep the dataset order; constant attributes (rate 0 or 1,
    common on the synthetic demo) are the farthest from 50 % and so rank last."""
    rates = labels.float().mean(0)  # (A,)
    distance = (rates - 0.5).abs()
    ranked = sorted(range(len(names)), key=lambda i: (distance[i].item(), i))
    keep = sorted(ranked[:count])
    return [names[i] for i in keep], [(names[i], rates[i].item()) for i in ranked]


def mismatched_attributes(attrs):
    """ã for D_mismatch: each row gets another row's attributes (the batch rolled by one), and a
    row that still equals its own (a duplicate combination) gets one random attribute flipped,
    so ã ≠ a on every row. (B, A) -> (B, A); no host sync, draws from the global torch RNG."""
    wrong = attrs.roll(1, dims=0)
    still_equal = (wrong == attrs).all(dim=1, keepdim=True)  # (B, 1)
    column = torch.randint(attrs.shape[1], (attrs.shape[0],), device=attrs.device)
    flip = F.one_hot(column, attrs.shape[1]).bool() & still_equal  # (B, A): at most one per row
    return torch.where(flip, 1 - wrong, wrong)


# ================================================================================================
# Losses (one per term of the objective; logits in, scalar out)
# ================================================================================================
def loss_d_real(logit_real):
    """D_real = CE(D(x, a), 1): a real face with its own attributes is real."""
    return F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))


def loss_d_fake(logit_fake):
    """D_fake = CE(D(G(z, a), a), 0): a generated face is fake."""
    return F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))


def loss_d_mismatch(logit_mismatch):
    """D_mismatch = CE(D(x, ã), 0): a real face with the wrong attributes is rejected too."""
    return F.binary_cross_entropy_with_logits(logit_mismatch, torch.zeros_like(logit_mismatch))


def loss_g_adv(logit_fake):
    """G_loss = CE(D(G(z, a), a), 1): the non-saturating generator loss."""
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


def loss_recon(images_real, images_recon):
    """Recon_loss = ‖x − G(E(x), a)‖₁ (mean over pixels): the face redrawn with its own attributes."""
    return (images_real - images_recon).abs().mean()


def loss_attr_cls(attr_logits, attrs):
    """Attr_loss = CE(E_a(x), a): the encoder also reads the attributes of a face."""
    return F.binary_cross_entropy_with_logits(attr_logits, attrs)


# ================================================================================================
# Training steps
# ================================================================================================
def generate_fakes(generator, encoder, images_real, attrs, attrs_wrong, noise):
    """The generator's outputs for one step.

    -> (fakes (F, 3, H, W), their attributes (F, A), reconstructions (B, 3, H, W) or None).
    Plain: fakes = G(z, a). --refine: one G call on [z; E(x); E(x)] with [a; a; ã] gives the
    noise faces, the reconstructions G(E(x), a) and the edits G(E(x), ã); fakes = noise faces
    and edits (D judges both), and the encoder's attribute logits are returned for Attr_loss.
    """
    if encoder is None:
        return generator(noise, attrs), attrs, None, None
    code, attr_logits = encoder(images_real)  # (B, noise_dim), (B, A)
    outputs = generator(torch.cat([noise, code, code]), torch.cat([attrs, attrs, attrs_wrong]))
    made, recon, edits = outputs.chunk(3)
    return torch.cat([made, edits]), torch.cat([attrs, attrs_wrong]), recon, attr_logits


def d_step(discriminator, opt_d, images_real, attrs, attrs_wrong, fakes, fake_attrs, amp_ctx):
    """One RMSProp step on D_loss = D_real + D_fake + D_mismatch -> dict of detached tensors.

    Real pairs (x, a) and mismatched pairs (x, ã) share one D call (D has no BatchNorm, so the
    rows do not affect each other); the fakes arrive detached: this step never reaches G.
    """
    with amp_ctx():
        logits = discriminator(torch.cat([images_real, images_real]), torch.cat([attrs, attrs_wrong]))
        logit_real, logit_mismatch = logits.float().chunk(2)
        logit_fake = discriminator(fakes, fake_attrs).float()
        d_real, d_fake = loss_d_real(logit_real), loss_d_fake(logit_fake)
        d_mismatch = loss_d_mismatch(logit_mismatch)
        d_loss = d_real + d_fake + d_mismatch
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return {"d_loss": d_loss.detach(), "d_real": d_real.detach(), "d_fake": d_fake.detach(),
            "d_mismatch": d_mismatch.detach(),
            # D's mean probability on each kind of pair: the curves the original plotted
            "p_real": torch.sigmoid(logit_real).mean().detach(),
            "p_fake": torch.sigmoid(logit_fake).mean().detach(),
            "p_mismatch": torch.sigmoid(logit_mismatch).mean().detach()}


def g_step(discriminator, opt_g, fakes, fake_attrs, images_real, recon, attr_logits, attrs,
           lambda_rec, lambda_cls, amp_ctx):
    """One RMSProp step on G_loss = CE(D(fakes), 1) (+ λ_rec·Recon_loss + λ_cls·Attr_loss with
    --refine) for G (and E) -> dict of detached tensors. D's parameters get gradients here too;
    they are discarded (opt_d.zero_grad in the next d_step) and D is not stepped."""
    with amp_ctx():
        g_adv = loss_g_adv(discriminator(fakes, fake_attrs).float())
        g_loss = g_adv
        stats = {"g_adv": g_adv.detach()}
        if recon is not None:
            recon_term = loss_recon(images_real.float(), recon.float())
            attr_term = loss_attr_cls(attr_logits.float(), attrs)
            g_loss = g_loss + lambda_rec * recon_term + lambda_cls * attr_term
            stats.update(recon=recon_term.detach(), attr_cls=attr_term.detach())
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {"g_loss": g_loss.detach(), **stats}


def rmsprop_like_tf(params, lr):
    """RMSProp as the original's TensorFlow 1 `tf.train.RMSPropOptimizer(lr)` defaults it:
    v ← 0.9·v + 0.1·g², θ ← θ − lr·g / √v, with v starting at 1.

    PyTorch's RMSprop starts v at 0 (and decays by 0.99), so its first updates are ≈ lr·sign(g)·10
    on every weight at once; on the FC baseline's 116k-input layer that moves D's logit by tens in
    one step. Starting v at 1 (PyTorch fills the state lazily, so we fill it first) makes the first
    steps plain SGD-sized, as in the original."""
    params = list(params)
    optimizer = torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-10)
    for param in params:
        optimizer.state[param] = {"step": torch.tensor(0.0), "square_avg": torch.ones_like(param)}
    return optimizer


def train_step(models, optimizers, images_real, attrs, noise, args, amp_ctx):
    """One step of the alternating game: D first (on detached fakes), then G against the
    updated D. The fakes are generated once, with gradients, and reused by both steps."""
    generator, discriminator, encoder = models
    opt_g, opt_d = optimizers
    attrs_wrong = mismatched_attributes(attrs)
    with amp_ctx():
        fakes, fake_attrs, recon, attr_logits = generate_fakes(
            generator, encoder, images_real, attrs, attrs_wrong, noise)
    stats = d_step(discriminator, opt_d, images_real, attrs, attrs_wrong, fakes.detach(),
                   fake_attrs, amp_ctx)
    stats.update(g_step(discriminator, opt_g, fakes, fake_attrs, images_real, recon, attr_logits,
                        attrs, args.lambda_rec, args.lambda_cls, amp_ctx))
    return stats




# ================================================================================================
# Sampling and evaluation
# ================================================================================================
def toggled(attrs, column):
    """attrs with one attribute flipped (0 <-> 1) on every row."""
    flipped = attrs.clone()
    flipped[:, column] = 1 - flipped[:, column]
    return flipped


@torch.no_grad()
def attribute_grid(generator, noise, base_attrs, attr_names, path, title=None):
    """Rows = fixed noise vectors z (each with the attributes of one validation face), columns =
    those attributes, then each attribute flipped in turn: same z across a row, so a column shows
    what one attribute does to that face."""
    columns = [generator(noise, base_attrs)]
    columns += [generator(noise, toggled(base_attrs, k)) for k in range(len(attr_names))]
    grid = torch.stack(columns, dim=1).float()  # (R, 1 + A, 3, H, W)
    rows = [" ".join(n[:4] for n, v in zip(attr_names, row) if v > 0.5) or "(none)"
            for row in base_attrs.tolist()]
    common.save_grid(grid, path, row_labels=rows, col_labels=["base"] + [f"flip {n}" for n in attr_names],
                     title=title)


@torch.no_grad()
def edit_grid(generator, encoder, images, attrs, attr_names, path, title=None):
    """--refine: rows = validation faces; columns = input | G(E(x), a) | G(E(x), a with one
    attribute flipped) for each attribute."""
    code, _ = encoder(images)
    columns = [images, generator(code, attrs)]
    columns += [generator(code, toggled(attrs, k)) for k in range(len(attr_names))]
    grid = torch.stack(columns, dim=1).float()
    common.save_grid(grid, path, col_labels=["input", "recon"] + [f"flip {n}" for n in attr_names],
                     title=title)


def plot_d_outputs(jsonl_path, png_path):
    """D's mean probability on real, fake and mismatched pairs over training (the original's
    "discriminator detailed prob" plot). A healthy matching-aware game keeps real high,
    mismatched low, and fake between them, moving; real ≈ 1, fake ≈ 0 for long means D won."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in common.read_jsonl(jsonl_path) if "p_real" in r]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key, label in (("p_real", "D(x, a): real"), ("p_fake", "D(G(z, a), a): fake"),
                       ("p_mismatch", "D(x, ã): mismatched")):
        ax.plot([r["step"] for r in records], [r[key] for r in records], label=label, lw=1)
    ax.set(xlabel="step", ylabel="mean σ(D)", ylim=(0, 1), title="discriminator outputs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class AttributeClassifier(nn.Module):
    """A small CNN that reads the attributes of a real face; the judge of `eval`.
    (B, 3, H, W) -> 3 stride-2 convs -> global average -> (B, A) logits; any image size."""

    def __init__(self, num_attrs, width=32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_attrs))

    def forward(self, images):
        return self.net(images)


def train_classifier(data, steps, seed, device, batch_size=64):
    """Adam 1e-3 on the per-attribute cross-entropy of real training faces (with flips)."""
    torch.manual_seed(seed)
    model = AttributeClassifier(len(data.attr_names)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    batch_size = min(batch_size, len(data.images))
    for step in range(steps):
        images, labels, _ = common.get_batch(data, step, batch_size, seed, device, hflip=True)
        loss = F.binary_cross_entropy_with_logits(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def predict(model, images, batch_size=256):
    """0/1 predictions of a classifier, batched -> (N, A) float on the CPU."""
    return torch.cat([(model(chunk) > 0).float().cpu() for chunk in images.split(batch_size)])


# ================================================================================================
# Checkpoint, loading a trained model, the evaluation contract
# ================================================================================================
def checkpoint_state(models, optimizers, step, args, attr_names):
    """The full training state as one dict (weights_only-loadable)."""
    generator, discriminator, encoder = models
    state = {"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
             "opt_g": optimizers[0].state_dict(), "opt_d": optimizers[1].state_dict(),
             "step": step, "config": dataclasses.asdict(args), "attr_names": list(attr_names),
             "rng": rng_state()}
    if encoder is not None:
        state["encoder"] = encoder.state_dict()
    return state


def load_trained(ckpt_path, device="cpu"):
    """(config, attr_names, generator, encoder or None) from a checkpoint, in eval mode."""
    state = load_checkpoint(ckpt_path)
    config, attr_names = state["config"], state["attr_names"]
    generator, _, encoder = build_models(config, len(attr_names))
    generator.load_state_dict(state["generator"])
    generator.to(device).eval()
    if encoder is not None:
        encoder.load_state_dict(state["encoder"])
        encoder.to(device).eval()
    return config, attr_names, generator, encoder


def load_for_eval(ckpt_path, device="cpu"):
    """The evaluation contract (benchmarks/evaluate.py): a namespace with attr_names, img_size,
    crop, generate(attrs, seed) -> faces; edit(images, attr_src, attr_tgt) and
    reconstruct(images) for --refine checkpoints (None otherwise); encode = None.
    Images are float [-1, 1] (B, 3, H, W), attributes (B, A) 0/1 in attr_names order; results
    come back on the CPU."""
    device = torch.device(device)
    config, attr_names, generator, encoder = load_trained(ckpt_path, device)
    img_hw, crop = image_geometry(config)

    @torch.no_grad()
    def generate(attrs, seed=0):
        attrs = attrs.float().to(device)
        noise = torch.randn(len(attrs), config["noise_dim"],
                            generator=torch.Generator().manual_seed(seed)).to(device)
        return torch.cat([generator(z, a).cpu() for z, a in zip(noise.split(256), attrs.split(256))])

    @torch.no_grad()
    def edit(images, attr_src, attr_tgt):
        out = []
        for x, a in zip(images.split(256), attr_tgt.float().split(256)):
            code, _ = encoder(x.to(device))
            out.append(generator(code, a.to(device)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def reconstruct(images):
        out = []
        for x in images.split(256):
            code, attr_logits = encoder(x.to(device))  # attributes read by E's head
            out.append(generator(code, (attr_logits > 0).float()).cpu())
        return torch.cat(out)

    return types.SimpleNamespace(
        attr_names=list(attr_names), img_size=img_hw[0] if img_hw[0] == img_hw[1] else img_hw,
        crop=crop, generate=generate, edit=edit if encoder is not None else None,
        reconstruct=reconstruct if encoder is not None else None, encode=None)




# ================================================================================================
# Interactive refinement: `play`
# ================================================================================================
def parse_attr_line(line, attr_names, current):
    """Apply one line of `play` input to a {name: 0/1} dict -> the new dict.

    Tokens (space- or comma-separated): '+Name' (set), '-Name' (clear), 'Name=1' / 'Name=0'
    (also the original's 'Name=-1'); names are case-insensitive. An unknown name raises an
    InputError that lists the valid ones."""
    updated = dict(current)
    for token in line.replace(",", " ").split():
        if token[0] in "+-" and "=" not in token:
            name, value = token[1:], 1.0 if token[0] == "+" else 0.0
        elif "=" in token:
            name, _, raw = token.partition("=")
            if raw not in ("1", "+1", "0", "-1"):
                raise InputError(f"bad value in {token!r}: expected Name=1 or Name=0")
            value = 1.0 if raw in ("1", "+1") else 0.0
        else:
            raise InputError(f"cannot read {token!r}: expected +Name, -Name or Name=1 / Name=0")
        (name,) = common.resolve_attrs([name], attr_names)  # InputError names the valid ones
        updated[name] = value
    return updated


@torch.no_grad()
def play(args, lines):
    """Draw a face from the first line's attributes, then redraw it after each edit line.
    Plain models keep z fixed; --refine models encode the current image, z = E(x), so each
    step refines the previous picture. -> list of the image paths written."""
    device = torch.device(args.device)
    config, attr_names, generator, encoder = load_trained(args.ckpt, device)
    out = Path(args.out) if args.out else Path(args.ckpt).parent / "play"
    out.mkdir(parents=True, exist_ok=True)
    lines = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise InputError("no input: give the starting attributes on the first line "
                         f"(e.g. '+{attr_names[0]}'), then one edit per line")
    noise = torch.randn(1, config["noise_dim"],
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    current = dict.fromkeys(attr_names, 0.0)
    frames, labels, paths = [], [], []
    for number, line in enumerate(lines):
        current = parse_attr_line(line, attr_names, current)
        attrs = torch.tensor([[current[n] for n in attr_names]], device=device)
        if encoder is not None and frames:
            noise, _ = encoder(frames[-1].to(device))  # refine: start from the current face
        image = generator(noise, attrs).float().cpu()  # (1, 3, H, W)
        frames.append(image)
        labels.append(line if number else f"start: {line}")
        path = out / f"step_{number:03d}.png"
        save_image_scaled(image[0], path)
        paths.append(path)
        active = " ".join(n for n in attr_names if current[n] > 0.5) or "(none)"
        print(f"step {number}: {active} -> {path}")
    common.save_grid(torch.stack([f[0] for f in frames])[None], out / "history.png",
                     col_labels=labels, title="play: each column is one input line")
    print(f"history strip: {out / 'history.png'}")
    return paths


def save_image_scaled(image, path, min_side=128):
    """One (3, H, W) image in [-1, 1] as a PNG, enlarged (nearest) so a 32-px face is visible."""
    from PIL import Image
    picture = Image.fromarray(common.to_uint8(image).permute(1, 2, 0).numpy())
    scale = max(1, min_side // min(picture.size))
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


# ================================================================================================
# Evaluation: do generated faces carry the requested attributes?
# ================================================================================================
def evaluate(args):
    """Train (or load) an attribute classifier on real training faces, then judge generated ones.

    Reports per attribute: the classifier's accuracy on real validation faces (how far to trust
    it), the majority-class rate (what "always guess the common value" scores), the agreement
    of generated faces with the attributes they were asked for (requested = validation label
    combinations, so the combinations are realistic), and the flip response: with z and the
    other attributes fixed, how often the classifier's answer follows the attribute when only it
    is switched 0 -> 1 (P(pred = 1 | a_k = 1) − P(pred = 1 | a_k = 0); 1 = perfect control, 0 = G
    ignores it). Writes eval.json next to the checkpoint.
    """
    device = pick_device(args.device)
    config, attr_names, generator, _ = load_trained(args.ckpt, device)
    img_hw, crop = image_geometry(config)
    data_spec = args.data or config["data"]
    train = common.to_device(common.load_celeba(data_spec, attr_names, "train", img_hw, crop), device)
    val = common.load_celeba(data_spec, attr_names, "val", img_hw, crop)
    classifier_path = Path(args.classifier or Path(args.ckpt).parent / "attr_classifier.pt")
    meta = {"attr_names": list(attr_names), "img_hw": list(img_hw), "crop": crop, "data": data_spec}
    classifier = AttributeClassifier(len(attr_names)).to(device)
    saved = torch.load(classifier_path, map_location="cpu", weights_only=True) \
        if classifier_path.is_file() else None
    if saved is not None and saved["meta"] == meta:
        classifier.load_state_dict(saved["model"])
        classifier.eval()
        print(f"classifier: loaded {classifier_path}")
    else:
        start = time.time()
        classifier = train_classifier(train, args.classifier_steps, args.seed, device)
        save_checkpoint(classifier_path, {"model": classifier.state_dict(), "meta": meta})
        print(f"classifier: trained {args.classifier_steps} steps in {time.time() - start:.0f} s "
              f"-> {classifier_path}")

    val_images = common.to_float(val.images).to(device)
    val_labels = val.labels
    real_accuracy = (predict(classifier, val_images) == val_labels).float().mean(0)
    majority = torch.maximum(train.labels.cpu().mean(0), 1 - train.labels.cpu().mean(0))

    count = args.num_samples
    requested = val_labels[torch.arange(count) % len(val_labels)].to(device)
    noise = torch.randn(count, config["noise_dim"],
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.no_grad():
        fakes = torch.cat([generator(z, a) for z, a in zip(noise.split(256), requested.split(256))])
        agreement = (predict(classifier, fakes.float()) == requested.cpu()).float().mean(0)
        response = []
        for k in range(len(attr_names)):
            on, off = requested.clone(), requested.clone()
            on[:, k], off[:, k] = 1, 0
            pred_on = predict(classifier, torch.cat([generator(z, a) for z, a in
                                                     zip(noise.split(256), on.split(256))]).float())
            pred_off = predict(classifier, torch.cat([generator(z, a) for z, a in
                                                      zip(noise.split(256), off.split(256))]).float())
            response.append((pred_on[:, k].mean() - pred_off[:, k].mean()).item())

    print(f"{'attribute':<22}{'real acc':>9}{'majority':>9}{'gen agree':>10}{'flip resp':>10}")
    rows = {}
    for k, name in enumerate(attr_names):
        rows[name] = {"real_accuracy": real_accuracy[k].item(), "majority": majority[k].item(),
                      "generated_agreement": agreement[k].item(), "flip_response": response[k]}
        print(f"{name:<22}{real_accuracy[k]:>9.3f}{majority[k]:>9.3f}{agreement[k]:>10.3f}"
              f"{response[k]:>10.3f}")
    summary = {"real_accuracy": real_accuracy.mean().item(), "majority": majority.mean().item(),
               "generated_agreement": agreement.mean().item(),
               "flip_response": sum(response) / len(response)}
    print(f"{'mean':<22}{summary['real_accuracy']:>9.3f}{summary['majority']:>9.3f}"
          f"{summary['generated_agreement']:>10.3f}{summary['flip_response']:>10.3f}")
    result = {"ckpt": str(args.ckpt), "num_samples": count, "classifier_steps": args.classifier_steps,
              "val_images": len(val_labels), "per_attribute": rows, "mean": summary}
    (Path(args.ckpt).parent / "eval.json").write_text(json.dumps(result, indent=1))
    return result




# ================================================================================================
# main: training
# ================================================================================================
def apply_presets(args, device):
    """--smoke, then the CPU + demo preset, each only on fields still at their defaults."""
    defaults = Args()
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    elif device.type == "cpu" and args.data == "demo" and args.steps == defaults.steps:
        changed = {name: value for name, value in CPU_DEMO_PRESET.items()
                   if getattr(args, name) == getattr(defaults, name) != value}
        for name, value in changed.items():
            setattr(args, name, value)
        print("note: CPU + demo preset applies (about 2.5 minutes on two CPU cores): "
              + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
              + "; pass --steps to train the full configuration")
    return args


def load_training_data(args):
    """-> (train FaceData with the chosen attributes, the attribute names). With 'nonsparse23'
    the 40 labels are loaded once, ranked, and the chosen columns kept."""
    img_hw, crop = image_geometry(dataclasses.asdict(args))
    if [a.lower() for a in args.attrs] == [NONSPARSE_KEY]:
        data = common.load_celeba(args.data, None, "train", img_hw, crop)
        names, ranked = select_nonsparse(data.labels, data.attr_names)
        print(f"{NONSPARSE_KEY}: the {len(names)} attributes closest to 50 % positive "
              f"(rate in {len(data.labels)} training labels):")
        print("  " + ", ".join(f"{n} {r:.2f}" for n, r in ranked[:len(names)]))
        columns = [data.attr_names.index(n) for n in names]
        return dataclasses.replace(data, labels=data.labels[:, columns], attr_names=names), names
    if any(a.lower() == NONSPARSE_KEY for a in args.attrs):
        raise InputError(f"'{NONSPARSE_KEY}' stands alone: --attrs {NONSPARSE_KEY}, or a list of names")
    data = common.load_celeba(args.data, args.attrs, "train", img_hw, crop)
    return data, data.attr_names


def fixed_sample_inputs(args, attr_names, device, rows=8):
    """The sample grids' fixed inputs: noise from seed + 1, attributes (and faces, for the edit
    grid) of the first validation images (the training split if validation is empty)."""
    img_hw, crop = image_geometry(dataclasses.asdict(args))
    val = common.load_celeba(args.data, attr_names, "val", img_hw, crop, verbose=False)
    if len(val.images) == 0:
        val = common.load_celeba(args.data, attr_names, "train", img_hw, crop, verbose=False)
    rows = min(rows, len(val.images))
    noise = torch.randn(rows, args.noise_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    return (noise.to(device), val.labels[:rows].to(device),
            common.to_float(val.images[:rows]).to(device))


def train(args):
    device = pick_device(args.device)
    args = apply_presets(args, device)
    check_config(args)
    out = Path(args.out)
    # Read (and vet) the checkpoint before loading any data: a wrong setting fails at once.
    state = (load_checkpoint(out / "ckpt.pt", dataclasses.asdict(args), RESUME_MUST_MATCH)
             if args.resume else None)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    data, attr_names = load_training_data(args)
    data = common.to_device(data, device)
    sample_noise, sample_attrs, sample_images = fixed_sample_inputs(args, attr_names, device)

    models = build_models(dataclasses.asdict(args), len(attr_names))
    generator, discriminator, encoder = (m.to(device) if m is not None else None for m in models)
    channels_last = args.channels_last and device.type == "cuda" and args.arch == "dcgan"
    if channels_last:
        for model in (generator, discriminator, encoder):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    g_params = list(generator.parameters()) + (list(encoder.parameters()) if encoder else [])
    opt_g = rmsprop_like_tf(g_params, args.lr)
    opt_d = rmsprop_like_tf(discriminator.parameters(), args.lr)
    print(f"{args.arch} ({'refine, ' if args.refine else ''}attrs joined "
          f"{args.attr_join if args.arch == 'dcgan' else 'at the input'}): "
          f"G {sum(p.numel() for p in generator.parameters()) / 1e6:.2f} M, "
          f"D {sum(p.numel() for p in discriminator.parameters()) / 1e6:.2f} M"
          + (f", E {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M" if encoder else "")
          + f" parameters; {len(data.images)} training images of {'x'.join(map(str, data.img_size))}"
          f" px; {len(attr_names)} attributes; device {device}")

    start_step, metrics_path = 0, out / "metrics.jsonl"
    if state is not None:
        generator.load_state_dict(state["generator"])
        discriminator.load_state_dict(state["discriminator"])
        if encoder is not None:
            encoder.load_state_dict(state["encoder"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        trim_jsonl(metrics_path, start_step)
        print(f"resumed from {out / 'ckpt.pt'} at step {start_step}")
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log

    models = (generator, discriminator, encoder)
    run_models = models
    if args.compile:  # compiled wrappers train; the plain modules are saved (same parameters)
        run_models = tuple(torch.compile(m) if m is not None else None for m in models)
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731

    def save_samples(step):
        generator.eval()
        with amp_ctx():
            attribute_grid(generator, sample_noise, sample_attrs, attr_names,
                           out / "samples" / f"step_{step:06d}.png", title=f"step {step}")
            if encoder is not None:
                encoder.eval()
                edit_grid(generator, encoder, sample_images, sample_attrs, attr_names,
                          out / "samples" / f"edit_step_{step:06d}.png", title=f"step {step}")
                encoder.train()
        generator.train()

    totals, count, clock, last_step = {}, 0, time.time(), start_step
    for step in range(start_step, args.steps):
        images_real, attrs, _ = common.get_batch(data, step, args.batch_size, args.seed, device,
                                                 channels_last=channels_last)
        noise = torch.randn(len(images_real), args.noise_dim, device=device)
        stats = train_step(run_models, (opt_g, opt_d), images_real, attrs, noise, args, amp_ctx)
        for key, value in stats.items():  # detached tensors: no host sync until the log step
            totals[key] = totals.get(key, 0) + value
        count += 1
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.time() - clock
            record = {"step": done, "img_per_s": count * args.batch_size / max(elapsed, 1e-9)}
            record.update({k: (v / count).item() for k, v in totals.items()})
            append_jsonl(metrics_path, record)
            eta = (args.steps - done) * elapsed / max(done - last_step, 1)
            print(f"step {done}/{args.steps}  d {record['d_loss']:.3f} (real {record['d_real']:.3f} "
                  f"fake {record['d_fake']:.3f} mis {record['d_mismatch']:.3f})  g {record['g_loss']:.3f}"
                  + (f" (recon {record['recon']:.3f})" if "recon" in record else "")
                  + f"  D: real {record['p_real']:.2f} fake {record['p_fake']:.2f} "
                  f"mis {record['p_mismatch']:.2f}  {record['img_per_s']:.0f} img/s  ETA {eta:.0f} s",
                  flush=True)
            totals, count, last_step = {}, 0, done
        if done % args.sample_every == 0 or done == args.steps:
            save_samples(done)
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(out / "ckpt.pt", checkpoint_state(models, (opt_g, opt_d), done, args,
                                                              attr_names))
        if count == 0:  # just logged: time the next interval from here, without the saving
            clock = time.time()
    if metrics_path.exists():
        common.plot_metrics(metrics_path, out / "losses.png",
                            keys=[k for k in ("d_loss", "d_real", "d_fake", "d_mismatch", "g_loss",
                                              "g_adv", "recon", "attr_cls", "img_per_s")
                                  if k in common.read_jsonl(metrics_path)[-1]])
        plot_d_outputs(metrics_path, out / "d_outputs.png")
    print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png, d_outputs.png")
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "play", "eval") else "train"
    if command == "play":
        play(parse_dataclass(PlayArgs, argv, "cgan.py play"), sys.stdin.read().splitlines())
    elif command == "eval":
        evaluate(parse_dataclass(EvalArgs, argv, "cgan.py eval"))
    else:
        train(parse_dataclass(Args, argv, "cgan.py [train]"))


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # bad input: one clear line, no traceback
        sys.exit(f"error: {err}")
