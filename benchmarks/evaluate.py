"""Score any method's checkpoint with the same independent judge, on the same test images.

Every method file exposes the same tiny contract, `load_for_eval(ckpt_path, device)`, returning a
namespace with attr_names, img_size, crop and, where the method supports them,
edit(images, attr_src, attr_tgt), reconstruct(images), generate(attrs, seed) and
encode(images) -> {name: code}. This script asks for what is there and measures it:

  edit        edit accuracy: each attribute flipped one at a time on every test image; the judge
              (benchmarks/judge.py) must read the flipped value. Real-image judge accuracy is the
              ceiling. On the demo set also the TRUE edit error: the demo renderer draws the same
              face with the attribute flipped (common.render_counterfactual), so the PSNR between
              an edit and that counterfactual measures the edit itself, and the judge's accuracy on
              the counterfactuals is the oracle's (the best an editor can score).
  reconstruct PSNR and SSIM of the reconstruction against the input.
  generate    attribute accuracy of faces generated from the test images' attribute rows (unless
              the namespace says conditional=False: mad.py decodes its prior, and those faces
              enter the FD only).
  encode      with several named codes (mad.py): nearest-neighbour retrieval of identity and
              expression labels from each code (a disentangled code has a strong diagonal).
  all         judge-feature FD between the real test images and the method's outputs (edits,
              or generated faces). Not FID: no Inception weights offline (see judge.py). FD grows
              as the sample shrinks; compare numbers computed on the same number of images.

    python benchmarks/evaluate.py --method attgan --ckpt runs/attgan/ckpt.pt --data demo \\
        --judge runs/judge/demo.pt --json runs/eval/attgan_demo.json
    python benchmarks/evaluate.py --table runs/eval/*_demo.json      # a Markdown results table
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import InputError  # noqa: E402
from judge import load_judge  # noqa: E402

METHODS = ("attgan", "dual_transfer", "cgan", "feature_ae", "mad")
EXPRESSION_ATTRS = ("Smiling", "Mouth_Slightly_Open")


# ================================================================================================
# Metrics
# ================================================================================================
def psnr(images, reference):
    """Peak signal-to-noise ratio per image, dB, for images in [-1, 1] (peak-to-peak 2) -> (B,).
    Identical images give 100 dB (the MSE is floored at 4e-10)."""
    mse = (images.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(4e-10))


def ssim(images, reference, window=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004) per image -> (B,) in [-1, 1]; 1 only for identical
    images. Gaussian window 11, σ 1.5, on [0, 1] intensities, per channel then averaged, 'valid'
    positions only, C1 = 0.01², C2 = 0.03² (the paper's constants). Images smaller than the window
    use a window of their size."""
    x, y = (images.float() + 1) / 2, (reference.float() + 1) / 2
    window = min(window, *x.shape[-2:])
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=x.shape[1])  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def frechet_distance(features_a, features_b):
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½), in float64 (the FID formula, here on
    judge features). The matrix square roots come from symmetric eigendecompositions: Σ_a^½ Σ_b Σ_a^½
    is symmetric positive semi-definite, so its eigenvalues (clamped at 0) give the trace term
    without the complex round-off of a general sqrtm."""
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrt_psd(matrix):
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T

    root_a = sqrt_psd(cov_a)
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle
    return max(value.item(), 0.0)


def retrieval_accuracy(codes, labels):
    """Leave-one-out nearest-neighbour (cosine) retrieval: the fraction of queries whose nearest
    other item has the same label. Only queries whose label occurs at least twice count. -> float"""
    codes = F.normalize(codes.float(), dim=1)
    similarity = codes @ codes.T
    similarity.fill_diagonal_(-math.inf)
    nearest = similarity.argmax(1)
    _, label_index, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    has_partner = counts[label_index] > 1
    if not has_partner.any():
        return float("nan")
    return (labels[nearest] == labels)[has_partner].float().mean().item()


def retrieval_matrix(codes, label_sets):
    """{label kind: {code name: accuracy}} for every code and every kind of label."""
    return {kind: {name: retrieval_accuracy(code, labels) for name, code in codes.items()}
            for kind, labels in label_sets.items()}


# ================================================================================================
# Evaluation
# ================================================================================================
def is_demo(data):
    return data == "demo" or data.startswith("demo:")


def flipped(attrs, column):
    out = attrs.clone()
    out[:, column] = 1 - out[:, column]
    return out


def evaluate(method, ckpt, data="demo", judge_path=None, split="test", max_images=500,
             true_images=64, device="cpu", say=print):
    """Load the method's checkpoint and the judge, then score_model(...) -> a JSON-ready dict."""
    if method not in METHODS:
        raise InputError(f"unknown --method {method!r}; expected one of {', '.join(METHODS)}")
    model = importlib.import_module(f"adapters.{method}").load(ckpt, device)
    result = score_model(model, load_judge(judge_path, device), data, split, max_images,
                         true_images)
    result = {"method": method, "ckpt": str(ckpt), "judge": str(judge_path), **result}
    say(summary(result))
    return result


