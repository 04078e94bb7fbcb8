"""Features Changer: autoencoders whose latent codes carry attribute directions.

Reimplements the **Features Changer** project (Cc618/Feature-Changer, MIT licence): an autoencoder
learns a 100-number code z for a face; the mean code of faces WITH an attribute minus the mean code
of faces WITHOUT it is a direction v in that code, and decoding z + 1.5·v adds the attribute
(glasses, blond hair, a smile, a mustache), z − 1.5·v removes it. Two autoencoders:

* `dcae` — Deep Convolutional AutoEncoder, 32 px (the original's `Net3`, after ku2482/vae.pytorch).
* `pgae` — Progressive Growing AutoEncoder (Karras et al., "Progressive Growing of GANs for
  Improved Quality, Stability, and Variation", ICLR 2018, https://arxiv.org/abs/1710.10196, but an
  autoencoder, not a GAN): trained at 8 px, then grown to 16, 32 and 64 px, each new resolution
  faded in on both the encoder and the decoder.

Both are trained with the Deep Feature Consistent loss (Xianxu Hou, Linlin Shen, Ke Sun, Guoping
Qiu, "Deep Feature Consistent Variational Autoencoder", WACV 2017, https://arxiv.org/abs/1610.00291)
for sharper pictures than a pixel loss gives.

Objective
---------
    z = E(x)  (B, 100)          x̂ = D(z)  (B, 3, H, W) in [-1, 1]
    L_dfc = Σ_{l ∈ relu1_1, relu2_1, relu3_1} MSE(Φ_l(x̂), Φ_l(x))     Φ = frozen ImageNet VGG19 on
                                                     ImageNet-normalised inputs ((x + 1)/2 − μ)/σ
    L_mse = MSE(x̂, x)                                  (--loss mse; and PGAE below 32 px)
    PGAE fade-in of resolution R (α: 0 -> 1 over --fade-steps, then --stable-steps at α = 1):
        encoder: h_{R/2} = α·block_R(fromRGB_R(x_R)) + (1 − α)·fromRGB_{R/2}(avgpool(x_R))
        decoder: x̂_R     = α·toRGB_R(block_R(h_{R/2})) + (1 − α)·upsample(toRGB_{R/2}(h_{R/2}))
Attribute vectors (the original's README: 1000 images with, 1000 without, strength 1.5):
    v_a = mean_{x: a(x)=1} E(x) − mean_{x: a(x)=0} E(x)
    grid:  D(E(x) ± 1.5·v_a)        lerp:  D(E(x) + t·(±2·v_a)), t = 0 .. 1
    morph: D((1 − t)·E(x_1) + t·E(x_2))
    edit (evaluation contract): D(E(x) + 1.5·Σ_a (tgt_a − src_a)·v_a)

Notation -> code
----------------
    E, D                AutoEncoder.encode / .decode  (one module; `progressive` picks PGAE)
    z                   z_size numbers (original `z_size` = 100)
    Φ_l                 VGGFeatures (VGG19 features[:12]; taps after indices 1, 6, 11)
    v_a                 attribute_vectors(...) -> (A, z_size); vectors.pt holds them per name
    α, R                pg_schedule(step, ...) -> (resolution index, alpha)
    nef, ndf            encoder / decoder base widths (the original's names, 32 each)

Shapes (dcae, 32 px, nef = ndf = 32; every conv block: conv, LeakyReLU 0.2, BatchNorm, as the
original orders them)
--------------------------------------------------------------------------------------------------
    E: x (B, 3, 32, 32) -> (B, 32, 16, 16) -> (B, 64, 8, 8) -> (B, 128, 4, 4)   conv 4x4 stride 2
       -> flatten (B, 2048) -> Linear -> z (B, 100)
    D: z -> Linear, ReLU -> (B, 128, 4, 4) -> (B, 64, 8, 8) -> (B, 32, 16, 16)   nearest x2, conv 3x3
       -> nearest x2, conv 3x3 -> (B, 3, 32, 32), tanh
pgae (64 px): the same blocks one level deeper, with a 1x1 fromRGB (3 -> C, LeakyReLU) before the
encoder block and a 1x1 toRGB (C -> 3, tanh) after the decoder block of every resolution R:
    E at 64 px: x (B, 3, 64, 64) -> fromRGB_64 (B, 16, 64, 64) -> (B, 32, 32, 32) -> (B, 64, 16, 16)
                -> (B, 128, 8, 8) -> (B, 256, 4, 4) -> z (B, 100)
    E at 8 px:  x (B, 3, 8, 8) -> fromRGB_8 (B, 128, 8, 8) -> (B, 256, 4, 4) -> z
    D at R:     z -> (B, 256, 4, 4) -> (B, 128, 8, 8) -> ... -> (B, C_R, R, R) -> toRGB_R (B, 3, R, R)
    Training images are loaded at --img-size (64) and average-pooled to the current R.

Training schedule: Adam (lr 1e-3, betas 0.9, 0.999; the original's params.py: lr 1e-3, batch 128,
z_size 100). PGAE: `pg_schedule` is a pure function of the step: 8 px for --stable-steps, then per
new resolution --fade-steps of fade-in and --stable-steps at α = 1; after 64 px it stays there. The
checkpoint stores the resolution and α too (for the reader; a resume recomputes them from the step).

Deviations from the original, and why
-------------------------------------
* The original PGAE is fully convolutional (its code is a feature map, its blocks two 3x3 convs
  with max-pooling). Here PGAE reuses the DCAE blocks (4x4 stride-2 convs; nearest upsampling +
  3x3 conv) and the same Linear bottleneck of 100 numbers, so both models have the same kind of
  code and the same attribute-vector arithmetic applies to both.
* Outputs pass through tanh (images in [-1, 1], as every method here); the original decoder ends
  with a bare convolution.
* VGG19: only features[:12] (up to relu3_1) is built, laid out as torchvision's VGG19 so its
  ImageNet weights file (vgg19-dcbb9e9d.pth) loads into it; building the whole torchvision model
  would allocate its 120 M classifier weights for nothing. Nothing is downloaded: the file comes
  from torch.hub's cache folder or --vgg-weights PATH; when it is missing training stops and says
  where to put it. The default --loss auto means dfc, with one exception: on the cpu-demo preset
  (a CPU and the demo set) without the file it means mse, with a printed note, so that
  `python feature_ae.py` runs anywhere. An explicit --loss dfc always needs the file.
  `--vgg-weights random` (random VGG, a warning) exists only so tests can run the DFC code path.
* The loss is the DFC feature term alone: the DFC-VAE's KL term belongs to a VAE, and these are
  plain autoencoders (as the original).
* The attribute vectors are computed by the `vectors` sub-command and, for the training sample
  grids, from up to --vector-images training images per side at each sample step.
* The training grid shows input | reconstruction | ±1.5·v for each attribute at the current
  resolution. No multi-GPU path: the models are small (a DCAE step is milliseconds on one GPU).
* --compile applies to dcae only (PGAE's changing resolution and α would recompile every step).
* On a CPU with the demo data, `--preset auto` (the default) switches to the small `cpu-demo`
  preset (batch 64, 1,500 steps, PGAE phases of 200 steps; see CPU_DEMO_PRESET).

Commands
--------
    python feature_ae.py                                 # dcae on the demo set (cpu-demo on a CPU)
    python feature_ae.py --arch pgae --out runs/pgae     # progressive, 8 -> 64 px
    python feature_ae.py --data ./celeba --vgg-weights ~/vgg19-dcbb9e9d.pth
    python feature_ae.py --data ./celeba --loss mse      # no VGG weights: plain pixel MSE
    python feature_ae.py --data ./celeba --resume        # continue runs/feature_ae/ckpt.pt exactly
    python feature_ae.py --smoke --out /tmp/fae_smoke    # seconds, end to end
    python feature_ae.py vectors --ckpt runs/feature_ae/ckpt.pt           # -> vectors.pt beside it
    python feature_ae.py grid --ckpt runs/feature_ae/ckpt.pt              # -> grid.png
    python feature_ae.py lerp --ckpt runs/feature_ae/ckpt.pt --attr Smiling --frames 16
    python feature_ae.py morph --ckpt runs/feature_ae/ckpt.pt --index-a 3 --index-b 7

Outputs in --out: ckpt.pt (model, optimizer, step, PGAE phase, config, attribute names, RNG),
metrics.jsonl (loss, mse, psnr, dfc when used, res, alpha), losses.png, samples/step_XXXXXX.png.

Evaluation contract (benchmarks/evaluate.py): load_for_eval(ckpt_path, device) returns a namespace
with attr_names, img_size, crop; reconstruct(images) = D(E(x)); edit(images, attr_src, attr_tgt) =
D(E(x) + 1.5·Σ(tgt − src)·v) with the vectors of vectors.pt beside the checkpoint, or computed
from the checkpoint's training data (up to 1000 images per side); encode(images) -> {"z": (B, 100)};
generate = None (an autoencoder has no prior to sample from). A PGAE checkpoint still below its
final resolution works at its current one: inputs are average-pooled to it and outputs upsampled
(nearest) back to img_size.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
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

# The original README's attributes (smile, blond hair, mustache, glasses) and a few more.
FEATURE_ATTRS = ["Smiling", "Blond_Hair", "Mustache", "Eyeglasses", "Bangs", "Male", "Black_Hair",
                 "Wearing_Hat"]
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/" + VGG19_FILE
DFC_MIN_SIZE = 32  # the feature loss applies from this resolution up (below: pixel MSE)


# ================================================================================================
# Config
# ================================================================================================
@dataclass
class Args:
    """Train a Features Changer autoencoder (sub-commands: train (default), vectors, grid, lerp,
    morph; `python feature_ae.py grid --help`)."""
    arch: str = "dcae"
    """'dcae' (32 px convolutional AE) or 'pgae' (progressive growing 8 -> 64 px)"""
    data: str = "demo"
    """CelebA folder (any layout common.py reads), or 'demo' / 'demo:N' for the synthetic set"""
    out: str = "runs/feature_ae"
    """output folder: ckpt.pt, metrics.jsonl, losses.png, samples/"""
    attrs: list = field(default_factory=list)
    """attributes for the vectors in the sample grids (default: Smiling Blond_Hair Mustache ...)"""
    img_size: int = 0
    """image side in pixels, a power of 2 >= 8 (0: the architecture's, dcae 32, pgae 64)"""
    crop: int = 170
    """centre square crop in official 178x218 pixels before resizing"""
    z_size: int = 100
    """latent code size (original: 100)"""
    nef: int = 32
    """channels of the first encoder conv, doubling per halving (original: 32)"""
    ndf: int = 32
    """channels of the last hidden decoder layer, doubling towards the bottleneck (original: 32)"""
    loss: str = "auto"
    """'dfc' (VGG19 relu1_1 + relu2_1 + relu3_1 feature MSE; PGAE below 32 px: MSE), 'mse', or
    'auto' = dfc, except on the cpu-demo preset without VGG19 weights: mse, with a note"""
    vgg_weights: str = None
    """torchvision's VGG19 ImageNet file (default: torch.hub cache); 'random' only for tests"""
    fade_steps: int = 2500
    """PGAE: steps over which a new resolution fades in (α 0 -> 1)"""
    stable_steps: int = 2500
    """PGAE: steps at α = 1 after each fade (and at 8 px first)"""
    batch_size: int = 128
    """images per step (original: 128)"""
    steps: int = 20000
    """training steps (PGAE reaches 64 px at step 17,500 with the default phases)"""
    lr: float = 1e-3
    """Adam learning rate (original: 1e-3)"""
    strength: float = 1.5
    """z ± strength·v in the sample grids (original: 1.5)"""
    vector_images: int = 1000
    """images with / without each attribute averaged into a vector (original: 1000)"""
    seed: int = 0
    """seed for the weights and the batches"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cuda', 'cpu', ..."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored elsewhere)"""
    channels_last: bool = True
    """channels-last memory format on CUDA"""
    compile: bool = False
    """torch.compile the model (CUDA, dcae only)"""
    preset: str = "auto"
    """'auto' (cpu-demo on a CPU with demo data, else paper), 'paper' or 'cpu-demo'"""
    log_every: int = 100
    """print a progress line and append to metrics.jsonl every this many steps"""
    sample_every: int = 2000
    """write a sample grid every this many steps (and at the end)"""
    ckpt_every: int = 2000
    """write ckpt.pt every this many steps (and at the end)"""
    resume: bool = False
    """continue from <out>/ckpt.pt (its configuration must match)"""
    smoke: bool = False
    """tiny end-to-end run: demo:16, 32 px, tiny widths, random VGG, 6 steps (seconds on a CPU)"""


# Fields a resumed run must share with its checkpoint (--steps may grow).
RESUME_MUST_MATCH = ("arch", "data", "attrs", "img_size", "crop", "z_size", "nef", "ndf", "loss",
                     "vgg_weights", "fade_steps", "stable_steps", "batch_size", "lr", "seed")

# --smoke: applied to the fields still at their defaults. PGAE: 8 px for 1 step, 16 px fading in
# over steps 1-2, stable at step 3, 32 px fading in from step 4: the phase changes within 4 steps.
SMOKE = dict(data="demo:16", img_size=32, z_size=16, nef=8, ndf=8, vgg_weights="random",
             fade_steps=2, stable_steps=1, batch_size=8, steps=6, vector_images=32, log_every=2,
             sample_every=3, ckpt_every=3)

# `--preset cpu-demo` (chosen by `--preset auto` on a CPU with demo data): batch 64, 1,500 steps,
# PGAE phases of 200 steps (8 px 200, then 16, 32, 64 px 400 each), so `python feature_ae.py`
# gives readable reconstructions in minutes on two CPU cores.
CPU_DEMO_PRESET = dict(batch_size=64, steps=1500, fade_steps=200, stable_steps=200, log_every=50,
                       sample_every=500, ckpt_every=500, vector_images=500)


@dataclass
class VectorsArgs:
    """Compute the attribute vectors v_a = mean E(x with a) − mean E(x without a) on the training
    split and save them (python feature_ae.py vectors --ckpt runs/feature_ae/ckpt.pt)."""
    ckpt: str = "runs/feature_ae/ckpt.pt"
    """checkpoint written by training"""
    data: str = None
    """dataset (default: the checkpoint's)"""
    attrs: list = field(default_factory=list)
    """attributes (default: the checkpoint's)"""
    max_per_side: int = 1000
    """at most this many images with, and as many without, each attribute (original: 1000)"""
    out: str = None
    """output file (default: vectors.pt beside the checkpoint)"""
    device: str = "auto"
    """device to encode on"""


@dataclass
class GridArgs:
    """The original's feature grid: rows are test images, columns input | reconstruction | +v and
    −v for each attribute (z ± strength·v) (python feature_ae.py grid --ckpt ...)."""
    ckpt: str = "runs/feature_ae/ckpt.pt"
    """checkpoint written by training"""
    vectors: str = None
    """vectors.pt (default: beside the checkpoint; computed from the training split if missing)"""
    data: str = None
    """dataset (default: the checkpoint's)"""
    split: str = "test"
    """split the rows come from"""
    count: int = 8
    """number of rows (images)"""
    attrs: list = field(default_factory=list)
    """attributes (columns; default: the checkpoint's)"""
    strength: float = 1.5
    """z ± strength·v (original: 1.5)"""
    out: str = None
    """output PNG (default: grid.png beside the checkpoint)"""
    device: str = "auto"
    """device to run the model on"""


@dataclass
class LerpArgs:
    """GIFs interpolating from z to z + strength·v (add) and to z − strength·v (remove) for one
    attribute (python feature_ae.py lerp --ckpt ... --attr Smiling --frames 16)."""
    ckpt: str = "runs/feature_ae/ckpt.pt"
    """checkpoint written by training"""
    vectors: str = None
    """vectors.pt (default: beside the checkpoint; computed from the training split if missing)"""
    data: str = None
    """dataset for --index (default: the checkpoint's)"""
    split: str = "test"
    """split for --index"""
    index: int = 0
    """image of that split (without --image)"""
    image: str = None
    """your own photo (jpg/png) instead of --index"""
    attr: str = None
    """attribute (default: the checkpoint's first)"""
    strength: float = 2.0
    """end point z ± strength·v (original: 2)"""
    frames: int = 16
    """frames per GIF"""
    fps: int = 8
    """GIF frames per second"""
    scale: int = 4
    """GIF upscaling factor (nearest)"""
    out: str = None
    """output folder (default: the checkpoint's): lerp_<attr>_add.gif, lerp_<attr>_remove.gif"""
    device: str = "auto"
    """device to run the model on"""


@dataclass
class MorphArgs:
    """A GIF interpolating between the codes of two images: D((1 − t)·E(x_a) + t·E(x_b))
    (python feature_ae.py morph --ckpt ... --index-a 3 --index-b 7)."""
    ckpt: str = "runs/feature_ae/ckpt.pt"
    """checkpoint written by training"""
    data: str = None
    """dataset for the indices (default: the checkpoint's)"""
    split: str = "test"
    """split for the indices"""
    index_a: int = 0
    """first image of that split (without --image-a)"""
    index_b: int = 1
    """last image of that split (without --image-b)"""
    image_a: str = None
    """your own photo for the first frame"""
    image_b: str = None
    """your own photo for the last frame"""
    frames: int = 16
    """frames of the GIF"""
    fps: int = 8
    """GIF frames per second"""
    scale: int = 4
    """GIF upscaling factor (nearest)"""
    out: str = None
    """output GIF (default: morph_<a>_<b>.gif beside the checkpoint)"""
    device: str = "auto"
    """device to run the model on"""


# ================================================================================================
# Shared boilerplate (verbatim copies from attgan.py; tests/test_copies.py checks them)
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


# Copied from attgan.py
def format_seconds(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


# ================================================================================================
# Model
# ================================================================================================
def down_block(in_ch, out_ch):
    """Encoder block: conv 4x4 stride 2 (halves H, W), LeakyReLU 0.2, BatchNorm (original order)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                         nn.BatchNorm2d(out_ch))


def up_block(in_ch, out_ch):
    """Decoder block: nearest x2 upsampling, conv 3x3, LeakyReLU 0.2, BatchNorm (eps 1e-3, as the
    original). Nearest upsampling + conv instead of a transposed conv avoids checkerboard marks."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.BatchNorm2d(out_ch, eps=1e-3))


def resolutions(img_size, progressive):
    """Output resolutions the model is trained at: [8, 16, ..., img_size] for PGAE, [img_size]."""
    if not progressive:
        return [img_size]
    return [8 * 2 ** k for k in range(img_size.bit_length() - 4 + 1) if 8 * 2 ** k <= img_size]


class AutoEncoder(nn.Module):
    """DCAE (progressive=False) or PGAE (progressive=True); see the header for the shapes.

    Modules are kept in dicts keyed by the resolution R they work at: encoder[R] takes an (R, R)
    map to (R/2, R/2), decoder[R] an (R/2, R/2) map to (R, R). Channels of a map of side s:
    nef·img_size/(2s) in the encoder, ndf·img_size/(2s) in the decoder (32, 64, 128 at 16, 8, 4
    px for the 32 px DCAE). The DCAE's first encoder block reads the image itself and its last
    decoder block writes RGB; the PGAE has 1x1 fromRGB / toRGB layers at every resolution."""

    def __init__(self, img_size=32, z_size=100, nef=32, ndf=32, progressive=False):
        super().__init__()
        self.img_size, self.progressive = img_size, progressive
        self.sizes = resolutions(img_size, progressive)
        enc_ch = lambda s: nef * img_size // (2 * s)  # noqa: E731  (s = img_size: nef / 2)
        dec_ch = lambda s: ndf * img_size // (2 * s)  # noqa: E731
        self.bottleneck = (dec_ch(4), 4, 4)
        self.encoder, self.decoder = nn.ModuleDict(), nn.ModuleDict()
        self.from_rgb, self.to_rgb = nn.ModuleDict(), nn.ModuleDict()
        size = img_size
        while size >= 8:
            rgb_input = not progressive and size == img_size
            self.encoder[str(size)] = down_block(3 if rgb_input else enc_ch(size), enc_ch(size // 2))
            last = not progressive and size == img_size
            self.decoder[str(size)] = (
                nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                              nn.Conv2d(dec_ch(size // 2), 3, 3, padding=1)) if last
                else up_block(dec_ch(size // 2), dec_ch(size)))
            size //= 2
        for size in self.sizes:
            if progressive:
                self.from_rgb[str(size)] = nn.Sequential(nn.Conv2d(3, enc_ch(size), 1), nn.LeakyReLU(0.2))
                self.to_rgb[str(size)] = nn.Sequential(nn.Conv2d(dec_ch(size), 3, 1), nn.Tanh())
            else:
                self.from_rgb[str(size)] = nn.Identity()
                self.to_rgb[str(size)] = nn.Tanh()
        self.to_z = nn.Linear(enc_ch(4) * 16, z_size)  # (B, 2048) -> (B, 100) for the DCAE
        self.from_z = nn.Sequential(nn.Linear(z_size, dec_ch(4) * 16), nn.ReLU())

    def check(self, size, alpha):
        if size not in self.sizes:
            raise InputError(f"resolution {size}: this model works at {self.sizes}")
        if alpha < 1 and size == self.sizes[0]:
            raise InputError(f"no fade-in at the first resolution ({size} px)")

    def encode(self, images, alpha=1.0):
        """(B, 3, R, R) at one of self.sizes -> z (B, z_size). alpha < 1: R is fading in."""
        size = images.shape[-1]
        self.check(size, alpha)
        hidden = self.encoder[str(size)](self.from_rgb[str(size)](images))  # (B, C, R/2, R/2)
        if alpha < 1:  # the new block blended with the previous resolution's input path
            old = self.from_rgb[str(size // 2)](F.avg_pool2d(images, 2))  # (B, C, R/2, R/2)
            hidden = alpha * hidden + (1 - alpha) * old
        size //= 2
        while size >= 8:
            hidden = self.encoder[str(size)](hidden)
            size //= 2
        return self.to_z(hidden.flatten(1))  # (B, 4·4·C) -> (B, z_size)

    def decode(self, z, size=None, alpha=1.0):
        """z (B, z_size) -> (B, 3, size, size) in [-1, 1] (size: default the largest)."""
        size = size or self.img_size
        self.check(size, alpha)
        hidden = self.from_z(z).view(-1, *self.bottleneck)  # (B, C, 4, 4)
        level = 8
        while level < size:
            hidden = self.decoder[str(level)](hidden)
            level *= 2
        image = self.to_rgb[str(size)](self.decoder[str(size)](hidden))  # (B, 3, R, R)
        if alpha < 1:  # blended with the previous resolution's picture, upsampled
            old = self.to_rgb[str(size // 2)](hidden)  # (B, 3, R/2, R/2)
            image = alpha * image + (1 - alpha) * F.interpolate(old, scale_factor=2, mode="nearest")
        return image

    def forward(self, images, alpha=1.0):
        """Reconstruct at the images' own resolution (one of self.sizes)."""
        return self.decode(self.encode(images, alpha), images.shape[-1], alpha)


def pg_schedule(step, n_sizes, fade_steps, stable_steps):
    """(resolution index, α) at training step `step` (0-based): a pure function of the step, so a
    resumed run is exactly where an uninterrupted one would be. Index 0 for stable_steps steps,
    then for each further resolution fade_steps steps with α = t / fade_steps (0, ..., < 1) and
    stable_steps steps at α = 1; after the last resolution it stays there at α = 1."""
    if n_sizes == 1 or step < stable_steps:
        return 0, 1.0
    per_phase = fade_steps + stable_steps
    index, into = divmod(step - stable_steps, per_phase)
    index += 1
    if index >= n_sizes:
        return n_sizes - 1, 1.0
    return index, (into / fade_steps if into < fade_steps else 1.0)


def downsample(images, size):
    """Average-pool (B, 3, H, H) images to (B, 3, size, size) (H a multiple of size)."""
    factor = images.shape[-1] // size
    return F.avg_pool2d(images, factor) if factor > 1 else images


def check_config(config):
    """Refuse settings the networks cannot be built with, with one clear line."""
    size = config["img_size"]
    if config["arch"] not in ("dcae", "pgae"):
        raise InputError(f"--arch {config['arch']!r}: expected 'dcae' or 'pgae'")
    if size < 8 or size & (size - 1):
        raise InputError(f"--img-size {size}: expected a power of 2, at least 8 (32, 64, 128)")
    if config["loss"] not in ("dfc", "mse"):
        raise InputError(f"--loss {config['loss']!r}: expected 'dfc' or 'mse'")
    if config["preset"] not in ("auto", "paper", "cpu-demo"):
        raise InputError(f"--preset {config['preset']!r}: expected 'auto', 'paper' or 'cpu-demo'")
    if config["nef"] < 2 or config["nef"] % 2 or config["ndf"] < 2 or config["ndf"] % 2:
        raise InputError("--nef and --ndf must be even and at least 2")
    if config["arch"] == "pgae" and (config["fade_steps"] < 1 or config["stable_steps"] < 1):
        raise InputError("--fade-steps and --stable-steps must be at least 1")


def build_model(config):
    """The AutoEncoder of a config dict (Args as a dict, or a checkpoint's config)."""
    return AutoEncoder(config["img_size"], config["z_size"], config["nef"], config["ndf"],
                       progressive=config["arch"] == "pgae")


# ================================================================================================
# Losses
# ================================================================================================
class VGGFeatures(nn.Module):
    """VGG19's features[:12] (conv1_1 ... relu3_1), laid out as torchvision's `vgg19().features`
    so its state-dict keys ('0.weight', '2.weight', ...) match the ImageNet file's 'features.N.*'.
    Frozen, always in eval mode. forward: images in [-1, 1] -> [relu1_1, relu2_1, relu3_1]."""
    TAPS = (1, 6, 11)  # relu1_1, relu2_1, relu3_1 (the DFC paper's first three layers)

    def __init__(self):
        super().__init__()
        layers, in_ch = [], 3
        for item in (64, 64, "M", 128, 128, "M", 256):  # the start of torchvision's config "E"
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = item
        self.layers = nn.Sequential(*layers)  # 12 modules: indices 0..11
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # stays in eval mode whatever the caller asks (no BN, but clear)
        return super().train(False)

    def forward(self, images):
        hidden = ((images + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet-normalised
        taps = []
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if index in self.TAPS:
                taps.append(hidden)
        return taps


def default_vgg_path():
    """Where torchvision keeps its downloaded weights: <torch.hub.get_dir()>/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def vgg_weights_available(weights):
    return weights == "random" or Path(weights or default_vgg_path()).expanduser().is_file()


def load_vgg(weights, device):
    """VGGFeatures with ImageNet weights from `weights` (a path; None = torch.hub's cache), or
    random weights (seed 0, a warning) for weights == 'random'. Never downloads."""
    if weights == "random":
        print("warning: --vgg-weights random: the DFC loss uses a RANDOM VGG19 (for tests only; "
              "the features mean nothing)", flush=True)
        with torch.random.fork_rng(devices=[]):  # leaves the training RNG untouched
            torch.manual_seed(0)
            return VGGFeatures().to(device)
    path = Path(weights or default_vgg_path()).expanduser()
    if not path.is_file():
        raise InputError(f"the DFC loss needs VGG19 ImageNet weights, and {path} is missing: fetch "
                         f"{VGG19_URL} and put it in {default_vgg_path().parent} or pass "
                         f"--vgg-weights PATH (or train with --loss mse)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"cannot read VGG19 weights {path}: {err}") from err
    vgg = VGGFeatures()
    wanted = {f"features.{key}": key for key in vgg.layers.state_dict()}
    missing = [name for name in wanted if name not in state]
    if missing:
        raise InputError(f"{path} is not torchvision's VGG19 file ({VGG19_FILE}): "
                         f"it has no {missing[0]}")
    vgg.layers.load_state_dict({key: state[name] for name, key in wanted.items()})
    return vgg.to(device)


def loss_mse(img_recon, img_real):
    """Pixel loss: MSE(x̂, x), the mean squared difference over pixels and channels."""
    return F.mse_loss(img_recon.float(), img_real.float())


def loss_dfc(vgg, img_recon, img_real):
    """Deep feature consistent loss: Σ_{l ∈ relu1_1, relu2_1, relu3_1} MSE(Φ_l(x̂), Φ_l(x)).
    The target's features carry no gradient; the gradient reaches x̂ through the frozen VGG."""
    with torch.no_grad():
        target = vgg(img_real)
    return sum(F.mse_loss(a.float(), b.float()) for a, b in zip(vgg(img_recon), target))


def uses_dfc(loss, size):
    """Whether the feature loss applies at this resolution: --loss dfc and size >= 32 (below that
    VGG's features of a few pixels mean little, and the original uses MSE)."""
    return loss == "dfc" and size >= DFC_MIN_SIZE


def psnr(mse):
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2): 10·log10(4 / MSE)."""
    return 10 * torch.log10(4 / mse.clamp_min(1e-10))


# ================================================================================================
# Training step
# ================================================================================================
def train_step(model, optimizer, img_real, alpha, loss_name, vgg, amp_ctx):
    """One Adam update on a batch at its own resolution -> dict of detached scalar tensors."""
    with amp_ctx():
        img_recon = model(img_real, alpha)
        mse = loss_mse(img_recon, img_real)
        stats = {"mse": mse.detach(), "psnr": psnr(mse.detach())}
        if uses_dfc(loss_name, img_real.shape[-1]):
            loss = loss_dfc(vgg, img_recon, img_real)
            stats["dfc"] = loss.detach()
        else:
            loss = mse
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), **stats}


# ================================================================================================
# Attribute vectors and the pictures
# ================================================================================================
@torch.no_grad()
def encode_all(encode, images, batch_size=256, device=None):
    """encode (float [-1, 1] images -> (B, Z)) over uint8 or float images (N, 3, H, W) -> (N, Z)."""
    codes = []
    for chunk in images.split(batch_size):
        chunk = chunk.to(device) if device is not None else chunk
        codes.append(encode(common.to_float(chunk) if chunk.dtype == torch.uint8 else chunk).float())
    return torch.cat(codes)


@torch.no_grad()
def attribute_vectors(encode, images, labels, max_per_side=1000, seed=0, device=None):
    """v_a = mean E(x with a) − mean E(x without a), over at most max_per_side images per side
    (drawn in a fixed random order from `seed`). images (N, 3, H, W) uint8 or float, labels (N, A)
    0/1 -> (vectors (A, Z) float on the CPU, counts (A, 2) long: images with, without). An
    attribute with no image on one side gets a zero vector (and a 0 count)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    labels = labels.cpu()[order] > 0.5
    picks = []
    for a in range(labels.shape[1]):
        picks.append((order[labels[:, a]][:max_per_side], order[~labels[:, a]][:max_per_side]))
    needed = torch.unique(torch.cat([torch.cat(p) for p in picks]))  # each image encoded once
    codes = encode_all(encode, images[needed.to(images.device)], device=device).cpu()
    row = {i: r for r, i in enumerate(needed.tolist())}
    vectors = torch.zeros(labels.shape[1], codes.shape[1])
    counts = torch.zeros(labels.shape[1], 2, dtype=torch.long)
    for a, (with_, without) in enumerate(picks):
        counts[a] = torch.tensor([len(with_), len(without)])
        if len(with_) and len(without):
            vectors[a] = (codes[[row[i] for i in with_.tolist()]].mean(0)
                          - codes[[row[i] for i in without.tolist()]].mean(0))
    return vectors, counts


def edit_codes(z, vectors, attr_src, attr_tgt, strength=1.5):
    """z + strength·Σ_a (tgt_a − src_a)·v_a: z (B, Z), vectors (A, Z), attributes (B, A) 0/1."""
    return z + strength * (attr_tgt.float() - attr_src.float()) @ vectors.to(z)


@torch.no_grad()
def feature_grid(model, images, vectors, strength, size, alpha):
    """(R, 2 + 2A, 3, size, size): input | reconstruction | D(z + s·v_a), D(z − s·v_a) per
    attribute; images (R, 3, img_size, img_size) in [-1, 1], pooled to the model's resolution."""
    images = downsample(images, size)
    z = model.encode(images, alpha)
    columns = [images, model.decode(z, size, alpha)]
    for vector in vectors.to(z):
        columns += [model.decode(z + strength * vector, size, alpha),
                    model.decode(z - strength * vector, size, alpha)]
    return torch.stack([c.float() for c in columns], 1)


def grid_labels(attr_names):
    return ["input", "recon"] + [f"{sign}{name}" for name in attr_names for sign in "+-"]


@torch.no_grad()
def lerp_frames(model, z_start, z_end, frames, size, alpha):
    """D((1 − t)·z_start + t·z_end) for t = 0 .. 1 in `frames` steps -> (frames, 3, size, size);
    z_start, z_end (1, Z)."""
    t = torch.linspace(0, 1, frames, device=z_start.device)[:, None]
    return model.decode((1 - t) * z_start + t * z_end, size, alpha).float()


# ================================================================================================
# Checkpoint, loading a trained model, the evaluation contract
# ================================================================================================
def checkpoint_state(model, optimizer, step, args, attr_names, size, alpha):
    """The full training state as one dict (weights_only-loadable). `phase` records the PGAE
    resolution and α reached (a resume recomputes them from the step: pg_schedule)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "phase": {"size": size, "alpha": alpha}, "config": dataclasses.asdict(args),
            "attr_names": list(attr_names), "rng": rng_state()}


def load_trained(ckpt_path, device="cpu"):
    """(state, model in eval mode, resolution, α) from a checkpoint."""
    state = load_checkpoint(ckpt_path)
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    size, alpha = state["phase"]["size"], state["phase"]["alpha"]
    return state, model.to(device).eval(), size, alpha


def load_split(config, attr_names, data=None, split="train", verbose=False):
    """A split of the checkpoint's dataset (or `data`) at the training image size; an empty split
    falls back to 'train' (tiny demo sets)."""
    data = data or config["data"]
    faces = common.load_celeba(data, attr_names, split, config["img_size"], config["crop"],
                               verbose=verbose)
    if len(faces.images) == 0 and split != "train":
        faces = common.load_celeba(data, attr_names, "train", config["img_size"], config["crop"],
                                   verbose=False)
    return faces


def vectors_for(ckpt_path, state, model, size, alpha, attr_names, vectors_path=None,
                max_per_side=1000, device="cpu"):
    """(A, Z) vectors for attr_names: from vectors.pt (--vectors, or beside the checkpoint) when
    it holds them all and was made from this step's weights; else computed on the training split."""
    path = Path(vectors_path) if vectors_path else Path(ckpt_path).parent / "vectors.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("step") == state["step"] and all(n in saved["vectors"] for n in attr_names):
            return torch.stack([saved["vectors"][n] for n in attr_names])
        print(f"note: {path} is from another step or lacks some attributes; computing the vectors")
    elif vectors_path:
        raise InputError(f"vectors file not found: {path} (write one with `feature_ae.py vectors`)")
    faces = load_split(state["config"], attr_names, split="train")
    vectors, _ = attribute_vectors(lambda x: model.encode(downsample(x, size), alpha), faces.images,
                                   faces.labels, max_per_side, seed=state["config"]["seed"],
                                   device=device)
    return vectors


def load_for_eval(ckpt_path, device="cpu"):
    """The evaluation contract (benchmarks/evaluate.py): a namespace with attr_names, img_size,
    crop; reconstruct(images) -> D(E(x)); edit(images, attr_src, attr_tgt) ->
    D(E(x) + 1.5·Σ(tgt − src)·v) (vectors from vectors.pt beside the checkpoint, or computed from
    up to 1000 training images per side); encode(images) -> {"z": (B, z_size)}; generate = None.
    Images are float [-1, 1] (B, 3, img_size, img_size), attributes (B, A) 0/1 in attr_names
    order; results come on the CPU at img_size."""
    device = torch.device(device)
    state, model, size, alpha = load_trained(ckpt_path, device)
    config, attr_names = state["config"], state["attr_names"]
    img_size = config["img_size"]
    cache = {}

    def prepare(images):
        images = images.to(device).float()
        if images.shape[-1] != img_size or images.shape[-2] != img_size:
            images = F.interpolate(images, size=(img_size, img_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return downsample(images, size)

    def finish(images):
        if size != img_size:
            images = F.interpolate(images, scale_factor=img_size // size, mode="nearest")
        return images.float().cpu()

    @torch.no_grad()
    def encode(images, batch_size=256):
        return {"z": torch.cat([model.encode(prepare(x), alpha).float().cpu()
                                for x in images.split(batch_size)])}

    @torch.no_grad()
    def reconstruct(images, batch_size=256):
        return torch.cat([finish(model(prepare(x), alpha)) for x in images.split(batch_size)])

    @torch.no_grad()
    def edit(images, attr_src, attr_tgt, batch_size=256):
        if "vectors" not in cache:
            cache["vectors"] = vectors_for(ckpt_path, state, model, size, alpha, attr_names,
                                           device=device).to(device)
        out = []
        for x, src, tgt in zip(images.split(batch_size), attr_src.split(batch_size),
                               attr_tgt.split(batch_size)):
            z = edit_codes(model.encode(prepare(x), alpha), cache["vectors"], src.to(device),
                           tgt.to(device), 1.5)
            out.append(finish(model.decode(z, size, alpha)))
        return torch.cat(out)

    return types.SimpleNamespace(attr_names=list(attr_names), img_size=img_size,
                                 crop=config["crop"], edit=edit, reconstruct=reconstruct,
                                 generate=None, encode=encode)


# ================================================================================================
# Sub-commands: vectors, grid, lerp, morph
# ================================================================================================
def pick_attrs(requested, state):
    if not requested:
        return list(state["attr_names"])
    return common.resolve_attrs(requested)


def vectors_command(args):
    """Encode the training split, save {attr_names, vectors {name: (Z,)}, counts {name: [with,
    without]}, step} to vectors.pt -> its path."""
    device = pick_device(args.device)
    state, model, size, alpha = load_trained(args.ckpt, device)
    attr_names = pick_attrs(args.attrs, state)
    faces = load_split(state["config"], attr_names, args.data, "train", verbose=True)
    vectors, counts = attribute_vectors(lambda x: model.encode(downsample(x, size), alpha),
                                        faces.images, faces.labels, args.max_per_side,
                                        seed=state["config"]["seed"], device=device)
    path = Path(args.out or Path(args.ckpt).parent / "vectors.pt")
    save_checkpoint(path, {"attr_names": attr_names, "step": state["step"],
                           "vectors": {n: v for n, v in zip(attr_names, vectors)},
                           "counts": {n: c.tolist() for n, c in zip(attr_names, counts)}})
    for name, vector, (n_with, n_without) in zip(attr_names, vectors, counts.tolist()):
        note = "  (no images on one side: zero vector)" if not (n_with and n_without) else ""
        print(f"  {name:<22} {n_with:5d} with, {n_without:5d} without, |v| = {vector.norm():.3f}{note}")
    print(f"wrote {path}")
    return path


def grid_command(args):
    device = pick_device(args.device)
    state, model, size, alpha = load_trained(args.ckpt, device)
    attr_names = pick_attrs(args.attrs, state)
    vectors = vectors_for(args.ckpt, state, model, size, alpha, attr_names, args.vectors,
                          state["config"]["vector_images"], device)
    faces = load_split(state["config"], attr_names, args.data, args.split)
    images = common.to_float(faces.images[:args.count]).to(device)
    grid = feature_grid(model, images, vectors, args.strength, size, alpha)
    path = Path(args.out or Path(args.ckpt).parent / "grid.png")
    common.save_grid(grid.cpu(), path, col_labels=grid_labels(attr_names),
                     title=f"z ± {args.strength:g}·v ({size} px)")
    print(f"wrote {path}")
    return path


def pick_image(config, image, data, split, index, size, device):
    """(1, 3, size, size) in [-1, 1]: a photo, or image `index` of a split."""
    if image:
        picture = common.load_photo(image, config["img_size"], config["crop"])
    else:
        faces = load_split(config, [], data, split)
        if not 0 <= index < len(faces.images):
            raise InputError(f"index {index}: the '{faces.split}' split has {len(faces.images)} images")
        picture = common.to_float(faces.images[index:index + 1])
    return downsample(picture.to(device), size)


def check_frames(frames):
    if frames < 2:
        raise InputError(f"--frames {frames}: expected at least 2")


def merged_note(path, frames):
    """Pillow stores identical consecutive GIF frames as one longer frame (e.g. when v is tiny):
    say so, rather than leave a GIF with fewer frames than asked for unexplained."""
    from PIL import Image
    with Image.open(path) as gif:
        stored = gif.n_frames
    return "" if stored == frames else (f"; note: {frames - stored} identical consecutive frames "
                                        f"were merged by Pillow ({stored} stored)")


def lerp_command(args):
    """Two GIFs: z -> z + strength·v (add) and z -> z − strength·v (remove) -> their paths."""
    check_frames(args.frames)
    device = pick_device(args.device)
    state, model, size, alpha = load_trained(args.ckpt, device)
    name = common.resolve_attrs([args.attr])[0] if args.attr else state["attr_names"][0]
    vector = vectors_for(args.ckpt, state, model, size, alpha, [name], args.vectors,
                         state["config"]["vector_images"], device)[0].to(device)
    image = pick_image(state["config"], args.image, args.data, args.split, args.index, size, device)
    with torch.no_grad():
        z = model.encode(image, alpha)
    folder = Path(args.out or Path(args.ckpt).parent)
    paths = []
    for sign, word in ((1, "add"), (-1, "remove")):
        frames = lerp_frames(model, z, z + sign * args.strength * vector, args.frames, size, alpha)
        path = folder / f"lerp_{name}_{word}.gif"
        common.save_gif(frames.cpu(), path, fps=args.fps, scale=args.scale)
        paths.append(path)
        print(f"wrote {path} ({word} {name}: z -> z {'+-'[sign < 0]} {args.strength:g}·v)"
              + merged_note(path, args.frames))
    return paths


def morph_command(args):
    """A GIF from E(x_a) to E(x_b) -> its path."""
    check_frames(args.frames)
    device = pick_device(args.device)
    state, model, size, alpha = load_trained(args.ckpt, device)
    config = state["config"]
    first = pick_image(config, args.image_a, args.data, args.split, args.index_a, size, device)
    last = pick_image(config, args.image_b, args.data, args.split, args.index_b, size, device)
    with torch.no_grad():
        z_first, z_last = model.encode(first, alpha), model.encode(last, alpha)
    frames = lerp_frames(model, z_first, z_last, args.frames, size, alpha)
    names = [Path(args.image_a).stem if args.image_a else str(args.index_a),
             Path(args.image_b).stem if args.image_b else str(args.index_b)]
    path = Path(args.out or Path(args.ckpt).parent / f"morph_{names[0]}_{names[1]}.gif")
    common.save_gif(frames.cpu(), path, fps=args.fps, scale=args.scale)
    print(f"wrote {path}" + merged_note(path, args.frames))
    return path


# ================================================================================================
# main: training
# ================================================================================================
# Copied from attgan.py
def is_demo(data):
    return data == "demo" or data.startswith("demo:")


def default_attrs(data):
    """FEATURE_ATTRS; on the demo set those it draws."""
    if not is_demo(data):
        return list(FEATURE_ATTRS)
    return [a for a in FEATURE_ATTRS if a in common.DEMO_ATTRS]


def apply_presets(args, device):
    """--smoke or the cpu-demo preset on the fields still at their defaults; fills --img-size,
    --attrs and --loss auto (dfc; mse on the cpu-demo preset when the VGG19 file is missing)."""
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
                print("note: cpu-demo preset (CPU + demo data; --preset paper keeps the full "
                      "configuration): " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                    for k, v in changed.items()))
        elif args.preset == "auto":
            args.preset = "paper"
    if args.loss == "auto":
        args.loss = "dfc"
        if args.preset == "cpu-demo" and not vgg_weights_available(args.vgg_weights):
            args.loss = "mse"
            print(f"note: cpu-demo preset without VGG19 weights ({default_vgg_path()} is "
                  f"missing): --loss mse instead of dfc (fetch {VGG19_URL} for dfc)")
    if args.img_size == 0:
        args.img_size = 64 if args.arch == "pgae" else 32
    if not args.attrs:
        args.attrs = default_attrs(args.data)
    return args


def train(args):
    device = pick_device(args.device)
    args = apply_presets(args, device)
    config = dataclasses.asdict(args)
    check_config(config)
    out = Path(args.out)
    # Read (and vet) the checkpoint before loading any data: a wrong setting fails at once.
    state = load_checkpoint(out / "ckpt.pt", config, RESUME_MUST_MATCH) if args.resume else None
    sizes = resolutions(args.img_size, args.arch == "pgae")
    needs_vgg = args.loss == "dfc" and sizes[-1] >= DFC_MIN_SIZE
    vgg = load_vgg(args.vgg_weights, device) if needs_vgg else None  # fails before any work
    torch.manual_seed(args.seed)

    data = common.load_celeba(args.data, args.attrs, "train", args.img_size, args.crop)
    attr_names = data.attr_names
    data = common.to_device(data, device)
    val = load_split(config, attr_names, split="val")
    sample_images = common.to_float(val.images[:8]).to(device)

    model = build_model(config).to(device)
    channels_last = args.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    start_step, metrics_path = 0, out / "metrics.jsonl"
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        print(f"resumed from {out / 'ckpt.pt'} at step {start_step}")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    if state is not None:
        trim_jsonl(metrics_path, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    model_train = model
    if args.compile and args.arch == "dcae":
        model_train = torch.compile(model)
    elif args.compile:
        print("note: --compile is ignored for pgae (its resolution and α change during training)")
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731
    print(f"Features Changer {args.arch.upper()} {' -> '.join(map(str, sizes))} px, z {args.z_size}, "
          f"loss {args.loss}{' (MSE below 32 px)' if args.loss == 'dfc' and len(sizes) > 1 else ''};"
          f" {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
          f"{len(data.images)} training images; device {device}; "
          f"{'smoke' if args.smoke else args.preset} configuration")

    def save_samples(step, size, alpha):
        model.eval()
        with amp_ctx():
            vectors, _ = attribute_vectors(lambda x: model.encode(downsample(x, size), alpha),
                                           data.images, data.labels, args.vector_images,
                                           seed=args.seed, device=device)
            grid = feature_grid(model, sample_images, vectors, args.strength, size, alpha)
        model.train()
        common.save_grid(grid, out / "samples" / f"step_{step:06d}.png",
                         col_labels=grid_labels(attr_names),
                         title=f"{args.arch.upper()} step {step}, {size} px"
                               + (f" (fading in, α {alpha:.2f})" if alpha < 1 else ""))

    totals, counts, clock, interval_start = {}, {}, time.time(), start_step
    phase = None
    for step in range(start_step, args.steps):
        index, alpha = pg_schedule(step, len(sizes), args.fade_steps, args.stable_steps)
        size = sizes[index]
        if len(sizes) > 1 and (index, alpha == 1) != phase:
            print(f"phase: {size} px, {'stable' if alpha == 1 else 'fading in'} from step {step}")
            phase = (index, alpha == 1)
        img_real, _, _ = common.get_batch(data, step, args.batch_size, args.seed, device,
                                          channels_last=channels_last)
        img_real = downsample(img_real, size)
        stats = train_step(model_train, optimizer, img_real, alpha, args.loss, vgg, amp_ctx)
        for key, value in stats.items():  # detached tensors: no host sync until the log step
            totals[key] = totals.get(key, 0) + value
            counts[key] = counts.get(key, 0) + 1
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            keys = sorted(totals)
            means = torch.stack([totals[k] / counts[k] for k in keys]).float().tolist()
            elapsed = time.time() - clock
            record = {"step": done, "img_per_s": (done - interval_start) * args.batch_size / elapsed,
                      "res": size, "alpha": alpha, **dict(zip(keys, means))}
            eta = (args.steps - done) * elapsed / (done - interval_start)
            append_jsonl(metrics_path, record)
            dfc_part = f" dfc {record['dfc']:.4f}" if "dfc" in record else ""
            print(f"step {done}/{args.steps}  {size} px α {alpha:.2f}  loss {record['loss']:.4f}"
                  f"{dfc_part}  mse {record['mse']:.4f}  psnr {record['psnr']:.2f} dB  "
                  f"{record['img_per_s']:.0f} img/s  ETA {format_seconds(eta)}", flush=True)
            totals, counts, interval_start = {}, {}, done
        saving = time.time()
        if done % args.sample_every == 0 or done == args.steps:
            save_samples(done, size, alpha)
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(out / "ckpt.pt", checkpoint_state(model, optimizer, done, args,
                                                              attr_names, size, alpha))
        if not totals:  # just logged: time the next interval from here
            clock = time.time()
        else:  # img/s counts training only, not the time spent writing samples and checkpoints
            clock += time.time() - saving
    if metrics_path.exists():
        records = common.read_jsonl(metrics_path)
        keys = [k for k in ("loss", "dfc", "mse", "psnr", "res", "alpha", "img_per_s")
                if any(k in r for r in records)]
        common.plot_metrics(metrics_path, out / "losses.png", keys=keys)
        print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png")
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"vectors": (VectorsArgs, vectors_command), "grid": (GridArgs, grid_command),
                "lerp": (LerpArgs, lerp_command), "morph": (MorphArgs, morph_command)}
    command = argv.pop(0) if argv and argv[0] in ("train", *commands) else "train"
    if command in commands:
        cls, run = commands[command]
        return run(parse_dataclass(cls, argv, f"feature_ae.py {command}"))
    return train(parse_dataclass(Args, argv, "feature_ae.py [train]"))


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # bad input: one clear line, no traceback
        sys.exit(f"error: {err}")
