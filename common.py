"""What every method file shares: CelebA in every layout, the synthetic demo CelebA, image output.

Nothing method-specific lives here. The file reads from the top down:

Part 1: what a method file uses (the first screens after the constants below).
    `load_celeba` reads one split of CelebA, whatever shape it arrived in, as a `FaceData`: the
    official Google Drive folder (its img_align_celeba.zip read in place, no unzipping), all files
    side by side, the torchvision folder, the Kaggle copy, a flat csv variant, or the synthetic
    demo set ('demo', 'demo:N'). `resolve_attrs` and `check_attr_rates` check the attributes asked
    for; `to_device` and `get_batch` give the training batches (`batch_indices` and
    `identity_pairs` the indices behind them); `load_photo` reads a user's own photo; `to_float`
    and `to_uint8` convert pixels; `save_grid`, `save_gif` and `plot_metrics` write labelled
    grids, GIFs and loss curves (torchvision's make_grid, matplotlib and PIL).
Part 2: the machinery behind it: layout detection, annotation parsing, preprocessing, the cache,
    the partition and the batch stream. Images are decoded, cropped and resized ONCE into a uint8
    cache on disk that every run memory-maps (no split is ever copied, so all 202,599 images fit
    any machine); batches come from a GPU copy when the split fits there, else they are gathered
    a few steps ahead in a background thread and moved asynchronously, so data loading never
    limits training.
Part 3: the demo faces (`demo_root`, `make_demo`, `render_counterfactual`; `DEMO_ATTRS` lists the
    attributes drawn): procedurally drawn faces in the official file layout, with identities,
    pose, expression and landmarks, and the same face drawn again with one attribute changed (a
    ground-truth edit).
Part 4: the command line (a quick look at a dataset, and the CelebA download helper):

    python common.py info ./celeba            # layout, counts, partitions, attribute rates
    python common.py info demo                # the synthetic set (generated on first use)
    python common.py download ./celeba        # tries torchvision; else says what to fetch by hand
    python common.py bench --data demo        # cache build img/s + peak memory, batches/s

Preprocessing convention (AttGAN's for aligned CelebA, used by every method unless it says
otherwise): a centre square crop of side 170 in official 178x218 pixels, resized to the model size,
images in [-1, 1]. Crops are given in official pixels and scale with the image, so the official
half-size release (89x109) gets an 85x85 crop of the same face region.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

CELEBA_ATTRS = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
)
OFFICIAL_SIZE = (218, 178)  # (H, W) of the official aligned images; crops are given in these pixels
LANDMARK_NAMES = ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
SPLITS = ("train", "val", "test", "all")


class InputError(ValueError):
    """Bad input from the user (a path, an attribute name, a file, a checkpoint). The scripts print
    it as one line without a traceback."""


# ======== Part 1: what a method file uses. A split of CelebA and its batches ======================
@dataclass
class FaceData:
    """One split of a dataset: uint8 images plus per-image annotations.

    `images` is a plain (N, 3, H, W) uint8 tensor: a slice of the memory-mapped disk cache (only
    the rows read are ever loaded), or a copy on the GPU after to_device. `stream`, set by
    to_device when the images stay on the host, gathers the next batches in a background thread.
    """
    images: torch.Tensor  # (N, 3, H, W) uint8 RGB, cropped and resized
    labels: torch.Tensor  # (N, A) float32 in {0, 1}, columns = attr_names
    attr_names: list
    files: list  # '000123.jpg' for each row
    identities: torch.Tensor | None  # (N,) int64, None without identity_CelebA
    landmarks: torch.Tensor | None  # (N, 5, 2) (x, y) in output pixels, None without the file
    root: Path
    layout: str
    split: str
    img_size: tuple
    stream: BatchStream | None = dataclasses.field(default=None, repr=False, compare=False)


def load_celeba(data, attrs=None, split="train", img_size=128, crop=170, verbose=True) -> FaceData:
    """Load one split of CelebA (any layout, or 'demo' / 'demo:N') as a FaceData.

    data: a folder or 'demo' (200 identities x 30 images) or 'demo:N' (N identities).
    attrs: attribute names in the order wanted (None = all 40); labels become 0/1 floats.
    split: 'train' | 'val' | 'test' | 'all'. The official partition is used when it covers the
        images present and leaves no part empty; otherwise a deterministic identity-disjoint
        80/10/10 split (fallback_split), with a notice. Rows are sorted by file name within a
        split; 'all' is train, then val, then test.
    img_size: int (square) or (H, W). crop: centre crop side in official pixels, None = full frame.

    Only images that exist AND have a label row are used; missing ones, unlabelled ones and
    corrupt ones are counted in one printed line. The images are a slice of the memory-mapped
    disk cache (build_cache): loading costs no memory until rows are read.
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    layout = find_layout(data)
    header, attr_rows = read_annotation(layout.files["list_attr_celeba"])
    header = header or list(CELEBA_ATTRS)
    attr_names = resolve_attrs(attrs if attrs is not None else header, header)
    columns = [header.index(a) for a in attr_names]

    members = list_images(layout.image_dir)
    files = sorted(members.keys() & attr_rows.keys())
    if not files:
        raise InputError(f"none of the {len(attr_rows)} labelled images is in {layout.image_dir}")
    identity_of, covered = read_identities(layout, files)
    part_of, _ = assign_partition(layout, files, identity_of, verbose, split != "all")
    order = sorted(files, key=lambda f: (part_of[f], f))  # each split: one contiguous block
    cache = build_cache(layout.image_dir, order, img_size, crop, verbose, members)
    kept = cache["files"]
    if verbose:
        notes = [f"{len(kept)} of {len(attr_rows)} labelled images found in {layout.image_dir}"
                 f" ({layout.name} layout)"]
        if len(members) > len(files):
            notes.append(f"{len(members) - len(files)} unlabelled images ignored")
        if cache["corrupt"]:
            notes.append(f"{len(cache['corrupt'])} corrupt images skipped")
        if identity_of is None and "identity_CelebA" in layout.files:
            notes.append(f"{layout.files['identity_CelebA'].name} covers only {covered} of "
                         f"{len(files)} images: identities unused")
        print("; ".join(notes), file=sys.stderr)

    parts = [part_of[f] for f in kept]  # non-decreasing: the split is rows [lo, hi)
    lo, hi = (0, len(kept)) if split == "all" else (
        bisect.bisect_left(parts, SPLITS.index(split)), bisect.bisect_right(parts, SPLITS.index(split)))
    files = kept[lo:hi]
    labels = torch.tensor([[float(attr_rows[f][c]) > 0 for c in columns] for f in files],
                          dtype=torch.float32).reshape(len(files), len(columns))
    landmarks = None
    if "list_landmarks_align_celeba" in layout.files:
        _, rows = read_annotation(layout.files["list_landmarks_align_celeba"])
        if all(f in rows for f in kept):
            points = torch.tensor([[float(v) for v in rows[f]] for f in files]).view(-1, 5, 2)
            landmarks = _map_landmarks(points, cache["orig_sizes"][lo:hi], img_size, crop)
    return FaceData(
        images=cache["images"][lo:hi], labels=labels, attr_names=attr_names, files=files,
        identities=None if identity_of is None else torch.tensor([identity_of[f] for f in files]),
        landmarks=landmarks, root=layout.root, layout=layout.name, split=split,
        img_size=_size_hw(img_size))


