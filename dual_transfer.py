"""Dual Training for face attribute transfer: encoder, decoder and a frozen classifier, trained on
pairs of photos of the same person.

Reimplements the "Dual Training for Face Attribute Transfer" project (LaughingGo/change_face; its
README: "change photograph of a person with attributes like wearing glasses or not"). The original
code never ran (undefined variables, a half-written training loop), so this file follows the
README's description of the method and states every choice it had to make.

The idea: an encoder E should keep what is *attribute-independent* about a person (who they are,
how they are lit and posed) and a decoder Dec should draw that person with whatever attributes it
is given. No GAN: the supervision comes from CelebA itself, which has many photos of each person.
Take two photos x1, x2 of the same person whose target attributes differ (with and without
glasses). Then Dec(E(x1), a2) should *be* x2, and Dec(E(x2), a1) should be x1 - a real photo of
the edited face is available as the target. A classifier C, trained first and then frozen, checks
that the drawn faces carry the attributes asked for, and E(x1) ≈ E(x2) asks the codes of one
person to agree. The two directions mirror each other: that is the "dual" in the name.

Objective of stage 2 (a1, a2 = target attributes of x1, x2, 0/1; z1 = E(x1), z2 = E(x2))
-----------------------------------------------------------------------------------------
    x̂_12 = Dec(z1, a2')          x1 redrawn with x2's attributes      a' = 2a − 1  (±1)
    x̂_21 = Dec(z2, a1')          x2 redrawn with x1's attributes
    L_rec  = MSE(x̂_12, x2) + L1(x̂_12, x2) + MSE(x̂_21, x1) + L1(x̂_21, x1)   two reconstruction errors
    L_cls  = BCE(C(x̂_12), a2) + BCE(C(x̂_21), a1)                           two classification errors
    L_lat  = ‖z1 − z2‖₁  (mean)                                              latent difference error
    L_self = MSE + L1 of Dec(z1, a1') vs x1 and Dec(z2, a2') vs x2         optional (deviation, below)
    L      = λ_rec·L_rec + λ_cls·L_cls + λ_lat·L_lat + λ_self·L_self      E and Dec updated; C frozen
Stage 1: C alone, L_C = BCE(C(x), a) over the training split (rare attributes up-weighted, below).

Notation -> code
----------------
    x1, x2, a1, a2     img_1, img_2, attr_1, attr_2       a pair from pair_batch(): same identity
    E, Dec, C          Encoder, Decoder, Classifier
    z1, z2             z_1, z_2                            (B, latent_dim, h, w)
    a'                 signed(a)                           what Dec sees: −1 absent, +1 present
    x̂_12, x̂_21         img_12, img_21

Shapes (defaults: 64 px, n_layers 4, dim 64, latent_dim 256, A = 1 attribute)
----------------------------------------------------------------------------
    E:   x (B, 3, 64, 64) -> (B, 64, 32, 32) -> (B, 128, 16, 16) -> (B, 256, 8, 8)
         -> (B, 512, 4, 4)           conv 4x4 s2, BatchNorm, LeakyReLU 0.2
         -> z (B, 256, 4, 4)         conv 1x1, BatchNorm without affine (see "latent scale")
    Dec: [z, a' tiled (B, A, 4, 4)] -> (B, 512, 8, 8) -> (B, 256, 16, 16) -> (B, 128, 32, 32)
         each followed by ++ a' tiled; deconv 4x4 s2, BatchNorm, ReLU
         -> (B, 3, 64, 64)           deconv 4x4 s2, tanh
    C:   x -> (B, 32, 32, 32) -> ... -> (B, 256, 4, 4) -> flatten -> FC -> logits (B, A)

Choices the original leaves open, and deviations
------------------------------------------------
* Optimiser. The original used SGD (lr 1e-5, momentum 0.9, weight decay 1e-3, batch 64, 64 px);
  `--preset original` reproduces it. At that learning rate the networks barely move in a run of
  any practical length (see the README's numbers), so the default is Adam (lr 2e-4, betas 0.5 and
  0.999, the usual choice for image-to-image encoder-decoders).
* Latent scale. E's last layer is a BatchNorm *without* affine parameters. Why: Dec starts with a
  BatchNorm too, so it does not care how large z is, and L_lat = ‖z1 − z2‖₁ could then be driven
  to zero by shrinking every code (a collapse that teaches nothing). With z normalised to unit
  variance per channel over the batch, L_lat can only fall by making the codes of one person alike
  *relative to* the spread over different people.
* Dec sees attributes at the bottleneck and after every up-sampling layer (±1 tiled over the map):
  the attribute must survive to the resolution where glasses are drawn.
* The classifier's BCE up-weights the positive class by neg/pos per attribute (pos_weight):
  Eyeglasses is present on 6.5 % of CelebA, and an unweighted classifier would learn "never".
  Stage 2 freezes it in eval mode: its gradients still flow through to the decoder's output.
* Pairs: every pair (i, j) of training images of one identity whose target attributes differ
  (the original's down-sampling); each step draws --batch-size pairs, so it processes twice as
  many images, and img/s counts both images of a pair.
* L_self (--lambda-self, default 1): Dec(E(x), a) ≈ x. x1 and x2 differ in pose, expression and
  background, and an exact x2 cannot be drawn from x1's code; a decoder trained only on the
  transfers averages these out and blurs. Asked to redraw x itself, it has a sharp target. This
  term is ours, not the original's; `--lambda-self 0` switches it off (README: measured both).
* No GAN, as the original: the results are as sharp as MSE/L1 allow.

Commands
--------
    python dual_transfer.py                                 # demo set (cpu-demo preset on a CPU)
    python dual_transfer.py classifier --data ./celeba      # stage 1 only: trains and saves C
    python dual_transfer.py --data ./celeba                 # stage 2 (trains C first if needed)
    python dual_transfer.py --data ./celeba --attrs Eyeglasses Smiling --out runs/dual2
    python dual_transfer.py --data ./celeba --preset original      # the original SGD settings
    python dual_transfer.py --data ./celeba --resume                # continue exactly
    python dual_transfer.py eval --ckpt runs/dual_transfer/ckpt.pt  # pairs, PSNR, C accuracy
    python dual_transfer.py edit --ckpt runs/dual_transfer/ckpt.pt --image me.jpg --set Eyeglasses=1
    python dual_transfer.py --smoke --out /tmp/dual_smoke           # seconds, both stages

Outputs in --out: classifier.pt (stage 1), ckpt.pt (E, Dec, C, the optimizer, step, config,
attribute names, RNG), metrics.jsonl, losses.png, eval.json, samples/step_XXXXXX.png (rows:
validation pairs; columns x1 | x2 | Dec(E(x1), a2) | Dec(E(x2), a1) | x1 with each attribute
flipped).

Evaluation contract (benchmarks/evaluate.py): load_for_eval(ckpt_path, device) returns a
namespace with attr_names, img_size, crop, edit(images, attr_src, attr_tgt) = Dec(E(x), attr_tgt),
reconstruct(images) = Dec(E(x), a) with a read by the frozen classifier, encode(images) ->
{"z": (B, latent_dim·h·w)}, generate = None.
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


# ================================================================================================
# Config
# ================================================================================================
@dataclass
class Args:
    """Train Dual Training for attribute transfer (sub-commands: train (default), classifier, eval,
    edit; `python dual_transfer.py edit --help`)."""
    data: str = "demo"
    """CelebA folder with identity_CelebA.txt (any layout common.py reads), or 'demo' / 'demo:N'"""
    out: str = "runs/dual_transfer"
    """output folder: classifier.pt, ckpt.pt, metrics.jsonl, losses.png, eval.json, samples/"""
    attrs: list = field(default_factory=lambda: ["Eyeglasses"])
    """target attributes (the original: Eyeglasses, 'with or without glasses')"""
    img_size: int = 64
    """image side in pixels (the original: 64); a multiple of 2^n_layers"""
    crop: int = 170
    """centre square crop in official 178x218 pixels before resizing"""
    n_layers: int = 4
    """stride-2 layers of E, Dec and C"""
    dim: int = 64
    """channels of E's first layer (doubling per layer up to --max-dim) and Dec's last hidden one"""
    max_dim: int = 512
    """cap on the channels of any layer"""
    latent_dim: int = 256
    """channels of the code z (B, latent_dim, img_size / 2^n_layers, same)"""
    cls_dim: int = 32
    """channels of the classifier's first layer (doubling per layer up to --max-dim)"""
    lambda_rec: float = 1.0
    """weight of the two pair reconstruction errors (MSE + L1 each)"""
    lambda_cls: float = 0.1
    """weight of the two classification errors of the frozen classifier"""
    lambda_lat: float = 0.1
    """weight of the latent difference error ‖E(x1) − E(x2)‖₁"""
    lambda_self: float = 1.0
    """weight of the self-reconstruction Dec(E(x), a) ≈ x (ours, not the original's; 0 = off)"""
    optimizer: str = "adam"
    """'adam' (betas 0.5, 0.999) or 'sgd' (with --momentum, --weight-decay; the original)"""
    lr: float = 2e-4
    """learning rate of E and Dec (the original: SGD 1e-5)"""
    momentum: float = 0.9
    """SGD momentum (the original: 0.9)"""
    weight_decay: float = 0.0
    """weight decay (the original: 1e-3 with SGD)"""
    batch_size: int = 64
    """pairs per step (each step sees twice as many images; the original: 64)"""
    steps: int = 20000
    """stage-2 training steps"""
    classifier: str = None
    """stage-1 checkpoint (default: <out>/classifier.pt; trained first when absent)"""
    cls_steps: int = 3000
    """steps of stage 1 when the classifier is trained here"""
    cls_lr: float = 1e-3
    """Adam learning rate of the classifier"""
    max_pairs: int = 200000
    """keep at most this many training pairs (a random, seeded subset)"""
    seed: int = 0
    """seed for the weights and the order of pairs and images"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cuda', 'cpu', ..."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored elsewhere)"""
    channels_last: bool = True
    """channels-last memory format on CUDA"""
    compile: bool = False
    """torch.compile E, Dec and C (CUDA)"""
    preset: str = "auto"
    """'auto' (cpu-demo on a CPU with demo data, else default), 'default', 'original' (SGD 1e-5,
    momentum 0.9, weight decay 1e-3, batch 64) or 'cpu-demo'"""
    log_every: int = 100
    """print a progress line and append to metrics.jsonl every this many steps"""
    sample_every: int = 2000
    """write a sample grid every this many steps (and at the end)"""
    ckpt_every: int = 2000
    """write ckpt.pt every this many steps (and at the end)"""
    resume: bool = False
    """continue from <out>/ckpt.pt (its configuration must match)"""
    smoke: bool = False
    """tiny end-to-end run of both stages: demo:16, 32 px, tiny widths, 4 steps (seconds on a CPU)"""