def score_model(model, judge, data="demo", split="test", max_images=500, true_images=64):
    """All the metrics a load_for_eval namespace supports, scored by `judge` -> a dict."""
    test = common.load_celeba(data, model.attr_names, split, model.img_size, model.crop, verbose=False)
    count = min(max_images, len(test.images))
    if count == 0:
        raise InputError(f"the {split} split of {data} is empty")
    images, attr_src = common.to_float(test.images[:count]), test.labels[:count]
    judged = [n for n in model.attr_names if n in judge.attr_names]
    if not judged:
        raise InputError(f"the judge knows none of the method's attributes {model.attr_names}")
    judge_cols = judge.columns(judged)
    method_cols = [model.attr_names.index(n) for n in judged]
    start = time.time()
    result = {"data": data, "split": split, "images": count, "img_size": model.img_size,
              "attrs": judged}
    real_probs, real_features = judge(images)
    real_pred = (real_probs[:, judge_cols] > 0.5).float()
    result["judge_acc_real"] = (real_pred == attr_src[:, method_cols]).float().mean().item()
    outputs = []

    if model.reconstruct is not None:
        recon = model.reconstruct(images)
        result["psnr"] = psnr(recon, images).mean().item()
        result["ssim"] = ssim(recon, images).mean().item()

    if model.edit is not None:
        per_attr, edits = {}, {}
        for name, j, k in zip(judged, judge_cols, method_cols):
            target = flipped(attr_src, k)
            edited = model.edit(images, attr_src, target)
            probs, features = judge(edited)
            per_attr[name] = ((probs[:, j] > 0.5).float() == target[:, k]).float().mean().item()
            edits[name] = edited[:true_images]  # only these are compared with renders
            outputs.append(features)
        result["edit_acc"] = sum(per_attr.values()) / len(per_attr)
        result["edit_acc_per_attr"] = per_attr
        if is_demo(data):
            result.update(true_edit_error(test, images, attr_src, edits, judged, method_cols,
                                          judge, judge_cols, model, true_images))

    if model.generate is not None:
        generated = model.generate(attr_src, seed=0)
        probs, features = judge(generated)
        if getattr(model, "conditional", True):  # mad.py samples its prior: no attributes asked
            pred = (probs[:, judge_cols] > 0.5).float()
            result["gen_acc"] = (pred == attr_src[:, method_cols]).float().mean().item()
            result["gen_acc_per_attr"] = dict(zip(judged, (pred == attr_src[:, method_cols])
                                                  .float().mean(0).tolist()))
        if model.edit is None:
            outputs.append(features)

    if model.encode is not None:
        codes = model.encode(images)
        if len(codes) > 1:  # named sub-codes: is each factor where it should be?
            result["retrieval"] = retrieval_matrix(codes, label_sets(data, test, split, model, count))

    if outputs:
        fake = torch.cat(outputs)
        take = torch.randperm(len(fake), generator=torch.Generator().manual_seed(0))[:count]
        result["fd"] = frechet_distance(real_features, fake[take])
    result["seconds"] = round(time.time() - start, 1)
    return result


def label_sets(data, test, split, model, count):
    """Labels for retrieval: identity (identity_CelebA) and expression (Smiling x
    Mouth_Slightly_Open, 4 classes), where the dataset has them."""
    sets = {}
    if test.identities is not None:
        sets["identity"] = test.identities[:count]
    expr = common.load_celeba(data, list(EXPRESSION_ATTRS), split, model.img_size, model.crop,
                              verbose=False).labels[:count]
    sets["expression"] = (expr[:, 0] * 2 + expr[:, 1]).long()
    return sets


