"""AttGAN: facial attribute editing by only changing what you want.

Reimplements **AttGAN** (Zhenliang He, Wangmeng Zuo, Meina Kan, Shiguang Shan, Xilin Chen,
"AttGAN: Facial Attribute Editing by Only Changing What You Want", IEEE TIP 2019,
https://arxiv.org/abs/1711.10678), with the defaults of the official code (the TensorFlow original
LynnHo/AttGAN-Tensorflow and its PyTorch port elvisyjlin/AttGAN-PyTorch).

An encoder G_enc turns a face x into feature maps z; a decoder G_dec redraws the face from z and an
attribute vector. Asked for the face's own attributes a it must give x back (reconstruction);
asked for other attributes b it must give a face that a classifier C reads as b, and that a critic
D cannot tell from a real photo. Reconstruction keeps everything the attributes do not describe
(identity, pose, background); the classifier forces the attributes to change. There is no latent
constraint: z is free to carry attribute information, the paper's point against "disentangled"
encoders. D and C share one convolutional trunk.

Objective (WGAN-GP; a = source attributes, b = target attributes, both 0/1)
--------------------------------------------------------------------------
    x̂_b = G_dec(G_enc(x), b')        the edit         b' = (2b − 1)·thres_int  (±0.5)
    x̂_a = G_dec(G_enc(x), a')        the reconstruction
    L_D = −D(x) + D(x̂_b) + λ_gp·(‖∇_x̃ D(x̃)‖₂ − 1)² + λ_cls_d·BCE(C(x), a)
          x̃ = α·x + (1 − α)·x̂_b, α ~ U(0, 1) per image                (Eq. 9 and 10 of the paper)
    L_G = −D(x̂_b) + λ_cls_g·BCE(C(x̂_b), b) + λ_rec·‖x − x̂_a‖₁          (Eq. 8)
    λ_rec = 100, λ_cls_g = 10, λ_cls_d = 1, λ_gp = 10 (all means over the batch / pixels)

Paper notation -> code
----------------------
    x, a            img_real, attr_src          (B, 3, H, W) in [-1, 1], (B, A) in {0, 1}
    b               attr_tgt                    shuffled rows of attr_src, made consistent
    a', b'          signed(a, thres_int)        what G_dec actually sees: ±thres_int
    G_enc, G_dec    Generator.encode/.decode
    D, C            Discriminator -> (adv (B,), cls logits (B, A)): one trunk, two FC heads
    λ_1, λ_2, λ_3   lambda_rec, lambda_cls_g, lambda_cls_d   (the official code's names)

Shapes (128 px, defaults: 5 layers, dim 64, max 1024, shortcut 1, inject 1, A = 13)
------------------------------------------------------------------------------------
    G_enc: x (B, 3, 128, 128) -> (B, 64, 64, 64) -> (B, 128, 32, 32) -> (B, 256, 16, 16)
           -> (B, 512, 8, 8) -> (B, 1024, 4, 4)          each: conv 4x4 s2, BatchNorm, LeakyReLU 0.2
    G_dec: [z (B, 1024, 4, 4), b' tiled (B, 13, 4, 4)]                     bottleneck injection
           -> (B, 1024, 8, 8) ++ encoder (B, 512, 8, 8) ++ b' (B, 13, 8, 8)   shortcut 1, inject 1
           -> (B, 512, 16, 16) -> (B, 256, 32, 32) -> (B, 128, 64, 64)  deconv 4x4 s2, BN, ReLU
           -> (B, 3, 128, 128)                                           last deconv, tanh
    D:     x -> (B, 64, 64, 64) ... -> (B, 1024, 4, 4)         conv 4x4 s2, InstanceNorm, LReLU
           flatten (B, 16384) -> FC 1024, ReLU -> FC 1   (adversarial head)
                              -> FC 1024, ReLU -> FC A   (attribute head; separate weights)
    --shortcut-layers K concatenates the encoder map of the same scale after the first K decoder
    layers (U-Net style); --inject-layers K tiles b' after the first K decoder layers, on top of
    the bottleneck injection that is always there (the official code's counting: inject 0 =
    bottleneck only). 64 px: every map is half as wide (bottleneck 2x2); 256 px: twice.

Training schedule (the official loop)
-------------------------------------
Each step draws one batch and makes ONE update: steps 1..n_d update D, step n_d + 1 updates G,
and so on (n_d = 5). So G is updated on every 6th step, and img/s counts every step's batch.
The target attributes b are the batch's own attribute rows in a random order (a realistic
combination, as the official code does), made consistent by `make_consistent`. Adam 2e-4,
betas (0.5, 0.999); the learning rate drops ×0.1 at --lr-decay-step (official: 200 epochs,
lr / 10^(epoch // 100), i.e. ×0.1 at epoch 100 = step 568,700). Default --steps = 200 epochs of the
official 182,000 training images at batch 32 (5,687 steps per epoch).

Test-time editing (official test.py): G_dec sees ±thres_int for every attribute except the edited
one, which gets ±test_int (1.0: twice the training strength, a clearer edit). `edit --set A=v`
takes any real v in label units (0 = absent, 1 = present; G sees (2v − 1)·test_int), so 0.5 is
neutral and 1.5 exaggerates; `--slider A` draws strengths −2..+2 (strength s = 2v − 1).

Deviations from the official code, and why
------------------------------------------
* Convolutions followed by a normalisation have no bias (the norm's shift makes it redundant).
  Weights use PyTorch's default initialisation, as the PyTorch port.
* The sample-grid / `edit` attribute conflicts use the official test-time rule
  (check_attribute_conflict); we also apply it to the shuffled training targets, where the
  official code applies none (shuffled real rows are nearly always consistent already; CelebA
  rows with two hair colours are the exception). For whole rows, the attribute listed first in
  --attrs wins. See `make_consistent`.
* Fakes for the D step are generated under torch.no_grad() (the port builds the graph and then
  detaches it: same numbers, more memory). D sees real and fake images in one concatenated batch
  (InstanceNorm/LayerNorm are per image, so this changes nothing but the speed).
* One --n-layers for encoder, decoder and discriminator (the official code has three knobs, all 5).
* The learning-rate drop is placed by a step number (--lr-decay-step) instead of an epoch, as
  everything here counts steps; the presets move it to the middle of their shorter runs.
* --d-norm layer (GroupNorm with one group = LayerNorm over C, H, W) reproduces the TF original's
  D, --d-norm instance (default) the port's. Never BatchNorm: the gradient penalty is a
  per-image quantity, and batch statistics would make each image's score depend on the others.
* Several GPUs: DistributedDataParallel; --batch-size is the global batch, split over the ranks.
  BatchNorm statistics stay per rank (no SyncBatchNorm), like DataParallel in the port.
* On a CPU with the demo data, `--preset auto` (the default) switches to the small `cpu-demo`
  preset (64 px, widths 16 up to 128, n_d 2, 1,500 steps, lr drop at step 1,200; see
  CPU_DEMO_PRESET) so that `python attgan.py` finishes in minutes;
  `--preset paper` keeps the paper's configuration anywhere.

Commands
--------
    python attgan.py                                  # demo set; on a CPU the cpu-demo preset
    python attgan.py --data ./celeba                  # the paper's configuration (128 px, 13 attrs)
    python attgan.py --data ./celeba --img-size 64 --out runs/attgan64
    python attgan.py --data ./celeba --resume         # continue runs/attgan/ckpt.pt exactly
    torchrun --nproc_per_node 4 attgan.py --data ./celeba    # DistributedDataParallel
    python attgan.py --smoke --out /tmp/attgan_smoke  # seconds, end to end
    python attgan.py edit --ckpt runs/attgan/ckpt.pt --image me.jpg --set Eyeglasses=1 \\
        --set Blond_Hair=0.5 --out me_edited.png
    python attgan.py edit --ckpt runs/attgan/ckpt.pt --image me.jpg --slider Male
    python attgan.py edit --ckpt runs/attgan/ckpt.pt --index 3      # a validation image, all flips
    python attgan.py benchmark --img-size 128 --batch-size 32 --iters 60   # img/s of training

Outputs in --out: ckpt.pt (G, D, both optimizers, step, config, attribute names, RNG), metrics.jsonl,
losses.png, samples/step_XXXXXX.png (rows: fixed validation faces; columns: input | reconstruction
| each attribute flipped).

Evaluation contract (benchmarks/evaluate.py): load_for_eval(ckpt_path, device) returns a namespace
with attr_names, img_size, crop, edit(images, attr_src, attr_tgt) (attributes that differ get
±test_int, the rest ±thres_int, as the official test), reconstruct(images) (source attributes read
by D's classifier head), generate = None, encode = None.
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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import InputError

PAPER_ATTRS = ["Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows",
               "Eyeglasses", "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin",
               "Young"]  # the 13 attributes of the paper, in its order


# ================================================================================================
# Config
# ================================================================================================
@dataclass
class Args:
    """Train AttGAN (sub-commands: train (default), edit, benchmark; `python attgan.py edit
    --help`)."""
    data: str = "demo"
    """CelebA folder (any layout common.py reads), or 'demo' / 'demo:N' for the synthetic set"""
    out: str = "runs/attgan"
    """output folder: ckpt.pt, metrics.jsonl, losses.png, samples/"""
    attrs: list = field(default_factory=list)
    """attribute names to edit (default: the paper's 13; on the demo set 13 that it draws)"""
    img_size: int = 128
    """image side in pixels; a multiple of 2^n_layers (64, 128, 256)"""
    crop: int = 170
    """centre square crop in official 178x218 pixels before resizing (official: 170)"""
    n_layers: int = 5
    """conv layers of the encoder, the decoder and the discriminator (official: 5 each)"""
    enc_dim: int = 64
    """channels of the first encoder conv, doubling per layer up to --max-dim"""
    dec_dim: int = 64
    """channels of the last hidden decoder layer, doubling towards the bottleneck up to --max-dim"""
    dis_dim: int = 64
    """channels of the first discriminator conv, doubling per layer up to --max-dim"""
    max_dim: int = 1024
    """cap on the channels of any conv layer (official: 1024)"""
    dis_fc_dim: int = 1024
    """hidden units of each discriminator head (official: 1024)"""
    d_norm: str = "instance"
    """discriminator normalisation: 'instance' (PyTorch port) or 'layer' (TF original)"""
    shortcut_layers: int = 1
    """U-Net shortcuts: encoder maps joined after the first K decoder layers"""
    inject_layers: int = 1
    """attributes tiled after the first K decoder layers (besides the bottleneck)"""
    thres_int: float = 0.5
    """attributes reach G as (2a − 1)·thres_int during training"""
    test_int: float = 1.0
    """strength of an edited attribute in sample grids (G sees ±test_int)"""
    lambda_rec: float = 100.0
    """weight of the reconstruction loss ‖x − G(x, a)‖₁ (official λ_1)"""
    lambda_cls_g: float = 10.0
    """weight of the attribute loss on edited images in L_G (official λ_2)"""
    lambda_cls_d: float = 1.0
    """weight of the attribute loss on real images in L_D (official λ_3)"""
    lambda_gp: float = 10.0
    """weight of the WGAN-GP gradient penalty"""
    n_d: int = 5
    """discriminator updates per generator update (each on its own batch)"""
    batch_size: int = 32
    """images per step (global batch: split over the ranks under torchrun)"""
    steps: int = 1_137_400
    """training steps, each one D or one G update (default: 200 epochs of 182,000 at batch 32)"""
    lr: float = 2e-4
    """Adam learning rate of G and D (betas 0.5, 0.999)"""
    lr_decay_step: int = 568_700
    """the learning rate drops ×0.1 from this step on (official: epoch 100 of 200)"""
    seed: int = 0
    """seed for the weights, the batches, the target attributes and the penalty's α"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cuda', 'cpu', ..."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored elsewhere)"""
    channels_last: bool = True
    """channels-last memory format on CUDA (faster convolutions on tensor cores)"""
    compile: bool = False
    """torch.compile G and D (CUDA; the first steps are slow while it compiles)"""
    preset: str = "auto"
    """'auto' (cpu-demo on a CPU with demo data, else paper), 'paper' or 'cpu-demo'"""
    log_every: int = 100
    """print a progress line and append to metrics.jsonl every this many steps"""
    sample_every: int = 5000
    """write a sample grid every this many steps (and at the end)"""
    ckpt_every: int = 5000
    """write ckpt.pt every this many steps (and at the end)"""
    resume: bool = False
    """continue from <out>/ckpt.pt (its configuration must match)"""
    smoke: bool = False
    """tiny end-to-end run: demo:16, 32 px, 4 layers, tiny widths, 6 steps (seconds on a CPU)"""


# Fields a resumed run must share with its checkpoint: everything that changes the model shapes,
# the data, the batches or the trajectory. (--steps may grow: a resumed run can train longer.)
RESUME_MUST_MATCH = ("data", "attrs", "img_size", "crop", "n_layers", "enc_dim", "dec_dim",
                     "dis_dim", "max_dim", "dis_fc_dim", "d_norm", "shortcut_layers",
                     "inject_layers", "thres_int", "lambda_rec", "lambda_cls_g", "lambda_cls_d",
                     "lambda_gp", "n_d", "batch_size", "lr", "lr_decay_step", "seed")

# --smoke: applied to the fields still at their defaults (so `--smoke --steps 2` runs 2 steps).
# n_d = 1 so that a handful of steps exercises both updates.
SMOKE = dict(data="demo:16", img_size=32, n_layers=4, enc_dim=8, dec_dim=8, dis_dim=8, max_dim=32,
             dis_fc_dim=32, batch_size=8, n_d=1, steps=6, lr_decay_step=3, log_every=2,
             sample_every=3, ckpt_every=3)

# `--preset cpu-demo` (chosen by `--preset auto` on a CPU with demo data): the same method at
# 64 px with narrower networks and fewer steps, so `python attgan.py` shows recognisable edits
# after a few minutes on two CPU cores. Applied to the fields still at their defaults.
# n_d = 2 gives G a third of the updates instead of a sixth: in so short a run the
# reconstruction, which needs G updates, is what makes the grid readable.
CPU_DEMO_PRESET = dict(img_size=64, enc_dim=16, dec_dim=16, dis_dim=16, max_dim=128,
                       dis_fc_dim=128, n_d=2, steps=1500, lr_decay_step=1200, log_every=50,
                       sample_every=500, ckpt_every=500)


@dataclass
class EditArgs:
    """Edit a face with a trained AttGAN: your own photo (--image) or a validation image (--index).
    Its attributes are read by the discriminator's classifier head and printed; the edits are
    relative to them (python attgan.py edit --ckpt runs/attgan/ckpt.pt --image me.jpg --set
    Eyeglasses=1 --out me_edited.png)."""
    ckpt: str = "runs/attgan/ckpt.pt"
    """checkpoint written by training"""
    image: str = None
    """a photo (jpg/png); put the face in the middle, filling most of the frame"""
    index: int = 0
    """without --image: this image of the checkpoint's dataset ('val' split)"""
    data: str = None
    """dataset for --index (default: the checkpoint's)"""
    set: list = field(default_factory=list)
    """Attr=value edits, repeatable (0 = absent, 1 = present; any real value, 0.5 = neutral)"""
    slider: str = None
    """write a strip of this attribute from strength −2 to +2 (strength = 2·value − 1)"""
    test_int: float = 1.0
    """strength scale of edited attributes (G sees (2·value − 1)·test_int)"""
    out: str = None
    """output PNG (default: edit.png / slider_<Attr>.png beside the checkpoint)"""
    device: str = "cpu"
    """device to run G and D on"""


@dataclass
class BenchArgs:
    """Time training steps on random images and print img/s (each D or G update counts its batch):
    python attgan.py benchmark --img-size 128 --batch-size 32 --iters 60."""
    img_size: int = 128
    """image side in pixels"""
    batch_size: int = 32
    """images per step"""
    iters: int = 60
    """timed steps (n_d D updates per G update, as in training)"""
    warmup: int = 12
    """untimed steps first (cuDNN autotune, torch.compile)"""
    width: int = 64
    """enc/dec/dis dim (64 = the paper's networks)"""
    num_attrs: int = 13
    """length of the attribute vector"""
    device: str = "auto"
    """'auto', 'cuda', 'cpu', ..."""
    amp: bool = True
    """bf16 autocast on CUDA"""
    channels_last: bool = True
    """channels-last memory format on CUDA"""
    compile: bool = False
    """torch.compile G and D"""


# ================================================================================================
# Shared boilerplate (the source of the verbatim copies in the other method files)
# ================================================================================================
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


def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU runs stay in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def rng_state():
    """Every random-number generator the training loop draws from, for an exact resume."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """Write `state` to a temporary file, then rename it over `path`: the rename is atomic, so a
    crash mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def append_jsonl(path, record):
    """Append one JSON line (metrics.jsonl: one line per logged step)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
def signed(attrs, intensity):
    """0/1 attributes -> what G_dec sees: (2a − 1)·intensity, i.e. ±thres_int in training.

    Why not feed 0/1? A symmetric code makes "absent" an active signal of the same size as
    "present", and the small training scale (0.5) leaves headroom: at test time ±1 (test_int)
    gives a stronger edit, and any value in between a partial one (the slider)."""
    return (attrs * 2 - 1) * intensity


def tile(attr_input, size):
    """(B, A) -> (B, A, h, w): the attribute vector repeated at every position of an (h, w) map."""
    return attr_input[:, :, None, None].expand(-1, -1, *size)


class Generator(nn.Module):
    """Encoder-decoder with U-Net shortcuts and attribute injection (see the header for shapes)."""

    def __init__(self, num_attrs, n_layers=5, enc_dim=64, dec_dim=64, max_dim=1024,
                 shortcut_layers=1, inject_layers=1):
        super().__init__()
        # At most n_layers − 1 decoder layers have a same-scale encoder map / a hidden output.
        self.shortcut_layers = min(shortcut_layers, n_layers - 1)
        self.inject_layers = min(inject_layers, n_layers - 1)
        enc_channels = [min(enc_dim * 2 ** i, max_dim) for i in range(n_layers)]  # 64 ... 1024
        self.encoder = nn.ModuleList()
        in_ch = 3
        for out_ch in enc_channels:
            self.encoder.append(nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),  # halves H, W
                nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2)))
            in_ch = out_ch
        self.decoder = nn.ModuleList()
        in_ch += num_attrs  # bottleneck: z ++ tiled attributes
        for i in range(n_layers - 1):
            out_ch = min(dec_dim * 2 ** (n_layers - 1 - i), max_dim)  # 1024, 512, 256, 128
            self.decoder.append(nn.Sequential(
                nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),  # doubles
                nn.BatchNorm2d(out_ch), nn.ReLU()))
            in_ch = out_ch
            if i < self.shortcut_layers:
                in_ch += enc_channels[n_layers - 2 - i]  # encoder map of the same scale
            if i < self.inject_layers:
                in_ch += num_attrs
        self.decoder.append(nn.Sequential(
            nn.ConvTranspose2d(in_ch, 3, 4, stride=2, padding=1), nn.Tanh()))  # (B, 3, H, W)

    def encode(self, images):
        """(B, 3, H, W) -> list of every encoder map; the last one is z, (B, 1024, H/32, W/32)."""
        features = []
        for layer in self.encoder:
            images = layer(images)
            features.append(images)
        return features

    def decode(self, features, attr_input):
        """Encoder maps + attributes as G sees them (B, A), e.g. ±thres_int -> (B, 3, H, W)."""
        hidden = torch.cat([features[-1], tile(attr_input, features[-1].shape[-2:])], 1)
        for i, layer in enumerate(self.decoder):
            hidden = layer(hidden)
            if i < self.shortcut_layers:  # (B, 1024, 8, 8) ++ (B, 512, 8, 8) for i = 0
                hidden = torch.cat([hidden, features[len(features) - 2 - i]], 1)
            if i < self.inject_layers:  # ++ (B, A, 8, 8) for i = 0
                hidden = torch.cat([hidden, tile(attr_input, hidden.shape[-2:])], 1)
        return hidden

    def forward(self, images, *attr_inputs):
        """Encode once, decode once per attribute tensor: G(x, b') -> edit; G(x, b', a') -> (edit,
        reconstruction). One forward call for all, so DistributedDataParallel sees every use."""
        features = self.encode(images)
        outputs = tuple(self.decode(features, a) for a in attr_inputs)
        return outputs[0] if len(outputs) == 1 else outputs


class Discriminator(nn.Module):
    """Shared conv trunk, then two FC heads: the critic D (a Wasserstein score, (B,)) and the
    attribute classifier C (logits, (B, A))."""

    def __init__(self, num_attrs, img_size=128, n_layers=5, dim=64, max_dim=1024, fc_dim=1024,
                 norm="instance"):
        super().__init__()
        layers, in_ch = [], 3
        for i in range(n_layers):
            out_ch = min(dim * 2 ** i, max_dim)
            # Per-image normalisation only (see the header): the penalty's gradient of one
            # image's score must not depend on the other images in the batch.
            norm_layer = (nn.InstanceNorm2d(out_ch, affine=True) if norm == "instance"
                          else nn.GroupNorm(1, out_ch))  # one group = LayerNorm over (C, H, W)
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False), norm_layer,
                       nn.LeakyReLU(0.2)]
            in_ch = out_ch
        self.trunk = nn.Sequential(*layers, nn.Flatten())  # (B, 1024 * 4 * 4) at 128 px
        flat = in_ch * (img_size // 2 ** n_layers) ** 2
        self.adv_head = nn.Sequential(nn.Linear(flat, fc_dim), nn.ReLU(), nn.Linear(fc_dim, 1))
        self.cls_head = nn.Sequential(nn.Linear(flat, fc_dim), nn.ReLU(), nn.Linear(fc_dim, num_attrs))

    def forward(self, images):
        """(B, 3, H, W) -> (critic score (B,), attribute logits (B, A))."""
        features = self.trunk(images)
        return self.adv_head(features).squeeze(1), self.cls_head(features)


def check_config(config):
    """Refuse settings the networks cannot be built with, with one clear line."""
    size, layers = config["img_size"], config["n_layers"]
    if size % 2 ** layers or size < 2 ** (layers + 1):
        raise InputError(f"--img-size {size} must be a multiple of 2^n_layers = {2 ** layers} and "
                         f"at least {2 ** (layers + 1)} (per-image norms need a 2x2 last map)")
    if config["d_norm"] not in ("instance", "layer"):
        raise InputError(f"--d-norm {config['d_norm']!r}: expected 'instance' or 'layer'")
    if config["preset"] not in ("auto", "paper", "cpu-demo"):
        raise InputError(f"--preset {config['preset']!r}: expected 'auto', 'paper' or 'cpu-demo'")
    if config["n_d"] < 1:
        raise InputError("--n-d must be at least 1")


def build_models(config, num_attrs):
    """(Generator, Discriminator) from a config dict (Args as a dict, or a checkpoint's config)."""
    generator = Generator(num_attrs, config["n_layers"], config["enc_dim"], config["dec_dim"],
                          config["max_dim"], config["shortcut_layers"], config["inject_layers"])
    discriminator = Discriminator(num_attrs, config["img_size"], config["n_layers"],
                                  config["dis_dim"], config["max_dim"], config["dis_fc_dim"],
                                  config["d_norm"])
    return generator, discriminator


# ================================================================================================
# Target attributes: shuffled, then made consistent
# ================================================================================================
# Attributes that exclude each other (the official check_attribute_conflict): when the key is
# present, the attributes listed for it are absent. A bald head has no bangs; one hair colour at
# most; hair is straight or wavy; in CelebA a mustache counts as a beard, so Mustache excludes
# No_Beard (and No_Beard excludes Mustache).
HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
EXCLUDES = {
    "Bald": ("Bangs",), "Receding_Hairline": ("Bangs",), "Bangs": ("Bald", "Receding_Hairline"),
    **{colour: tuple(c for c in HAIR_COLOURS if c != colour) for colour in HAIR_COLOURS},
    "Straight_Hair": ("Wavy_Hair",), "Wavy_Hair": ("Straight_Hair",),
    "Mustache": ("No_Beard",), "No_Beard": ("Mustache",),
}


def make_consistent(attrs, attr_names, changed=None):
    """Switch off attributes that contradict a present one -> a new (B, A) tensor.

    `changed` (a column index): that attribute was just set, so it wins: if present (> 0.5), its
    rivals become 0 (the official test-time rule, used for the sample grids and `edit`).
    `changed=None` (whole rows, e.g. the shuffled training targets): columns are visited in
    --attrs order and each present one switches off its rivals, so the one listed first wins.
    Only the attributes in attr_names take part. Works on any values; "present" means > 0.5.
    """
    attrs = attrs.clone()
    order = [changed] if changed is not None else range(len(attr_names))
    for k in order:
        rivals = [attr_names.index(r) for r in EXCLUDES.get(attr_names[k], ()) if r in attr_names]
        if rivals:
            present = attrs[:, k:k + 1] > 0.5  # (B, 1)
            attrs[:, rivals] = torch.where(present, torch.zeros_like(attrs[:, rivals]),
                                           attrs[:, rivals])
    return attrs


def target_attributes(attr_src, attr_names, generator):
    """b: the batch's attribute rows in a random order (realistic combinations, as the official
    code), made consistent. `generator`: a torch.Generator on the batch's device."""
    order = torch.randperm(len(attr_src), device=attr_src.device, generator=generator)
    return make_consistent(attr_src[order], attr_names)


# ================================================================================================
# Losses (one function per term of L_D and L_G)
# ================================================================================================
def loss_adv_d(score_real, score_fake):
    """WGAN critic loss: −(E[D(x)] − E[D(x̂_b)]) = −Wasserstein estimate."""
    return score_fake.float().mean() - score_real.float().mean()


def loss_adv_g(score_fake):
    """WGAN generator loss: −E[D(x̂_b)]."""
    return -score_fake.float().mean()


def loss_cls(attr_logits, attrs):
    """Attribute classification BCE(C(·), attrs), averaged over images and attributes."""
    return F.binary_cross_entropy_with_logits(attr_logits.float(), attrs)


def loss_rec(img_recon, img_real):
    """Reconstruction ‖x − x̂_a‖₁, the mean absolute pixel difference."""
    return (img_recon.float() - img_real).abs().mean()


def gradient_penalty(critic, img_real, img_fake, alpha):
    """WGAN-GP (Gulrajani et al. 2017): E[(‖∇_x̃ D(x̃)‖₂ − 1)²] on x̃ = α·x + (1 − α)·x̂, one α per image.

    `critic` maps images -> scores (B,). The gradient is taken with create_graph=True, so the
    penalty's own gradient reaches D's weights (a double backward).

    Precision under bf16 autocast: the forward may run in bf16, but the norm and the penalty are
    computed here in fp32 with autocast off. ‖g‖ sums the squares of 3·H·W values per image; in
    bf16 (8 bits of mantissa) that sum is only good to ~0.4 %, and (‖g‖ − 1)² near its optimum
    compares two numbers that agree to that precision: the penalty and its gradient would be
    mostly rounding noise. In fp32 they are exact enough; bf16's fp32-sized exponent means the
    gradient itself never under- or overflows, so no loss scaling is needed.
    """
    interp = (alpha * img_real + (1 - alpha) * img_fake).requires_grad_(True)
    score = critic(interp)
    (grad,) = torch.autograd.grad(score.float().sum(), interp, create_graph=True)
    with torch.autocast(interp.device.type, enabled=False):
        grad_norm = grad.float().flatten(1).norm(2, dim=1)  # (B,), fp32
        return ((grad_norm - 1) ** 2).mean()


# ================================================================================================
# Training steps
# ================================================================================================
@dataclass
class Nets:
    """The networks as each use needs them. `g`, `d`: the plain modules (saved, and used for the
    gradient penalty, which needs an eager double backward). `g_train`, `d_train`: what the
    updates call (DistributedDataParallel-wrapped and/or compiled). `g_fake`, `d_judge`: G making
    the D step's fakes and D judging the G step's edits (no DDP: no gradient to synchronise)."""
    g: nn.Module
    d: nn.Module
    g_train: nn.Module
    d_train: nn.Module
    g_fake: nn.Module
    d_judge: nn.Module


def d_step(nets, opt_d, img_real, attr_src, attr_tgt, alpha, args, amp_ctx):
    """One discriminator update (L_D) -> dict of detached scalar tensors (no host sync)."""
    for p in nets.d.parameters():
        p.requires_grad_(True)
    with torch.no_grad(), amp_ctx():
        img_fake = nets.g_fake(img_real, signed(attr_tgt, args.thres_int)).float()
    with amp_ctx():
        # Real and fake in one batch: InstanceNorm/LayerNorm are per image, so this is exact.
        score, attr_logits = nets.d_train(torch.cat([img_real, img_fake]))
        score_real, score_fake = score.chunk(2)
        adv = loss_adv_d(score_real, score_fake)
        cls = loss_cls(attr_logits[:len(img_real)], attr_src)
        gp = gradient_penalty(lambda x: nets.d(x)[0], img_real, img_fake, alpha)
        loss = adv + args.lambda_gp * gp + args.lambda_cls_d * cls
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    accuracy = ((attr_logits[:len(img_real)] > 0).float() == attr_src).float().mean()
    return {"d_loss": loss.detach(), "d_adv": adv.detach(), "gp": gp.detach(),
            "d_cls": cls.detach(), "d_acc": accuracy.detach()}


def g_step(nets, opt_g, img_real, attr_src, attr_tgt, args, amp_ctx):
    """One generator update (L_G) -> dict of detached scalar tensors. D's weights are frozen so
    no gradient is computed for them (they would be discarded)."""
    for p in nets.d.parameters():
        p.requires_grad_(False)
    with amp_ctx():
        img_fake, img_recon = nets.g_train(img_real, signed(attr_tgt, args.thres_int),
                                           signed(attr_src, args.thres_int))
        score_fake, logits_fake = nets.d_judge(img_fake)
        adv = loss_adv_g(score_fake)
        cls = loss_cls(logits_fake, attr_tgt)
        rec = loss_rec(img_recon, img_real)
        loss = adv + args.lambda_cls_g * cls + args.lambda_rec * rec
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    return {"g_loss": loss.detach(), "g_adv": adv.detach(), "g_cls": cls.detach(),
            "g_rec": rec.detach()}


def step_generator(seed, step, rank, device):
    """A torch.Generator seeded from (seed, step, rank): the step's target shuffle and penalty α
    are a pure function of them, so a resumed run (and every DDP rank) draws exactly what an
    uninterrupted one would, without relying on the global RNG."""
    return torch.Generator(device).manual_seed((seed * 1_000_003 + step) * 1009 + rank)


def train_step(nets, optimizers, step, img_real, attr_src, attr_names, args, amp_ctx, rank=0):
    """Step `step` (0-based) of the official alternation: a G update on every (n_d + 1)-th step,
    a D update otherwise."""
    rng = step_generator(args.seed, step, rank, img_real.device)
    attr_tgt = target_attributes(attr_src, attr_names, rng)
    if (step + 1) % (args.n_d + 1) == 0:
        return g_step(nets, optimizers[0], img_real, attr_src, attr_tgt, args, amp_ctx)
    alpha = torch.rand(len(img_real), 1, 1, 1, device=img_real.device, generator=rng)
    return d_step(nets, optimizers[1], img_real, attr_src, attr_tgt, alpha, args, amp_ctx)


def learning_rate(step, args):
    """lr, ×0.1 from lr_decay_step on (the official lr / 10^(epoch // 100) over 200 epochs). A
    step number, not a fraction of --steps, so a run extended by --resume keeps its schedule."""
    return args.lr * (0.1 if step >= args.lr_decay_step else 1.0)


# ================================================================================================
# Sampling: the edit grid
# ================================================================================================
def edit_inputs(attr_src, attr_names, thres_int, test_int, changes):
    """What G sees for an edit of the rows attr_src (B, A): every attribute at ±thres_int, the
    changed ones ({column: value in label units}) at (2v − 1)·test_int, and their rivals switched
    off (official test-time rule). An attribute changed explicitly keeps its value. -> (B, A)"""
    attr_tgt = attr_src.clone()
    for k, value in changes.items():
        attr_tgt[:, k] = value
        attr_tgt = make_consistent(attr_tgt, attr_names, changed=k)
    for k, value in changes.items():
        attr_tgt[:, k] = value
    inputs = signed(attr_tgt, thres_int)
    for k in changes:
        inputs[:, k] = signed(attr_tgt[:, k], test_int)
    return inputs


@torch.no_grad()
def flip_grid(generator, images, attr_src, attr_names, thres_int, test_int):
    """(R, 2 + A, 3, H, W): per image its input, reconstruction and each attribute flipped."""
    columns = [images, generator(images, signed(attr_src, thres_int))]
    for k in range(len(attr_names)):
        flipped = edit_inputs(attr_src, attr_names, thres_int, test_int, {k: 1 - attr_src[:, k]})
        columns.append(generator(images, flipped))
    return torch.stack([c.float() for c in columns], 1)


def flip_labels(attr_names):
    return ["input", "recon"] + [f"flip {name}" for name in attr_names]


# ================================================================================================
# Checkpoint, loading a trained model, the evaluation contract
# ================================================================================================
def checkpoint_state(nets, optimizers, step, args, attr_names):
    """The full training state as one dict (weights_only-loadable)."""
    return {"generator": nets.g.state_dict(), "discriminator": nets.d.state_dict(),
            "opt_g": optimizers[0].state_dict(), "opt_d": optimizers[1].state_dict(),
            "step": step, "config": dataclasses.asdict(args), "attr_names": list(attr_names),
            "rng": rng_state()}


def load_trained(ckpt_path, device="cpu"):
    """(config, attr_names, generator, discriminator) from a checkpoint, in eval mode."""
    state = load_checkpoint(ckpt_path)
    config, attr_names = state["config"], state["attr_names"]
    generator, discriminator = build_models(config, len(attr_names))
    generator.load_state_dict(state["generator"])
    discriminator.load_state_dict(state["discriminator"])
    return config, attr_names, generator.to(device).eval(), discriminator.to(device).eval()


@torch.no_grad()
def read_attributes(discriminator, images, batch_size=256):
    """P(attribute present) from D's classifier head -> (B, A) on the CPU."""
    return torch.cat([torch.sigmoid(discriminator(chunk)[1]).float().cpu()
                      for chunk in images.split(batch_size)])


def load_for_eval(ckpt_path, device="cpu"):
    """The evaluation contract (benchmarks/evaluate.py): a namespace with attr_names, img_size,
    crop; edit(images, attr_src, attr_tgt) -> images, where the attributes that differ between
    src and tgt get ±test_int and the others ±thres_int (the official test); reconstruct(images)
    -> G(x, a') with a read by D's classifier head; generate = encode = None. Images are float
    [-1, 1] (B, 3, H, W), attributes (B, A) 0/1 in attr_names order; results come on the CPU."""
    device = torch.device(device)
    config, attr_names, generator, discriminator = load_trained(ckpt_path, device)
    thres_int, test_int = config["thres_int"], config["test_int"]

    @torch.no_grad()
    def edit(images, attr_src, attr_tgt, batch_size=256):
        attr_src, attr_tgt = attr_src.float(), attr_tgt.float()
        inputs = signed(attr_tgt, thres_int)
        changed = attr_src != attr_tgt
        inputs[changed] = signed(attr_tgt, test_int)[changed]
        return torch.cat([generator(x.to(device), a.to(device)).float().cpu()
                          for x, a in zip(images.split(batch_size), inputs.split(batch_size))])

    @torch.no_grad()
    def reconstruct(images, batch_size=256):
        out = []
        for x in images.split(batch_size):
            x = x.to(device)
            attr_src = (read_attributes(discriminator, x) > 0.5).float().to(device)
            out.append(generator(x, signed(attr_src, thres_int)).float().cpu())
        return torch.cat(out)

    return types.SimpleNamespace(attr_names=list(attr_names), img_size=config["img_size"],
                                 crop=config["crop"], edit=edit, reconstruct=reconstruct,
                                 generate=None, encode=None)


# ================================================================================================
# `edit`: your own photo
# ================================================================================================
def merge_repeated(argv, flag):
    """argparse keeps only the last of a repeated nargs='*' option: gather every `--set A=1
    --set B=0` into one `--set A=1 B=0`."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


def parse_settings(settings, attr_names):
    """['Eyeglasses=1', 'Blond_Hair=0.5'] -> {column: value}; names are case-insensitive."""
    changes = {}
    for item in settings:
        name, sep, raw = item.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = None
        if not sep or value is None or not math.isfinite(value):
            raise InputError(f"cannot read --set {item!r}: expected Attr=value, e.g. Eyeglasses=1")
        (name,) = common.resolve_attrs([name], attr_names)  # InputError lists the valid names
        changes[attr_names.index(name)] = value
    return changes


@torch.no_grad()
def edit(args):
    """Read the face's attributes with D, print them, then write the requested picture:
    --set: the edited face (and input | reconstruction | edit beside it); --slider: a strip of
    strengths −2..+2; neither: input | reconstruction | each attribute flipped. -> output path."""
    device = torch.device(args.device)
    config, attr_names, generator, discriminator = load_trained(args.ckpt, device)
    size, crop, thres_int = config["img_size"], config["crop"], config["thres_int"]
    labels = None
    if args.image:
        image = common.load_photo(args.image, size, crop)
        source = args.image
    else:
        data = common.load_celeba(args.data or config["data"], attr_names, "val", size, crop,
                                  verbose=False)
        if not 0 <= args.index < len(data.images):
            raise InputError(f"--index {args.index}: the 'val' split has {len(data.images)} images")
        image = common.to_float(data.images[args.index:args.index + 1])
        labels, source = data.labels[args.index], f"{data.files[args.index]} (val #{args.index})"
    image = image.to(device)
    probs = read_attributes(discriminator, image)[0]
    attr_src = (probs > 0.5).float()[None].to(device)
    print(f"{source}: attributes read by the discriminator (P(present))")
    for k, name in enumerate(attr_names):
        truth = f"   label {int(labels[k])}" if labels is not None else ""
        print(f"  {name:<22}{probs[k]:6.3f}  {'yes' if probs[k] > 0.5 else 'no '}{truth}")
    recon = generator(image, signed(attr_src, thres_int)).float()
    default_dir = Path(args.ckpt).parent
    if args.slider:
        (name,) = common.resolve_attrs([args.slider], attr_names)
        k = attr_names.index(name)
        strengths = [s / 2 for s in range(-4, 5)]  # −2.0, −1.5, ..., +2.0
        frames = [image[0].cpu()]
        for strength in strengths:
            # strength s = 2v − 1, so v = (s + 1) / 2 in label units
            inputs = edit_inputs(attr_src, attr_names, thres_int, args.test_int, {k: (strength + 1) / 2})
            frames.append(generator(image, inputs).float()[0].cpu())
        path = Path(args.out or default_dir / f"slider_{name}.png")
        common.save_grid([frames], path, col_labels=["input"] + [f"{s:+.1f}" for s in strengths],
                         title=f"{name}: strength −2 .. +2 (training saw ±{2 * thres_int:g})")
    elif args.set:
        changes = parse_settings(args.set, attr_names)
        inputs = edit_inputs(attr_src, attr_names, thres_int, args.test_int, changes)
        edited = generator(image, inputs).float()
        path = Path(args.out or default_dir / "edit.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(edited[0].cpu(), path)
        compare = path.with_name(path.stem + "_compare.png")
        common.save_grid([[image[0].cpu(), recon[0].cpu(), edited[0].cpu()]], compare,
                         col_labels=["input", "reconstruction", "edited"],
                         title=", ".join(args.set))
        print(f"input | reconstruction | edit: {compare}")
    else:
        grid = flip_grid(generator, image, attr_src, attr_names, thres_int, args.test_int)
        path = Path(args.out or default_dir / "edit.png")
        common.save_grid(grid.cpu(), path, col_labels=flip_labels(attr_names))
    print(f"wrote {path}")
    return path


def save_image(image, path):
    """One (3, H, W) image in [-1, 1] as a PNG at its own size."""
    from PIL import Image
    Image.fromarray(common.to_uint8(image).permute(1, 2, 0).numpy()).save(path)


# ================================================================================================
# `benchmark`: training throughput
# ================================================================================================
def benchmark(args):
    """Time args.iters training steps (n_d D updates per G update) on random images -> img/s.
    The data are already on the device, so this measures the networks and optimizers only."""
    device = pick_device(args.device)
    config = dataclasses.asdict(Args(img_size=args.img_size, enc_dim=args.width,
                                     dec_dim=args.width, dis_dim=args.width))
    train_args = Args(**config)
    check_config(config)
    names = [f"attr{k}" for k in range(args.num_attrs)]
    torch.manual_seed(0)
    g, d = (m.to(device) for m in build_models(config, args.num_attrs))
    channels_last = args.channels_last and device.type == "cuda"
    if channels_last:
        g.to(memory_format=torch.channels_last)
        d.to(memory_format=torch.channels_last)
    nets = make_nets(g, d, device, args.compile, distributed=False)
    optimizers = make_optimizers(g, d, train_args)
    images = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device) * 2 - 1
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    attrs = (torch.rand(args.batch_size, args.num_attrs, device=device) < 0.4).float()
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731

    def run(first, count):
        for step in range(first, first + count):
            last = train_step(nets, optimizers, step, images, attrs, names, train_args, amp_ctx)
        float(next(iter(last.values())))  # wait for the device to finish

    run(0, args.warmup)
    start = time.perf_counter()
    run(args.warmup, args.iters)
    elapsed = time.perf_counter() - start
    rate = args.iters * args.batch_size / elapsed
    print(f"benchmark: {args.iters} steps of batch {args.batch_size} at {args.img_size} px on "
          f"{device} (amp {args.amp and device.type == 'cuda'}, channels_last {channels_last}, "
          f"compile {args.compile}): {elapsed:.2f} s, {rate:.1f} img/s")
    return rate


# ================================================================================================
# main: training
# ================================================================================================
def is_demo(data):
    return data == "demo" or data.startswith("demo:")


def default_attrs(data):
    """The paper's 13; on the demo set the paper's that it draws (all but Bushy_Eyebrows), filled
    up to 13 with other drawn attributes in common.DEMO_ATTRS order."""
    if not is_demo(data):
        return list(PAPER_ATTRS)
    chosen = [a for a in PAPER_ATTRS if a in common.DEMO_ATTRS]
    chosen += [a for a in common.DEMO_ATTRS if a not in chosen][:len(PAPER_ATTRS) - len(chosen)]
    return [a for a in common.DEMO_ATTRS if a in chosen]


def apply_presets(args, device):
    """--smoke, or the cpu-demo preset, on the fields still at their defaults; fills --attrs."""
    defaults = Args()
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    else:
        use_cpu_preset = args.preset == "cpu-demo" or (
            args.preset == "auto" and device.type == "cpu" and is_demo(args.data))
        if use_cpu_preset:
            changed = {name: value for name, value in CPU_DEMO_PRESET.items()
                       if getattr(args, name) == getattr(defaults, name) != value}
            for name, value in changed.items():
                setattr(args, name, value)
            args.preset = "cpu-demo"
            if changed:
                print("note: cpu-demo preset (CPU + demo data; --preset paper keeps the paper's "
                      "configuration): " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                    for k, v in changed.items()))
        elif args.preset == "auto":
            args.preset = "paper"
    if not args.attrs:
        args.attrs = default_attrs(args.data)
    return args


def setup_distributed(args):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL
    on CUDA (one GPU per rank), gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(args.device)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch_size % world_size:
        raise InputError(f"--batch-size {args.batch_size} must be divisible by the {world_size} ranks")
    return dist.get_rank(), world_size, device


def make_nets(g, d, device, compile_, distributed):
    """Wrap the plain modules for their uses (see Nets). The gradient penalty keeps the eager D:
    torch.compile does not support the double backward it needs."""
    g_train, d_train = g, d
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        g_train = nn.parallel.DistributedDataParallel(g, device_ids=ids)
        d_train = nn.parallel.DistributedDataParallel(d, device_ids=ids)
    g_fake, d_judge = g, d
    if compile_:
        g_train, d_train = torch.compile(g_train), torch.compile(d_train)
        g_fake, d_judge = torch.compile(g), torch.compile(d)
    return Nets(g=g, d=d, g_train=g_train, d_train=d_train, g_fake=g_fake, d_judge=d_judge)


def make_optimizers(g, d, args):
    """(Adam for G, Adam for D): lr 2e-4, betas (0.5, 0.999), as the official code. The learning
    rate is set every step from `learning_rate`, so a resumed run follows the same schedule."""
    return (torch.optim.Adam(g.parameters(), lr=args.lr, betas=(0.5, 0.999)),
            torch.optim.Adam(d.parameters(), lr=args.lr, betas=(0.5, 0.999)))


def format_seconds(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def train(args):
    rank, world_size, device = setup_distributed(args)
    args = apply_presets(args, device)
    config = dataclasses.asdict(args)
    check_config(config)
    out, is_main = Path(args.out), rank == 0
    say = print if is_main else (lambda *a, **k: None)
    # Read (and vet) the checkpoint before loading any data: a wrong setting fails at once.
    state = load_checkpoint(out / "ckpt.pt", config, RESUME_MUST_MATCH) if args.resume else None
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)

    size, crop = args.img_size, args.crop
    data = common.load_celeba(args.data, args.attrs, "train", size, crop, verbose=is_main)
    attr_names = data.attr_names
    data = common.to_device(data, device)
    val = common.load_celeba(args.data, attr_names, "val", size, crop, verbose=False)
    if len(val.images) == 0:
        val = common.load_celeba(args.data, attr_names, "train", size, crop, verbose=False)
    sample_images = common.to_float(val.images[:8]).to(device)
    sample_attrs = val.labels[:8].to(device)

    g, d = (m.to(device) for m in build_models(config, len(attr_names)))
    channels_last = args.channels_last and device.type == "cuda"
    if channels_last:
        g.to(memory_format=torch.channels_last)
        d.to(memory_format=torch.channels_last)
    optimizers = make_optimizers(g, d, args)
    start_step, metrics_path = 0, out / "metrics.jsonl"
    if state is not None:
        g.load_state_dict(state["generator"])
        d.load_state_dict(state["discriminator"])
        optimizers[0].load_state_dict(state["opt_g"])
        optimizers[1].load_state_dict(state["opt_d"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        say(f"resumed from {out / 'ckpt.pt'} at step {start_step}")
    if is_main:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        if state is not None:
            trim_jsonl(metrics_path, start_step)
        elif metrics_path.exists():
            metrics_path.unlink()  # a fresh run starts a fresh log
    nets = make_nets(g, d, device, args.compile, world_size > 1)
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731
    per_rank_batch = args.batch_size // world_size
    say(f"AttGAN {size} px, {len(attr_names)} attributes ({', '.join(attr_names)}); "
        f"G {sum(p.numel() for p in g.parameters()) / 1e6:.2f} M, "
        f"D {sum(p.numel() for p in d.parameters()) / 1e6:.2f} M parameters; "
        f"{len(data.images)} training images; device {device}"
        + (f" x {world_size} ranks" if world_size > 1 else "")
        + f"; {'smoke' if args.smoke else args.preset} configuration")

    def save_samples(step):
        g.eval()
        with amp_ctx():
            grid = flip_grid(g, sample_images, sample_attrs, attr_names, args.thres_int, args.test_int)
        g.train()
        common.save_grid(grid, out / "samples" / f"step_{step:06d}.png",
                         col_labels=flip_labels(attr_names), title=f"AttGAN, step {step}")

    totals, counts, clock, interval_start = {}, {}, time.time(), start_step
    for step in range(start_step, args.steps):
        lr = learning_rate(step, args)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        img_real, attr_src, _ = common.get_batch(data, step, per_rank_batch, args.seed, device,
                                                 rank, world_size, channels_last=channels_last)
        stats = train_step(nets, optimizers, step, img_real, attr_src, attr_names, args, amp_ctx,
                           rank)
        for key, value in stats.items():  # detached tensors: no host sync until the log step
            totals[key] = totals.get(key, 0) + value
            counts[key] = counts.get(key, 0) + 1
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            keys = sorted(totals)
            means = torch.stack([totals[k] / counts[k] for k in keys]).float()
            if world_size > 1:  # the average over ranks (the one collective at log steps)
                dist.all_reduce(means)
                means /= world_size
            elapsed = time.time() - clock
            record = {"step": done, "img_per_s": (done - interval_start) * args.batch_size / elapsed,
                      "lr": lr, **dict(zip(keys, means.tolist()))}
            eta = (args.steps - done) * elapsed / (done - interval_start)
            if is_main:
                append_jsonl(metrics_path, record)
                d_part = (f"D {record['d_loss']:.3f} (adv {record['d_adv']:.3f} gp {record['gp']:.3f}"
                          f" cls {record['d_cls']:.3f} acc {record['d_acc']:.2f})"
                          if "d_loss" in record else "")
                g_part = (f"G {record['g_loss']:.3f} (adv {record['g_adv']:.3f} cls "
                          f"{record['g_cls']:.3f} rec {record['g_rec']:.4f})"
                          if "g_loss" in record else "")
                print(f"step {done}/{args.steps}  {d_part}  {g_part}  lr {lr:.1e}  "
                      f"{record['img_per_s']:.0f} img/s  ETA {format_seconds(eta)}", flush=True)
            totals, counts, interval_start = {}, {}, done
        saving = time.time()
        if is_main and (done % args.sample_every == 0 or done == args.steps):
            save_samples(done)
        if is_main and (done % args.ckpt_every == 0 or done == args.steps):
            save_checkpoint(out / "ckpt.pt", checkpoint_state(nets, optimizers, done, args,
                                                              attr_names))
        if not totals:  # just logged: time the next interval from here
            clock = time.time()
        else:  # img/s counts training only, not the time spent writing samples and checkpoints
            clock += time.time() - saving
    if world_size > 1:
        check_ranks_agree(g, d, world_size, say)
        # Every rank waits here until all are done communicating: a rank that tears down its
        # gloo connections while another still reads from them can abort it ("connection reset").
        dist.barrier()
        dist.destroy_process_group()
    if is_main and metrics_path.exists():
        records = common.read_jsonl(metrics_path)
        keys = [k for k in ("d_loss", "d_adv", "gp", "d_cls", "d_acc", "g_loss", "g_adv", "g_cls",
                            "g_rec", "img_per_s") if any(k in r for r in records)]
        common.plot_metrics(metrics_path, out / "losses.png", keys=keys)
        print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png")
    return out


def check_ranks_agree(g, d, world_size, say):
    """DDP sanity check at the end: every rank must hold the same G and D parameters (gradients
    are averaged before each update). Prints the largest difference between any two ranks."""
    worst = torch.zeros(())
    for p in [*g.parameters(), *d.parameters()]:
        high, low = p.detach().clone(), p.detach().clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        worst = torch.maximum(worst, (high - low).abs().max().cpu())
    say(f"DDP check: {world_size} ranks, largest parameter difference between ranks "
        f"{worst.item():.3g}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "edit", "benchmark") else "train"
    if command == "edit":
        return edit(parse_dataclass(EditArgs, merge_repeated(argv, "--set"), "attgan.py edit"))
    if command == "benchmark":
        return benchmark(parse_dataclass(BenchArgs, argv, "attgan.py benchmark"))
    return train(parse_dataclass(Args, argv, "attgan.py [train]"))


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # bad input: one clear line, no traceback
        sys.exit(f"error: {err}")
