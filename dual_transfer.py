"""Dual Training for face attribute transfer: E encodes a face; Dec redraws it from E's features and
attributes a; C, trained first and left out of stage 2's optimiser (main.py 4532938), tells whether a
drawn face carries a. Two photos x1, x2 of one person should give one code, and Dec(E(x2), a1) should
show x1's attributes. Images: [0, 1].

Reimplements LaughingGo/change_face ("Change photograph of a person with attributes like wearing
glasses or not", README.md), read at: main.py 4532938 and c3c68d69, model.py c3c68d69 and 84e46c8,
model_loss.py, opts.py and main_without_classify.py 84e46c8, Train_Classifier.py 416dbc8, celebA.py
4532938. It ran: Visualization.ipynb loads a trained checkpoint (epoch 31). The first main.py
(0202992: 64 px, another model) cannot run: it calls names it never defines (img1, preson_pre).

Objective (main.py; alpha, beta from opts.py; each term from model_loss.py)
    z = E(x) = [f1, ..., fn]    every encoder layer's output; fn is the bottleneck code
    L_lat   = L1(fn(x1), fn(x2))                                      diff_loss
    L_self  = MSE+L1(Dec(z1, a1), x1) + MSE+L1(Dec(z2, a2), x2)       recon_loss (self-recon.)
    L_cls   = BCE(C(Dec(z2, a1)), a1) + BCE(C(Dec(z1, a2)), a2)       classify_loss, transfers
    L_cross = MSE+L1(Dec(z2, a1), x1) + MSE+L1(Dec(z1, a2), x2)       main_without_classify.py
    L = λ_lat·L_lat + λ_self·L_self + λ_cls·L_cls + λ_cross·L_cross    (main.py: 1, 1, β, 0)
Stage 1 (Train_Classifier.py): C alone on both photos of each pair, BCE(C(x1), a1) + BCE(C(x2), a2);
main.py 4532938 loads it, as here (c3c68d69 trained C with E and Dec, L_cls on the self-reconstructions).
Length: opts.py's 100 epochs per stage, as steps (--steps; preprocess.py lists each pair both ways).
Code: x1, x2, a1, a2, z1, Dec(z2, a1) = img_1, img_2, attr_1, attr_2, feats_1, img_21.

Shapes (model.py: 128 px from the full frame, no crop, as main.py; 5 layers, dim 64; A attributes)
    E:   x (B, 3, 128, 128) -> f1 (B, 64, 64, 64) -> ... -> f5 (B, 1024, 4, 4)  conv4x4 s2, BN, ReLU
    Dec: [f5, a tiled (B, A, 4, 4)] -> (B, 512, 8, 8) + f4 -> (B, 256, 16, 16) [+ f3] -> ...
         -> (B, 3, 128, 128); deconv4x4 s2, BN, ReLU; last deconv, BN, sigmoid. Shortcuts ADD.
    C:   five conv4x4 s2 + BN + ReLU (64 ... 1024) -> FC 16384 -> 1024 -> FC -> A   (27.9 M)

Deviations, and why
* Stage 2 keeps C in eval mode (main.py leaves it in train mode: its BatchNorm then uses the drawn
  faces' statistics). C outputs logits with BCE-with-logits (the original: sigmoid + BCELoss).
* Pairs: two photos of one person whose target attributes differ, in both stages, all people, as
  preprocess.py 4532938 (persons 1-999, first attribute; as stored, an indentation error stops it).
  The one pair file published, data/select_data.json (0202992: every ordered pair of persons 1-99),
  indexes an unpublished annotation.json. Stage 1 weights present labels by neg/pos among the pairs'
  photos, clamped to [1, 50] (ours, for rare attributes; one attribute's pairs are balanced: 1).
* Split: CelebA's own, so validation pairs are other people. main.py shuffles the pairs, 80 % for
  training and 20 % for validation: the same people in both (Train_Classifier.py: first 400,000).
* eval.json's PSNR: peak 1, the range, as benchmarks/ (main.py's psnr takes the drawn face's maximum,
  20·log10(max) - 10·log10(MSE), and logs the sum of the x1 and x2 values).
* RGB (celebA.py reads BGR with cv2: a channel order, no effect on learning).
* cpu-demo preset (CPU + demo data): smaller networks and Adam 5e-4 (the original's 1e-5 needs days).

    python dual_transfer.py                                 # demo set, both stages (minutes, CPU)
    python dual_transfer.py --data ./celeba --out runs/dual # the original's settings
    python dual_transfer.py edit --ckpt runs/dual/ckpt.pt --image me.jpg --set Eyeglasses=1
"""
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
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
from common import InputError