def get_batch(data: FaceData, step, batch_size, seed=0, device=None, rank=0, world_size=1,
              hflip=False, channels_last=False):
    """Batch `step` of `data` -> (images float in [-1, 1] (B, 3, H, W), labels (B, A), indices (B,)).

    The uint8 rows are gathered where data.images lives (the GPU after to_device when they fit;
    else from the memory-mapped cache, a few steps ahead by data.stream), moved to `device`
    asynchronously and converted to float there. hflip mirrors a random half of the batch, drawn
    from (seed, step) so it is reproducible too.
    """
    if device is None:
        device = data.labels.device if data.stream is not None else data.images.device
    device = torch.device(device)
    n = len(data.images)
    idx = batch_indices(n, step, batch_size, seed, rank, world_size)
    if data.stream is not None and data.stream.images is data.images:
        rows = data.stream.take(step, (batch_size, seed, rank, world_size), lambda s: batch_indices(
            n, s, batch_size, seed, rank, world_size))
    else:
        rows = data.images[idx.to(data.images.device)]
    images = to_float(rows.to(device, non_blocking=True))
    if hflip:
        flip = torch.rand(len(idx), generator=torch.Generator().manual_seed(seed * 7919 + step)) < 0.5
        images = torch.where(flip.to(device).view(-1, 1, 1, 1), images.flip(-1), images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, data.labels[idx.to(data.labels.device)].to(device, non_blocking=True), idx


def to_device(data: FaceData, device, gpu_cache=None, ahead=4) -> FaceData:
    """Move a FaceData to `device` once: labels, identities and landmarks always; the uint8 images
    when they fit there, else they stay in the memory-mapped cache and batches stream from it.

    gpu_cache: 'auto' (default; $FACE_ATTR_GPU_CACHE overrides) keeps the images on a GPU when
    they take under a quarter of its free memory; 'on' always; 'off' never (streamed, also on
    the CPU, where it gathers batches in a background thread). The rule is checked once here.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mode = gpu_cache or os.environ.get("FACE_ATTR_GPU_CACHE") or "auto"
    if mode not in GPU_CACHE_MODES:
        raise InputError(f"unknown gpu cache mode {mode!r} (FACE_ATTR_GPU_CACHE or gpu_cache); "
                         f"expected one of {', '.join(GPU_CACHE_MODES)}")
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    small = dict(labels=move(data.labels), identities=move(data.identities),
                 landmarks=move(data.landmarks))
    nbytes = data.images.numel() * data.images.element_size()
    if mode == "off":
        resident = False
    elif mode == "on" or data.images.device == device or device.type != "cuda":
        resident = True  # on the CPU the memory map is already where the batches are made
    else:
        free = torch.cuda.mem_get_info(device)[0]
        resident = nbytes < free / 4
        if not resident:
            print(f"note: the {data.split} images ({nbytes / 1e9:.1f} GB) take more than a quarter "
                  f"of the GPU's {free / 1e9:.1f} GB free: batches stream from the disk cache "
                  "(FACE_ATTR_GPU_CACHE=on|off to choose)", file=sys.stderr)
    if not resident:
        host = data.images.cpu()
        return dataclasses.replace(data, images=host, stream=BatchStream(
            host, ahead, pin=device.type == "cuda"), **small)
    if data.images.device == device:
        return dataclasses.replace(data, stream=None, **small)
    images = torch.empty(data.images.shape, dtype=torch.uint8, device=device)
    for i in range(0, len(images), 4096):  # in blocks: the memory map is read once, in order
        images[i:i + 4096].copy_(data.images[i:i + 4096])
    return dataclasses.replace(data, images=images, stream=None, **small)


def batch_indices(n, step, batch_size, seed=0, rank=0, world_size=1,
                  what="training images") -> torch.Tensor:
    """The image indices of training step `step`: a pure function of its arguments.

    Epoch e walks the permutation seeded by (seed, e) in slices of batch_size * world_size; rank r
    takes its own slice of each. So a resumed run draws exactly the batches an uninterrupted one
    would, and DDP ranks never see the same image in a step. The tail of an epoch that does not
    fill a whole step is dropped.
    """
    per_epoch = n // (batch_size * world_size)
    if per_epoch == 0:
        ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
        raise InputError(
            f"only {n} {what} (what the train/val/test split left of this dataset), fewer than one "
            f"batch of {batch_size}{ranks}: use --batch-size {max(1, n // world_size)} or less, or "
            "more images (a folder of few identities keeps about 80 % of them for training)")
    epoch, position = divmod(step, per_epoch)
    start = (position * world_size + rank) * batch_size
    return _epoch_permutation(n, seed, epoch)[start:start + batch_size]


def identity_pairs(identities, labels=None, require_diff=True, max_pairs=None, seed=0) -> torch.Tensor:
    """All pairs (i, j), i < j, of two different images of the same person -> LongTensor (P, 2).

    With `labels` and require_diff, only pairs whose labels differ in at least one column are kept
    (the Dual Training paper's down-sampling: each pair then teaches an attribute change).
    max_pairs keeps a random subset (deterministic by seed).
    """
    if identities is None:
        raise InputError("identity pairs need identity_CelebA.txt (from the official CelebA "
                         "release's Anno folder); this dataset has no identity file")
    ids = identities.cpu()
    order = torch.argsort(ids, stable=True)
    _, counts = torch.unique_consecutive(ids[order], return_counts=True)
    pairs = [torch.combinations(group, 2) for group in torch.split(order, counts.tolist())
             if len(group) > 1]
    pairs = torch.cat(pairs) if pairs else torch.empty((0, 2), dtype=torch.long)
    pairs = pairs.sort(dim=1).values
    if labels is not None and require_diff and len(pairs):
        lab = labels.cpu()
        pairs = pairs[(lab[pairs[:, 0]] != lab[pairs[:, 1]]).any(dim=1)]
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        pairs = pairs[keep.sort().values]
    return pairs


# ======== Part 1: attribute names, checked ========================================================
def resolve_attrs(names, available=CELEBA_ATTRS) -> list[str]:
    """Attribute names, any case -> the same names as `available` spells them, in the order given;
    an unknown name raises an InputError that suggests the closest valid name and lists them all."""
    by_lower = {a.lower(): a for a in available}
    resolved = []
    for name in names:
        if name.lower() not in by_lower:
            close = difflib.get_close_matches(name, list(available), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(f"unknown attribute {name!r}{hint}; valid names: {', '.join(available)}")
        resolved.append(by_lower[name.lower()])
    return resolved


def check_attr_rates(data, allow=False, low=0.01) -> list[str]:
    """A training split's attr_names, refused where an attribute cannot be learned: present on fewer
    than `low` or more than 1 - `low` of its images (constant ones included), each named with its
    rate; with `allow`, only said on stderr."""
    n, present = len(data.labels), data.labels.sum(0).tolist()  # counts: 2 of 200 is 1 %, not 0.99999 %
    rare = [f"{name} on {k / n:.1%}" for name, k in zip(data.attr_names, present) if min(k, n - k) < low * n]
    if rare and not allow:
        raise InputError(f"--attrs: {', '.join(rare)} of the {len(data.labels)} training images; expected "
                         f"attributes present on {low:.0%} to {1 - low:.0%} (--allow-rare-attrs trains anyway)")
    if rare:
        print(f"note: rare attributes, trained anyway: {', '.join(rare)}", file=sys.stderr)
    return data.attr_names


# ======== Part 1: pixels in and out: a user's photo, uint8 <-> [-1, 1] ============================
def load_photo(path, img_size=128, crop=170) -> torch.Tensor:
    """A user's own photo (jpg/png, any size) -> (1, 3, h, w) float in [-1, 1].

    An image with CelebA's aligned aspect ratio (178:218, within 3 %) gets exactly the training
    crop. Any other photo gets a centre square crop of its short side: put the face in the middle,
    filling most of the frame, for results like the training data's. The camera's EXIF
    orientation is applied first (phone photos are often stored sideways), and 16-bit images are
    scaled to 8 bits.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path} (expected a .jpg or .png file)")
    try:
        with Image.open(path) as image:  # decoded inside preprocess, exactly as the cache does
            if image.getexif().get(ORIENTATION_TAG, 1) != 1:
                image = ImageOps.exif_transpose(image)
            width, height = image.size
            if abs(width / height - OFFICIAL_SIZE[1] / OFFICIAL_SIZE[0]) > 0.03 * width / height:
                side = min(width, height)  # not CelebA-aligned: square centre crop
                image = image.crop(((width - side) // 2, (height - side) // 2,
                                    (width + side) // 2, (height + side) // 2))
                crop = None if crop is None else OFFICIAL_SIZE[1]
            return to_float(preprocess(image, img_size, crop)).unsqueeze(0)
    except Image.DecompressionBombError as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        raise InputError(f"image too large: {path} ({int(pixels[1]) if pixels else 0:,} pixels; "
                         f"PIL refuses more than {2 * Image.MAX_IMAGE_PIXELS:,}): save a smaller "
                         "copy (a face photo needs no more than about 1000x1000)") from err
    except (OSError, SyntaxError) as err:
        raise InputError(f"cannot read image {path}: {err} (expected a .jpg or .png file)") from err


def to_float(images) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(images) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255] (clamped, rounded)."""
    return images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


# ======== Part 1: image output: labelled grids, GIFs, loss curves =================================
def save_grid(images, path, row_labels=None, col_labels=None, title=None):
    """Save a grid of images in [-1, 1] as a PNG: `images` is (R, C, 3, H, W) (or a list of R lists
    of C (3, H, W) tensors). Row and column labels, when given, are drawn around it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid, save_image

    if not isinstance(images, torch.Tensor):
        images = torch.stack([torch.stack(list(row)) for row in images])
    rows, cols, _, h, w = images.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = images.detach().float().cpu().reshape(rows * cols, 3, h, w).add(1).div(2).clamp(0, 1)
    grid = make_grid(flat, nrow=cols, padding=2, pad_value=1.0)
    if row_labels is None and col_labels is None and title is None:
        save_image(grid, path)
        return
    zoom = max(1, 96 // h)  # small images are shown larger so the labels stay readable
    gh, gw = grid.shape[1] * zoom, grid.shape[2] * zoom
    dpi = 100
    left = 1.4 if row_labels is not None else 0.1
    top = 0.9 if col_labels is not None else 0.1
    top += 0.3 if title else 0
    fig = plt.figure(figsize=(gw / dpi + left + 0.1, gh / dpi + top + 0.1), dpi=dpi)
    ax = fig.add_axes((left / fig.get_figwidth(), 0.1 / fig.get_figheight(),
                       gw / dpi / fig.get_figwidth(), gh / dpi / fig.get_figheight()))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", extent=(0, gw, gh, 0))
    step_x, step_y = (w + 2) * zoom, (h + 2) * zoom
    ax.set_xticks([2 * zoom + step_x * c + w * zoom / 2 for c in range(cols)],
                  list(col_labels) if col_labels is not None else [""] * cols)
    ax.set_yticks([2 * zoom + step_y * r + h * zoom / 2 for r in range(rows)],
                  list(row_labels) if row_labels is not None else [""] * rows)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, labelsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="left")
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.05 / fig.get_figheight())
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)  # crop unused margins
    plt.close(fig)