# Fields a resumed run must share with its checkpoint (--steps may grow).
RESUME_MUST_MATCH = ("data", "attrs", "img_size", "crop", "n_layers", "dim", "max_dim",
                     "latent_dim", "cls_dim", "lambda_rec", "lambda_cls", "lambda_lat",
                     "lambda_self", "optimizer", "lr", "momentum", "weight_decay", "batch_size",
                     "max_pairs", "seed")
# Fields the stage-1 classifier must share with stage 2.
CLASSIFIER_MUST_MATCH = ("attrs", "img_size", "crop", "n_layers", "max_dim", "cls_dim")

SMOKE = dict(data="demo:16", img_size=32, n_layers=3, dim=8, max_dim=32, latent_dim=16, cls_dim=8,
             batch_size=8, steps=4, cls_steps=4, log_every=2, sample_every=2, ckpt_every=2)

# --preset original: the settings of the original project (a faithful, very slow optimiser).
ORIGINAL_PRESET = dict(optimizer="sgd", lr=1e-5, momentum=0.9, weight_decay=1e-3, batch_size=64)

# --preset cpu-demo (chosen by 'auto' on a CPU with demo data): narrower networks, fewer steps, so
# `python dual_transfer.py` shows glasses coming and going after a few minutes on two CPU cores.
CPU_DEMO_PRESET = dict(dim=16, max_dim=128, latent_dim=64, cls_dim=16, batch_size=16, steps=1500,
                       cls_steps=300, log_every=50, sample_every=500, ckpt_every=500)