SCRIPT = "dual_transfer.py"


# ======== Config ========
@dataclasses.dataclass
class Args:
    """Dual Training: stage 1 (the classifier) when needed, then stage 2. A photo: `dual_transfer.py edit --help`."""
    attrs: list = dataclasses.field(default_factory=lambda: ["Eyeglasses"])  # target attributes (README.md: glasses)
    img_size: int = 128  # image side in pixels (main.py: Resize((128, 128))), a multiple of 2^n_layers
    crop: int = 0  # centre square crop in official 178x218 pixels; 0 = the full frame, as the original
    n_layers: int = 5  # stride-2 layers of E, Dec and C (model.py: 5)
    dim: int = 64  # channels of E's first layer, doubling per layer (model.py: 64 ... 1024)
    shortcut_layers: int = 1  # Dec layers adding E's same-size map (model.py, main.py: 1; main_without_classify.py: 3)
    cls_dim: int = 64  # channels of C's first conv layer, doubling per layer (model.py: 64 ... 1024)
    cls_fc: int = 1024  # width of C's hidden fully connected layer (model.py: 1024)
    lambda_lat: float = 1.0  # weight of L_lat, the L1 distance of the two codes (main.py: 1)
    lambda_self: float = 1.0  # weight of L_self, the self-reconstruction (main.py: alpha, opts.py 1)
    lambda_cls: float = 0.1  # weight of L_cls on the transfers (main.py: beta, opts.py 0.1)
    lambda_cross: float = 0.0  # weight of L_cross, Dec(E(x2), a1) vs x1 (main_without_classify.py: 1; main.py: 0)
    lr: float = 1e-5  # Adam learning rate of E and Dec (main.py 4532938, opts.py: 1e-5)
    weight_decay: float = 1e-3  # Adam weight decay of both stages (opts.py: 1e-3)
    batch_size: int = 128  # pairs per step, both stages (opts.py c3c68d69, 84e46c8: 128; Visualization.ipynb: 64)
    steps: int = 94000  # stage-2 steps (opts.py: 100 epochs; ≈ 100 passes of 128 over CelebA's 120,143 glasses pairs)
    cls_steps: int = 94000  # stage-1 steps, as many (Train_Classifier.py: 100 epochs of the same pairs)
    cls_lr: float = 1e-5  # Adam learning rate of stage 1 (Train_Classifier.py: opts.py's 1e-5)
    data: str = "demo"  # a CelebA folder with identity_CelebA.txt (any layout common.py reads), 'demo' or 'demo:N'
    out: str = "runs/dual_transfer"  # run folder: classifier.pt, ckpt.pt, metrics.jsonl, eval.json, samples/
    classifier: str = None  # stage-1 file (default <out>/classifier.pt; trained when absent or trained otherwise)
    seed: int = 0  # seed of the weights (the order of the pairs is a function of seed and step)
    device: str = "auto"  # 'auto' (cuda, mps, cpu), 'cuda', 'cpu', ...
    amp: bool = True  # bf16 autocast on CUDA (the original is fp32; ignored elsewhere)
    compile: bool = False  # torch.compile E, Dec and C for the training steps (CUDA)
    preset: str = "auto"  # 'auto' (cpu-demo on a CPU with the demo set, else default), 'default', 'cpu-demo'
    log_every: int = 100  # print a line and append to metrics.jsonl every this many steps
    sample_every: int = 2000  # write samples/step_XXXXXX.png every this many steps, and at the end
    ckpt_every: int = 2000  # write ckpt.pt every this many steps, and at the end
    resume: bool = False  # continue the run in --out exactly where its checkpoint stopped
    allow_rare_attrs: bool = False  # train on attributes present on < 1 % or > 99 % of the training images
    smoke: bool = False  # a tiny end-to-end run of both stages on demo:16 (seconds on a CPU); tests use it


POSITIVE = ("img_size", "n_layers", "dim", "cls_dim", "cls_fc", "lr", "cls_lr", "batch_size", "steps", "cls_steps",
            "log_every", "sample_every", "ckpt_every")  # > 0; every other number >= 0