def save_gif(frames, path, fps=8, scale=1):
    """Save frames (T, 3, H, W) in [-1, 1] as a looping GIF (PIL), optionally upscaled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = []
    for frame in frames:
        picture = Image.fromarray(to_uint8(frame.cpu()).permute(1, 2, 0).numpy())
        if scale != 1:
            picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
        pictures.append(picture)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / fps),
                     loop=0, disposal=1)


def plot_metrics(jsonl_path, png_path, keys=None):
    """Write png_path: every numeric key of metrics.jsonl (or `keys`) against 'step', one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items()
                       if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    cols = min(3, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), lw=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ======== Part 2: machinery. Finding the files: every layout, detected automatically ==============
# Each layout is (name, image folder, folders holding the annotation files), relative to --data;
# the first that matches wins. Wherever a layout expects the image folder, `<folder>.zip` (the
# official img_align_celeba.zip, not yet unpacked) is read in place; when both exist, whichever
# holds more images is used, so a half-unpacked folder never hides a complete zip. Annotation
# files are looked up by stem, as .txt (official format: a count line, a header line, then rows)
# or .csv (Kaggle format: a header row `image_id,...`).
LAYOUTS = (
    ("drive", "Img/img_align_celeba", ("Anno", "Eval")),  # the Google Drive folder as it unpacks
    ("kaggle", "img_align_celeba/img_align_celeba", (".",)),
    ("torchvision", "celeba/img_align_celeba", ("celeba",)),
    ("official", "img_align_celeba", (".",)),  # everything side by side ('csv' with .csv labels)
)
ANNOTATIONS = {  # stem -> what it holds
    "list_attr_celeba": "40 binary attributes",
    "identity_CelebA": "identity of each image",
    "list_eval_partition": "official train/val/test split",
    "list_landmarks_align_celeba": "5 landmarks in the aligned images",
    "list_bbox_celeba": "face boxes (of the in-the-wild images)",
}

