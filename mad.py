"""MAD: an adversarial autoencoder whose 99-d code splits into pose, identity, style, expression.

Reimplements **MAD** (Björn Browatzki and Christian Wallraven, "Robust Discrimination and
Generation of Faces using Compact, Disentangled Embeddings", ICCV Workshops (RSL-CV) 2019,
https://openaccess.thecvf.com/content_ICCVW_2019/papers/RSL-CV/Browatzki_Robust_Discrimination_and_Generation_of_Faces_using_Compact_Disentangled_Embeddings_ICCVW_2019_paper.pdf;
project browatbn2/MAD, whose README promises code that was never published in full). The original
trained on VGGFace2, AffectNet and VoxCeleb; this file trains on CelebA (and the synthetic demo
set) with the supervision CelebA offers, and says below what replaces what.

Two ideas. (1) An adversarial autoencoder: a ResNet encoder E squeezes a face into a code z of only
99 numbers, an inverted-ResNet decoder G draws the face back; a latent discriminator D_z pushes the
codes E(x) towards the prior N(0, I) (so a random code decodes to a face), and an image
discriminator D_x pushes reconstructions and decodes of prior samples towards real photos (so
they are sharp). (2) Supervised disentanglement: z is cut into four sub-vectors and each is made to
carry one factor — z_pose regresses the head angles, z_identity / z_expression / z_style are
trained with triplet losses so that faces sharing that factor lie close in that sub-vector only.
Swapping one sub-vector between two faces then changes that factor alone.

Objective (B images x in [-1, 1]; z = E(x); z_p ~ N(0, I); softplus(t) = log(1 + e^t))
--------------------------------------------------------------------------------------
    L_D   = softplus(−D_z(z_p)) + softplus(D_z(z))                                  (latent GAN)
          + softplus(−D_x(x)) + ½·[softplus(D_x(G(z))) + softplus(D_x(G(z_p)))]       (image GAN)
    L_AE  = λ_rec·‖x − G(z)‖₁ + λ_z·softplus(−D_z(z))
          + λ_x·½·[softplus(−D_x(G(z))) + softplus(−D_x(G(z_p)))]
    L_fac = λ_pose·‖z_pose − θ/pose_scale‖²                       θ = (yaw, pitch, roll) degrees
          + Σ_{f ∈ identity, expression, style} λ_f·mean_a max(0, ‖z_f(a) − z_f(p)‖₂
                                                        − ‖z_f(a) − z_f(n)‖₂ + margin)
            a, p share factor f's label, a and n do not (triplets drawn within the batch)
The GAN loss is the non-saturating one of Goodfellow et al. (BCE with logits): both
discriminators are plain binary classifiers, the latent one (as in Makhzani et al.'s adversarial
autoencoder) compares vectors, where a Wasserstein critic would need a gradient penalty and gains
nothing; and the generator side −log D(fake) gives strong gradients early, when D wins easily.

Stages (--stage), each its own folder <out>/<stage>/ and its own optimizers
---------------------------------------------------------------------------
    ae           updates E (trunk + head), G with L_AE; D_z, D_x with L_D.      (no factor losses)
    disentangle  updates ONLY E's code head (the two linear layers trunk features -> z) with
                 L_fac + λ_rec·‖x − G(z)‖₁ + λ_z·softplus(−D_z(z)). E's trunk, G, D_z and D_x are
                 frozen (requires_grad off, BatchNorm in eval mode: not one number of them
                 changes). The reconstruction through the frozen G and the frozen D_z keep the
                 re-arranged code decodable and near the prior; the original's "--train_ae 0".
    joint        updates everything: E, G with L_AE + L_fac; D_z, D_x with L_D.
A stage after 'ae' starts from the weights of the previous stage's checkpoint (--init, default
<out>/ae/ckpt.pt for disentangle and <out>/disentangle/ckpt.pt for joint) with fresh optimizers;
--resume continues <out>/<stage>/ckpt.pt exactly (step, optimizers, RNG).

Paper notation -> code
----------------------
    E, G                  Encoder (trunk + head), Decoder
    D_z, D_x              LatentDiscriminator, ImageDiscriminator (logits (B,))
    z = [z_p, z_id, z_s, z_e]   split_code(z, sizes) -> {"pose", "identity", "style", "expression"}
    sizes 3 + 32 + 32 + 32 = 99 --pose-dim --identity-dim --style-dim --expression-dim
    θ (head pose)         pose_from_landmarks (CelebA) or the demo set's true angles, degrees
    λ_rec, λ_z, λ_x       lambda_rec, lambda_z, lambda_x;  λ_pose, λ_id, λ_expr, λ_style, margin

Supervision: CelebA signals for the original's data sets
--------------------------------------------------------
    pose        VoxCeleb/AffectNet head pose -> angles estimated from CelebA's 5 landmarks
                (list_landmarks_align_celeba) by the geometry in pose_from_landmarks: roll is the
                eye line's angle; yaw = atan(u / NOSE_DEPTH), u = horizontal offset of the nose
                from the eye midpoint over the inter-ocular distance (a nose tip NOSE_DEPTH
                inter-ocular distances in front of the eye plane, orthographic camera); pitch =
                atan((v0 − v)·PITCH_GAIN), v = (nose − eye line) / (mouth line − eye line) after
                undoing roll, v0 its value on a frontal CelebA face. Checked on the demo set's
                exact landmarks against its true angles (1,440 images): correlation 0.97 (yaw),
                0.69 (pitch, biased by −7°: the drawn faces' proportions are not CelebA's), 0.96
                (roll). Without a landmarks file (e.g. the 3,000-image sample) pose supervision
                is off, with a printed warning.
    identity    VGGFace2 identities -> identity_CelebA.txt. Batches after 'ae' are half random
                images, half a random other image of the same person each (partner_indices),
                so that same-identity positives exist; off without an identity file.
    expression  AffectNet expressions -> the labels Smiling and Mouth_Slightly_Open (a triplet
                positive has both equal, a negative differs in one at least).
    style       -> appearance attributes: hair colours, Eyeglasses, Bangs, Male, Wearing_Hat
                (STYLE_ATTRS; the rest of --attrs): what changes a face's look but neither who it
                is (mostly) nor its expression or pose. Positive = the same vector of those labels.
    demo set    the true factors are known (common.load_demo_params): pose = the rendered yaw,
                pitch, roll; identity = the drawn person; expression and style labels are exact
                functions of the drawn smile, mouth opening, hair, glasses, ... (common.demo_labels).

Shapes (128 px, defaults enc_dim = dec_dim = dis_dim = 64, max_dim 512, head_dim 512)
----------------------------------------------------------------------------------------
    E trunk: x (B, 3, 128, 128) -> stem conv4x4 s2, BN, LReLU (B, 64, 64, 64)
             -> ResDown (B, 128, 32, 32) -> (B, 256, 16, 16) -> (B, 512, 8, 8) -> (B, 512, 4, 4)
                                                  log2(size / 4) − 1 residual blocks with stride 2
    E head:  flatten (B, 8192) -> Linear 512, LReLU -> Linear 99 = z (B, 99)
    G:       z (B, 99) -> Linear (B, 512·4·4) -> (B, 512, 4, 4) -> ResUp (B, 512, 8, 8)
             -> (B, 512, 16, 16) -> (B, 256, 32, 32) -> (B, 128, 64, 64) -> (B, 64, 128, 128)
             -> BN, ReLU, conv3x3 (B, 3, 128, 128), tanh
    D_x:     x -> conv4x4 s2 (B, 64, 64, 64) ... (B, 512, 4, 4) -> Linear 1: logits (B,)
             (spectral normalisation on every layer: a BCE discriminator that stays Lipschitz)
    D_z:     z (B, 99) -> Linear 512, LReLU -> Linear 512, LReLU -> Linear 1: logits (B,)
    256 px adds one block to E and G; 64 px removes one.

Deviations from the original, and why
-------------------------------------
* Data and supervision: see above (CelebA signals instead of VGGFace2/AffectNet/VoxCeleb).
* z_pose regresses the angles directly (scaled by --pose-scale = 30 degrees so that the targets
  have the prior's unit scale); there is no separate pose network.
* Network widths follow ResNet-18 (64 ... 512); the original's exact layers were not published.
* The disentangle stage re-trains only the encoder's code head (see Stages): with the trunk and
  the decoder frozen, the factor losses can only re-arrange what the autoencoder already encodes.
* One process (no DistributedDataParallel): the method is small, and the per-stage folders and
  the identity-paired batches are simpler to keep exact on one device.
* --resume reads <out>/<stage>/ckpt.pt (not <out>/ckpt.pt): the three stages live side by side.
* On a CPU with the demo data, `--preset auto` switches to CPU_DEMO_PRESET (64 px, widths 16 up to
  64, batch 16, 400 steps per stage) so each stage finishes in minutes; --preset paper keeps the
  defaults, --preset cpu-demo applies it anywhere (e.g. to a CelebA folder on a laptop).

Commands
--------
    python mad.py --stage ae                        # demo set; on a CPU the cpu-demo preset
    python mad.py --stage disentangle               # from runs/mad/ae/ckpt.pt
    python mad.py --stage joint                     # from runs/mad/disentangle/ckpt.pt
    python mad.py --data ./celeba --stage ae --out runs/mad_celeba      # 128 px (--img-size 256)
    python mad.py --data ./celeba --stage ae --out runs/mad_celeba --resume   # continue exactly
    python mad.py --smoke --out /tmp/mad_smoke --stage ae               # seconds, end to end
    python mad.py swap --ckpt runs/mad/joint/ckpt.pt                    # factor-swap grid
    python mad.py sample --ckpt runs/mad/joint/ckpt.pt                  # prior faces, interpolations
    python mad.py eval --ckpt runs/mad/joint/ckpt.pt                    # retrieval matrix, PSNR

Outputs in <out>/<stage>/: ckpt.pt (E, G, D_z, D_x, optimizers, step, stage, config, attribute
names, RNG), metrics.jsonl, losses.png, samples/step_XXXXXX.png (rows: fixed validation faces A;
columns: input | reconstruction | partner B (the next row's face) | A with B's pose / identity /
style / expression | a decode of a fixed prior sample).

Evaluation contract (benchmarks/evaluate.py): load_for_eval(ckpt_path, device) returns a namespace
with attr_names, img_size, crop, reconstruct(images) = G(E(x)), encode(images) -> {"pose",
"identity", "style", "expression"} sub-vectors, generate(attrs, seed=0) -> len(attrs) decodes of
prior samples (the attributes are ignored: MAD is not attribute-conditioned, and the namespace
says so with conditional=False), edit = None.
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

FACTORS = ("pose", "identity", "style", "expression")  # the order of the sub-vectors in z
STAGES = ("ae", "disentangle", "joint")
PREVIOUS_STAGE = {"disentangle": "ae", "joint": "disentangle"}
EXPRESSION_ATTRS = ["Smiling", "Mouth_Slightly_Open"]
STYLE_ATTRS = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Eyeglasses", "Bangs",
               "Male", "Wearing_Hat"]
NOSE_DEPTH = 0.33   # nose tip in front of the eye plane, in inter-ocular distances (~2 cm / 6.3 cm)
PITCH_GAIN = 3.0    # (eye-to-mouth height) / (nose depth): ~40 px / 13 px on an aligned face
FRONTAL_V = 0.575   # (nose − eyes) / (mouth − eyes) vertically on a frontal face: (135−112)/(152−112)


# ================================================================================================
# Config
# ================================================================================================
@dataclass
class Args:
    """Train MAD, one stage at a time (sub-commands: train (default), swap, sample, eval;
    `python mad.py eval --help`)."""
    data: str = "demo"
    """CelebA folder (any layout common.py reads), or 'demo' / 'demo:N' for the synthetic set"""
    out: str = "runs/mad"
    """output folder; each stage writes <out>/<stage>/: ckpt.pt, metrics.jsonl, losses.png, samples/"""
    stage: str = "ae"
    """'ae' (autoencoder + both GANs), 'disentangle' (factor losses, only E's code head trains), 'joint' (all)"""
    init: str = None
    """weights to start a fresh stage from (default: <out>/ae/ckpt.pt for disentangle, <out>/disentangle/ckpt.pt for joint)"""
    attrs: list = field(default_factory=list)
    """attributes loaded (default: Smiling, Mouth_Slightly_Open and STYLE_ATTRS present in the data)"""
    expression_attrs: list = field(default_factory=lambda: list(EXPRESSION_ATTRS))
    """the attributes of --attrs that define expression; the others define style"""
    img_size: int = 128
    """image side in pixels: 64, 128 (default) or 256 (the original); a power of two >= 16"""
    crop: int = 170
    """centre square crop in official 178x218 pixels before resizing"""
    pose_dim: int = 3
    """size of z_pose (yaw, pitch, roll)"""
    identity_dim: int = 32
    """size of z_identity"""
    style_dim: int = 32
    """size of z_style"""
    expression_dim: int = 32
    """size of z_expression"""
    enc_dim: int = 64
    """channels of the encoder stem, doubling per residual block up to --max-dim"""
    dec_dim: int = 64
    """channels of the last decoder block, doubling towards the 4x4 map up to --max-dim"""
    dis_dim: int = 64
    """channels of the first image-discriminator conv, doubling up to --max-dim"""
    max_dim: int = 512
    """cap on the channels of any conv layer (ResNet-18's 512)"""
    head_dim: int = 512
    """hidden units of the encoder's code head (trunk features -> z)"""
    dz_dim: int = 512
    """hidden units of the latent discriminator D_z"""
    lambda_rec: float = 10.0
    """weight of the pixel reconstruction ‖x − G(E(x))‖₁"""
    lambda_z: float = 1.0
    """weight of the encoder's latent adversarial term (fool D_z)"""
    lambda_x: float = 1.0
    """weight of the decoder's image adversarial term (fool D_x)"""
    lambda_pose: float = 1.0
    """weight of the pose regression ‖z_pose − θ/pose_scale‖²"""
    lambda_id: float = 1.0
    """weight of the identity triplet loss on z_identity"""
    lambda_expr: float = 1.0
    """weight of the expression triplet loss on z_expression"""
    lambda_style: float = 1.0
    """weight of the style triplet loss on z_style"""
    margin: float = 1.0
    """triplet margin in code units (codes ~ N(0, I): two random 32-d codes lie ~8 apart)"""
    pose_scale: float = 30.0
    """z_pose targets are the angles in degrees divided by this"""
    batch_size: int = 64
    """images per step (after 'ae' half of them are same-identity partners of the other half)"""
    steps: int = 100_000
    """training steps of this stage"""
    lr: float = 2e-4
    """Adam learning rate of every network (betas 0.5, 0.999)"""
    seed: int = 0
    """seed for the weights, the batches, the prior samples and the triplets"""
    device: str = "auto"
    """'auto' (cuda, then mps, then cpu), 'cuda', 'cpu', ..."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored elsewhere)"""
    channels_last: bool = True
    """channels-last memory format on CUDA"""
    compile: bool = False
    """torch.compile the networks (CUDA; the first steps are slow while it compiles)"""
    preset: str = "auto"
    """'auto' (cpu-demo on a CPU with demo data, else paper), 'paper' or 'cpu-demo'"""
    log_every: int = 100
    """print a progress line and append to metrics.jsonl every this many steps"""
    sample_every: int = 5000
    """write a sample grid every this many steps (and at the end)"""
    ckpt_every: int = 5000
    """write ckpt.pt every this many steps (and at the end)"""
    resume: bool = False
    """continue from <out>/<stage>/ckpt.pt (its configuration must match)"""
    smoke: bool = False
    """tiny end-to-end run: demo:16, 32 px, tiny widths, 4 steps (seconds on a CPU)"""


# Fields a resumed run must share with its checkpoint (--steps may grow).
RESUME_MUST_MATCH = ("data", "stage", "attrs", "expression_attrs", "img_size", "crop", "pose_dim",
                     "identity_dim", "style_dim", "expression_dim", "enc_dim", "dec_dim",
                     "dis_dim", "max_dim", "head_dim", "dz_dim", "lambda_rec", "lambda_z",
                     "lambda_x", "lambda_pose", "lambda_id", "lambda_expr", "lambda_style",
                     "margin", "pose_scale", "batch_size", "lr", "seed")
# Fields a stage must share with the checkpoint it starts from (--init): the network shapes.
INIT_MUST_MATCH = ("img_size", "crop", "pose_dim", "identity_dim", "style_dim", "expression_dim",
                   "enc_dim", "dec_dim", "dis_dim", "max_dim", "head_dim", "dz_dim")

# --smoke: applied to the fields still at their defaults (so `--smoke --steps 2` runs 2 steps).
SMOKE = dict(data="demo:16", img_size=32, enc_dim=8, dec_dim=8, dis_dim=8, max_dim=32,
             head_dim=32, dz_dim=32, batch_size=8, steps=4, log_every=2, sample_every=4,
             ckpt_every=2)

# `--preset cpu-demo` (chosen by `--preset auto` on a CPU with demo data): the same method at
# 64 px with narrow networks (16 up to 64 channels), batch 16 and 400 steps per stage, so each
# stage takes a few minutes on two CPU cores. Applied to the fields still at their defaults.
CPU_DEMO_PRESET = dict(img_size=64, enc_dim=16, dec_dim=16, dis_dim=16, max_dim=64,
                       head_dim=128, dz_dim=128, batch_size=16, steps=400, log_every=50,
                       sample_every=200, ckpt_every=200)


@dataclass
class SwapArgs:
    """Factor swap: for pairs (A, B) of faces, decode A's code with one sub-vector taken from B
    (python mad.py swap --ckpt runs/mad/joint/ckpt.pt)."""
    ckpt: str = "runs/mad/joint/ckpt.pt"
    """checkpoint written by training"""
    data: str = None
    """dataset to draw the faces from (default: the checkpoint's)"""
    split: str = "val"
    """split to draw them from"""
    pairs: int = 8
    """number of (A, B) pairs, the columns: A = image k, B = image k + pairs"""
    out: str = None
    """output PNG (default: swap.png beside the checkpoint)"""
    device: str = "cpu"
    """device to run the networks on"""


@dataclass
class SampleArgs:
    """Random faces decoded from the prior, and interpolations along one sub-vector at a time
    (python mad.py sample --ckpt runs/mad/joint/ckpt.pt)."""
    ckpt: str = "runs/mad/joint/ckpt.pt"
    """checkpoint written by training"""
    count: int = 16
    """random faces in random.png"""
    frames: int = 8
    """interpolation steps per factor (columns of interpolate.png, frames of each GIF)"""
    seed: int = 0
    """seed of the prior samples"""
    out: str = None
    """output folder (default: the checkpoint's folder)"""
    device: str = "cpu"
    """device to run the decoder on"""


@dataclass
class EvalArgs:
    """Nearest-neighbour retrieval on each sub-vector (rows: label kind, columns: sub-vector) and
    reconstruction PSNR (python mad.py eval --ckpt runs/mad/joint/ckpt.pt)."""
    ckpt: str = "runs/mad/joint/ckpt.pt"
    """checkpoint written by training"""
    data: str = None
    """dataset (default: the checkpoint's)"""
    split: str = "test"
    """split to evaluate, leave-one-out within it ('val' is used when it is empty)"""
    metric: str = "cosine"
    """nearest neighbour by 'cosine' similarity or 'l2' distance"""
    max_images: int = 2000
    """use at most this many images of the split (the first ones)"""
    device: str = "cpu"
    """device to run the encoder and decoder on"""


# ================================================================================================
# Shared boilerplate (verbatim copies of attgan.py's; tests/test_copies.py checks them)
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
def save_image(image, path):
    """One (3, H, W) image in [-1, 1] as a PNG at its own size."""
    from PIL import Image
    Image.fromarray(common.to_uint8(image).permute(1, 2, 0).numpy()).save(path)


# ================================================================================================
# Model
# ================================================================================================
def code_sizes(config):
    """{"pose": 3, "identity": 32, "style": 32, "expression": 32} from a config dict."""
    return {name: config[f"{name}_dim"] for name in FACTORS}


def split_code(z, sizes):
    """z (B, sum(sizes)) -> {factor: (B, size)} views, in FACTORS order."""
    return dict(zip(sizes, z.split(list(sizes.values()), dim=1)))


def join_code(parts):
    """The inverse of split_code: {factor: (B, size)} -> z (B, 99)."""
    return torch.cat([parts[name] for name in FACTORS], 1)


class ResDown(nn.Module):
    """Residual block that halves H, W: conv3x3 s2, BN, LReLU, conv3x3, BN, plus a shortcut
    (avg-pool 2 + 1x1 conv), then LReLU. (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch),
            nn.LeakyReLU(0.2), nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch))
        self.skip = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(in_ch, out_ch, 1, bias=False),
                                  nn.BatchNorm2d(out_ch))

    def forward(self, x):
        return F.leaky_relu(self.main(x) + self.skip(x), 0.2)


class ResUp(nn.Module):
    """Residual block that doubles H, W (the inverted ResNet): BN, ReLU, nearest upsample, conv3x3,
    BN, ReLU, conv3x3, plus a shortcut (upsample + 1x1 conv). (B, C_in, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.main = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False))
        self.skip = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                  nn.Conv2d(in_ch, out_ch, 1, bias=False))

    def forward(self, x):
        return self.main(x) + self.skip(x)