PRESETS = {  # applied to the fields the user did not type
    "smoke": dict(data="demo:16", img_size=32, n_layers=3, dim=8, cls_dim=8, cls_fc=16, lr=1e-3, cls_lr=1e-3,
                  batch_size=8, steps=4, cls_steps=4, log_every=2, sample_every=2, ckpt_every=2),
    "cpu-demo": dict(img_size=64, n_layers=4, dim=16, cls_dim=16, cls_fc=128, batch_size=16, lr=5e-4,
                     cls_lr=5e-4, steps=1200, cls_steps=300, log_every=50, sample_every=400, ckpt_every=400),
}
RESUME_MUST_MATCH = ("data", "attrs", "img_size", "crop", "n_layers", "dim", "shortcut_layers", "cls_dim", "cls_fc",
                     "lambda_lat", "lambda_self", "lambda_cls", "lambda_cross", "lr", "weight_decay", "batch_size",
                     "seed")
CLASSIFIER_KEY = ("data", "attrs", "img_size", "crop", "n_layers", "cls_dim", "cls_fc", "cls_steps", "cls_lr",
                  "weight_decay", "batch_size", "seed")


# ======== Model (model.py) ========
def conv_block(in_ch, out_ch, transpose=False):
    """(de)conv 4x4 stride 2 (halves or doubles H and W), BatchNorm, ReLU; with bias, as model.py."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    return nn.Sequential(conv(in_ch, out_ch, 4, 2, 1), nn.BatchNorm2d(out_ch), nn.ReLU())


def init_weights(module):
    """model.py's _weight_init: Kaiming-normal (fan_out) convs, Xavier-normal linears, BN 1 and 0.
    Its isinstance(m, nn.Conv2d) test misses the decoder's ConvTranspose2d: those keep PyTorch's."""
    for m in module.modules():
        if type(m) is nn.Conv2d:
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """E: x (B, 3, H, W) in [0, 1] -> every layer's output [f1, ..., fn]; f_k (B, dim·2^(k-1),
    H / 2^k, W / 2^k). The decoder's shortcuts read the earlier ones, L_lat the last."""

    def __init__(self, n_layers=5, dim=64):
        super().__init__()
        widths = [dim * 2 ** k for k in range(n_layers)]  # 64, 128, 256, 512, 1024
        self.blocks = nn.ModuleList(conv_block(c_in, c_out) for c_in, c_out in zip([3] + widths, widths))
        init_weights(self)

    def forward(self, images):
        feats = [images]
        for block in self.blocks:
            feats.append(block(feats[-1]))
        return feats[1:]  # [(B, 64, 64, 64), ..., (B, 1024, 4, 4)] at 128 px


class Decoder(nn.Module):
    """Dec: (E's features, a (B, A) 0/1) -> image (B, 3, H, W) in [0, 1]. a is tiled over the
    bottleneck; after block i < shortcut_layers, E's feature map of the same size is ADDED. A pitfall
    of the original, kept: L_lat can reach 0 with a constant fn while the shortcuts carry the face."""

    def __init__(self, num_attrs, n_layers=5, dim=64, shortcut_layers=1):
        super().__init__()
        widths = [dim * 2 ** k for k in range(n_layers)][::-1]  # 1024, 512, 256, 128, 64
        self.shortcut_layers = shortcut_layers
        self.blocks = nn.ModuleList(conv_block(c_in, c_out, transpose=True)
                                    for c_in, c_out in zip([widths[0] + num_attrs] + widths[1:-1], widths[1:]))
        self.to_image = nn.Sequential(nn.ConvTranspose2d(widths[-1], 3, 4, 2, 1), nn.BatchNorm2d(3), nn.Sigmoid())
        init_weights(self)

    def forward(self, feats, attrs):
        tiled = attrs[:, :, None, None].expand(-1, -1, *feats[-1].shape[-2:])  # a at every position
        hidden = torch.cat([feats[-1], tiled], 1)  # (B, 1024 + A, 4, 4)
        for i, block in enumerate(self.blocks):
            hidden = block(hidden)  # (B, 512, 8, 8), (B, 256, 16, 16), ...
            if i < self.shortcut_layers:
                hidden = hidden + feats[-2 - i]  # U-Net shortcut: E's map of the same shape
        return self.to_image(hidden)  # (B, 3, 128, 128)