@dataclass
class EditArgs:
    """Edit a face with a trained model: your own photo (--image) or a validation image (--index).
    Its attributes are read by the frozen classifier and printed; `--set Eyeglasses=1` redraws the
    face with them changed (python dual_transfer.py edit --ckpt runs/dual_transfer/ckpt.pt
    --image me.jpg --set Eyeglasses=1 --out me_glasses.png)."""
    ckpt: str = "runs/dual_transfer/ckpt.pt"
    """checkpoint written by training"""
    image: str = None
    """a photo (jpg/png); put the face in the middle, filling most of the frame"""
    index: int = 0
    """without --image: this image of the checkpoint's dataset ('val' split)"""
    data: str = None
    """dataset for --index (default: the checkpoint's)"""
    set: list = field(default_factory=list)
    """Attr=value edits, repeatable (0 = absent, 1 = present; any real value, Dec sees 2·value − 1)"""
    out: str = None
    """output PNG (default: edit.png beside the checkpoint)"""
    device: str = "cpu"
    """device to run the networks on"""


@dataclass
class EvalArgs:
    """Score a trained model on the pairs of a split: pair count, PSNR of the pair transfers
    Dec(E(x1), a2) vs x2, and the frozen classifier's accuracy on the transferred images."""
    ckpt: str = "runs/dual_transfer/ckpt.pt"
    """checkpoint written by training"""
    data: str = None
    """dataset (default: the checkpoint's)"""
    split: str = "test"
    """'train', 'val' or 'test'"""
    device: str = "cpu"
    """device to run the networks on"""


# ================================================================================================
# Shared boilerplate (verbatim copies; attgan.py holds the commented originals)
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


# Copied from attgan.py
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


# Copied from attgan.py
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


# Copied from attgan.py
def save_image(image, path):
    """One (3, H, W) image in [-1, 1] as a PNG at its own size."""
    from PIL import Image
    Image.fromarray(common.to_uint8(image).permute(1, 2, 0).numpy()).save(path)


# ================================================================================================
# Model
# ================================================================================================
def signed(attrs):
    """0/1 attributes -> what Dec sees: 2a − 1, so "absent" (−1) is as strong a signal as
    "present" (+1), and any real value in label units gives a partial or exaggerated edit."""
    return attrs * 2 - 1


# Copied from attgan.py
def tile(attr_input, size):
    """(B, A) -> (B, A, h, w): the attribute vector repeated at every position of an (h, w) map."""
    return attr_input[:, :, None, None].expand(-1, -1, *size)


def widths(dim, n_layers, max_dim):
    """Channels of a stack of stride-2 layers: dim, 2·dim, 4·dim, ... capped at max_dim."""
    return [min(dim * 2 ** i, max_dim) for i in range(n_layers)]