def n_levels(img_size):
    """Stride-2 blocks between the image and the 4x4 map: log2(size / 4) (5 at 128 px)."""
    return int(math.log2(img_size // 4))


class Encoder(nn.Module):
    """E: trunk (stem + residual down blocks to 4x4) and code head (two linear layers) -> z (B, 99).
    The split into trunk and head is what the disentangle stage freezes / trains."""

    def __init__(self, img_size=128, code_dim=99, dim=64, max_dim=512, head_dim=512):
        super().__init__()
        # ResNet-style stem: a strided conv halves H, W at once (most of the cost sits at full
        # resolution), then one residual block per remaining halving.
        layers = [nn.Conv2d(3, dim, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(dim),
                  nn.LeakyReLU(0.2)]
        in_ch = dim
        for i in range(n_levels(img_size) - 1):
            out_ch = min(dim * 2 ** (i + 1), max_dim)
            layers.append(ResDown(in_ch, out_ch))  # halves H, W: 128 -> 64 -> ... -> 4
            in_ch = out_ch
        self.trunk = nn.Sequential(*layers, nn.Flatten())  # (B, C·4·4)
        self.head = nn.Sequential(nn.Linear(in_ch * 16, head_dim), nn.LeakyReLU(0.2),
                                  nn.Linear(head_dim, code_dim))  # (B, 99)

    def forward(self, images):
        return self.head(self.trunk(images))


class Decoder(nn.Module):
    """G: z (B, 99) -> Linear -> (B, C, 4, 4) -> residual up blocks -> (B, 3, H, W) in [-1, 1]."""

    def __init__(self, img_size=128, code_dim=99, dim=64, max_dim=512):
        super().__init__()
        levels = n_levels(img_size)
        channels = [min(dim * 2 ** (levels - i), max_dim) for i in range(levels + 1)]  # 512 .. 64
        self.start_ch = channels[0]
        self.fc = nn.Linear(code_dim, channels[0] * 16)
        self.blocks = nn.Sequential(*[ResUp(channels[i], channels[i + 1]) for i in range(levels)])
        self.out = nn.Sequential(nn.BatchNorm2d(channels[-1]), nn.ReLU(),
                                 nn.Conv2d(channels[-1], 3, 3, padding=1), nn.Tanh())

    def forward(self, z):
        hidden = self.fc(z).view(len(z), self.start_ch, 4, 4)  # (B, 512, 4, 4)
        return self.out(self.blocks(hidden))  # (B, 3, H, W)


class ImageDiscriminator(nn.Module):
    """D_x: conv4x4 s2 + LReLU down to 4x4, then Linear -> logits (B,). Spectral normalisation on
    every layer and no BatchNorm: real and fake images are judged one by one."""

    def __init__(self, img_size=128, dim=64, max_dim=512):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        layers, in_ch = [], 3
        for i in range(n_levels(img_size)):
            out_ch = min(dim * 2 ** i, max_dim)
            layers += [sn(nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            in_ch = out_ch
        self.net = nn.Sequential(*layers, nn.Flatten(), sn(nn.Linear(in_ch * 16, 1)))

    def forward(self, images):
        return self.net(images).squeeze(1)  # (B,)


class LatentDiscriminator(nn.Module):
    """D_z: an MLP on codes, E(x) (fake) versus samples of N(0, I) (real) -> logits (B,)."""

    def __init__(self, code_dim=99, hidden=512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(code_dim, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, z):
        return self.net(z).squeeze(1)  # (B,)


def check_config(config):
    """Refuse settings the networks cannot be built with, with one clear line."""
    size = config["img_size"]
    if size < 16 or size & (size - 1):
        raise InputError(f"--img-size {size}: expected a power of two >= 16 (64, 128, 256)")
    if config["stage"] not in STAGES:
        raise InputError(f"--stage {config['stage']!r}: expected one of {', '.join(STAGES)}")
    if config["preset"] not in ("auto", "paper", "cpu-demo"):
        raise InputError(f"--preset {config['preset']!r}: expected 'auto', 'paper' or 'cpu-demo'")
    if min(code_sizes(config).values()) < 1:
        raise InputError("every sub-vector size (--pose-dim ... --expression-dim) must be >= 1")
    if config["batch_size"] < 4 or config["batch_size"] % 2:
        raise InputError(f"--batch-size {config['batch_size']}: expected an even number >= 4")


def build_models(config):
    """(Encoder, Decoder, LatentDiscriminator, ImageDiscriminator) from a config dict."""
    size, code_dim = config["img_size"], sum(code_sizes(config).values())
    return (Encoder(size, code_dim, config["enc_dim"], config["max_dim"], config["head_dim"]),
            Decoder(size, code_dim, config["dec_dim"], config["max_dim"]),
            LatentDiscriminator(code_dim, config["dz_dim"]),
            ImageDiscriminator(size, config["dis_dim"], config["max_dim"]))


# ================================================================================================
# Supervision: pose from landmarks, triplets within a batch
# ================================================================================================
def pose_from_landmarks(landmarks):
    """(N, 5, 2) landmarks (x, y) in pixels, CelebA order lefteye, righteye, nose, leftmouth,
    rightmouth -> (N, 3) (yaw, pitch, roll) in degrees. A geometric approximation:

    roll  = atan2(dy, dx) of the eye line in image coordinates (y down): positive when the face
            is turned clockwise on screen (the image-right eye lower).
    Undo roll about the eye midpoint and divide by the inter-ocular distance (iod), then
    yaw   = atan(u / NOSE_DEPTH), u = horizontal offset of the nose from the eye midpoint: a nose
            tip NOSE_DEPTH·iod in front of the eye plane, seen by an orthographic camera, moves
            NOSE_DEPTH·iod·sin(yaw) while the iod shrinks by cos(yaw). Positive: nose to image right.
    pitch = atan((FRONTAL_V − v)·PITCH_GAIN), v = (nose − eye line) / (mouth line − eye line)
            vertically; FRONTAL_V is v on a frontal aligned CelebA face. Positive: chin up (the
            nose moves up towards the eyes).
    """
    points = landmarks.float()
    eye_l, eye_r, nose = points[:, 0], points[:, 1], points[:, 2]
    mouth = (points[:, 3] + points[:, 4]) / 2
    eye_mid = (eye_l + eye_r) / 2
    eye_vec = eye_r - eye_l
    roll = torch.atan2(eye_vec[:, 1], eye_vec[:, 0])  # (N,)
    iod = eye_vec.norm(dim=1).clamp_min(1e-6)
    cos, sin = torch.cos(-roll), torch.sin(-roll)

    def derotate(p):  # rotate by −roll about the eye midpoint, in iod units -> (N, 2)
        d = p - eye_mid
        return torch.stack([d[:, 0] * cos - d[:, 1] * sin, d[:, 0] * sin + d[:, 1] * cos], 1) / iod[:, None]

    nose_n, mouth_n = derotate(nose), derotate(mouth)
    yaw = torch.atan(nose_n[:, 0] / NOSE_DEPTH)
    v = nose_n[:, 1] / mouth_n[:, 1].clamp_min(1e-6)
    pitch = torch.atan((FRONTAL_V - v) * PITCH_GAIN)
    return torch.rad2deg(torch.stack([yaw, pitch, roll], 1))


def build_factors(data, args, demo, say=print):
    """Per-image supervision of a split -> dict of tensors on data's device, None where unknown:
    pose (N, 3) degrees, identity (N, 1), expression (N, E), style (N, S) (label keys)."""
    names = data.attr_names
    expr_cols = [names.index(a) for a in args.expression_attrs if a in names]
    style_cols = [k for k, a in enumerate(names) if a not in args.expression_attrs]
    factors = {"pose": None, "identity": None,
               "expression": data.labels[:, expr_cols] if expr_cols else None,
               "style": data.labels[:, style_cols] if style_cols else None}
    if demo:  # the true render parameters
        params = common.load_demo_params(data.root)
        rows = [params[f] for f in data.files]
        factors["pose"] = torch.tensor([[p["yaw"], p["pitch"], p["roll"]] for p in rows])
        factors["identity"] = torch.tensor([[p["identity"]] for p in rows])
    else:
        if data.landmarks is not None:
            factors["pose"] = pose_from_landmarks(data.landmarks.cpu())
        else:
            say(f"warning: {args.data} has no landmarks file (list_landmarks_align_celeba): pose "
                "supervision is off, z_pose is left to the autoencoder")
        if data.identities is not None:
            factors["identity"] = data.identities.cpu()[:, None]
        else:
            say(f"warning: {args.data} has no identity file (identity_CelebA): identity triplets are off")
    for name, kind in (("expression", "expression"), ("style", "style")):
        if factors[name] is None:
            say(f"warning: none of --attrs is a {kind} attribute: {kind} triplets are off")
    device = data.images.device
    return {k: None if v is None else v.to(device) for k, v in factors.items()}


def identity_groups(identities):
    """For partner_indices: (order, start, count) — image indices sorted by identity, and for each
    image the position of its identity's first image in `order` and the identity's image count."""
    ids = identities.view(-1)
    order = torch.argsort(ids, stable=True)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return order, starts[inverse], counts[inverse]


def partner_indices(idx, groups, generator):
    """For each image index, a random OTHER image of the same identity (itself when it has none).
    Draws from `generator` on the CPU, so it is a pure function of the step."""
    order, start, count = groups
    idx = idx.to(order.device)
    r = torch.rand(len(idx), generator=generator).to(order.device)
    c = count[idx]
    pick = order[start[idx] + (r * (c - 1).clamp_min(1)).long().clamp_max(c - 1)]
    last = order[start[idx] + c - 1]
    return torch.where(pick == idx, last, pick)  # never itself if c > 1 (itself is last then)


def sample_triplets(keys, generator):
    """keys (B, K): rows equal = same factor value -> (anchor, positive, negative, valid), each (B,).

    Anchor a = every row; positive = a random other row with the same key; negative = a random
    row with another key; valid = the anchor has both. Drawn from `generator` (no host sync)."""
    same = (keys[:, None, :] == keys[None, :, :]).all(-1)  # (B, B)
    eye = torch.eye(len(keys), dtype=torch.bool, device=keys.device)
    pos_mask, neg_mask = same & ~eye, ~same
    scores = torch.rand(2, len(keys), len(keys), generator=generator).to(keys.device)
    positive = torch.where(pos_mask, scores[0], -1.0).argmax(1)
    negative = torch.where(neg_mask, scores[1], -1.0).argmax(1)
    valid = pos_mask.any(1) & neg_mask.any(1)
    anchor = torch.arange(len(keys), device=keys.device)
    return anchor, positive, negative, valid


# ================================================================================================
# Losses (one function per term)
# ================================================================================================
def loss_rec(img_recon, img_real):
    """Pixel reconstruction ‖x − G(E(x))‖₁, the mean absolute difference."""
    return (img_recon.float() - img_real).abs().mean()


def loss_gan_d(logits_real, logits_fake):
    """Discriminator BCE: softplus(−D(real)) + softplus(D(fake)) = −log σ(D(real)) − log(1 − σ(D(fake)))."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def loss_gan_g(logits_fake):
    """Non-saturating generator (encoder) loss: softplus(−D(fake)) = −log σ(D(fake))."""
    return F.softplus(-logits_fake.float()).mean()


def loss_pose(z_pose, pose_deg, pose_scale):
    """Pose regression ‖z_pose − θ/pose_scale‖², mean over images and the 3 angles."""
    return F.mse_loss(z_pose.float(), pose_deg.float() / pose_scale)


def triplet_loss(z_anchor, z_positive, z_negative, margin, valid=None):
    """mean over valid anchors of max(0, ‖z_a − z_p‖₂ − ‖z_a − z_n‖₂ + margin); 0 without any."""
    d_pos = (z_anchor.float() - z_positive.float()).norm(dim=1)
    d_neg = (z_anchor.float() - z_negative.float()).norm(dim=1)
    hinge = F.relu(d_pos - d_neg + margin)
    if valid is None:
        return hinge.mean()
    valid = valid.float()
    return (hinge * valid).sum() / valid.sum().clamp_min(1)


TRIPLET_WEIGHTS = {"identity": "lambda_id", "expression": "lambda_expr", "style": "lambda_style"}


def factor_losses(z, targets, generator, args):
    """The disentanglement terms on codes z (B, 99) -> {name: loss} (only those with supervision):
    "pose" regression, and "trip_identity", "trip_expression", "trip_style" on their sub-vectors."""
    parts = split_code(z.float(), code_sizes(dataclasses.asdict(args)))
    losses = {}
    if targets["pose"] is not None:
        k = min(3, args.pose_dim)  # extra pose dimensions (if any) stay unsupervised
        losses["pose"] = loss_pose(parts["pose"][:, :k], targets["pose"][:, :k], args.pose_scale)
    for name in TRIPLET_WEIGHTS:
        if targets[name] is not None:
            anchor, positive, negative, valid = sample_triplets(targets[name], generator)
            sub = parts[name]
            losses[f"trip_{name}"] = triplet_loss(sub[anchor], sub[positive], sub[negative],
                                                  args.margin, valid)
    return losses


def weighted_factor_sum(losses, args):
    """Σ λ_f · L_f over the factor losses present."""
    weights = {"pose": args.lambda_pose, **{f"trip_{k}": getattr(args, v)
                                            for k, v in TRIPLET_WEIGHTS.items()}}
    return sum(weights[k] * v for k, v in losses.items())


# ================================================================================================
# Training steps
# ================================================================================================
@dataclass
class Nets:
    """The plain modules (saved, frozen, toggled) and what the steps call (`*_run`: the same
    modules, or their torch.compile wrappers)."""
    e: nn.Module
    g: nn.Module
    dz: nn.Module
    dx: nn.Module
    e_run: nn.Module
    g_run: nn.Module
    dz_run: nn.Module
    dx_run: nn.Module


def set_requires_grad(modules, flag):
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(flag)


def d_step(nets, opt_d, img_real, z_prior, amp_ctx):
    """One update of D_z and D_x (L_D) -> dict of detached scalar tensors (no host sync)."""
    set_requires_grad([nets.dz, nets.dx], True)
    with torch.no_grad(), amp_ctx():
        z_code = nets.e_run(img_real).float()
        img_fake = nets.g_run(torch.cat([z_code, z_prior])).float()  # recon ++ prior decodes
    with amp_ctx():
        logits_z = nets.dz_run(torch.cat([z_prior, z_code]))  # (2B,): prior is "real"
        d_z = loss_gan_d(logits_z[:len(z_prior)], logits_z[len(z_prior):])
        logits_x = nets.dx_run(torch.cat([img_real, img_fake]))  # (3B,)
        d_x = loss_gan_d(logits_x[:len(img_real)], logits_x[len(img_real):])  # fakes: ½ each kind
        loss = d_z + d_x
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return {"d_z": d_z.detach(), "d_x": d_x.detach()}


def ae_step(nets, opt_ae, img_real, z_prior, targets, generator, args, amp_ctx):
    """One update of what the stage trains with L_AE (+ L_fac after 'ae'; in 'disentangle' only
    the code head, with reconstruction and D_z terms) -> dict of detached scalar tensors."""
    set_requires_grad([nets.dz, nets.dx], False)  # their gradients would be thrown away
    stats = {}
    with amp_ctx():
        z_code = nets.e_run(img_real).float()
        img_recon = nets.g_run(z_code)
        rec = loss_rec(img_recon, img_real)
        adv_z = loss_gan_g(nets.dz_run(z_code))
        loss = args.lambda_rec * rec + args.lambda_z * adv_z
        stats.update(rec=rec.detach(), adv_z=adv_z.detach())
        if args.stage != "disentangle":
            img_prior = nets.g_run(z_prior)
            adv_x = loss_gan_g(nets.dx_run(torch.cat([img_recon, img_prior])))
            loss = loss + args.lambda_x * adv_x
            stats["adv_x"] = adv_x.detach()
        if args.stage != "ae":
            losses = factor_losses(z_code, targets, generator, args)
            if losses:
                loss = loss + weighted_factor_sum(losses, args)
            stats.update({k: v.detach() for k, v in losses.items()})
    opt_ae.zero_grad(set_to_none=True)
    loss.backward()
    opt_ae.step()
    stats["ae_loss"] = loss.detach()
    return stats


def step_generator(seed, step, stage):
    """A CPU torch.Generator seeded from (seed, step, stage): the prior samples, identity partners
    and triplets of a step are a pure function of them, so a resumed run draws exactly what an
    uninterrupted one would. (CPU: the same numbers on every device.)"""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + STAGES.index(stage))


def make_batch(data, factors, groups, step, args, device, generator, channels_last=False):
    """Images (B, 3, H, W) in [-1, 1] and their supervision for step `step`. With identity groups
    (stages after 'ae'), half the batch is common.batch_indices' images and half a same-identity
    partner of each; otherwise all B come from batch_indices."""
    if groups is not None:
        first = common.batch_indices(len(data.images), step, args.batch_size // 2, args.seed)
        idx = torch.cat([first, partner_indices(first, groups, generator).cpu()])
    else:
        idx = common.batch_indices(len(data.images), step, args.batch_size, args.seed)
    images = common.to_float(data.images[idx.to(data.images.device)].to(device))
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = {k: None if v is None else v[idx.to(v.device)].to(device) for k, v in factors.items()}
    return images, targets


def train_step(nets, optimizers, step, img_real, targets, args, amp_ctx, generator):
    """One step of the stage: a D update (not in 'disentangle'), then an AE update."""
    code_dim = sum(code_sizes(dataclasses.asdict(args)).values())
    z_prior = torch.randn(len(img_real), code_dim, generator=generator).to(img_real.device)
    stats = {}
    if args.stage != "disentangle":
        stats.update(d_step(nets, optimizers["opt_d"], img_real, z_prior, amp_ctx))
    stats.update(ae_step(nets, optimizers["opt_ae"], img_real, z_prior, targets, generator, args,
                         amp_ctx))
    return stats


def configure_stage(nets, stage, lr):
    """requires_grad, train/eval modes and optimizers for a stage -> {"opt_ae", ["opt_d"]}.
    disentangle: only E.head trains; E.trunk and G in eval mode (BatchNorm statistics frozen)."""
    betas = (0.5, 0.999)
    modules = [nets.e, nets.g, nets.dz, nets.dx]
    set_requires_grad(modules, True)
    for module in modules:
        module.train()
    if stage == "disentangle":
        set_requires_grad([nets.e.trunk, nets.g, nets.dz, nets.dx], False)
        nets.e.trunk.eval()
        nets.g.eval()
        return {"opt_ae": torch.optim.Adam(nets.e.head.parameters(), lr=lr, betas=betas)}
    return {"opt_ae": torch.optim.Adam([*nets.e.parameters(), *nets.g.parameters()], lr=lr, betas=betas),
            "opt_d": torch.optim.Adam([*nets.dz.parameters(), *nets.dx.parameters()], lr=lr, betas=betas)}


# ================================================================================================
# Sampling and evaluation
# ================================================================================================
def swap_codes(z_a, z_b, factor, sizes):
    """A's code with the sub-vector `factor` taken from B -> (B, 99)."""
    parts = split_code(z_a, sizes)
    parts[factor] = split_code(z_b, sizes)[factor]
    return join_code(parts)


@torch.no_grad()
def sample_grid(e, g, images, z_prior, sizes):
    """(R, 8, 3, H, W): per face A its input, reconstruction, partner B (the next row), A with B's
    pose / identity / style / expression, and a decode of a prior sample."""
    z = e(images).float()
    partner = images.roll(-1, 0)
    z_b = z.roll(-1, 0)
    columns = [images, g(z), partner] + [g(swap_codes(z, z_b, f, sizes)) for f in FACTORS]
    columns.append(g(z_prior))
    return torch.stack([c.float() for c in columns], 1)


SAMPLE_LABELS = ["input A", "recon", "B", *[f"B's {f}" for f in FACTORS], "prior"]


@torch.no_grad()
def swap_grid(e, g, img_a, img_b, sizes):
    """Rows: A, B, recon A, then A with B's pose / identity / style / expression; columns: pairs.
    -> (7, P, 3, H, W)"""
    z_a, z_b = e(img_a).float(), e(img_b).float()
    rows = [img_a, img_b, g(z_a)] + [g(swap_codes(z_a, z_b, f, sizes)) for f in FACTORS]
    return torch.stack([r.float() for r in rows], 0)


SWAP_ROWS = ["A", "B", "recon A", *[f"A + B's {f}" for f in FACTORS]]


@torch.no_grad()
def interpolation_frames(g, sizes, frames, seed=0, device="cpu"):
    """For each factor: decodes of z(t) = z0 with only that sub-vector moved linearly from z0's to
    z1's (z0, z1 ~ N(0, I)), t = 0..1 -> (len(FACTORS), frames, 3, H, W)."""
    gen = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(2, sum(sizes.values()), generator=gen).to(device).chunk(2)
    rows = []
    for factor in FACTORS:
        t = torch.linspace(0, 1, frames, device=device)[:, None]
        target = swap_codes(z0, z1, factor, sizes)
        rows.append(g(z0 * (1 - t) + target * t).float())  # only that factor's entries differ
    return torch.stack(rows)


def nearest_neighbour_accuracy(codes, keys, metric="cosine"):
    """Leave-one-out 1-NN retrieval: the fraction of images whose nearest OTHER image (by `metric`
    on `codes` (N, d)) has the same key (keys (N, K), rows equal = same label). Only images whose
    label occurs at least twice are queries (CelebA's test split has many one-image identities);
    all images are candidates. NaN when no image qualifies."""
    codes = codes.float()
    if metric == "cosine":
        unit = F.normalize(codes, dim=1)
        similarity = unit @ unit.T
    elif metric == "l2":
        similarity = -torch.cdist(codes, codes)
    else:
        raise InputError(f"--metric {metric!r}: expected 'cosine' or 'l2'")
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.argmax(1)
    same = (keys[:, None, :] == keys[None, :, :]).all(-1)
    same.fill_diagonal_(False)
    has_match = same.any(1)  # a query with no other image of its label cannot be answered
    if not has_match.any():
        return float("nan")
    return (keys[nearest] == keys).all(1)[has_match].float().mean().item()


def retrieval_matrix(codes, labels, metric="cosine"):
    """codes {sub-vector: (N, d)}, labels {kind: (N, K) keys} -> {kind: {sub-vector: accuracy}}.
    Good disentanglement: high on the diagonal (identity by z_identity, ...), low elsewhere."""
    return {kind: {sub: nearest_neighbour_accuracy(z, key, metric) for sub, z in codes.items()}
            for kind, key in labels.items()}


def format_matrix(matrix):
    """The retrieval matrix as text: rows label kinds, columns sub-vectors."""
    subs = list(next(iter(matrix.values())))
    lines = ["nearest-neighbour accuracy  " + "".join(f"{'z_' + s:>13}" for s in subs)]
    lines += [f"{kind + ' labels':<28}" + "".join(f"{row[s]:13.3f}" for s in subs)
              for kind, row in matrix.items()]
    return "\n".join(lines)


def psnr(img_a, img_b):
    """Mean per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2: 10·log10(4 / MSE))."""
    mse = (img_a.float() - img_b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4 / mse)).mean().item()


# ================================================================================================
# Checkpoint, loading a trained model, the evaluation contract
# ================================================================================================
def checkpoint_state(nets, optimizers, step, args, attr_names):
    """The full training state of a stage as one dict (weights_only-loadable)."""
    return {"encoder": nets.e.state_dict(), "decoder": nets.g.state_dict(),
            "d_z": nets.dz.state_dict(), "d_x": nets.dx.state_dict(),
            **{name: opt.state_dict() for name, opt in optimizers.items()},
            "step": step, "stage": args.stage, "config": dataclasses.asdict(args),
            "attr_names": list(attr_names), "rng": rng_state()}


def load_weights(nets, state):
    nets.e.load_state_dict(state["encoder"])
    nets.g.load_state_dict(state["decoder"])
    nets.dz.load_state_dict(state["d_z"])
    nets.dx.load_state_dict(state["d_x"])


def load_trained(ckpt_path, device="cpu"):
    """(config, attr_names, encoder, decoder) from a checkpoint, in eval mode."""
    state = load_checkpoint(ckpt_path)
    config = state["config"]
    e, g, _, _ = build_models(config)
    e.load_state_dict(state["encoder"])
    g.load_state_dict(state["decoder"])
    return config, state["attr_names"], e.to(device).eval(), g.to(device).eval()


def load_for_eval(ckpt_path, device="cpu"):
    """The evaluation contract (see the header): reconstruct, encode, generate; edit = None.
    Images float [-1, 1] (B, 3, H, W); results on the CPU."""
    device = torch.device(device)
    config, attr_names, e, g = load_trained(ckpt_path, device)
    sizes = code_sizes(config)

    @torch.no_grad()
    def reconstruct(images, batch_size=256):
        return torch.cat([g(e(x.to(device))).float().cpu() for x in images.split(batch_size)])

    @torch.no_grad()
    def encode(images, batch_size=256):
        z = torch.cat([e(x.to(device)).float().cpu() for x in images.split(batch_size)])
        return split_code(z, sizes)

    @torch.no_grad()
    def generate(attrs, seed=0):
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(len(attrs), sum(sizes.values()), generator=gen)
        return g(z.to(device)).float().cpu()

    # conditional=False: generate() ignores the attributes (faces from the prior), so an
    # evaluator must not score its outputs against them.
    return types.SimpleNamespace(attr_names=list(attr_names), img_size=config["img_size"],
                                 crop=config["crop"], edit=None, reconstruct=reconstruct,
                                 generate=generate, encode=encode, conditional=False)


def load_split(data, config, attr_names, split):
    """A split of the checkpoint's dataset at its size; an empty split falls back to 'val', then
    'train' (tiny demo sets)."""
    for name in (split, "val", "train"):
        loaded = common.load_celeba(data, attr_names, name, config["img_size"], config["crop"],
                                    verbose=False)
        if len(loaded.images) >= 2:
            return loaded
    raise InputError(f"{data}: fewer than 2 images in the {split!r} split")


# ================================================================================================
# Sub-commands: swap, sample, eval
# ================================================================================================
def swap(args):
    """Write the factor-swap grid -> its path."""
    config, attr_names, e, g = load_trained(args.ckpt, args.device)
    data = load_split(args.data or config["data"], config, attr_names, args.split)
    pairs = min(args.pairs, len(data.images) // 2)
    images = common.to_float(data.images[:2 * pairs]).to(args.device)
    grid = swap_grid(e, g, images[:pairs], images[pairs:], code_sizes(config))
    path = Path(args.out or Path(args.ckpt).parent / "swap.png")
    common.save_grid(grid.cpu(), path, row_labels=SWAP_ROWS,
                     col_labels=[f"pair {k}" for k in range(pairs)],
                     title="MAD factor swap: A's code with one sub-vector from B")
    print(f"wrote {path}")
    return path


def sample(args):
    """Write random.png (prior decodes), interpolate.png (rows: factors) and one GIF per factor
    -> the output folder."""
    config, _, _, g = load_trained(args.ckpt, args.device)
    sizes = code_sizes(config)
    out = Path(args.out or Path(args.ckpt).parent)
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.count, sum(sizes.values()), generator=gen).to(args.device)
    with torch.no_grad():
        faces = g(z).float().cpu()
    cols = min(8, args.count)
    rows = math.ceil(args.count / cols)
    faces = torch.cat([faces, -torch.ones(rows * cols - args.count, *faces.shape[1:])])
    common.save_grid(faces.view(rows, cols, *faces.shape[1:]), out / "random.png",
                     title="MAD: decodes of z ~ N(0, I)")
    frames = interpolation_frames(g, sizes, args.frames, args.seed, args.device).cpu()
    common.save_grid(frames, out / "interpolate.png", row_labels=[f"z_{f}" for f in FACTORS],
                     col_labels=[f"t={t:.2f}" for t in torch.linspace(0, 1, args.frames).tolist()],
                     title="one sub-vector interpolated, the rest fixed")
    for factor, row in zip(FACTORS, frames):  # there and back, without repeating the ends
        common.save_gif(torch.cat([row, row.flip(0)[1:-1]]), out / f"interpolate_{factor}.gif", fps=8,
                        scale=max(1, 128 // row.shape[-1]))
    print(f"wrote {out / 'random.png'}, {out / 'interpolate.png'}, interpolate_<factor>.gif")
    return out


def evaluate(args):
    """Print the retrieval matrix and the reconstruction PSNR -> {"retrieval": {kind: {sub: acc}},
    "psnr": dB, "images": N, "split": name}."""
    config, attr_names, e, g = load_trained(args.ckpt, args.device)
    data = load_split(args.data or config["data"], config, attr_names, args.split)
    n = min(args.max_images, len(data.images))
    fake_args = types.SimpleNamespace(**dict(config, data=args.data or config["data"]))
    factors = build_factors(data, fake_args, is_demo(fake_args.data), say=lambda *a, **k: None)
    codes, recon_psnr = [], []
    with torch.no_grad():
        for chunk in common.to_float(data.images[:n]).split(256):
            chunk = chunk.to(args.device)
            z = e(chunk).float()
            codes.append(z.cpu())
            recon_psnr.append(psnr(g(z), chunk) * len(chunk))
    parts = split_code(torch.cat(codes), code_sizes(config))
    labels = {kind: factors[kind][:n].cpu() for kind in ("identity", "expression", "style")
              if factors[kind] is not None}
    if not labels:
        raise InputError("the data have neither identities nor expression/style labels to retrieve")
    matrix = retrieval_matrix(parts, labels, args.metric)
    result = {"retrieval": matrix, "psnr": sum(recon_psnr) / n, "images": n, "split": data.split}
    print(f"{n} images of the {data.split!r} split, leave-one-out, {args.metric}")
    print(format_matrix(matrix))
    print(f"reconstruction PSNR {result['psnr']:.2f} dB")
    return result


# ================================================================================================
# main: training
# ================================================================================================
# Copied from attgan.py
def is_demo(data):
    return data == "demo" or data.startswith("demo:")


def default_attrs(data):
    """Smiling, Mouth_Slightly_Open and STYLE_ATTRS (all drawn by the demo set; all in CelebA)."""
    return EXPRESSION_ATTRS + STYLE_ATTRS


# Copied from attgan.py
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


def make_nets(e, g, dz, dx, compile_):
    run = (lambda m: torch.compile(m)) if compile_ else (lambda m: m)
    return Nets(e=e, g=g, dz=dz, dx=dx, e_run=run(e), g_run=run(g), dz_run=run(dz), dx_run=run(dx))


def train(args):
    device = pick_device(args.device)
    args = apply_presets(args, device)
    config = dataclasses.asdict(args)
    check_config(config)
    out = Path(args.out) / args.stage
    # Read (and vet) the checkpoints before loading any data: a wrong setting fails at once.
    state = load_checkpoint(out / "ckpt.pt", config, RESUME_MUST_MATCH) if args.resume else None
    init_state, init_path = None, args.init
    if state is None and (init_path or args.stage in PREVIOUS_STAGE):
        init_path = init_path or Path(args.out) / PREVIOUS_STAGE[args.stage] / "ckpt.pt"
        init_state = load_checkpoint(init_path, config, INIT_MUST_MATCH)
    torch.manual_seed(args.seed)

    size, crop = args.img_size, args.crop
    data = common.load_celeba(args.data, args.attrs, "train", size, crop)
    attr_names = data.attr_names
    data = common.to_device(data, device)
    factors = build_factors(data, args, is_demo(args.data))
    groups = None
    if args.stage != "ae" and factors["identity"] is not None:
        groups = identity_groups(factors["identity"].cpu())
    val = common.load_celeba(args.data, attr_names, "val", size, crop, verbose=False)
    if len(val.images) < 2:
        val = common.load_celeba(args.data, attr_names, "train", size, crop, verbose=False)
    sample_images = common.to_float(val.images[:8]).to(device)
    sizes = code_sizes(config)
    sample_prior = torch.randn(len(sample_images), sum(sizes.values()),
                               generator=torch.Generator().manual_seed(args.seed)).to(device)

    e, g, dz, dx = (m.to(device) for m in build_models(config))
    channels_last = args.channels_last and device.type == "cuda"
    if channels_last:
        for m in (e, g, dx):
            m.to(memory_format=torch.channels_last)
    nets = make_nets(e, g, dz, dx, args.compile)
    optimizers = configure_stage(nets, args.stage, args.lr)
    start_step, metrics_path = 0, out / "metrics.jsonl"
    if state is not None:
        load_weights(nets, state)
        for name, opt in optimizers.items():
            opt.load_state_dict(state[name])
        set_rng_state(state["rng"])
        start_step = state["step"]
        print(f"resumed stage {args.stage} from {out / 'ckpt.pt'} at step {start_step}")
    elif init_state is not None:
        load_weights(nets, init_state)
        print(f"stage {args.stage}: starting from {init_path} (stage {init_state['stage']}, "
              f"step {init_state['step']})")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    if state is not None:
        trim_jsonl(metrics_path, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    amp_ctx = lambda: autocast(device, args.amp)  # noqa: E731
    trainable = sum(p.numel() for opt in optimizers.values() for group in opt.param_groups
                    for p in group["params"])
    print(f"MAD stage {args.stage}: {size} px, code {'+'.join(map(str, sizes.values()))} = "
          f"{sum(sizes.values())}; E {sum(p.numel() for p in e.parameters()) / 1e6:.2f} M, "
          f"G {sum(p.numel() for p in g.parameters()) / 1e6:.2f} M, "
          f"D_z {sum(p.numel() for p in dz.parameters()) / 1e6:.2f} M, "
          f"D_x {sum(p.numel() for p in dx.parameters()) / 1e6:.2f} M parameters "
          f"({trainable / 1e6:.2f} M trained in this stage); {len(data.images)} training images; "
          f"device {device}; {'smoke' if args.smoke else args.preset} configuration")

    def save_samples(step):
        modes = [m.training for m in (e, g)]
        e.eval(), g.eval()
        with amp_ctx():
            grid = sample_grid(e, g, sample_images, sample_prior, sizes)
        for m, mode in zip((e, g), modes):
            m.train(mode)
        if args.stage == "disentangle":  # keep the frozen trunk's BatchNorm in eval mode
            e.trunk.eval()
        common.save_grid(grid, out / "samples" / f"step_{step:06d}.png", col_labels=SAMPLE_LABELS,
                         title=f"MAD {args.stage}, step {step}")

    totals, clock, interval_start = {}, time.time(), start_step
    for step in range(start_step, args.steps):
        rng = step_generator(args.seed, step, args.stage)
        img_real, targets = make_batch(data, factors, groups, step, args, device, rng, channels_last)
        stats = train_step(nets, optimizers, step, img_real, targets, args, amp_ctx, rng)
        for key, value in stats.items():  # detached tensors: no host sync until the log step
            totals[key] = totals.get(key, 0) + value
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            keys = sorted(totals)
            means = (torch.stack([totals[k] for k in keys]).float() / (done - interval_start)).tolist()
            elapsed = time.time() - clock
            record = {"step": done, "img_per_s": (done - interval_start) * args.batch_size / elapsed,
                      **dict(zip(keys, means))}
            eta = (args.steps - done) * elapsed / (done - interval_start)
            append_jsonl(metrics_path, record)
            losses = "  ".join(f"{k} {record[k]:.3f}" for k in keys)
            print(f"step {done}/{args.steps} [{args.stage}]  {losses}  "
                  f"{record['img_per_s']:.0f} img/s  ETA {format_seconds(eta)}", flush=True)
            totals, interval_start = {}, done
        saving = time.time()
        if done % args.sample_every == 0 or done == args.steps:
            save_samples(done)
        if done % args.ckpt_every == 0 or done == args.steps:
            save_checkpoint(out / "ckpt.pt", checkpoint_state(nets, optimizers, done, args, attr_names))
        if not totals:  # just logged: time the next interval from here
            clock = time.time()
        else:  # img/s counts training only, not the time spent writing samples and checkpoints
            clock += time.time() - saving
    if metrics_path.exists():
        records = common.read_jsonl(metrics_path)
        keys = [k for k in ("ae_loss", "rec", "adv_z", "adv_x", "d_z", "d_x", "pose",
                            "trip_identity", "trip_expression", "trip_style", "img_per_s")
                if any(k in r for r in records)]
        common.plot_metrics(metrics_path, out / "losses.png", keys=keys)
        print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png")
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "swap", "sample", "eval") else "train"
    if command == "swap":
        return swap(parse_dataclass(SwapArgs, argv, "mad.py swap"))
    if command == "sample":
        return sample(parse_dataclass(SampleArgs, argv, "mad.py sample"))
    if command == "eval":
        return evaluate(parse_dataclass(EvalArgs, argv, "mad.py eval"))
    return train(parse_dataclass(Args, argv, "mad.py [train]"))


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # bad input: one clear line, no traceback
        sys.exit(f"error: {err}")