class Classifier(nn.Module):
    """C: x (B, 3, H, W) in [0, 1] -> attribute logits (B, A). Five conv blocks, FC, FC (no
    non-linearity between the two FCs, as model.py)."""

    def __init__(self, num_attrs, img_size=128, n_layers=5, dim=64, fc=1024):
        super().__init__()
        widths = [dim * 2 ** k for k in range(n_layers)]
        self.blocks = nn.Sequential(*[conv_block(c_in, c_out) for c_in, c_out in zip([3] + widths, widths)],
                                    nn.Flatten())
        side = img_size // 2 ** n_layers
        self.fc1 = nn.Linear(widths[-1] * side * side, fc)  # 16384 -> 1024 at 128 px
        self.fc2 = nn.Linear(fc, num_attrs)
        init_weights(self)

    def forward(self, images):
        return self.fc2(self.fc1(self.blocks(images)))


def build_models(config, num_attrs):
    """(Encoder, Decoder, Classifier) from a config dict (Args as a dict, or a checkpoint's)."""
    return (Encoder(config["n_layers"], config["dim"]),
            Decoder(num_attrs, config["n_layers"], config["dim"], config["shortcut_layers"]),
            Classifier(num_attrs, config["img_size"], config["n_layers"], config["cls_dim"], config["cls_fc"]))


def to_unit(images):
    """[-1, 1] (common.py's convention) -> [0, 1] (the original's transforms.ToTensor range)."""
    return (images + 1) / 2


# ======== Losses (model_loss.py), images in [0, 1] ========
def loss_recon(img_fake, img_target):
    """recon_loss: MSE + L1 (means) between a drawn face and its target photo."""
    diff = img_fake.float() - img_target.float()
    return diff.pow(2).mean() + diff.abs().mean()


def loss_lat(feats_1, feats_2):
    """diff_loss: L1 (mean) between the last encoder outputs (the bottleneck) of the two photos."""
    return (feats_1[-1].float() - feats_2[-1].float()).abs().mean()


def loss_cls(attr_logits, attrs, pos_weight=None):
    """classify_loss: BCE(sigmoid(logits), a), mean; pos_weight (A,) weights present labels (stage 1, ours)."""
    return F.binary_cross_entropy_with_logits(attr_logits.float(), attrs, pos_weight=pos_weight)