def true_edit_error(test, images, attr_src, edits, judged, method_cols, judge, judge_cols, model,
                    limit):
    """Demo set only: PSNR between each edit and the rendered counterfactual (the true edited
    face), the do-nothing baseline PSNR(input, counterfactual), and the oracle's judge accuracy."""
    n = min(limit, len(images))
    true_psnr, still_psnr, oracle = {}, {}, {}
    for name, j, k in zip(judged, judge_cols, method_cols):
        truth = torch.stack([
            common.to_float(common.preprocess(
                common.render_counterfactual(test.root, test.files[i], {name: 1 - attr_src[i, k].item()}),
                model.img_size, model.crop)) for i in range(n)])
        true_psnr[name] = psnr(edits[name][:n], truth).mean().item()
        still_psnr[name] = psnr(images[:n], truth).mean().item()
        probs, _ = judge(truth)
        oracle[name] = ((probs[:, j] > 0.5).float() == 1 - attr_src[:n, k]).float().mean().item()
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    return {"true_edit_psnr": mean(true_psnr), "true_edit_psnr_per_attr": true_psnr,
            "unedited_psnr": mean(still_psnr), "oracle_edit_acc": mean(oracle),
            "oracle_edit_acc_per_attr": oracle, "true_images": n}


def summary(result):
    lines = [f"{result['method']} on {result['data']} ({result['split']}, {result['images']} "
             f"images, {result['img_size']} px), judge accuracy on the real images "
             f"{result['judge_acc_real']:.3f}"]
    if "edit_acc" in result:
        lines.append(f"  edit accuracy {result['edit_acc']:.3f}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in result["edit_acc_per_attr"].items()))
    if "true_edit_psnr" in result:
        lines.append(f"  true edit PSNR {result['true_edit_psnr']:.2f} dB (unedited input vs the "
                     f"counterfactual: {result['unedited_psnr']:.2f} dB); oracle edit accuracy "
                     f"{result['oracle_edit_acc']:.3f} ({result['true_images']} images)")
    if "psnr" in result:
        lines.append(f"  reconstruction PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.3f}")
    if "gen_acc" in result:
        lines.append(f"  generated attribute accuracy {result['gen_acc']:.3f}")
    if "retrieval" in result:
        codes = list(next(iter(result["retrieval"].values())))
        lines.append("  retrieval accuracy  " + "".join(f"{c:>12}" for c in codes))
        for kind, row in result["retrieval"].items():
            lines.append(f"  {kind:<19}" + "".join(f"{row[c]:>12.3f}" for c in codes))
    if "fd" in result:
        lines.append(f"  judge-feature FD {result['fd']:.3f}")
    return "\n".join(lines)


def table(paths):
    """A Markdown table of evaluation JSON files (one row each)."""
    columns = [("edit_acc", "edit acc", "{:.3f}"), ("true_edit_psnr", "true edit PSNR", "{:.2f}"),
               ("oracle_edit_acc", "oracle acc", "{:.3f}"), ("gen_acc", "gen acc", "{:.3f}"),
               ("psnr", "recon PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
               ("fd", "judge FD", "{:.3f}"), ("judge_acc_real", "judge acc (real)", "{:.3f}")]
    rows = [json.loads(Path(p).read_text()) for p in paths]
    used = [c for c in columns if any(c[0] in r for r in rows)]
    out = ["| method | run | images | " + " | ".join(c[1] for c in used) + " |",
           "|---|---|---|" + "---|" * len(used)]
    for r in rows:
        cells = [c[2].format(r[c[0]]) if c[0] in r else "–" for c in used]
        run = Path(r.get("ckpt", "?")).parent.as_posix()  # the run folder tells runs apart
        out.append(f"| {r['method']} | `{run}` | {r['images']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", choices=METHODS, help="the method file the checkpoint is from")
    parser.add_argument("--ckpt", help="the method's ckpt.pt")
    parser.add_argument("--data", default="demo", help="dataset to score on")
    parser.add_argument("--judge", help="judge checkpoint (benchmarks/judge.py)")
    parser.add_argument("--split", default="test", help="'test', 'val' or 'train'")
    parser.add_argument("--max-images", type=int, default=500, help="test images used")
    parser.add_argument("--true-images", type=int, default=64,
                        help="demo only: images whose counterfactuals are rendered per attribute")
    parser.add_argument("--device", default="cpu", help="device for the method and the judge")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--table", nargs="+", help="print a Markdown table of these result files")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return None
    if not (args.method and args.ckpt and args.judge):
        raise InputError("--method, --ckpt and --judge are required (or --table FILES)")
    result = evaluate(args.method, args.ckpt, args.data, args.judge, args.split, args.max_images,
                      args.true_images, args.device)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    try:
        main()
    except InputError as err:
        sys.exit(f"error: {err}")
