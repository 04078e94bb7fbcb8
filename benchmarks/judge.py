"""The independent judge: an attribute classifier that scores every method the same way.

No method's own discriminator or classifier may grade that method's edits: a generator trained
against a network learns that network's blind spots, so its own classifier is the easiest judge
there is. This one is trained separately, on real images of the training split only, and never
sees a generated image. It also supplies the features for a Fréchet distance between real and
generated images: no Inception weights can be fetched offline, so this is a **judge-feature FD**,
comparable between methods scored by the same judge, not the FID of the literature.

Model: 4 stages of [conv 3x3, BatchNorm, ReLU] x 2 + max-pool (widths 32, 64, 128, 256), global
average pooling -> a 256-d feature (the FD features), dropout, a linear layer -> logits (B, A).
Inputs: --img-size px (default 64), centre crop 170, in [-1, 1]; method outputs of another size
are resized to it (bilinear, antialiased) by `Judge.prepare`.

    python benchmarks/judge.py --data ./celeba --out runs/judge/celeba.pt      # GPU: minutes
    python benchmarks/judge.py --out runs/judge/demo.pt                        # demo set
    python benchmarks/judge.py --smoke --out /tmp/judge.pt                     # seconds

Prints the per-attribute test accuracy beside the majority baseline (always answering the most
common value), marks the attributes it reads at least 5 points better than that (the ones
benchmarks/evaluate.py scores), and stores both numbers in the checkpoint. --out is checked before
any work: a folder that cannot be written is refused, and so is an existing file unless --overwrite.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from common import InputError  # noqa: E402
from cli import output_path, run, vet, write_output  # noqa: E402

# --smoke: 200 steps (seconds) is the least that reliably beats the majority rate on demo:16's
# per-image attributes (Black_Hair by 0.32-0.37 over seeds 0-2; tests/test_benchmarks.py relies on it).
SMOKE = dict(data="demo:16", img_size=32, width=8, steps=200, batch_size=32)
MIN_MARGIN = 0.05  # an attribute is judged where the judge beats its majority rate by this much


class JudgeNet(nn.Module):
    """VGG-style CNN: x (B, 3, S, S) -> (logits (B, A), features (B, 8·width))."""

    def __init__(self, num_attrs, width=32):
        super().__init__()
        layers, in_ch = [], 3
        for i in range(4):
            out_ch = width * 2 ** i
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                       nn.ReLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_ch), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch = out_ch
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 8·width)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(in_ch, num_attrs))

    def forward(self, images):
        features = self.body(images)
        return self.head(features), features


class Judge:
    """A trained judge, ready to score images of any size: probabilities and FD features."""

    def __init__(self, state, device="cpu"):
        self.config, self.attr_names = state["config"], state["attr_names"]
        self.img_size, self.crop = self.config["img_size"], self.config["crop"]
        self.net = JudgeNet(len(self.attr_names), self.config["width"])
        self.net.load_state_dict(state["model"])
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.test_accuracy = state.get("test_accuracy")

    def prepare(self, images):
        """Images in [-1, 1] of any size -> (B, 3, S, S) at the judge's size."""
        images = images.float()
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear",
                                   antialias=True, align_corners=False).clamp(-1, 1)
        return images

    @torch.no_grad()
    def __call__(self, images, batch_size=256):
        """-> (P(attribute present) (B, A), features (B, F)), both on the CPU."""
        probs, feats = [], []
        for chunk in images.split(batch_size):
            logits, features = self.net(self.prepare(chunk).to(self.device))
            probs.append(torch.sigmoid(logits.float()).cpu())
            feats.append(features.float().cpu())
        return torch.cat(probs), torch.cat(feats)

    def columns(self, names):
        """Indices of `names` among the judge's attributes (InputError for one it does not know)."""
        missing = [n for n in names if n not in self.attr_names]
        if missing:
            raise InputError(f"the judge was not trained on {', '.join(missing)}; it knows "
                             f"{', '.join(self.attr_names)} (train one with --attrs)")
        return [self.attr_names.index(n) for n in names]