def psnr(img_a, img_b):
    """PSNR per image in dB for images in [0, 1] (peak 1) -> (B,)."""
    mse = (img_a.float() - img_b.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


# ======== Training steps ========
def classifier_step(classifier, optimizer, img_1, img_2, attr_1, attr_2, pos_weight, amp_ctx):
    """Stage 1 (Train_Classifier.py): one update of C on both photos of a batch of pairs -> floats."""
    with amp_ctx():
        logits_1, logits_2 = classifier(img_1), classifier(img_2)  # two passes (BatchNorm), as there
        loss = loss_cls(logits_1, attr_1, pos_weight) + loss_cls(logits_2, attr_2, pos_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    hits = torch.cat([(logits_1 > 0).float() == attr_1, (logits_2 > 0).float() == attr_2])
    return {"c_loss": loss.item(), "c_acc": hits.float().mean().item()}


def dual_step(models, optimizer, img_1, img_2, attr_1, attr_2, args, amp_ctx):
    """Stage 2 (main.py): one update of E and Dec on a batch of pairs (images in [0, 1]) -> detached scalars.
    C is frozen (eval mode, no parameter in the optimiser) but differentiable: L_cls reaches Dec."""
    encoder, decoder, classifier = models
    with amp_ctx():
        feats_1, feats_2 = encoder(img_1), encoder(img_2)  # two passes, as main.py
        img_11, img_22 = decoder(feats_1, attr_1), decoder(feats_2, attr_2)  # self-reconstructions
        img_21, img_12 = decoder(feats_2, attr_1), decoder(feats_1, attr_2)  # transfers
        logits_21, logits_12 = classifier(img_21), classifier(img_12)
        terms = {"lat": loss_lat(feats_1, feats_2),
                 "self": loss_recon(img_11, img_1) + loss_recon(img_22, img_2),
                 "cls": loss_cls(logits_21, attr_1) + loss_cls(logits_12, attr_2),
                 "cross": loss_recon(img_21, img_1) + loss_recon(img_12, img_2)}
        loss = sum(getattr(args, "lambda_" + name) * value for name, value in terms.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    hits = torch.cat([(logits_21 > 0).float() == attr_1, (logits_12 > 0).float() == attr_2])
    return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},  # no host sync:
            "transfer_acc": hits.float().mean()}  # the loop reads them at log steps only


def pair_tensors(data, pairs, device):
    """Pairs of image indices (B, 2) -> (img_1, img_2 in [0, 1] (B, 3, H, W), attr_1, attr_2)."""
    chosen = pairs.flatten().to(data.images.device)
    images = to_unit(common.to_float(data.images[chosen].to(device)))
    attrs = data.labels[chosen].to(device)
    return images[0::2], images[1::2], attrs[0::2], attrs[1::2]


# ======== Sampling and evaluation ========
@torch.no_grad()
def transfer(encoder, decoder, images, attrs, batch_size=256):
    """Dec(E(x), a) for x (B, 3, H, W) in [0, 1] and a (B, A) in label units -> [0, 1]."""
    return torch.cat([decoder(encoder(x), a).float() for x, a in zip(images.split(batch_size), attrs.split(batch_size))])


def flip(attrs, k):
    """attrs (B, A) 0/1 with column k flipped."""
    return torch.where(torch.arange(attrs.shape[1], device=attrs.device) == k, 1 - attrs, attrs)


@torch.no_grad()
def pair_grid(encoder, decoder, img_1, img_2, attr_1, attr_2, attr_names):
    """-> ((R, 5 [+ A], 3, H, W) in [-1, 1], labels): x1 | x2 | Dec(E(x1), a1) | Dec(E(x1), a2) |
    Dec(E(x2), a1) [| x1 with attribute k flipped, for each k when A > 1]."""
    columns = [img_1, img_2] + [transfer(encoder, decoder, x, a)
                                for x, a in ((img_1, attr_1), (img_1, attr_2), (img_2, attr_1))]
    labels = ["x1", "x2", "Dec(E(x1), a1)", "Dec(E(x1), a2)", "Dec(E(x2), a1)"]
    for k, name in enumerate(attr_names if len(attr_names) > 1 else []):
        columns.append(transfer(encoder, decoder, img_1, flip(attr_1, k)))
        labels.append(f"x1 flip {name}")
    return torch.stack(columns, 1) * 2 - 1, labels


@torch.no_grad()
def evaluate_pairs(models, data, pairs, split, device):
    """-> PSNR (dB) of Dec(E(x1), a1) and of Dec(E(x2), a1) vs x1 (a floor); how often C reads a1 where a1 != a2."""
    encoder, decoder, classifier = models
    sums = torch.zeros(4)
    for chunk in pairs.split(128):
        img_1, img_2, attr_1, attr_2 = pair_tensors(data, chunk, device)
        img_21, changed = transfer(encoder, decoder, img_2, attr_1), attr_1 != attr_2
        hits = ((classifier(img_21) > 0).float() == attr_1) & changed
        sums += torch.tensor([psnr(transfer(encoder, decoder, img_1, attr_1), img_1).sum(),
                              psnr(img_21, img_1).sum(), hits.sum(), changed.sum()])
    psnr_self, psnr_transfer = (sums[:2] / max(len(pairs), 1)).tolist()
    read = (sums[2] / sums[3].clamp_min(1)).item()
    print(f"{split}: {len(pairs)} pairs; PSNR self-reconstruction {psnr_self:.2f} dB, transfer vs the other photo "
          f"{psnr_transfer:.2f} dB; the frozen C reads the target on {read:.3f} of the changed attributes")
    return {"pairs": len(pairs), "psnr_self": psnr_self, "psnr_transfer": psnr_transfer, "transfer_acc_changed": read}


# ======== Stage 1: the classifier (Train_Classifier.py), reused only when it matches ========
def classifier_key(args, data):
    """What C depends on: the CLASSIFIER_KEY settings and a digest of the training pixels, labels and identities."""
    digest = hashlib.sha1(b"".join(t.cpu().numpy().tobytes() for t in (data.images, data.labels, data.identities)))
    return {**{name: getattr(args, name) for name in CLASSIFIER_KEY}, "data_digest": digest.hexdigest()}


def get_classifier(args, data, val, pairs, device):
    """Stage 1 -> C's weights: --classifier or <out>/classifier.pt if its key is this run's, else C trained
    now on both photos of the training pairs and saved with its key. A stage 1 that a signal stopped
    saved its step and optimizer there: the same command continues it."""
    path, key = Path(args.classifier or Path(args.out) / "classifier.pt"), classifier_key(args, data)
    stopped = None  # a stage 1 that a signal stopped, to continue
    if path.is_file():
        saved = (state := load_checkpoint(path)).get("key", {})
        differ = [k for k in key if saved.get(k) != key[k]]
        if not differ and "val_accuracy" in state:
            print(f"classifier: {path} (validation accuracy {state['val_accuracy']})")
            return state["classifier"]
        why = ", ".join(f"{k}={saved.get(k)!r} (this run: {key[k]!r})" for k in differ)
        if differ and args.classifier:
            raise InputError(f"--classifier {path} was trained with {why}")
        print(f"{path} stopped at step {state['step']}: continuing it" if not differ else
              f"{path} was trained with {why}: training a new classifier")
        stopped = None if differ else state
    elif args.classifier:
        raise InputError(f"--classifier {path}: no such file (leave it out to train one)")
    torch.manual_seed(args.seed)
    classifier = build_models(dataclasses.asdict(args), len(data.attr_names))[2].to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.cls_lr, weight_decay=args.weight_decay)
    for module, name in ((classifier, "classifier"), (optimizer, "optimizer")) if stopped else ():
        module.load_state_dict(stopped[name])
    seen, amp_ctx = data.labels[pairs.flatten()], lambda: autocast(device, args.amp)  # labels C is shown
    pos_weight = (len(seen) / seen.sum(0).clamp_min(1) - 1).clamp(1.0, 50.0).to(device)  # neg/pos, in [1, 50]
    for step, stop in training_steps(stopped["step"] if stopped else 0, args.cls_steps, path, resume=False):
        chosen = pairs[common.batch_indices(len(pairs), step, args.batch_size, args.seed + 1)]
        stats = classifier_step(classifier, optimizer, *pair_tensors(data, chosen, device), pos_weight, amp_ctx)
        if stop:  # the next run with the same settings continues from here
            save_checkpoint(path, {"kind": "classifier", "classifier": classifier.state_dict(), "key": key,
                                   "optimizer": optimizer.state_dict(), "step": step + 1})
        if (step + 1) % max(args.cls_steps // 5, 1) == 0:
            check_finite(step + 1, stats, classifier)
            print(f"stage 1: classifier step {step + 1}/{args.cls_steps}  loss {stats['c_loss']:.3f}  "
                  f"batch acc {stats['c_acc']:.3f}")
    with torch.no_grad():
        logits = torch.cat([classifier.eval()(to_unit(common.to_float(x.to(device)))).cpu()
                            for x in val.images.split(256)] + [torch.empty(0, len(args.attrs))])
    accuracy = dict(zip(data.attr_names, ((logits > 0).float() == val.labels).float().mean(0).tolist()))
    save_checkpoint(path, {"kind": "classifier", "classifier": classifier.state_dict(), "key": key,
                           "val_accuracy": accuracy})
    print(f"wrote {path}; accuracy on {len(val.images)} validation images: {accuracy}")
    return classifier.state_dict()


# ======== A trained model: load(), and edit(args) for your own photo ========
def load(ckpt, device="cpu"):
    """A trained model -> (config, attr_names, (encoder, decoder, classifier)) in eval mode."""
    state = load_checkpoint(ckpt)
    if state.get("kind") != "dual":
        raise InputError(f"{ckpt}: expected a stage-2 ckpt.pt of {SCRIPT}, found its stage-1 classifier")
    models = build_models(state["config"], len(state["attr_names"]))
    for model, name in zip(models, ("encoder", "decoder", "classifier")):
        model.load_state_dict(state[name]), model.to(device).eval()
    return state["config"], state["attr_names"], models


@dataclasses.dataclass
class EditArgs:
    """Edit your photo: C reads its attributes (printed); --set changes them, else each is flipped in a grid."""
    ckpt: str = "runs/dual_transfer/ckpt.pt"  # checkpoint written by training
    image: str = "face.jpg"  # a photo (jpg/png), the face centred and filling most of the frame
    set: list = dataclasses.field(default_factory=list)  # Attr=value, e.g. Eyeglasses=1 (0 absent, 1 present)
    out: str = None  # output PNG (default: edit.png beside the checkpoint)


@torch.no_grad()
def edit(args):
    """Print what C reads on the photo; write --set's edit (+ a comparison grid), else every attribute flipped."""
    if args.out and Path(args.out).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise InputError(f"--out {args.out}: expected a .png or .jpg file name")
    path = Path(args.out or Path(args.ckpt).parent / "edit.png")
    check_writable(path, *[path.with_name(path.stem + "_compare.png")] * bool(args.set))
    config, names, (encoder, decoder, classifier) = load(args.ckpt, device := pick_device("auto"))
    for item in args.set:
        if not re.fullmatch(r"\w+=[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", item):
            raise InputError(f"--set {item!r}: expected Attr=value, e.g. Eyeglasses=1")
    changes = {names.index(common.resolve_attrs([item.partition("=")[0]], names)[0]):
               float(item.partition("=")[2]) for item in args.set}
    image = to_unit(common.load_photo(args.image, config["img_size"], config["crop"] or None)).to(device)
    attr_src = (classifier(image) > 0).float()
    print(f"{args.image}: P(present) read by the classifier: " + ", ".join(
        f"{n} {p:.3f}" for n, p in zip(names, torch.sigmoid(classifier(image))[0].tolist())))
    targets = [attr_src] + [flip(attr_src, k) for k in range(len(names))]
    labels = ["input", "recon"] + [f"flip {name}" for name in names]
    if changes:
        targets, labels = [attr_src, attr_src.clone()], ["input", "recon", " ".join(args.set)]
        for k, value in changes.items():
            targets[1][:, k] = value
    columns = [image] + [transfer(encoder, decoder, image, a) for a in targets]
    if changes:
        torchvision.utils.save_image(columns[-1][0].cpu(), path)
        path = path.with_name(path.stem + "_compare.png")
    common.save_grid(torch.stack(columns, 1).cpu() * 2 - 1, path, col_labels=labels)
    print(f"wrote {path}")
    return path


# ======== train(args) and main() ========
def configure(args, device):
    """Presets, canonical --data and --attrs, and the checks the networks need -> args."""
    if args.preset not in ("auto", "default", "cpu-demo"):
        raise InputError(f"--preset {args.preset!r}: expected auto, default or cpu-demo")
    auto = "cpu-demo" if device.type == "cpu" and is_demo(args.data) else "default"
    args.preset = "smoke" if args.smoke else auto if args.preset == "auto" else args.preset
    apply_preset(args, PRESETS.get(args.preset, {}), args.preset)  # 'default': the original's values
    args.data = args.data if is_demo(args.data) else str(Path(args.data).resolve())
    args.attrs = common.resolve_attrs(args.attrs)
    size, layers = args.img_size, args.n_layers
    if size % 2 ** layers or size < 2 ** (layers + 1):
        raise InputError(f"--img-size {size}: expected a multiple of 2^n_layers = {2 ** layers}, at least "
                         f"{2 ** (layers + 1)} (the code map must be at least 2x2)")
    if args.shortcut_layers > layers - 1:
        raise InputError(f"--shortcut-layers {args.shortcut_layers}: expected at most n_layers - 1 = {layers - 1}")
    return args


def prepare(args):
    """-> (train split, val split, training pairs, validation pairs)."""
    data = common.load_celeba(args.data, args.attrs, "train", args.img_size, args.crop or None)
    if data.identities is None:
        raise InputError(f"dual training needs identity_CelebA.txt (who is in each photo; the official CelebA "
                         f"release has it in its Anno folder) beside the images of {data.root} ({data.layout})")
    common.check_attr_rates(data, args.allow_rare_attrs)
    val = common.load_celeba(args.data, data.attr_names, "val", args.img_size, args.crop or None, verbose=False)
    pairs = common.identity_pairs(data.identities, data.labels)
    if len(pairs) < args.batch_size:
        raise InputError(f"only {len(pairs)} same-identity pairs whose {', '.join(data.attr_names)} differ in "
                         f"the training split; --batch-size {args.batch_size} needs more")
    val_pairs = common.identity_pairs(val.identities, val.labels)  # (0, 2) for an empty split
    print(f"pairs: {len(pairs)} in the training split, {len(val_pairs)} in the validation split")
    return data, val, pairs, val_pairs


def train(args):
    device = pick_device(args.device)
    args, out = configure(args, device), Path(args.out)
    lock = claim_run_folder(out, args.resume)  # noqa: F841 (held till exit; before any data loads)
    state = load_checkpoint(out / "ckpt.pt", dataclasses.asdict(args), RESUME_MUST_MATCH) if args.resume else None
    if (start := state["step"] if state else 0) >= args.steps:
        raise InputError(f"--resume: the checkpoint is at step {start}; expected a larger --steps")
    data, val, pairs, val_pairs = prepare(args)
    names, amp_ctx = data.attr_names, lambda: autocast(device, args.amp)
    # ALGO LOGIC: C from stage 1, frozen (eval mode, no gradients for its weights; its input still
    # passes gradients to Dec); E and Dec trained by Adam (main.py 4532938: torch's betas).
    classifier_state = state["classifier"] if state else get_classifier(args, data, val, pairs, device)
    torch.manual_seed(args.seed)
    encoder, decoder, classifier = build_models(dataclasses.asdict(args), len(names))
    classifier.load_state_dict(classifier_state)
    classifier.eval().requires_grad_(False)
    models = [m.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
              for m in (encoder, decoder, classifier)]
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=args.lr,
                                 weight_decay=args.weight_decay)
    # TRY NOT TO MODIFY: resume (the pair order is a pure function of seed and step), logging, files.
    for module, name in ((encoder, "encoder"), (decoder, "decoder"), (optimizer, "optimizer")):
        module.load_state_dict(state[name]) if state else None
    trim_jsonl(out / "metrics.jsonl", start)
    print(f"Dual Training {args.img_size} px, {', '.join(names)}; steps {start}..{args.steps}; E, Dec, "
          f"C (frozen): " + ", ".join(f"{sum(p.numel() for p in m.parameters()):,}" for m in models)
          + f" parameters; Adam lr {args.lr:g}; {device}; {args.preset}")
    grid_data = val if len(val_pairs) else data  # six pairs drawn across people
    grid = pair_tensors(grid_data, common.identity_pairs(grid_data.identities, grid_data.labels, max_pairs=6,
                                                         seed=args.seed), device)
    data = common.to_device(data, device)
    step_models = [torch.compile(m) for m in models] if args.compile else models
    totals, clock, since = {}, time.time(), start
    for step, stop in training_steps(start, args.steps, out / "ckpt.pt"):  # stop: SIGINT/SIGTERM came
        # ALGO LOGIC: one update of E and Dec on a batch of pairs
        chosen = pairs[common.batch_indices(len(pairs), step, args.batch_size, args.seed)]
        stats = dual_step(step_models, optimizer, *pair_tensors(data, chosen, device), args, amp_ctx)
        # TRY NOT TO MODIFY: logging, samples and checkpoints
        totals = {k: totals.get(k, 0.0) + v for k, v in stats.items()}  # tensors: no sync until a log
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            steps_per_s = (done - since) / (time.time() - clock)
            record = {"step": done, **{k: float(v) / (done - since) for k, v in totals.items()},
                      "img_per_s": steps_per_s * 2 * args.batch_size}  # both images of a pair
            check_finite(done, record, *models)
            with writing(out / "metrics.jsonl"), open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"step {done}/{args.steps}  " + "  ".join(f"{k} {record[k]:.4g}" for k in stats)
                  + f"  {record['img_per_s']:.0f} img/s  ETA {(args.steps - done) / steps_per_s / 60:.1f} min",
                  flush=True)
            totals, clock, since = {}, time.time(), done
        if done % args.sample_every == 0 or done == args.steps:
            picture, labels = pair_grid(encoder.eval(), decoder.eval(), *grid, names)
            with writing(path := out / "samples" / f"step_{done:06d}.png"):
                common.save_grid(picture.cpu(), path, col_labels=labels, title=f"Dual Training, step {done}")
            encoder.train(), decoder.train()
        if done % args.ckpt_every == 0 or done == args.steps or stop:
            check_finite(done, {}, *models)  # a diverged run never overwrites the last good one
            save_checkpoint(out / "ckpt.pt", {
                "kind": "dual", "step": done, "config": dataclasses.asdict(args), "attr_names": list(names),
                "optimizer": optimizer.state_dict(), "encoder": encoder.state_dict(),
                "decoder": decoder.state_dict(), "classifier": classifier.state_dict()})
    with writing(out / "losses.png"):
        common.plot_metrics(out / "metrics.jsonl", out / "losses.png")
    encoder.eval(), decoder.eval()
    results = {"train": evaluate_pairs(models, data, common.identity_pairs(
        data.identities, data.labels, max_pairs=2000, seed=args.seed), "train (<= 2000 pairs, all people)", device)}
    if len(val_pairs):
        results["val"] = evaluate_pairs(models, val, val_pairs, "val", device)
    with writing(out / "eval.json"):
        (out / "eval.json").write_text(json.dumps({"step": args.steps, **results}, indent=1) + "\n")
    print(f"done: {out / 'ckpt.pt'}, samples in {out / 'samples'}, losses.png, eval.json")
    return out


# ======== Plumbing: verbatim copies of attgan.py's (tests/test_copies.py keeps them identical) ========
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
    command = argv.pop(0) if argv and argv[0] in ("train", "edit") else "train"
    if command == "edit":
        return edit(parse_dataclass(EditArgs, argv, f"{SCRIPT} edit"))
    return train(parse_dataclass(Args, argv, f"{SCRIPT} [train]", positive=POSITIVE))


if __name__ == "__main__":
    run_main(main)