# stem -> (values per row when the file has no header, what each value must be)
ANNOTATION_VALUES = {
    "list_attr_celeba": (len(CELEBA_ATTRS), "binary"),
    "identity_CelebA": (1, "integer"),
    "list_eval_partition": (1, "partition"),
    "list_landmarks_align_celeba": (10, "number"),
    "list_bbox_celeba": (4, "number"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclass
class Layout:
    """Where one dataset's files are. `image_dir` is the image folder or the .zip read in place;
    `files` maps an annotation stem to its path (if present)."""
    name: str
    root: Path
    image_dir: Path
    files: dict


def _count_images(source: Path) -> int:
    """How many image files a folder or a zip holds (0 if it does not exist)."""
    if source.is_dir():
        return sum(1 for e in os.scandir(source) if e.name.lower().endswith(IMAGE_EXTENSIONS))
    if source.is_file():
        return len(list_images(source))
    return 0


def find_layout(data) -> Layout:
    """Detect which of the known layouts `data` is ('demo' / 'demo:N' generate the demo set)."""
    if str(data) == "demo" or str(data).startswith("demo:"):
        layout = find_layout(demo_root(str(data)))
        return dataclasses.replace(layout, name="demo")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise InputError(f"data folder not found: {root} (expected a CelebA folder, or 'demo')")
    for name, image_dir, anno_dirs in LAYOUTS:
        files = {}
        for stem in ANNOTATIONS:
            found = [root / d / (stem + ext) for d in anno_dirs for ext in (".txt", ".csv")]
            found = [p for p in found if p.is_file()]
            if found:
                files[stem] = found[0]
        folder, archive = root / image_dir, root / (image_dir + ".zip")
        if "list_attr_celeba" not in files or not (folder.is_dir() or archive.is_file()):
            continue
        source = folder
        if archive.is_file() and (not folder.is_dir() or _count_images(archive) > _count_images(folder)):
            source = archive
        if name == "official" and files["list_attr_celeba"].suffix == ".csv":
            name = "csv"  # flat folder with Kaggle-style csv annotations
        return Layout(name, root, source, files)
    tried = "; ".join(f"{name}: {image_dir}/ (or .zip) + list_attr_celeba.txt|.csv in "
                      f"{' or '.join(d + '/' for d in anno_dirs)}" for name, image_dir, anno_dirs in LAYOUTS)
    raise InputError(f"no CelebA layout found in {root} (tried {tried}; or use --data demo)")


def list_images(source) -> dict:
    """Image file name -> where to read it: a path in a folder, or a member name in a zip (the
    zip is only indexed here; its images are read once, while the cache builds)."""
    source = Path(source)
    if source.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(source) as archive:
                return {PurePosixPath(m.filename).name: m.filename for m in archive.infolist()
                        if m.filename.lower().endswith(IMAGE_EXTENSIONS) and not m.is_dir()}
        except (OSError, zipfile.BadZipFile) as err:
            raise InputError(f"cannot read {source}: {err} (an incomplete download? "
                             "unzip it or fetch it again)") from err
    return {e.name: e.path for e in os.scandir(source)
            if e.name.lower().endswith(IMAGE_EXTENSIONS)}


def _check_values(values, kind, csv_file) -> str | None:
    """None if every value of one row is valid for `kind`, else what was expected."""
    if kind == "binary":
        allowed = {"1", "-1", "0"} if csv_file else {"1", "-1"}
        return None if allowed.issuperset(values) else (
            "1 or -1" + (" (or 0/1)" if csv_file else "") + " for every attribute")
    if kind == "partition":
        return None if values[0] in ("0", "1", "2") else "0, 1 or 2 (train, val, test)"
    if kind == "integer":
        return None if all(v.isdigit() for v in values) else "a whole number"
    try:
        [float(v) for v in values]
    except ValueError:
        return "numbers"
    return None


def read_annotation(path) -> tuple[list[str], dict[str, list[str]]]:
    """Read one annotation file in either format -> (column names, {file name: values as str}).

    Official .txt: [count line], header line, `000001.jpg v1 v2 ...` (identity and partition files
    have neither count nor header). Kaggle .csv: header `image_id,...`, then rows. Every row of a
    known file is checked as it is read (as many values as the header names, each valid for the
    file: attributes 1/-1, or 0/1 in csv, partitions 0/1/2, ...); a bad one stops with an
    InputError naming the file, the line and what was expected, before anything is trained on it.
    """
    path = Path(path)
    expected, kind = ANNOTATION_VALUES.get(path.stem, (None, None))
    is_csv = path.suffix == ".csv"
    header, header_line, rows, shared = [], 0, {}, {}
    # utf-8-sig: a byte-order mark (Windows editors write one) is dropped, in .txt as in .csv
    with open(path, newline="", encoding="utf-8-sig") as f:  # one row at a time, never held twice
        lines = enumerate(csv.reader(f) if is_csv else (line.split() for line in f), 1)
        for n, row in lines:
            if not row:
                continue
            if not rows and not header and not header_line:
                if not is_csv and len(row) == 1 and row[0].isdigit() and n == 1:
                    continue  # the count line
                if is_csv or not row[0].lower().endswith(IMAGE_EXTENSIONS):  # the header line
                    header_line, header = n, (row[1:] if is_csv or row[0] == "image_id" else row)
                    if kind is not None and len(set(header)) < len(header):
                        twice = sorted({h for h in header if header.count(h) > 1})
                        raise InputError(f"{path}, line {n}: the header names {', '.join(twice)} twice")
                    expected = len(header) if header else expected
                    continue
            where = f"{path}, line {n}"
            if not row[0].lower().endswith(IMAGE_EXTENSIONS):
                raise InputError(f"{where}: {row[0]!r} is not an image file name; expected rows like "
                                 f"'000001.jpg' followed by {expected or 'the'} values")
            if expected is not None and len(row) - 1 != expected:
                because = f" (one per name in the header, line {header_line})" if header else ""
                raise InputError(f"{where}: {len(row) - 1} values after {row[0]}; expected "
                                 f"{expected}{because}")
            if kind is not None:
                problem = _check_values(row[1:], kind, is_csv)
                if problem:
                    raise InputError(f"{where}: {' '.join(row[1:])!r} after {row[0]}; expected {problem}")
            rows[row[0]] = [shared.setdefault(v, v) for v in row[1:]]  # one "-1" object, not 5 million
    return header, rows


# ======== Part 2: preprocessing: one function for the cache, direct decodes and a photo ===========
ORIENTATION_TAG = 0x0112  # EXIF: how the camera was held


def crop_box(width, height, crop=170) -> tuple[float, float, float, float]:
    """The centre square crop, given in official 178-px-wide pixels and scaled to this image's
    width, as a (left, top, right, bottom) box in float pixels; crop=None keeps the full frame."""
    if crop is None:
        return (0.0, 0.0, float(width), float(height))
    side = min(crop * width / OFFICIAL_SIZE[1], width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def _size_hw(img_size) -> tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def _to_rgb(image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and 32-bit grey ('I;16', 'I') are scaled down to 8 bits
    (PIL's own convert would clip them, turning a 16-bit PNG white)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    return image.convert("RGB")


def preprocess(image, img_size=128, crop=170) -> torch.Tensor:
    """PIL image (or uint8 (3, H, W) tensor) -> uint8 (3, h, w): centre crop, then resize.

    A JPEG that is not yet loaded is decoded at a reduced DCT scale when the crop is at least
    twice the output (PIL's draft mode), which is several times faster. The crop box is scaled by
    the decoder's exact factor (1/2, 1/4 or 1/8), not by the rounded size of the reduced image, so
    it is the same face region at every output size.
    """
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    out_h, out_w = _size_hw(img_size)
    box = crop_box(*image.size, crop)
    if getattr(image, "format", None) == "JPEG" and image.tile:  # opened, not yet decoded
        full_w = image.size[0]
        drafted = image.draft("RGB", (math.ceil(out_w * image.size[0] / (box[2] - box[0])),
                                      math.ceil(out_h * image.size[1] / (box[3] - box[1]))))
        # draft returns the full frame in reduced pixels, e.g. (0, 0, 44.5, 54.5) for 178x218 at
        # 1/4, while image.size rounds it up to (45, 55): the exact scale is 44.5 / 178.
        scale = drafted[1][2] / full_w if drafted else 1.0
        box = tuple(v * scale for v in box)
    image = _to_rgb(image).resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def _decode(opened, img_size, crop):
    """Decode one image (a path, or a file object) -> (uint8 (3, h, w), original (W, H)); None for
    a corrupt or truncated file."""
    try:
        with Image.open(opened) as image:
            size = image.size
            return preprocess(image, img_size, crop), size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


# ======== Part 2: the uint8 cache on disk: decode + crop + resize once, memory-map it after =======
CACHE_VERSION = 2  # bump when the cached pixels (or their file format) would change


def cache_root() -> Path:
    """Where demo sets and uint8 image caches live: $FACE_ATTR_CACHE, else .cache beside this file."""
    root = Path(os.environ.get("FACE_ATTR_CACHE") or Path(__file__).resolve().parent / ".cache")
    if root.exists() and not root.is_dir():
        raise InputError(f"FACE_ATTR_CACHE={root} is a file; expected a folder for the demo sets "
                         "and image caches (a new or existing folder)")
    return root


def _cache_error(path, err) -> InputError:
    """The one line for a cache file or folder that cannot be written (no such folder, read-only,
    disk full, quota): the path, the cause, and the variable that moves the cache."""
    where = (f"FACE_ATTR_CACHE={os.environ['FACE_ATTR_CACHE']}" if os.environ.get("FACE_ATTR_CACHE")
             else f"the cache folder {cache_root()} (FACE_ATTR_CACHE unset)")
    return InputError(f"cannot write {path} ({err.strerror or err}); nothing partial was kept; "
                      f"{where} must be a writable folder with room: set FACE_ATTR_CACHE to one")


@contextlib.contextmanager
def _building(tmp, dest, what):
    """Around filling the temporary folder `tmp` that becomes `dest` once complete: on any failure
    `tmp` is removed (nothing half-built is left in the way of the next run); Ctrl-C becomes a
    one-line KeyboardInterrupt, a write failure (OSError) a one-line InputError naming `dest`."""
    try:
        yield
    except KeyboardInterrupt:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KeyboardInterrupt(f"interrupted while building {what}; nothing partial was kept; "
                                "the same command starts it again") from None
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _cache_error(dest, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# A cache is a folder cache_root()/images/<key>/ with pixels.u8 (N x 3 x h x w uint8, row-major,
# no header) and index.json (shape, kept file names, original sizes, corrupt names). Its rows are
# in the order load_celeba asks for: train, then val, then test, so every split is one contiguous
# slice of the memory map and no split is ever copied.
def _image_stamps(source, files, members) -> list:
    """What identifies each image's bytes: (name, size, modification time in ns) for a folder,
    (name, size, CRC) for a zip member (with the zip's own size and time in the key)."""
    if Path(source).suffix.lower() == ".zip":
        with zipfile.ZipFile(source) as archive:
            return [(name, archive.getinfo(members[name]).file_size,
                     archive.getinfo(members[name]).CRC) for name in files]
    stats = [os.stat(members[name]) for name in files]
    return [(name, st.st_size, st.st_mtime_ns) for name, st in zip(files, stats)]


def cache_key(source, stamps, img_size, crop) -> str:
    """Everything that determines the cached pixels and their order: cache version, image
    folder or zip (with the zip's size and time), each file's name, size and modification time
    (CRC in a zip), the output size and the crop."""
    source = Path(source).resolve()
    where = [str(source)] + ([source.stat().st_size, source.stat().st_mtime_ns]
                             if source.is_file() else [])
    text = json.dumps([CACHE_VERSION, where, stamps, list(_size_hw(img_size)), crop])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _open_cache(folder: Path) -> dict | None:
    """Reopen a finished cache: the pixels memory-mapped (copy-on-write, nothing read yet). A
    damaged one (index unreadable, or pixels.u8 not exactly N x 3 x h x w bytes: truncated by a
    full disk, a copy cut short) is moved aside and deleted, saying why -> None (build it again)."""
    try:
        index = json.loads((folder / "index.json").read_text())
        shape = tuple(index["shape"])
        size = (folder / "pixels.u8").stat().st_size if shape[0] else 0
        problem = (None if len(shape) == 4 and len(index["files"]) == shape[0] == len(
            index["orig_sizes"]) and size == math.prod(shape) else f"pixels.u8 holds {size:,} "
                   f"bytes, its index.json says {' x '.join(map(str, shape))} = {math.prod(shape):,}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"{type(err).__name__}: {err}"
    if problem:
        print(f"the image cache {folder} is damaged ({problem}): building it again", file=sys.stderr)
        aside = folder.with_name(f"{folder.name}.{os.getpid()}.damaged.tmp")
        with contextlib.suppress(OSError):  # another process may have moved it first
            os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
        return None
    if shape[0] == 0:
        images = torch.empty(shape, dtype=torch.uint8)
    else:
        images = torch.from_numpy(np.memmap(folder / "pixels.u8", np.uint8, mode="c", shape=shape))
    return {"images": images, "files": index["files"], "orig_sizes": torch.tensor(
        index["orig_sizes"], dtype=torch.int32).view(-1, 2), "corrupt": index["corrupt"],
        "path": folder, "built": None}


def _decode_chunk(source, members, names, img_size, crop, local):
    """Worker: decode a few images of a folder or zip -> list of (uint8 (3, h, w), (W, H)) | None."""
    if Path(source).suffix.lower() != ".zip":
        return [_decode(members[n], img_size, crop) for n in names]
    if not hasattr(local, "archive"):  # one open zip per worker thread
        local.archive = zipfile.ZipFile(source)
    results = []
    for name in names:
        try:
            data = local.archive.read(members[name])
        except (OSError, zipfile.BadZipFile, zlib.error):
            data = b""
        results.append(_decode(io.BytesIO(data), img_size, crop))
    return results


def _decode_in_order(source, members, files, img_size, crop):
    """Yield (name, _decode's result) for `files` in order, decoded by threads (PIL releases the
    GIL) at most two chunks per thread ahead of the consumer, so memory stays bounded."""
    workers, chunk, local = os.cpu_count() or 1, 32, threading.local()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque()
        for start in range(0, len(files), chunk):
            names = files[start:start + chunk]
            pending.append((names, pool.submit(_decode_chunk, source, members, names, img_size,
                                               crop, local)))
            if len(pending) >= 2 * workers:
                names, future = pending.popleft()
                yield from zip(names, future.result())
        while pending:
            names, future = pending.popleft()
            yield from zip(names, future.result())


def _remove_crashed_builds(folder):
    """Delete the unfinished caches (KEY.PID.*.tmp) of builds whose process no longer runs: a build
    killed outright cannot clean up after itself, and at full scale it leaves gigabytes."""
    for tmp in folder.glob("*.*.*.tmp") if folder.is_dir() else []:
        pid = tmp.name.split(".")[1]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass  # exists, owned by another user


def build_cache(source, files, img_size, crop, verbose=True, members=None) -> dict:
    """Decode `files` (names in the image folder or zip `source`, in the order wanted) into a
    uint8 cache on disk, or reopen it if one with the same key (cache_key) exists.

    The decode writes each image straight to the file as it comes (plain writes: the pages of a
    writable memory map would count as this process's resident memory until the kernel flushes
    them), so memory does not grow with the number of images; the folder
    is renamed into place only when complete, so a crashed or concurrent build never leaves half
    a cache (Ctrl-C or a failed write removes the partial folder: _building). A damaged cache
    (pixels.u8 not the size its index says) is built again. Returns {"images": (N, 3, h, w) uint8 memory-mapped, "files": kept names, in order,
    "orig_sizes": (N, 2) (W, H), "corrupt": names that could not be decoded (skipped, counted,
    never a crash mid-training), "path": the cache folder, "built": (seconds, images) or None}.
    """
    source = Path(source)
    members = members if members is not None else list_images(source)
    key = cache_key(source, _image_stamps(source, files, members), img_size, crop)
    folder = cache_root() / "images" / key
    if folder.is_dir() and (cache := _open_cache(folder)) is not None:
        return cache
    out_h, out_w = _size_hw(img_size)
    need = len(files) * 3 * out_h * out_w
    _remove_crashed_builds(folder.parent)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.{os.getpid()}.", suffix=".tmp", dir=folder.parent))
    except OSError as err:
        raise _cache_error(folder.parent, err) from None
    free = shutil.disk_usage(tmp).free
    if need > free:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"the {out_h}x{out_w} cache of {len(files):,} images needs "
                         f"{need / 1e9:.1f} GB in {folder.parent}, which has {free / 1e9:.1f} GB "
                         "free; set FACE_ATTR_CACHE to a folder with room")
    kept, sizes, corrupt = [], [], []
    start = time.time()
    with _building(tmp, folder, f"the image cache {folder}"):
        with open(tmp / "pixels.u8", "wb") as out:
            for done, (name, result) in enumerate(_decode_in_order(source, members, files, img_size,
                                                                   crop), 1):
                if result is None:
                    corrupt.append(name)
                else:
                    out.write(result[0].numpy().data)  # straight to the file, in order
                    kept.append(name)
                    sizes.append(result[1])
                if verbose and (done % 5000 == 0 or done == len(files)):
                    print(f"\rcaching images: {done}/{len(files)} ({done / (time.time() - start):.0f} "
                          "img/s)", end="" if done < len(files) else "\n", file=sys.stderr, flush=True)
        (tmp / "index.json").write_text(json.dumps({
            "shape": [len(kept), 3, out_h, out_w], "files": kept, "orig_sizes": sizes,
            "corrupt": corrupt, "source": str(source)}))
    try:
        os.rename(tmp, folder)  # atomic; fails if another process finished the same cache first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    cache = _open_cache(folder)
    cache["built"] = (time.time() - start, len(files))
    return cache


# ======== Part 2: a split's partition, identities and landmarks ===================================
def fallback_split(files, identities, seed=0) -> list[str]:
    """A deterministic 80/10/10 train/val/test assignment. With identities, whole identities are
    assigned (shuffled by `seed`, filling train to 80 % of the images, then val to 90 %), so no
    person appears in two parts; without, single images are. With fewer than three identities (or
    images) some parts stay empty: every image of one identity goes to train."""
    groups = {}
    for name, ident in zip(files, identities if identities is not None else files):
        groups.setdefault(ident, []).append(name)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    split_of, seen = {}, 0
    for k in order:
        part = "train" if seen < 0.8 * len(files) else "val" if seen < 0.9 * len(files) else "test"
        for name in groups[keys[k]]:
            split_of[name] = part
        seen += len(groups[keys[k]])
    if len(keys) >= 3:  # tiny sets: no part left empty
        for part, k in (("test", order[-1]), ("val", order[-2])):
            if part not in split_of.values():
                split_of.update({name: part for name in groups[keys[k]]})
    return [split_of[name] for name in files]


def _map_landmarks(points, orig_sizes, img_size, crop):
    """Official landmarks (x, y in the 178x218 frame) -> pixels of the cropped, resized image."""
    out_h, out_w = _size_hw(img_size)
    mapped = torch.empty_like(points)
    for i, (width, height) in enumerate(orig_sizes.tolist()):
        sx, sy = width / OFFICIAL_SIZE[1], height / OFFICIAL_SIZE[0]
        left, top, right, bottom = crop_box(width, height, crop)
        mapped[i, :, 0] = (points[i, :, 0] * sx - left) * out_w / (right - left)
        mapped[i, :, 1] = (points[i, :, 1] * sy - top) * out_h / (bottom - top)
    return mapped


def read_identities(layout, files) -> tuple[dict | None, int]:
    """(file -> identity for `files`, or None unless the identity file covers all of them;
    how many of `files` it covers)."""
    if "identity_CelebA" not in layout.files:
        return None, 0
    _, rows = read_annotation(layout.files["identity_CelebA"])
    covered = sum(f in rows for f in files)
    return ({f: int(rows[f][0]) for f in files} if covered == len(files) else None), covered


def assign_partition(layout, files, identities, verbose=False, say_split=True) -> tuple[dict, str]:
    """file -> 0/1/2 (train/val/test) and 'official' or 'fallback': the official partition when it
    covers `files` and leaves no part empty, else fallback_split (with a printed notice)."""
    if "list_eval_partition" in layout.files:
        _, rows = read_annotation(layout.files["list_eval_partition"])
        if all(f in rows for f in files):
            parts = {f: int(rows[f][0]) for f in files}
            if len(set(parts.values())) == 3:
                return parts, "official"
    if verbose and say_split:
        why = "no partition file" if "list_eval_partition" not in layout.files else \
            "the official partition leaves a part empty for the images present"
        by = "by identity" if identities is not None else "by image (no usable identity file)"
        print(f"note: {why}; using a deterministic 80/10/10 split {by}", file=sys.stderr)
    ids = [identities[f] for f in files] if identities is not None else None
    names = ("train", "val", "test")
    return {f: names.index(p) for f, p in zip(files, fallback_split(files, ids))}, "fallback"


# ======== Part 2: the batch stream, and the order of the batches ==================================
GPU_CACHE_MODES = ("auto", "on", "off")


class BatchStream:
    """Gathers the uint8 rows of upcoming batches from host images (the memory-mapped cache) in a
    background thread, `ahead` steps before they are asked for, into pinned memory when the
    batches go to a GPU (so the copy there is asynchronous). It only computes early what
    get_batch would compute anyway: a batch stays a pure function of its step."""

    def __init__(self, images, ahead=4, pin=False):
        self.images, self.ahead, self.pin = images, ahead, pin
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.pending = {}  # (batch settings, step) -> Future of the gathered rows

    def gather(self, idx):
        out = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        return torch.index_select(self.images, 0, idx, out=out)

    def take(self, step, settings, indices_of):
        """The rows of batch `step` (indices_of(step) -> indices), and queue the next steps."""
        future = self.pending.pop((settings, step), None)
        wanted = [(settings, s) for s in range(step + 1, step + 1 + self.ahead)]
        for key in set(self.pending) - set(wanted):
            self.pending.pop(key).cancel()  # a jump (resume) or other settings: drop stale work
        for key in wanted:
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self.gather, indices_of(key[1]))
        return future.result() if future is not None else self.gather(indices_of(step))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


# ======== Part 2: metrics.jsonl, as plot_metrics reads it =========================================
def read_jsonl(path) -> list[dict]:
    """Read a JSON-lines file (e.g. metrics.jsonl) into a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ======== Part 3: the demo faces, the synthetic CelebA ============================================
# Procedurally drawn faces in the official file layout, so every method runs in minutes on a CPU
# without the 1.4 GB download, and the same loader (and torchvision's CelebA class) reads them.
# Each image is a pure function of its parameters (`render_face(params)`), stored in
# demo_faces.json, so any image can be drawn again with one attribute changed: the ground truth
# that lets the benchmarks measure a true edit error.
#
# The head is a small 3-D model: feature points (eyes, nose, mouth corners, ...) have a depth, are
# turned by yaw and pitch and projected orthographically; the drawn face is then rotated by roll
# about its centre. The 5 landmarks come from the same projection, so they are exact.
DEMO_ATTRS = ("Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Eyeglasses", "Gray_Hair",
              "Male", "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Smiling",
              "Wearing_Hat", "Young")
DEMO_FIXED = {name: 0 for name in CELEBA_ATTRS if name not in DEMO_ATTRS}  # never drawn: absent
HAIR_COLOURS = {"black": (28, 24, 22), "brown": (105, 66, 36), "blond": (226, 196, 120),
                "gray": (168, 168, 172), "auburn": (150, 52, 30)}  # auburn: none of the four labels
HAIR_LABEL = {"black": "Black_Hair", "brown": "Brown_Hair", "blond": "Blond_Hair", "gray": "Gray_Hair"}
SKIN = ((224, 172, 140), (198, 140, 100), (150, 100, 70), (100, 66, 46))  # not pale
PALE_SKIN = ((250, 222, 210), (240, 212, 196))
DEMO_IMAGES_PER_IDENTITY = 30


def sample_demo_faces(n_identities, images_per_identity=DEMO_IMAGES_PER_IDENTITY, seed=0) -> list[dict]:
    """The render parameters of every demo image, deterministic by seed.

    Per identity (fixed across its images): face shape, skin tone, eye colour and spacing, nose,
    hair style and natural colour, background, clothes, Male, Young, Pale_Skin, Bald.
    Per image: pose, smile and mouth opening, glasses, bangs, hat, dyed hair (15 %), mustache and
    beard. Correlations are CelebA-like but not deterministic: Mustache, beards and Bald mostly
    with Male, Gray_Hair only with Young=0, mouths open more often when smiling. Rates are
    raised over CelebA's (glasses 30 %, not 6.5 %) so every rendered attribute can be learned.
    """
    rng = np.random.default_rng(seed)
    faces = []
    for ident in range(n_identities):
        male, young = rng.random() < 0.45, rng.random() < 0.7
        natural = "gray" if not young and rng.random() < 0.6 else \
            rng.choice(["black", "brown", "blond", "auburn"], p=[0.35, 0.3, 0.22, 0.13])
        trait = dict(
            identity=ident + 1, male=bool(male), young=bool(young), pale=bool(rng.random() < 0.25),
            bald=bool(male and not young and rng.random() < 0.45),
            skin=int(rng.integers(len(SKIN))), face_w=float(rng.uniform(0.88, 1.08)),
            face_h=float(rng.uniform(0.92, 1.08)), eye_gap=float(rng.uniform(-3, 3)),
            eye_color=[int(v) for v in rng.choice([[70, 45, 25], [40, 90, 150], [60, 110, 60], [30, 30, 30]])],
            nose=float(rng.uniform(0.8, 1.25)), long_hair=bool(rng.random() < (0.2 if male else 0.85)),
            bg=[int(v) for v in rng.integers(40, 220, 3)], shirt=[int(v) for v in rng.integers(20, 230, 3)],
            hat_color=[int(v) for v in rng.integers(20, 230, 3)], natural_hair=str(natural),
            glasses_rate=float(rng.choice([0.1, 0.6])))
        for _ in range(images_per_identity):
            smile = float(rng.uniform(0, 1))
            hair = trait["natural_hair"]
            if rng.random() < 0.15:  # dyed for this photo
                hair = str(rng.choice([c for c in ("black", "brown", "blond", "auburn") if c != hair]))
            faces.append(dict(
                trait, hair=hair, glasses=bool(rng.random() < trait["glasses_rate"]),
                bangs=bool(not trait["bald"] and rng.random() < 0.3), hat=bool(rng.random() < 0.15),
                mustache=bool(rng.random() < (0.35 if male else 0.02)),
                beard=bool(rng.random() < (0.4 if male else 0.01)),
                yaw=float(rng.uniform(-30, 30)), pitch=float(rng.uniform(-10, 10)),
                roll=float(rng.uniform(-12, 12)), smile=smile,
                mouth_open=float(np.clip(rng.uniform(0, 1) + 0.3 * (smile - 0.5), 0, 1)),
                render_seed=int(rng.integers(2**31))))
    order = rng.permutation(len(faces))  # files mix identities, as CelebA's do
    return [faces[i] for i in order]


def demo_labels(params) -> dict:
    """The 40 CelebA labels (0/1) of one demo face, derived from its parameters."""
    labels = dict(DEMO_FIXED)
    hair = None if params["bald"] else HAIR_LABEL.get(params["hair"])
    labels.update({name: 0 for name in HAIR_LABEL.values()})
    if hair:
        labels[hair] = 1
    labels.update(Bald=params["bald"], Bangs=params["bangs"] and not params["bald"],
                  Eyeglasses=params["glasses"], Male=params["male"],
                  Mouth_Slightly_Open=params["mouth_open"] > 0.5, Mustache=params["mustache"],
                  No_Beard=not params["beard"], Pale_Skin=params["pale"], Smiling=params["smile"] > 0.5,
                  Wearing_Hat=params["hat"], Young=params["young"])
    return {name: int(labels[name]) for name in CELEBA_ATTRS}


def apply_attr_changes(params, changes) -> dict:
    """A copy of `params` with the attributes in `changes` set (value > 0.5 = present), made
    consistent by one rule: a hair colour set to 1 replaces the hair colour (and ends baldness);
    the current colour set to 0 becomes auburn (none of the four labels); Bald=1 clears bangs;
    Bangs=1 ends baldness; Smiling / Mouth_Slightly_Open move the expression strength just across
    the 0.5 threshold (to 0.8 or 0.2) only when the label actually changes; No_Beard=0 adds a
    beard. Nothing else changes: pose, identity and every other attribute stay as they were."""
    out = dict(params)
    for name, value in changes.items():
        on = float(value) > 0.5
        colour = {v: k for k, v in HAIR_LABEL.items()}.get(name)
        if colour:
            if on:
                out.update(hair=colour, bald=False)
            elif out["hair"] == colour:
                out["hair"] = "auburn"
        elif name == "Bald":
            out.update(bald=on, bangs=out["bangs"] and not on)
        elif name == "Bangs":
            out.update(bangs=on, bald=out["bald"] and not on)
        elif name in ("Smiling", "Mouth_Slightly_Open"):
            key = "smile" if name == "Smiling" else "mouth_open"
            if (out[key] > 0.5) != on:
                out[key] = 0.8 if on else 0.2
        elif name == "No_Beard":
            out["beard"] = not on
        elif name in ("Eyeglasses", "Male", "Mustache", "Pale_Skin", "Wearing_Hat", "Young"):
            key = {"Eyeglasses": "glasses", "Male": "male", "Mustache": "mustache",
                   "Pale_Skin": "pale", "Wearing_Hat": "hat", "Young": "young"}[name]
            out[key] = on
        else:
            raise InputError(f"the demo set does not draw {name!r}; it draws {', '.join(DEMO_ATTRS)}")
    return out


def render_face(params):
    """Draw one face -> (PIL RGB image 178x218, landmarks (5, 2) float, bbox (x, y, w, h)).

    Drawn at 2x and downsampled (antialiasing). Frontal landmarks sit where CelebA's aligned
    images have them: eyes near (70, 112) and (108, 112), nose (89, 135), mouth corners near
    (72, 152) and (106, 152).
    """
    S = 2  # supersampling
    W, H = OFFICIAL_SIZE[1] * S, OFFICIAL_SIZE[0] * S
    cx, cy = 89 * S, 125 * S  # head centre
    yaw, pitch, roll = (math.radians(params[k]) for k in ("yaw", "pitch", "roll"))
    fw, fh = params["face_w"], params["face_h"]
    if params["male"]:
        fw *= 1.04

    def project(x, y, z):
        """Head coordinates (official px, x right, y down, z towards the camera) -> canvas px."""
        x, y, z = x * fw, y * fh, z
        x, z = x * math.cos(yaw) + z * math.sin(yaw), -x * math.sin(yaw) + z * math.cos(yaw)
        y, z = y * math.cos(pitch) - z * math.sin(pitch), y * math.sin(pitch) + z * math.cos(pitch)
        return (cx + x * S, cy + y * S)

    def ellipse(draw, centre, rx, ry, **kw):
        draw.ellipse((centre[0] - rx * S, centre[1] - ry * S, centre[0] + rx * S, centre[1] + ry * S), **kw)

    skin = (PALE_SKIN[params["skin"] % 2] if params["pale"] else SKIN[params["skin"]])
    shade = tuple(int(c * 0.78) for c in skin)
    hair = HAIR_COLOURS[params["hair"]]
    squash = math.cos(yaw)  # features seen at an angle get narrower

    canvas = Image.new("RGB", (W, H), tuple(params["bg"]))
    back = ImageDraw.Draw(canvas)
    back.rectangle((0, 0, W, H // 3), fill=tuple(min(255, c + 25) for c in params["bg"]))
    back.ellipse((cx - 85 * S, cy + 62 * S, cx + 85 * S, cy + 190 * S), fill=tuple(params["shirt"]))
    back.rectangle((cx - 20 * S, cy + 35 * S, cx + 20 * S, cy + 75 * S), fill=shade)  # neck

    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))  # the head, rotated by roll at the end
    draw = ImageDraw.Draw(layer)
    centre = project(0, 0, -10)
    if not params["bald"]:  # hair behind the head
        ellipse(draw, project(0, -10, -20), 50 * fw, 58 * fh, fill=hair)
        if params["long_hair"]:
            left, right = project(-42, 0, -20), project(42, 0, -20)
            draw.rectangle((left[0] - 10 * S, left[1], right[0] + 10 * S, left[1] + 75 * S), fill=hair)
    for side in (-1, 1):  # ears
        ellipse(draw, project(side * 44, 5, -5), 7 * squash + 2, 11, fill=shade)
    jaw = 1.06 if params["male"] else 0.96
    ellipse(draw, centre, 43 * fw * (0.55 + 0.45 * squash), 52 * fh * jaw, fill=skin)
    if params["beard"]:
        chin = project(0, 34, 28)
        draw.pieslice((chin[0] - 40 * fw * S, chin[1] - 34 * S, chin[0] + 40 * fw * S, chin[1] + 20 * S),
                      0, 180, fill=tuple(int(c * 0.8) for c in hair) if not params["bald"] else (60, 50, 45))
    if not params["young"]:  # wrinkles
        for dy in (-36, -32):
            a, b = project(-18, dy, 36), project(18, dy, 36)
            draw.line((a, b), fill=shade, width=S)
    brow_w = 4 if params["male"] else 2
    eyes = []
    for side in (-1, 1):
        eye = project(side * (19 + params["eye_gap"] / 2), -13, 30)
        eyes.append(eye)
        ellipse(draw, eye, 7.5 * squash + 0.5, 4.2, fill=(245, 245, 245))
        ellipse(draw, eye, 3.6 * squash + 0.3, 3.6, fill=tuple(params["eye_color"]))
        ellipse(draw, eye, 1.6, 1.6, fill=(10, 10, 10))
        a, b = project(side * 12, -22, 32), project(side * 27, -21, 30)
        draw.line((a, b), fill=tuple(int(c * 0.6) for c in hair) if not params["bald"] else (70, 60, 50),
                  width=brow_w * S)
    nose_tip = project(0, 10 * params["nose"], 42)
    nose_top = project(0, -8, 36)
    draw.polygon([nose_top, (nose_tip[0] - 5 * S, nose_tip[1]), (nose_tip[0] + 5 * S, nose_tip[1])], fill=shade)
    smile, opening = params["smile"], params["mouth_open"]
    corners = [project(side * 17, 27 - 4 * smile, 30) for side in (-1, 1)]
    mid_top = project(0, 26 + 1 * smile, 33)
    mid_bottom = project(0, 28 + 3 * smile + 9 * opening, 33)
    lips = (200, 60, 80) if not params["male"] else (165, 85, 80)
    draw.polygon([corners[0], mid_top, corners[1], mid_bottom], fill=lips)
    if opening > 0.25:  # open mouth: dark inside with teeth
        inner_top = project(0, 27.5 + smile, 33)
        inner_bottom = project(0, 27 + 3 * smile + 8 * opening, 33)
        inner = [(corners[0][0] + 4 * S, corners[0][1]), inner_top, (corners[1][0] - 4 * S, corners[1][1]), inner_bottom]
        draw.polygon(inner, fill=(60, 20, 25))
        draw.rectangle((inner[0][0] + 2 * S, inner_top[1], inner[2][0] - 2 * S, inner_top[1] + 2.5 * S), fill=(240, 240, 235))
    if params["mustache"]:
        a, b = project(-16, 21, 36), project(16, 21, 36)
        draw.polygon([a, b, (b[0], b[1] + 4 * S), (a[0], a[1] + 4 * S)],
                     fill=tuple(int(c * 0.7) for c in hair) if not params["bald"] else (50, 40, 35))
    if params["bangs"] and not params["bald"]:
        pts = [project(-40, -52, 34), project(40, -52, 34)]  # hairline, then a jagged fringe
        pts += [project(x, -28 - 3 * (i % 2), 36) for i, x in enumerate(range(36, -40, -8))]
        draw.polygon(pts, fill=hair)
    if params["glasses"]:
        for eye in eyes:
            draw.rounded_rectangle((eye[0] - 11 * S * squash - S, eye[1] - 7 * S,
                                    eye[0] + 11 * S * squash + S, eye[1] + 7 * S),
                                   radius=3 * S, outline=(20, 20, 20), width=3 * S)
        draw.line((eyes[0][0] + 10 * S * squash, eyes[0][1], eyes[1][0] - 10 * S * squash, eyes[1][1]),
                  fill=(20, 20, 20), width=3 * S)
    if params["hat"]:
        brim_l, brim_r = project(-58, -36, 0), project(58, -36, 0)
        top_l, top_r = project(-40, -80, 0), project(40, -80, 0)
        color = tuple(params["hat_color"])
        draw.polygon([brim_l, top_l, top_r, brim_r], fill=color)
        draw.polygon([(brim_l[0] - 6 * S, brim_l[1] - 3 * S), (brim_r[0] + 6 * S, brim_r[1] - 3 * S),
                      (brim_r[0] + 6 * S, brim_r[1] + 6 * S), (brim_l[0] - 6 * S, brim_l[1] + 6 * S)], fill=color)

    points = [eyes[0], eyes[1], nose_tip, corners[0], corners[1]]
    pivot = (cx, cy)
    paste_rotated(canvas, layer, -math.degrees(roll), pivot)
    cos_r, sin_r = math.cos(roll), math.sin(roll)
    landmarks = np.array([[(pivot[0] + (x - pivot[0]) * cos_r - (y - pivot[1]) * sin_r) / S,
                           (pivot[1] + (x - pivot[0]) * sin_r + (y - pivot[1]) * cos_r) / S]
                          for x, y in points], dtype=np.float32)
    box_w, box_h = 2 * 50 * fw, 2 * 62 * fh
    bbox = (int(89 - box_w / 2), int(125 - box_h / 2 - 8), int(box_w), int(box_h))
    image = canvas.resize(OFFICIAL_SIZE[::-1], Image.Resampling.LANCZOS)
    return image, landmarks, bbox


def paste_rotated(canvas, layer, degrees, pivot):
    """canvas.paste(r, (0, 0), r) for r = layer.rotate(degrees, BICUBIC, center=pivot), the same
    pixels for less work: only the box that holds the layer's drawing and its turned footprint
    (plus the bicubic filter's reach) is rotated; elsewhere r is transparent anyway."""
    box = layer.getbbox(alpha_only=True)
    if box is None:
        return
    cos_a, sin_a = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    xs, ys = [box[0], box[2]], [box[1], box[3]]
    for x, y in ((box[0], box[1]), (box[2], box[1]), (box[0], box[3]), (box[2], box[3])):
        xs.append(pivot[0] + (x - pivot[0]) * cos_a + (y - pivot[1]) * sin_a)
        ys.append(pivot[1] - (x - pivot[0]) * sin_a + (y - pivot[1]) * cos_a)
    margin = 4  # bicubic reads 2 px either side
    left, top = max(0, math.floor(min(xs)) - margin), max(0, math.floor(min(ys)) - margin)
    right = min(layer.width, math.ceil(max(xs)) + margin)
    bottom = min(layer.height, math.ceil(max(ys)) + margin)
    part = layer.crop((left, top, right, bottom)).rotate(
        degrees, resample=Image.Resampling.BICUBIC, center=(pivot[0] - left, pivot[1] - top))
    canvas.paste(part, (left, top), part)


def _render_to_file(job):
    """Worker: draw one face and write its JPEG; returns its landmarks and box."""
    path, params = job
    image, landmarks, bbox = render_face(params)
    image.save(path, quality=95)
    return landmarks.round().astype(int).tolist(), bbox


def make_demo(root, n_identities=200, images_per_identity=DEMO_IMAGES_PER_IDENTITY, seed=0) -> Path:
    """Generate the demo set in the official CelebA layout under `root` (atomic: written to a
    temporary folder beside it, renamed into place at the end)."""
    root = Path(root)
    faces = sample_demo_faces(n_identities, images_per_identity, seed)
    names = [f"{i + 1:06d}.jpg" for i in range(len(faces))]
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    except OSError as err:
        raise _cache_error(root.parent, err) from None
    with _building(tmp, root, f"the demo set {root}"):
        (tmp / "img_align_celeba").mkdir()
        start = time.time()
        jobs = [(tmp / "img_align_celeba" / name, params) for name, params in zip(names, faces)]
        workers = min(os.cpu_count() or 1, 8)
        if workers > 1 and len(jobs) > 64:
            import multiprocessing  # the workers leave Ctrl-C to this process, which cleans up
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"), initializer=signal.signal,
                initargs=(signal.SIGINT, signal.SIG_IGN))
            try:
                results = list(pool.map(_render_to_file, jobs, chunksize=32))
            finally:
                pool.shutdown(cancel_futures=True)
        else:
            results = [_render_to_file(job) for job in jobs]
        print(f"demo set: {len(faces)} faces of {n_identities} identities drawn in {time.time() - start:.1f} s"
              f" -> {root}", file=sys.stderr)
        ids = sorted({p["identity"] for p in faces})
        order = np.random.default_rng(seed + 1).permutation(len(ids))
        n_held = max(1, round(0.1 * len(ids)))  # identities in val and in test each (80/10/10)
        part_of = {ids[k]: (0 if r < len(ids) - 2 * n_held else 1 if r < len(ids) - n_held else 2)
                   for r, k in enumerate(order)}
        labels = [demo_labels(p) for p in faces]
        lines = [f"{len(faces)}", " ".join(CELEBA_ATTRS)]
        lines += [f"{n} " + " ".join(f"{2 * lab[a] - 1:2d}" for a in CELEBA_ATTRS) for n, lab in zip(names, labels)]
        (tmp / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
        (tmp / "identity_CelebA.txt").write_text("".join(f"{n} {p['identity']}\n" for n, p in zip(names, faces)))
        (tmp / "list_eval_partition.txt").write_text("".join(f"{n} {part_of[p['identity']]}\n" for n, p in zip(names, faces)))
        header = " ".join(f"{k}_{c}" for k in LANDMARK_NAMES for c in "xy")
        (tmp / "list_landmarks_align_celeba.txt").write_text(
            f"{len(faces)}\n{header}\n" + "".join(f"{n} " + " ".join(f"{v}" for pt in r[0] for v in pt) + "\n"
                                                  for n, r in zip(names, results)))
        (tmp / "list_bbox_celeba.txt").write_text(
            f"{len(faces)}\nimage_id x_1 y_1 width height\n" + "".join(
                f"{n} " + " ".join(str(v) for v in r[1]) + "\n" for n, r in zip(names, results)))
        (tmp / "demo_faces.json").write_text(json.dumps(dict(zip(names, faces))))
        (tmp / "README.txt").write_text(
            "Synthetic demo CelebA (generated by common.py; not real people). Official CelebA layout.\n"
            f"Rendered attributes: {', '.join(DEMO_ATTRS)}; all others are -1 (absent).\n"
            "demo_faces.json holds every image's render parameters (common.render_counterfactual).\n"
            "list_bbox_celeba.txt boxes the head in these images (CelebA's refer to the wild images).\n")
        try:
            os.replace(tmp, root)  # atomic; fails if another process finished first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def demo_root(spec="demo") -> Path:
    """'demo' (200 identities x 30 images) or 'demo:N' (N identities) -> the folder of that demo
    set under cache_root()/demo/, generated on first use and reused afterwards."""
    count = spec.partition(":")[2]
    if spec != "demo" and not count.isdigit():
        raise InputError(f"unknown demo set {spec!r}; expected 'demo' or 'demo:N' (N identities)")
    if count and int(count) < 1:
        raise InputError(f"{spec}: demo:N needs N ≥ 1 (N identities of {DEMO_IMAGES_PER_IDENTITY} "
                         "images each; 'demo' is 200)")
    n_identities = int(count) if count else 200
    root = cache_root() / "demo" / f"seed0_ids{n_identities}"
    if not (root / "demo_faces.json").is_file():
        make_demo(root, n_identities)
    return root


def load_demo_params(root) -> dict:
    """file name -> render parameters of every image of a demo set."""
    path = Path(root) / "demo_faces.json"
    if not path.is_file():
        raise InputError(f"{root} is not a demo set (no demo_faces.json)")
    return json.loads(path.read_text())


def render_counterfactual(root, file_name, changes):
    """The same demo face (identity, pose, expression, all else) with `changes` applied, e.g.
    {'Eyeglasses': 1}, as a 178x218 PIL image: the ground truth of an edit."""
    params = load_demo_params(root)[file_name]
    return render_face(apply_attr_changes(params, changes))[0]


# ======== Part 4: the command line: info, download, bench =========================================
CELEBA_FILES_HELP = """\
CelebA cannot be downloaded automatically here. Fetch these files by hand from the official page
(https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html -> the Google Drive folder: 'Img', 'Anno', 'Eval'):
  Img/img_align_celeba.zip            (1.4 GB; no need to unzip: it is read in place)
  Anno/list_attr_celeba.txt           (the 40 attributes: required)
  Anno/identity_CelebA.txt            (identities: needed by dual_transfer.py and mad.py)
  Anno/list_landmarks_align_celeba.txt (landmarks: pose supervision in mad.py)
  Anno/list_bbox_celeba.txt
  Eval/list_eval_partition.txt        (the official train/val/test split)
and keep the folders as they are:
  {root}/Img/img_align_celeba.zip (or Img/img_align_celeba/000001.jpg ...)  {root}/Anno/...  {root}/Eval/...
(all files side by side in {root}, torchvision's layout {root}/celeba/..., and the Kaggle copy
'jessicali9530/celeba-dataset' unzipped into {root} are read as well). Then: python common.py info {root}"""


def info(data):
    """Print what `data` holds: layout, counts, partitions, identities, attribute positive rates.
    It reads the annotation files and lists the images, and decodes none (seconds, even for the
    202,599-image folder); corrupt images are found and counted when a run builds the cache."""
    layout = find_layout(data)
    print(f"layout: {layout.name}  ({layout.root})")
    kind = "zip, read in place" if layout.image_dir.suffix.lower() == ".zip" else "folder"
    print(f"images: {layout.image_dir} ({kind})")
    for stem, what in ANNOTATIONS.items():
        found = layout.files[stem].relative_to(layout.root) if stem in layout.files else "-- missing"
        print(f"  {stem:<28} {str(found):<34} {what}")
    header, attr_rows = read_annotation(layout.files["list_attr_celeba"])
    header = header or list(CELEBA_ATTRS)
    members = list_images(layout.image_dir)
    files = sorted(members.keys() & attr_rows.keys())
    print(f"labelled images present: {len(files)} ({len(members)} image files, {len(attr_rows)} "
          "label rows); not decoded here: corrupt ones are counted when a run builds the cache")
    identity_of, covered = read_identities(layout, files)
    part_of, how = assign_partition(layout, files, identity_of)
    print("partition: " + ("official" if how == "official" else "deterministic 80/10/10 fallback "
                           "(no usable official partition for the images present)"))
    sizes = collections.Counter(part_of.values())
    print("split sizes: " + ", ".join(f"{s} {sizes[k]}" for k, s in enumerate(("train", "val", "test"))))
    empty = [s for k, s in enumerate(("train", "val", "test")) if not sizes[k]]
    if empty:
        people = "" if identity_of is None else f" of {len(set(identity_of.values()))} identity(ies)"
        print(f"note: {' and '.join(empty)} empty: {len(files)} image(s){people} cannot fill "
              "three identity-disjoint parts; training works, evaluation needs at least 3 "
              "identities (or images)")
    if identity_of is not None:
        counts = collections.Counter(identity_of.values()).values()
        print(f"identities: {len(counts)} ({len(files) / max(len(counts), 1):.1f} images each on average, "
              f"{sum(c > 1 for c in counts)} with two or more)")
    elif "identity_CelebA" in layout.files:
        print(f"identities: unused: {layout.files['identity_CelebA'].name} covers {covered} of the "
              f"{len(files)} images (identity pairs and triplets need every image covered)")
    else:
        print("identities: none (no identity_CelebA file)")
    landmarks = "list_landmarks_align_celeba" in layout.files and all(
        f in read_annotation(layout.files["list_landmarks_align_celeba"])[1] for f in files)
    print(f"landmarks: {'yes' if landmarks else 'none'}")
    print("attribute positive rates (all images):")
    positive = (np.array([attr_rows[f] for f in files]) == "1").sum(0) if files else 0  # "-1"/"0": absent
    rates = (positive / len(files)).tolist() if files else [float("nan")] * len(header)
    for i in range(0, len(rates), 4):
        print("  " + "".join(f"{name:<20}{rate:>6.1%}    " for name, rate in
                             zip(header[i:i + 4], rates[i:i + 4])))


def download(root):
    """Try torchvision's CelebA download into `root`; on failure say what to fetch by hand."""
    from torchvision.datasets import CelebA

    try:
        CelebA(root, split="all", download=True)
        print(f"CelebA is in {Path(root) / 'celeba'}")
    except Exception as err:  # no network, Google Drive quota, missing gdown: all end the same way
        print(f"automatic download failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        print(CELEBA_FILES_HELP.format(root=root))
        sys.exit(1)


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (getrusage: kB on Linux, bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9


def bench(data, img_size=128, batch_size=64, steps=300, device="auto", split="train"):
    """Loader figures: the cache build (img/s, peak resident memory), then `steps` batches into
    `device` by both paths: resident (the GPU copy; on a CPU the memory map gathered in the loop)
    and streamed (gathered from the memory map a few steps ahead in a background thread)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    images_dir = cache_root() / "images"
    before = set(os.listdir(images_dir)) if images_dir.is_dir() else set()
    start = time.time()
    data = load_celeba(data, split=split, img_size=img_size)
    seconds = time.time() - start
    built = images_dir.is_dir() and set(os.listdir(images_dir)) - before
    if built:
        total = len(json.loads((images_dir / sorted(built)[0] / "index.json").read_text())["files"])
        print(f"cache build: {total:,} images in {seconds:.1f} s ({total / seconds:,.0f} img/s, "
              f"annotations and file listing included); peak resident memory {peak_rss_gb():.2f} GB")
    else:
        print(f"cache reused ({seconds:.1f} s to open; point FACE_ATTR_CACHE at an empty folder to "
              f"time a build); peak resident memory {peak_rss_gb():.2f} GB")
    nbytes = data.images.numel()
    print(f"{split} split: {len(data.files):,} images of {img_size} px = {nbytes / 1e9:.2f} GB")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = {"on": "GPU-resident" if device.type == "cuda" else "in memory (memory map)",
             "off": "streamed (background thread" + (", pinned memory)" if device.type == "cuda" else ")")}
    for mode in ("on", "off"):
        if mode == "on" and device.type == "cuda" and nbytes > 0.9 * torch.cuda.mem_get_info(device)[0]:
            print(f"{names[mode]}: skipped, {nbytes / 1e9:.1f} GB does not fit in the GPU's free memory")
            continue
        moved = to_device(data, device, gpu_cache=mode)
        for step in range(5):  # warm-up
            get_batch(moved, step, batch_size, device=device, hflip=True, channels_last=True)
        sync()
        start = time.time()
        for step in range(5, 5 + steps):
            get_batch(moved, step, batch_size, device=device, hflip=True, channels_last=True)
        sync()
        seconds = time.time() - start
        print(f"{names[mode]}: {steps / seconds:,.1f} batches/s, {steps * batch_size / seconds:,.0f} "
              f"img/s into {device} (batch {batch_size}, {steps} steps, hflip + channels_last)")
        del moved
    print(f"peak resident memory (whole run): {peak_rss_gb():.2f} GB")


def main(argv=None):
    parser = argparse.ArgumentParser(description="CelebA tools: look at a dataset, download it, "
                                                 "measure the loader.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="layout, counts, partitions, attribute rates").add_argument(
        "data", help="dataset folder, or 'demo' / 'demo:N'")
    sub.add_parser("download", help="download CelebA (or say how)").add_argument(
        "root", help="folder to download into")
    what = ("cache build img/s and peak resident memory, then batches/s and img/s for the "
            "GPU-resident and the streamed path")
    b = sub.add_parser("bench", help=what, description=what)
    b.add_argument("--data", default="demo", help="dataset folder, or 'demo' / 'demo:N'")
    b.add_argument("--img-size", type=int, default=128, help="side of the cached images in pixels")
    b.add_argument("--batch-size", type=int, default=64, help="images per batch")
    b.add_argument("--steps", type=int, default=300, help="batches timed per path")
    b.add_argument("--split", default="train", choices=SPLITS, help="which split to batch from")
    b.add_argument("--device", default="auto", help="cuda, cpu, ... (auto: cuda when available)")
    args = parser.parse_args(argv)
    if args.command == "info":
        info(args.data)
    elif args.command == "download":
        download(args.root)
    else:
        if args.img_size < 1 or args.batch_size < 1 or args.steps < 1:
            raise InputError("--img-size, --batch-size and --steps must be at least 1")
        bench(args.data, args.img_size, args.batch_size, args.steps, args.device, args.split)


if __name__ == "__main__":
    try:
        main()
    except InputError as err:  # bad input: one clear line, no traceback
        sys.exit(f"error: {err}")
    except KeyboardInterrupt as err:  # Ctrl-C: its one line, and the shell's code for SIGINT
        print(str(err) or "interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