def load_judge(path, device="cpu"):
    """A judge written by this script -> Judge; any other file -> InputError saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"judge not found: {path} (train one: python benchmarks/judge.py "
                         f"--data DATA --out {path})")
    try:  # weights_only: a file of unknown origin never runs code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = None
    expected = f"{path}: expected a judge written by benchmarks/judge.py"
    if not isinstance(state, dict):
        raise InputError(f"{expected}, found a file that is not a checkpoint")
    if state.get("script", "judge.py") != "judge.py" or not {"model", "attr_names", "config"} <= set(state):
        raise InputError(f"{expected}, found a checkpoint of {state.get('script', 'another program')}")
    try:
        return Judge(state, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"{expected}; its weights do not fit its configuration "
                         f"({str(err).splitlines()[0]})") from None


def varying_attrs(labels, names):
    """The attributes that take both values in `labels` (a judge cannot learn a constant one)."""
    mean = labels.mean(0)
    return [n for n, m in zip(names, mean.tolist()) if 0 < m < 1]


@torch.no_grad()
def accuracy(net, data, device, batch_size=256):
    """Per-attribute accuracy (A,) on a FaceData."""
    net.eval()
    correct = torch.zeros(len(data.attr_names))
    for start in range(0, len(data.images), batch_size):
        x = common.to_float(data.images[start:start + batch_size].to(device))
        pred = (net(x)[0].float() > 0).float().cpu()
        correct += (pred == data.labels[start:start + batch_size]).float().sum(0)
    net.train()
    return correct / max(len(data.images), 1)


def train_judge(args):
    """Train, report test accuracy, save -> the checkpoint dict."""
    device = torch.device(args.device if args.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    size = args.img_size
    loaded = common.load_celeba(args.data, args.attrs or None, "train", size, args.crop)
    names = loaded.attr_names if args.attrs else varying_attrs(loaded.labels, loaded.attr_names)
    columns = [loaded.attr_names.index(n) for n in names]  # keep the judged columns only
    train = dataclasses.replace(loaded, labels=loaded.labels[:, columns], attr_names=names)
    test = common.load_celeba(args.data, names, "test", size, args.crop, verbose=False)
    if len(test.images) == 0:
        raise InputError(f"the test split of {args.data} is empty: the judge needs held-out images")
    torch.manual_seed(args.seed)
    net = JudgeNet(len(names), args.width).to(device)
    if device.type == "cuda":  # GPU: TF32 matmuls/convolutions and NHWC layout (bf16 below)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    data = common.to_device(train, device)
    batch = min(args.batch_size, len(train.images))
    print(f"judge: {len(names)} attributes, {len(train.images)} training images, {size} px, "
          f"{args.steps} steps on {device}")
    clock = time.time()
    for step in range(args.steps):
        lr = args.lr * (0.1 if step >= 0.75 * args.steps else 1.0)  # a late drop helps accuracy
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels, _ = common.get_batch(data, step, batch, args.seed, device, hflip=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = net(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(args.steps // 10, 1) == 0 or step + 1 == args.steps:
            print(f"  step {step + 1}/{args.steps}  loss {loss.item():.4f}  "
                  f"{(step + 1) * batch / (time.time() - clock):.0f} img/s", flush=True)
    test_acc = accuracy(net, test, device)
    majority = torch.maximum(test.labels.mean(0), 1 - test.labels.mean(0))
    print(f"test accuracy on {len(test.images)} images (majority baseline), * = judged "
          f"(at least {MIN_MARGIN:.2f} above it):")
    for name, acc, base in zip(names, test_acc.tolist(), majority.tolist()):
        print(f"  {name:<22}{acc:.3f}  ({base:.3f}){'  *' if acc - base >= MIN_MARGIN - 1e-9 else ''}")
    print(f"  {'mean':<22}{test_acc.mean():.3f}  ({majority.mean():.3f})")
    state = {"model": {k: v.cpu() for k, v in net.state_dict().items()},
             "config": {k: v for k, v in vars(args).items()}, "attr_names": names,
             "test_accuracy": dict(zip(names, test_acc.tolist())),
             "majority": dict(zip(names, majority.tolist())), "steps": args.steps, "script": "judge.py"}
    print(f"wrote {write_output(args.out, state)}")  # atomic, as every checkpoint here
    return state


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="demo", help="dataset (any layout common.py reads, or demo)")
    parser.add_argument("--out", default="runs/judge/judge.pt", help="checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--attrs", nargs="*", default=[],
                        help="attributes to judge (default: every one that varies in the data)")
    parser.add_argument("--img-size", type=int, default=64, help="judge input size in pixels")
    parser.add_argument("--crop", type=int, default=170, help="centre crop in official pixels")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batches")
    parser.add_argument("--device", default="auto", help="'auto', 'cuda' or 'cpu'")
    parser.add_argument("--smoke", action="store_true", help="tiny run on demo:16 (seconds)")
    args = vet(parser.parse_args(argv), positive=("img_size", "width", "steps", "batch_size", "lr"),
               at_least_zero=("crop", "seed"))
    if args.smoke:
        defaults = parser.parse_args([])
        for name, value in SMOKE.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    output_path(args.out, "--out", args.overwrite)  # before the data is drawn and the judge trained
    return args


def main(argv=None):
    return train_judge(parse_args(argv))


if __name__ == "__main__":
    run(main)