def down_block(in_ch, out_ch):
    """conv 4x4 stride 2 (halves H and W), BatchNorm, LeakyReLU 0.2. No bias: the norm's shift
    makes it redundant."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.LeakyReLU(0.2))


class Encoder(nn.Module):
    """E: x (B, 3, H, W) -> z (B, latent_dim, H / 2^n, W / 2^n), normalised per channel."""

    def __init__(self, n_layers=4, dim=64, max_dim=512, latent_dim=256):
        super().__init__()
        channels = widths(dim, n_layers, max_dim)
        self.body = nn.Sequential(*[down_block(c_in, c_out)
                                    for c_in, c_out in zip([3] + channels, channels)])
        # The code: a 1x1 projection, then BatchNorm WITHOUT affine parameters, so z has zero mean
        # and unit variance per channel over the batch and L_lat cannot win by shrinking z.
        self.to_code = nn.Sequential(nn.Conv2d(channels[-1], latent_dim, 1, bias=False),
                                     nn.BatchNorm2d(latent_dim, affine=False))

    def forward(self, images):
        return self.to_code(self.body(images))  # (B, 256, 4, 4) at 64 px


class Decoder(nn.Module):
    """Dec: (z (B, latent_dim, h, w), a' (B, A)) -> image (B, 3, h·2^n, w·2^n) in [-1, 1]; a' is
    tiled and concatenated at the bottleneck and after every hidden up-sampling layer."""

    def __init__(self, num_attrs, n_layers=4, dim=64, max_dim=512, latent_dim=256):
        super().__init__()
        # Hidden layers mirror the encoder: 512, 256, 128 for 4 layers of dim 64.
        channels = widths(dim, n_layers, max_dim)[::-1][:n_layers - 1]
        self.hidden = nn.ModuleList()
        in_ch = latent_dim + num_attrs
        for out_ch in channels:
            self.hidden.append(nn.Sequential(
                nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),  # doubles
                nn.BatchNorm2d(out_ch), nn.ReLU()))
            in_ch = out_ch + num_attrs
        self.to_image = nn.Sequential(nn.ConvTranspose2d(in_ch, 3, 4, stride=2, padding=1),
                                      nn.Tanh())

    def forward(self, z, attr_input):
        hidden = torch.cat([z, tile(attr_input, z.shape[-2:])], 1)  # (B, 256 + A, 4, 4)
        for layer in self.hidden:
            hidden = layer(hidden)  # (B, 512, 8, 8), (B, 256, 16, 16), (B, 128, 32, 32)
            hidden = torch.cat([hidden, tile(attr_input, hidden.shape[-2:])], 1)
        return self.to_image(hidden)  # (B, 3, 64, 64)


class Classifier(nn.Module):
    """C: x (B, 3, H, W) -> attribute logits (B, A). A plain CNN; trained in stage 1, then frozen."""

    def __init__(self, num_attrs, img_size=64, n_layers=4, dim=32, max_dim=512):
        super().__init__()
        channels = widths(dim, n_layers, max_dim)
        self.body = nn.Sequential(*[down_block(c_in, c_out)
                                    for c_in, c_out in zip([3] + channels, channels)],
                                  nn.Flatten())  # (B, 256 * 4 * 4) at 64 px
        side = img_size // 2 ** n_layers
        self.head = nn.Linear(channels[-1] * side * side, num_attrs)

    def forward(self, images):
        return self.head(self.body(images))


def check_config(config):
    """Refuse settings the networks cannot be built with, with one clear line."""
    size, layers = config["img_size"], config["n_layers"]
    if layers < 2 or size % 2 ** layers or size < 2 ** (layers + 1):
        raise InputError(f"--img-size {size} must be a multiple of 2^n_layers = {2 ** layers} and "
                         f"at least {2 ** (layers + 1)} (the code map must be at least 2x2), and "
                         f"--n-layers at least 2")
    if config["optimizer"] not in ("adam", "sgd"):
        raise InputError(f"--optimizer {config['optimizer']!r}: expected 'adam' or 'sgd'")
    if config["preset"] not in ("auto", "default", "original", "cpu-demo"):
        raise InputError(f"--preset {config['preset']!r}: expected 'auto', 'default', 'original' "
                         f"or 'cpu-demo'")


def build_models(config, num_attrs):
    """(Encoder, Decoder, Classifier) from a config dict (Args as a dict, or a checkpoint's)."""
    encoder = Encoder(config["n_layers"], config["dim"], config["max_dim"], config["latent_dim"])
    decoder = Decoder(num_attrs, config["n_layers"], config["dim"], config["max_dim"],
                      config["latent_dim"])
    return encoder, decoder, build_classifier(config, num_attrs)


def build_classifier(config, num_attrs):
    return Classifier(num_attrs, config["img_size"], config["n_layers"], config["cls_dim"],
                      config["max_dim"])


# ================================================================================================
# Losses (one function per term)
# ================================================================================================
def loss_rec(img_fake, img_target):
    """One reconstruction error: MSE + L1 between a drawn face and its target photo. MSE punishes
    large errors (colour, layout), L1 keeps edges less blurred than MSE alone would."""
    diff = img_fake.float() - img_target
    return diff.pow(2).mean() + diff.abs().mean()


def loss_cls(attr_logits, attrs, pos_weight=None):
    """One classification error: BCE(C(x), a), averaged over images and attributes; pos_weight
    (A,) up-weights present labels (stage 1: neg/pos per attribute)."""
    return F.binary_cross_entropy_with_logits(attr_logits.float(), attrs, pos_weight=pos_weight)


def loss_lat(z_1, z_2):
    """The latent difference error: ‖E(x1) − E(x2)‖₁, mean over all code entries."""
    return (z_1.float() - z_2.float()).abs().mean()


def psnr(img_a, img_b):
    """Peak signal-to-noise ratio per image in dB, for images in [-1, 1] (peak-to-peak 2) -> (B,)."""
    mse = (img_a.float() - img_b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


# ================================================================================================
# Stage 1: the classifier
# ================================================================================================
def positive_weights(labels):
    """neg/pos per attribute (A,), clamped to [1, 50]: a rare label counts as much as a common one."""
    pos = labels.sum(0).clamp_min(1)
    return ((len(labels) - pos) / pos).clamp(1.0, 50.0)


def classifier_step(classifier, optimizer, images, attrs, pos_weight, amp_ctx):
    """One update of C -> dict of detached scalars."""
    with amp_ctx():
        logits = classifier(images)
        loss = loss_cls(logits, attrs, pos_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    accuracy = ((logits > 0).float() == attrs).float().mean()
    return {"c_loss": loss.detach(), "c_acc": accuracy.detach()}


@torch.no_grad()
def classifier_accuracy(classifier, images_uint8, labels, device, batch_size=256):
    """Per-attribute accuracy (A,) of C on uint8 images (eval mode)."""
    was_training = classifier.training
    classifier.eval()
    correct = torch.zeros(labels.shape[1])
    for start in range(0, len(images_uint8), batch_size):
        x = common.to_float(images_uint8[start:start + batch_size].to(device))
        pred = (classifier(x).float() > 0).cpu().float()
        correct += (pred == labels[start:start + batch_size].cpu()).float().sum(0)
    classifier.train(was_training)
    return correct / max(len(labels), 1)


def train_classifier(args, device, say=print):
    """Stage 1: train C on the training split with hflip augmentation, print per-attribute
    validation accuracy beside the majority baseline, save <out>/classifier.pt. -> state dict."""
    config = dataclasses.asdict(args)
    train_data = common.load_celeba(args.data, args.attrs, "train", args.img_size, args.crop)
    val = common.load_celeba(args.data, train_data.attr_names, "val", args.img_size, args.crop,
                             verbose=False)
    attr_names = train_data.attr_names
    data = common.to_device(train_data, device)
    torch.manual_seed(args.seed)
    classifier = build_classifier(config, len(attr_names)).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.cls_lr)
    pos_weight = positive_weights(train_data.labels).to(device)
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731
    batch = min(64, len(train_data.images))
    say(f"stage 1: classifier for {', '.join(attr_names)} on {len(train_data.images)} images, "
        f"{args.cls_steps} steps")
    clock = time.time()
    for step in range(args.cls_steps):
        images, attrs, _ = common.get_batch(data, step, batch, args.seed + 1, device, hflip=True)
        stats = classifier_step(classifier, optimizer, images, attrs, pos_weight, amp_ctx)
        if (step + 1) % max(args.cls_steps // 5, 1) == 0 or step + 1 == args.cls_steps:
            say(f"  classifier step {step + 1}/{args.cls_steps}  loss {stats['c_loss'].item():.3f}"
                f"  batch acc {stats['c_acc'].item():.3f}  "
                f"{(step + 1) * batch / (time.time() - clock):.0f} img/s")
    accuracy = classifier_accuracy(classifier, val.images, val.labels, device)
    majority = torch.maximum(val.labels.mean(0), 1 - val.labels.mean(0))
    say(f"classifier accuracy on the {len(val.images)} validation images (majority baseline):")
    for k, name in enumerate(attr_names):
        say(f"  {name:<22}{accuracy[k]:.3f}  ({majority[k]:.3f})")
    state = {"classifier": classifier.state_dict(), "step": args.cls_steps, "config": config,
             "attr_names": list(attr_names), "val_accuracy": accuracy.tolist()}
    path = Path(args.classifier or Path(args.out) / "classifier.pt")
    save_checkpoint(path, state)
    say(f"wrote {path}")
    return state


# ================================================================================================
# Stage 2: dual training
# ================================================================================================
def pair_batch(data, pairs, step, batch_size, seed, device, channels_last=False):
    """Pairs of step `step` -> (img_1, img_2 in [-1, 1] (B, 3, H, W), attr_1, attr_2 (B, A)).
    The pair order is a pure function of (seed, step), as common.get_batch's."""
    idx = common.batch_indices(len(pairs), step, batch_size, seed)
    chosen = pairs[idx].to(data.images.device)  # (B, 2)
    images = common.to_float(data.images[chosen.flatten()].to(device))  # (2B, 3, H, W)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    attrs = data.labels[chosen.flatten()].to(device)
    return images[0::2], images[1::2], attrs[0::2], attrs[1::2]


def dual_step(models, optimizer, img_1, img_2, attr_1, attr_2, args, amp_ctx):
    """One update of E and Dec on a batch of pairs (the stage-2 objective in the header) -> dict
    of detached scalars. C is frozen (eval mode, no gradients of its own) but differentiable: the
    classification errors reach Dec through C's input."""
    encoder, decoder, classifier = models
    with amp_ctx():
        z_1, z_2 = encoder(torch.cat([img_1, img_2])).chunk(2)  # one pass: BN sees both
        codes, attrs = [z_1, z_2], [attr_2, attr_1]  # x̂_12 = Dec(z1, a2), x̂_21 = Dec(z2, a1)
        if args.lambda_self > 0:
            codes, attrs = codes + [z_1, z_2], attrs + [attr_1, attr_2]
        decoded = decoder(torch.cat(codes), signed(torch.cat(attrs)))
        img_12, img_21 = decoded[:len(img_1)], decoded[len(img_1):2 * len(img_1)]
        rec = loss_rec(img_12, img_2) + loss_rec(img_21, img_1)
        logits = classifier(torch.cat([img_12, img_21]))
        cls = loss_cls(logits, torch.cat([attr_2, attr_1]))
        lat = loss_lat(z_1, z_2)
        loss = args.lambda_rec * rec + args.lambda_cls * cls + args.lambda_lat * lat
        stats = {}
        if args.lambda_self > 0:
            img_11, img_22 = decoded[2 * len(img_1):].chunk(2)
            self_rec = loss_rec(img_11, img_1) + loss_rec(img_22, img_2)
            loss = loss + args.lambda_self * self_rec
            stats["self"] = self_rec.detach()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    accuracy = ((logits > 0).float() == torch.cat([attr_2, attr_1])).float().mean()
    return {"loss": loss.detach(), "rec": rec.detach(), "cls": cls.detach(), "lat": lat.detach(),
            "transfer_acc": accuracy.detach(), **stats}


def make_optimizer(params, args):
    """Adam (default) or the original's SGD with momentum and weight decay."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.lr, betas=(0.5, 0.999), weight_decay=args.weight_decay)


def freeze(classifier):
    """Stage 2's classifier: eval mode (BatchNorm uses its running statistics) and no gradients
    for its weights. Gradients still flow through it to its input."""
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    return classifier


# ================================================================================================
# Sampling and evaluation
# ================================================================================================
@torch.no_grad()
def transfer(encoder, decoder, images, attrs, batch_size=256):
    """Dec(E(x), a) for images (B, 3, H, W) in [-1, 1] and attributes (B, A) in label units."""
    return torch.cat([decoder(encoder(x), signed(a)).float()
                      for x, a in zip(images.split(batch_size), attrs.split(batch_size))])


@torch.no_grad()
def pair_grid(encoder, decoder, img_1, img_2, attr_1, attr_2):
    """(R, 4 + A, 3, H, W): x1 | x2 | Dec(E(x1), a2) | Dec(E(x2), a1) | x1 with each attribute
    flipped, Dec(E(x1), a1 with column k flipped)."""
    columns = [img_1, img_2, transfer(encoder, decoder, img_1, attr_2),
               transfer(encoder, decoder, img_2, attr_1)]
    for k in range(attr_1.shape[1]):
        flipped = attr_1.clone()
        flipped[:, k] = 1 - flipped[:, k]
        columns.append(transfer(encoder, decoder, img_1, flipped))
    return torch.stack([c.float() for c in columns], 1)


def one_pair_per_person(pairs, identities, count):
    """The first pair of each of the first `count` identities (pairs are grouped by person, so
    pairs[:count] would show one person six times) -> (<= count, 2)."""
    seen, keep = set(), []
    for k, person in enumerate(identities[pairs[:, 0]].tolist()):
        if person not in seen:
            seen.add(person)
            keep.append(k)
        if len(keep) == count:
            break
    return pairs[keep]


def grid_labels(attr_names):
    return ["x1", "x2", "Dec(E(x1), a2)", "Dec(E(x2), a1)"] + [f"x1 flip {n}" for n in attr_names]


@torch.no_grad()
def evaluate_pairs(models, data, pairs, device, batch_size=128):
    """Scores on a split's pairs -> dict: pairs, PSNR of the transfers (x̂_12 vs x2 and x̂_21 vs x1,
    dB), the frozen classifier's accuracy on the transferred images for the attributes that
    changed ("does the edit take?") and for all attributes, its accuracy on the real images."""
    encoder, decoder, classifier = models
    result = {"pairs": len(pairs)}
    if len(pairs) == 0:
        return result
    psnrs, changed_hits, changed_total, all_hits, real_hits = [], 0.0, 0.0, 0.0, 0.0
    for chunk in pairs.split(batch_size):
        idx = chunk.flatten().to(data.images.device)
        images = common.to_float(data.images[idx].to(device))
        attrs = data.labels[idx].to(device)
        img_1, img_2, attr_1, attr_2 = images[0::2], images[1::2], attrs[0::2], attrs[1::2]
        img_12 = transfer(encoder, decoder, img_1, attr_2)
        img_21 = transfer(encoder, decoder, img_2, attr_1)
        psnrs += [psnr(img_12, img_2).cpu(), psnr(img_21, img_1).cpu()]
        target = torch.cat([attr_2, attr_1]).cpu()
        pred = (classifier(torch.cat([img_12, img_21]).to(device)).float() > 0).float().cpu()
        changed = torch.cat([attr_1 != attr_2] * 2).cpu()
        changed_hits += ((pred == target) & changed).sum().item()
        changed_total += changed.sum().item()
        all_hits += (pred == target).float().sum().item()
        real_pred = (classifier(torch.cat([img_2, img_1])).float() > 0).float().cpu()
        real_hits += (real_pred == target).float().sum().item()
    entries = 2 * len(pairs) * data.labels.shape[1]
    result.update(psnr=torch.cat(psnrs).mean().item(),
                  transfer_acc_changed=changed_hits / max(changed_total, 1),
                  transfer_acc_all=all_hits / entries, real_acc=real_hits / entries)
    return result


def report(result, split, say=print):
    if result["pairs"] == 0:
        say(f"{split}: no same-identity pairs with differing target attributes")
        return
    say(f"{split}: {result['pairs']} pairs; transfer PSNR {result['psnr']:.2f} dB; frozen "
        f"classifier accuracy on the transfers: {result['transfer_acc_changed']:.3f} on the changed "
        f"attributes, {result['transfer_acc_all']:.3f} on all (on the real photos: "
        f"{result['real_acc']:.3f})")


# ================================================================================================
# Checkpoint, loading a trained model, the evaluation contract
# ================================================================================================
def checkpoint_state(models, optimizer, step, args, attr_names):
    """The full stage-2 state as one dict (weights_only-loadable); C travels with it."""
    encoder, decoder, classifier = models
    return {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
            "classifier": classifier.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "config": dataclasses.asdict(args), "attr_names": list(attr_names),
            "rng": rng_state()}


def load_trained(ckpt_path, device="cpu"):
    """(config, attr_names, (encoder, decoder, classifier)) from a checkpoint, in eval mode."""
    state = load_checkpoint(ckpt_path)
    if "encoder" not in state:
        raise InputError(f"{ckpt_path} is not a stage-2 checkpoint of dual_transfer.py (expected "
                         f"encoder/decoder weights; a classifier.pt holds only stage 1)")
    config, attr_names = state["config"], state["attr_names"]
    models = build_models(config, len(attr_names))
    for model, key in zip(models, ("encoder", "decoder", "classifier")):
        model.load_state_dict(state[key])
        model.to(device).eval()
    return config, attr_names, models


def load_for_eval(ckpt_path, device="cpu"):
    """The evaluation contract (benchmarks/evaluate.py): a namespace with attr_names, img_size,
    crop; edit(images, attr_src, attr_tgt) -> Dec(E(x), attr_tgt) (attr_src is not needed: the code
    is attribute-free by design); reconstruct(images) -> Dec(E(x), a) with a read by the frozen
    classifier; encode(images) -> {"z": (B, latent_dim·h·w)}; generate = None. Images float
    [-1, 1] (B, 3, H, W), attributes (B, A) 0/1 in attr_names order; results on the CPU."""
    device = torch.device(device)
    config, attr_names, (encoder, decoder, classifier) = load_trained(ckpt_path, device)

    @torch.no_grad()
    def edit(images, attr_src, attr_tgt):
        return transfer(encoder, decoder, images.to(device), attr_tgt.float().to(device)).cpu()

    @torch.no_grad()
    def reconstruct(images, batch_size=256):
        out = []
        for x in images.split(batch_size):
            x = x.to(device)
            out.append(transfer(encoder, decoder, x, (classifier(x) > 0).float()).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode(images, batch_size=256):
        return {"z": torch.cat([encoder(x.to(device)).float().flatten(1).cpu()
                                for x in images.split(batch_size)])}

    return types.SimpleNamespace(attr_names=list(attr_names), img_size=config["img_size"],
                                 crop=config["crop"], edit=edit, reconstruct=reconstruct,
                                 encode=encode, generate=None)


# ================================================================================================
# `eval` and `edit`
# ================================================================================================
def evaluate(args):
    """Print (and return) the pair scores of a checkpoint on one split."""
    device = torch.device(args.device)
    config, attr_names, models = load_trained(args.ckpt, device)
    data = common.load_celeba(args.data or config["data"], attr_names, args.split,
                              config["img_size"], config["crop"], verbose=False)
    pairs = common.identity_pairs(data.identities, data.labels)
    result = evaluate_pairs(models, data, pairs, device)
    report(result, args.split)
    return result


@torch.no_grad()
def edit(args):
    """Read the face's attributes with the frozen classifier, print them, then write either the
    edited face (--set; and input | reconstruction | edit beside it) or input | reconstruction |
    each attribute flipped. -> output path."""
    device = torch.device(args.device)
    config, attr_names, (encoder, decoder, classifier) = load_trained(args.ckpt, device)
    size, crop = config["img_size"], config["crop"]
    labels = None
    if args.image:
        image, source = common.load_photo(args.image, size, crop), args.image
    else:
        data = common.load_celeba(args.data or config["data"], attr_names, "val", size, crop,
                                  verbose=False)
        if not 0 <= args.index < len(data.images):
            raise InputError(f"--index {args.index}: the 'val' split has {len(data.images)} images")
        image = common.to_float(data.images[args.index:args.index + 1])
        labels, source = data.labels[args.index], f"{data.files[args.index]} (val #{args.index})"
    image = image.to(device)
    probs = torch.sigmoid(classifier(image).float())[0].cpu()
    attr_src = (probs > 0.5).float()[None].to(device)
    print(f"{source}: attributes read by the classifier (P(present))")
    for k, name in enumerate(attr_names):
        truth = f"   label {int(labels[k])}" if labels is not None else ""
        print(f"  {name:<22}{probs[k]:6.3f}  {'yes' if probs[k] > 0.5 else 'no '}{truth}")
    recon = transfer(encoder, decoder, image, attr_src)
    path = Path(args.out or Path(args.ckpt).parent / "edit.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.set:
        attr_tgt = attr_src.clone()
        for k, value in parse_settings(args.set, attr_names).items():
            attr_tgt[:, k] = value
        edited = transfer(encoder, decoder, image, attr_tgt)
        save_image(edited[0].cpu(), path)
        compare = path.with_name(path.stem + "_compare.png")
        common.save_grid([[image[0].cpu(), recon[0].cpu(), edited[0].cpu()]], compare,
                         col_labels=["input", "reconstruction", "edited"], title=", ".join(args.set))
        print(f"input | reconstruction | edit: {compare}")
    else:
        columns = [image.cpu(), recon.cpu()]
        for k in range(len(attr_names)):
            flipped = attr_src.clone()
            flipped[:, k] = 1 - flipped[:, k]
            columns.append(transfer(encoder, decoder, image, flipped).cpu())
        common.save_grid(torch.stack(columns, 1), path,
                         col_labels=["input", "recon"] + [f"flip {n}" for n in attr_names])
    print(f"wrote {path}")
    return path


# ================================================================================================
# main: training
# ================================================================================================
# Copied from attgan.py
def is_demo(data):
    return data == "demo" or data.startswith("demo:")


def apply_presets(args, device):
    """--smoke, or a preset, on the fields still at their defaults."""
    defaults = Args()
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
        return args
    if args.preset == "auto":
        args.preset = "cpu-demo" if device.type == "cpu" and is_demo(args.data) else "default"
    preset = {"cpu-demo": CPU_DEMO_PRESET, "original": ORIGINAL_PRESET}.get(args.preset, {})
    changed = {name: value for name, value in preset.items()
               if getattr(args, name) == getattr(defaults, name) != value}
    for name, value in changed.items():
        setattr(args, name, value)
    if changed:
        print(f"note: {args.preset} preset: " + ", ".join(f"--{k.replace('_', '-')} {v}"
                                                         for k, v in changed.items()))
    return args


def get_classifier(args, attr_names, device):
    """The frozen stage-1 classifier: from --classifier / <out>/classifier.pt when it exists (its
    attributes and sizes must match), else trained now. -> state dict of the classifier."""
    path = Path(args.classifier or Path(args.out) / "classifier.pt")
    if not path.is_file():
        if args.classifier:
            raise InputError(f"--classifier {path}: no such file (run `python dual_transfer.py "
                             f"classifier` first, or leave --classifier out to train one now)")
        print(f"no classifier at {path}: training it first (stage 1)")
        return train_classifier(args, device)["classifier"]
    state = load_checkpoint(path, dataclasses.asdict(args), CLASSIFIER_MUST_MATCH)
    if state["attr_names"] != list(attr_names):
        raise InputError(f"classifier {path} was trained for {state['attr_names']}, this run "
                         f"edits {attr_names}")
    print(f"classifier: {path} (validation accuracy "
          + ", ".join(f"{n} {a:.3f}" for n, a in zip(attr_names, state["val_accuracy"])) + ")")
    return state["classifier"]


def train(args):
    device = pick_device(args.device)
    args = apply_presets(args, device)
    config = dataclasses.asdict(args)
    check_config(config)
    out = Path(args.out)
    state = load_checkpoint(out / "ckpt.pt", config, RESUME_MUST_MATCH) if args.resume else None

    data = common.load_celeba(args.data, args.attrs, "train", args.img_size, args.crop)
    attr_names = data.attr_names
    if data.identities is None:
        raise InputError(f"dual training needs identity_CelebA.txt (the person in each photo; it "
                         f"comes with the official CelebA release, in its Anno folder) beside the "
                         f"images of {data.root}; the {data.layout} layout found has none")
    pairs = common.identity_pairs(data.identities, data.labels, max_pairs=args.max_pairs,
                                  seed=args.seed)
    if len(pairs) < args.batch_size:
        raise InputError(f"only {len(pairs)} same-identity pairs whose {', '.join(attr_names)} "
                         f"differ in the training split; need at least --batch-size "
                         f"{args.batch_size} (choose other --attrs or a smaller batch)")
    val = common.load_celeba(args.data, attr_names, "val", args.img_size, args.crop, verbose=False)
    val_pairs = common.identity_pairs(val.identities, val.labels) if val.identities is not None \
        and len(val.images) else torch.empty((0, 2), dtype=torch.long)
    grid_source, grid_pairs = (val, val_pairs) if len(val_pairs) else (data, pairs)
    print(f"pairs: {len(pairs)} in the training split, {len(val_pairs)} in the validation split "
          f"(same identity, {', '.join(attr_names)} differing)")

    classifier_state = state["classifier"] if state is not None else \
        get_classifier(args, attr_names, device)
    torch.manual_seed(args.seed)
    encoder, decoder, classifier = build_models(config, len(attr_names))
    classifier.load_state_dict(classifier_state)
    models = [m.to(device) for m in (encoder, decoder, freeze(classifier))]
    channels_last = args.channels_last and device.type == "cuda"
    if channels_last:
        for model in models:
            model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer([*encoder.parameters(), *decoder.parameters()], args)
    start_step, metrics_path = 0, out / "metrics.jsonl"
    if state is not None:
        encoder.load_state_dict(state["encoder"])
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        print(f"resumed from {out / 'ckpt.pt'} at step {start_step}")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    if state is not None:
        trim_jsonl(metrics_path, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()
    step_models = [torch.compile(m) for m in models] if args.compile else models
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731
    data = common.to_device(data, device)
    shown = one_pair_per_person(grid_pairs, grid_source.identities, 6).flatten()
    grid_images = common.to_float(grid_source.images[shown]).to(device)
    grid_attrs = grid_source.labels[shown].to(device)
    print(f"Dual Training {args.img_size} px, attributes {', '.join(attr_names)}; E "
          f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M, Dec "
          f"{sum(p.numel() for p in decoder.parameters()) / 1e6:.2f} M, C "
          f"{sum(p.numel() for p in classifier.parameters()) / 1e6:.2f} M parameters (frozen); "
          f"{args.optimizer} lr {args.lr:g}; device {device}; "
          f"{'smoke' if args.smoke else args.preset} configuration")

    def save_samples(step):
        encoder.eval(), decoder.eval()
        with amp_ctx():
            grid = pair_grid(encoder, decoder, grid_images[0::2], grid_images[1::2],
                             grid_attrs[0::2], grid_attrs[1::2])
        encoder.train(), decoder.train()
        common.save_grid(grid.cpu(), out / "samples" / f"step_{step:06d}.png",
                         col_labels=grid_labels(attr_names), title=f"Dual Training, step {step}")

    totals, clock, interval_start = {}, time.time(), start_step
    for step in range(start_step, args.steps):
        img_1, img_2, attr_1, attr_2 = pair_batch(data, pairs, step, args.batch_size, args.seed,
                                                  device, channels_last)
        stats = dual_step(step_models, optimizer, img_1, img_2, attr_1, attr_2, args, amp_ctx)
        for key, value in stats.items():  # detached tensors: no host sync until the log step
            totals[key] = totals.get(key, 0) + value
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            keys = sorted(totals)
            means = (torch.stack([totals[k] for k in keys]).float() / (done - interval_start)).tolist()
            elapsed = time.time() - clock
            record = {"step": done, "img_per_s": (done - interval_start) * 2 * args.batch_size / elapsed,
                      **dict(zip(keys, means))}
            append_jsonl(metrics_path, record)
            eta = (args.steps - done) * elapsed / (done - interval_start)
            self_part = f" self {record['self']:.4f}" if "self" in record else ""
            print(f"step {done}/{args.steps}  loss {record['loss']:.4f} (rec {record['rec']:.4f} "
                  f"cls {record['cls']:.3f} lat {record['lat']:.3f}{self_part})  transfer acc "
                  f"{record['transfer_acc']:.3f}  {record['img_per_s']:.0f} img/s  "
                  f"ETA {format_seconds(eta)}", flush=True)
            totals, interval_start = {}, done
        saving = time.time()
        if done % args.sample_every == 0 or done == args.steps:
            save_samples(done)
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(out / "ckpt.pt", checkpoint_state(models, optimizer, done, args,
                                                              attr_names))
        clock = time.time() if not totals else clock + time.time() - saving
    if metrics_path.exists():
        common.plot_metrics(metrics_path, out / "losses.png",
                            keys=[k for k in ("loss", "rec", "cls", "lat", "self", "transfer_acc",
                                              "img_per_s")
                                  if any(k in r for r in common.read_jsonl(metrics_path))])
    encoder.eval(), decoder.eval()
    results = {"train": evaluate_pairs(models, data, pairs[:2000], device)}
    if len(val_pairs):
        results["val"] = evaluate_pairs(models, val, val_pairs, device)
    for split, result in results.items():
        report(result, split + (" (first 2000 pairs)" if split == "train" and len(pairs) > 2000
                                else ""))
    (out / "eval.json").write_text(json.dumps({"step": args.steps, **results}, indent=1) + "\n")
    print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png, eval.json")
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "classifier", "eval", "edit")
    command = argv.pop(0) if argv and argv[0] in commands else "train"
    if command == "edit":
        return edit(parse_dataclass(EditArgs, merge_repeated(argv, "--set"), "dual_transfer.py edit"))
    if command == "eval":
        return evaluate(parse_dataclass(EvalArgs, argv, "dual_transfer.py eval"))
    args = parse_dataclass(Args, argv, f"dual_transfer.py {command}")
    if command == "classifier":
        device = pick_device(args.device)
        args = apply_presets(args, device)
        check_config(dataclasses.asdict(args))
        return train_classifier(args, device)
    return train(args)


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # bad input: one clear line, no traceback
        sys.exit(f"error: {err}")
