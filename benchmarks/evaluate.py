"""Score any method's checkpoint with the same independent judge, on the same test images.

Each method has an evaluation adapter, `adapters.<method>.load(ckpt_path, device)` (the contract
is in adapters/__init__.py): a namespace with attr_names, img_size, crop and, where the method
supports them, edit, reconstruct, generate and encode. `--method noop` is the do-nothing editor
(it returns its input), scored by the same code; every evaluation also scores it at the method's
size, so each results table has its floor. What is measured:

  judged set  the attributes the judge reads at least --min-margin (5 points) better than the
              majority rate on these test images, at its own size. Every editor on a data set is
              scored on this one set; a method that lacks some of them is flagged, never quietly
              averaged over another set.
  edit        edit accuracy: each judged attribute flipped alone on every test image. An edit
              counts only where the judge read the attribute correctly BEFORE the edit (so a
              do-nothing editor scores exactly 0, not 1 - the judge's error rate); it succeeds
              when the judge then reads the flipped value. Preservation: for each edit, the
              share of the other judged attributes whose reading did not change (AttGAN's "only
              change what you want"; do nothing scores 1). On the demo set the renderer draws
              the true edited face (common.render_counterfactual), which gives the oracle (a
              perfect editor scored by the same rules) and the true edit PSNR.
  reconstruct PSNR and SSIM of the reconstruction against the input.
  generate    attribute accuracy of faces generated from the test images' attribute rows (unless
              the namespace says conditional=False: mad.py decodes its prior).
  encode      with several named codes (mad.py): nearest-neighbour retrieval of identity and
              expression labels from each code (a disentangled code has a strong diagonal).
  FD          judge-feature Fréchet distance to the test images at the method's own size, kept
              apart for edits (edit FD) and generated faces (sample FD). Not FID: no Inception
              weights offline (see judge.py). It shrinks with the size (a 32 px face upsampled
              to the judge's 64 px carries fewer features) and grows as the sample shrinks, so
              the table compares it only between rows of one size and one image count.

    python benchmarks/evaluate.py --method attgan --ckpt runs/attgan/ckpt.pt --data demo \\
        --judge runs/judge/demo.pt --json runs/eval/attgan_demo.json
    python benchmarks/evaluate.py --method noop --img-size 64 --data demo --judge runs/judge/demo.pt
    python benchmarks/evaluate.py --table runs/eval/*_demo.json      # a Markdown results table

--json is checked before the scoring (a folder that cannot be written, or an existing file without
--overwrite, is refused) and written atomically after it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import InputError  # noqa: E402
from cli import output_path, run, vet, write_output  # noqa: E402
from judge import MIN_MARGIN, load_judge  # noqa: E402

METHODS = ("attgan", "dual_transfer", "cgan", "feature_ae", "mad")
NOOP = "noop"  # the do-nothing editor
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
# The judged attribute set, and the do-nothing editor
# ================================================================================================
def judged_attributes(judge, test, min_margin=MIN_MARGIN):
    """Which attributes the judge can read on these test images, at its own size and crop.

    test: a FaceData loaded with the judge's attribute names (at judge.img_size, judge.crop).
    -> {"attrs": judged names, "not_judged": the rest, "judge_acc": {name: accuracy},
        "majority": {name: majority rate}, "min_margin", "images", "judge_size"}."""
    probs, _ = judge(common.to_float(test.images))
    labels = test.labels[:, [test.attr_names.index(n) for n in judge.attr_names]]
    accuracy = ((probs > 0.5).float() == labels).float().mean(0).tolist()
    rate = labels.mean(0)
    majority = torch.maximum(rate, 1 - rate).tolist()
    judged = [n for n, a, m in zip(judge.attr_names, accuracy, majority) if a - m >= min_margin - 1e-9]
    return {"attrs": judged, "not_judged": [n for n in judge.attr_names if n not in judged],
            "judge_acc": dict(zip(judge.attr_names, accuracy)),
            "majority": dict(zip(judge.attr_names, majority)), "min_margin": min_margin,
            "images": len(test.images), "judge_size": judge.img_size}


def do_nothing(attr_names, img_size, crop):
    """The do-nothing editor: returns its input. Its row is the floor of every table (edit
    accuracy 0, preservation 1, true edit PSNR = the input against the counterfactual)."""
    return types.SimpleNamespace(attr_names=list(attr_names), img_size=img_size, crop=crop,
                                 edit=lambda images, attr_src, attr_tgt: images.clone(),
                                 reconstruct=None, generate=None, encode=None)


def load_test(data, attr_names, split, img_size, crop, max_images):
    """The first `max_images` images of a split (files sorted by name: the same images at every
    size) -> FaceData."""
    test = common.load_celeba(data, list(attr_names), split, img_size, crop, verbose=False)
    n = min(max_images, len(test.images))
    if n == 0:
        raise InputError(f"the {split} split of {data} is empty")
    cut = lambda t: None if t is None else t[:n]  # noqa: E731
    return dataclasses.replace(test, images=test.images[:n], labels=test.labels[:n],
                               files=test.files[:n], identities=cut(test.identities),
                               landmarks=cut(test.landmarks))


def columns_of(test, names):
    """The same images with only the label columns `names`, in that order."""
    return dataclasses.replace(test, attr_names=list(names), labels=test.labels[
        :, [test.attr_names.index(n) for n in names]])


def flipped(attrs, column):
    out = attrs.clone()
    out[:, column] = 1 - out[:, column]
    return out


def mean_of(values):
    """Mean of the defined values of a dict (None where an attribute had nothing to count)."""
    kept = [v for v in values.values() if v is not None]
    return sum(kept) / len(kept) if kept else None


# ================================================================================================
# Scoring
# ================================================================================================
def evaluate(method, ckpt, data="demo", judge_path=None, split="test", max_images=500,
             true_images=64, device="cpu", min_margin=MIN_MARGIN, img_size=None, crop=170,
             say=print):
    """Load the judge and the method (or the do-nothing editor), score both -> a JSON-ready dict.
    img_size and crop only apply to --method noop (default: the judge's size)."""
    if method not in METHODS + (NOOP,):
        raise InputError(f"unknown --method {method!r}; expected one of {', '.join(METHODS + (NOOP,))}")
    judge = load_judge(judge_path, device)  # both files checked for what they are before any data
    model = None if method == NOOP else importlib.import_module(f"adapters.{method}").load(ckpt, device)
    attr_set = judged_attributes(judge, load_test(data, judge.attr_names, split, judge.img_size,
                                                  judge.crop, max_images), min_margin)
    if not attr_set["attrs"]:
        raise InputError(f"the judge reads no attribute of the {split} images at least "
                         f"{min_margin:.2f} better than its majority rate: nothing can be scored "
                         f"(train a better judge, or lower --min-margin)")
    if method == NOOP:
        model = do_nothing(attr_set["attrs"], img_size or judge.img_size, crop)
    renders = {}  # counterfactuals, shared with the do-nothing run at the same size
    extra = list(EXPRESSION_ATTRS) if model.encode is not None else []  # retrieval labels
    names = list(dict.fromkeys(list(model.attr_names) + attr_set["attrs"] + extra))
    test = load_test(data, names, split, model.img_size, model.crop, max_images)
    retrieval = label_sets(test, names) if model.encode is not None else None
    result = score_model(model, judge, columns_of(test, model.attr_names), attr_set, true_images,
                         retrieval, renders)
    result = {"method": method, "ckpt": None if method == NOOP else str(ckpt),
              "judge": str(judge_path), "data": data, **result}
    if method != NOOP:  # the floor at this size, for the table
        floor = do_nothing(attr_set["attrs"], model.img_size, model.crop)
        result["do_nothing"] = score_model(floor, judge, columns_of(test, attr_set["attrs"]),
                                           attr_set, true_images, None, renders)
    say(summary(result))
    return result


def score_model(model, judge, test, attr_set, true_images=64, retrieval_labels=None, renders=None):
    """Every metric the adapter namespace supports, on `test` (a FaceData at the model's size
    whose attribute columns are model.attr_names), scored by `judge` on the attributes of
    `attr_set` (judged_attributes) -> a dict. On the demo set the first `true_images` images
    are compared with their rendered counterfactuals (cached in `renders`)."""
    images, attr_src = common.to_float(test.images), test.labels
    judged = attr_set["attrs"]
    edited = [n for n in judged if n in model.attr_names]  # the judged attributes it can edit
    start = time.time()
    result = {"split": test.split, "images": len(images), "img_size": model.img_size,
              "crop": model.crop, "attr_set": attr_set, "attrs": edited,
              "attrs_missing": [n for n in judged if n not in model.attr_names]}
    real_probs, real_features = judge(images)
    before = real_probs[:, judge.columns(judged)] > 0.5  # (N, J): the judge's reading of the input
    src = {n: attr_src[:, model.attr_names.index(n)].bool() for n in edited}
    if edited:
        acc = {n: (before[:, judged.index(n)] == src[n]).float().mean().item() for n in edited}
        result.update(judge_acc_real=mean_of(acc), judge_acc_real_per_attr=acc)

    if model.reconstruct is not None:
        recon = model.reconstruct(images)
        result["psnr"] = psnr(recon, images).mean().item()
        result["ssim"] = ssim(recon, images).mean().item()

    if model.edit is not None and edited:
        result.update(score_edits(model, judge, test, images, before, src, judged, edited,
                                  real_features, true_images, renders))

    if model.generate is not None:
        generated = model.generate(attr_src, seed=0)
        probs, features = judge(generated)
        if getattr(model, "conditional", True) and edited:  # mad.py's prior: no attributes asked
            read = probs[:, judge.columns(edited)] > 0.5
            gen = {n: (read[:, i] == src[n]).float().mean().item() for i, n in enumerate(edited)}
            result.update(gen_acc=mean_of(gen), gen_acc_per_attr=gen)
        result["sample_fd"] = frechet_distance(real_features, features)

    if model.encode is not None and retrieval_labels:
        codes = model.encode(images)
        if len(codes) > 1:  # named sub-codes: is each factor where it should be?
            result["retrieval"] = retrieval_matrix(codes, retrieval_labels)
    result["seconds"] = round(time.time() - start, 1)
    return result


def score_edits(model, judge, test, images, before, src, judged, edited, real_features,
                true_images, renders):
    """Flip each editable judged attribute alone on every image and read the edits.

    An edit of attribute a on image i counts only when the judge read a correctly on the input
    (before[i, a] == source label); it succeeds when the judge reads the flipped value. Its
    preservation is the share of the other judged attributes whose reading is unchanged."""
    columns = judge.columns(judged)
    acc, kept, counted, features, outputs = {}, {}, {}, [], {}
    for name in edited:
        a, k = judged.index(name), model.attr_names.index(name)
        target = flipped(test.labels, k)
        out = model.edit(images, test.labels, target)
        probs, feats = judge(out)
        after = probs[:, columns] > 0.5
        acc[name], kept[name], counted[name] = edit_scores(before, after, src[name], a)
        features.append(feats)
        outputs[name] = out[:true_images]  # only these are compared with renders
    # One edit per test image, of a randomly drawn attribute: the same faces as the reference
    # set, so the do-nothing editor's edit FD is 0 (a resample of the inputs would not be).
    pick = torch.randint(len(features), (len(images),), generator=torch.Generator().manual_seed(0))
    fake = torch.stack(features)[pick, torch.arange(len(images))]
    result = {"edit_acc": mean_of(acc), "edit_acc_per_attr": acc, "edit_counted_per_attr": counted,
              "preservation": mean_of(kept), "preservation_per_attr": kept,
              "edit_fd": frechet_distance(real_features, fake)}
    if test.layout == "demo":
        result.update(true_edit_error(test, images, before, src, judge, judged, outputs,
                                      model, true_images, renders))
    return result


def edit_scores(before, after, source, a):
    """(edit accuracy, preservation, images counted) of one attribute's edits.
    before, after: (N, J) bool readings of the inputs and the edits; source: (N,) bool labels of
    attribute a. Accuracy is None where the judge misread every input; preservation is None when
    a is the only judged attribute."""
    read_right = before[:, a] == source
    success = after[:, a] == ~source
    acc = success[read_right].float().mean().item() if read_right.any() else None
    others = [b for b in range(before.shape[1]) if b != a]
    kept = (after[:, others] == before[:, others]).float().mean().item() if others else None
    return acc, kept, int(read_right.sum())


def true_edit_error(test, images, before, src, judge, judged, outputs, model, limit, renders):
    """Demo set only: the first `limit` images against their rendered counterfactuals (the true
    edited faces): the PSNR of each edit to its truth, the do-nothing PSNR(input, truth), and the
    oracle, the truths scored by the same rules as the edits."""
    n = min(limit, len(images))
    renders = {} if renders is None else renders
    columns = judge.columns(judged)
    true_psnr, still_psnr, oracle, oracle_kept = {}, {}, {}, {}
    for name, out in outputs.items():
        key = (name, n, str(model.img_size), model.crop)
        if key not in renders:
            renders[key] = torch.stack([common.to_float(common.preprocess(
                common.render_counterfactual(test.root, test.files[i], {name: int(not src[name][i])}),
                model.img_size, model.crop)) for i in range(n)])
        truth = renders[key]
        true_psnr[name] = psnr(out[:n], truth).mean().item()
        still_psnr[name] = psnr(images[:n], truth).mean().item()
        probs, _ = judge(truth)
        oracle[name], oracle_kept[name], _ = edit_scores(before[:n], probs[:, columns] > 0.5,
                                                         src[name][:n], judged.index(name))
    return {"true_edit_psnr": mean_of(true_psnr), "true_edit_psnr_per_attr": true_psnr,
            "unedited_psnr": mean_of(still_psnr), "oracle_edit_acc": mean_of(oracle),
            "oracle_edit_acc_per_attr": oracle, "oracle_preservation": mean_of(oracle_kept),
            "oracle_preservation_per_attr": oracle_kept, "true_images": n}


def label_sets(test, names):
    """Labels for retrieval: identity (identity_CelebA) and expression (Smiling x
    Mouth_Slightly_Open, 4 classes), where the dataset has them."""
    sets = {}
    if test.identities is not None:
        sets["identity"] = test.identities
    if all(n in names for n in EXPRESSION_ATTRS):
        smile, mouth = (test.labels[:, names.index(n)] for n in EXPRESSION_ATTRS)
        sets["expression"] = (smile * 2 + mouth).long()
    return sets


# ================================================================================================
# Reporting
# ================================================================================================
def size_label(img_size, crop):
    """'64 px' (crop 170, the default) or '64 px, crop 178' / '64×48 px, full frame'."""
    size = f"{img_size} px" if isinstance(img_size, int) else "×".join(map(str, img_size)) + " px"
    return size if crop == 170 else f"{size}, {'full frame' if crop is None else f'crop {crop}'}"


def fmt(value, spec):
    return "–" if value is None else spec.format(value)


def summary(result):
    lines = [f"{result['method']} on {result['data']} ({result['split']}, {result['images']} "
             f"images, {size_label(result['img_size'], result['crop'])})"]
    s = result["attr_set"]
    lines.append(f"  judged attributes ({len(s['attrs'])}, judge at {s['judge_size']} px at least "
                 f"{s['min_margin']:.2f} above its majority rate): " + ", ".join(
                     f"{n} {s['judge_acc'][n]:.2f} ({s['majority'][n]:.2f})" for n in s["attrs"]))
    if result["attrs_missing"]:
        lines.append(f"  NOT scored on {', '.join(result['attrs_missing'])} (not among the method's "
                     f"attributes): its averages cover {len(result['attrs'])} of {len(s['attrs'])}")
    if "judge_acc_real" in result:
        lines.append(f"  judge accuracy on the inputs at this size {result['judge_acc_real']:.3f}")
    if "edit_acc" in result:
        lines.append(f"  edit accuracy {fmt(result['edit_acc'], '{:.3f}')}: " + ", ".join(
            f"{k} {fmt(v, '{:.2f}')}" for k, v in result["edit_acc_per_attr"].items()))
        lines.append(f"  preservation {fmt(result['preservation'], '{:.3f}')}, edit FD "
                     f"{result['edit_fd']:.3f}")
    if "true_edit_psnr" in result:
        lines.append(f"  true edit PSNR {result['true_edit_psnr']:.2f} dB (unedited input vs the "
                     f"counterfactual: {result['unedited_psnr']:.2f} dB); oracle edit accuracy "
                     f"{fmt(result['oracle_edit_acc'], '{:.3f}')}, oracle preservation "
                     f"{fmt(result['oracle_preservation'], '{:.3f}')} ({result['true_images']} images)")
    if "psnr" in result:
        lines.append(f"  reconstruction PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.3f}")
    if "gen_acc" in result:
        lines.append(f"  generated attribute accuracy {result['gen_acc']:.3f}")
    if "sample_fd" in result:
        lines.append(f"  sample FD {result['sample_fd']:.3f}")
    if "retrieval" in result:
        codes = list(next(iter(result["retrieval"].values())))
        lines.append("  retrieval accuracy  " + "".join(f"{c:>12}" for c in codes))
        for kind, row in result["retrieval"].items():
            lines.append(f"  {kind:<19}" + "".join(f"{row[c]:>12.3f}" for c in codes))
    if "do_nothing" in result:
        floor = result["do_nothing"]
        lines.append(f"  do nothing at this size: edit accuracy {fmt(floor.get('edit_acc'), '{:.3f}')}"
                     f", edit FD {floor['edit_fd']:.3f}")
    return "\n".join(lines)


COLUMNS = (  # key, header, format
    ("edit_acc", "edit acc", "{:.3f}"), ("oracle_edit_acc", "oracle acc", "{:.3f}"),
    ("preservation", "preservation", "{:.3f}"), ("oracle_preservation", "oracle pres.", "{:.3f}"),
    ("true_edit_psnr", "true edit PSNR", "{:.2f}"), ("gen_acc", "gen acc", "{:.3f}"),
    ("psnr", "recon PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
    ("edit_fd", "edit FD", "{:.3f}"), ("sample_fd", "sample FD", "{:.3f}"),
    ("judge_acc_real", "judge acc", "{:.3f}"))
RANKED = ("edit_fd", "sample_fd")  # lowest in bold, among the methods of ONE size only


RESULT_KEYS = {"method", "data", "split", "images", "attr_set", "img_size", "crop", "attrs"}


def read_result(path):
    """One results file of `evaluate.py --json` -> dict; anything else -> InputError."""
    try:
        result = json.loads(Path(path).read_text())
    except OSError as err:
        raise InputError(f"--table {path}: {err.strerror}; expected a results file written by "
                         "evaluate.py --json") from None
    except ValueError:
        result = None
    if not (isinstance(result, dict) and RESULT_KEYS <= set(result)):
        raise InputError(f"--table {path}: expected a results file written by evaluate.py --json, "
                         f"found {'JSON without its fields' if isinstance(result, (dict, list)) else 'no JSON'}")
    return result


def table(paths):
    """A Markdown results table of evaluation JSON files: one row each, grouped by size with a
    do-nothing row per size, then notes naming the judged attribute set and every exception."""
    rows = [read_result(p) for p in paths]
    first = rows[0]
    for r in rows[1:]:  # one table, one data set, one judge, one attribute set
        for key in ("data", "split", "images", "attr_set"):
            if r[key] != first[key]:
                raise InputError(f"{r['method']} ({r.get('ckpt')}) and {first['method']} "
                                 f"({first.get('ckpt')}) differ in {key}: score them on the same "
                                 f"data, split, --max-images and judge to share a table")
    groups = {}  # size label -> [do-nothing row or None, method rows...]
    for r in rows:
        group = groups.setdefault(size_label(r["img_size"], r["crop"]), [None])
        if r["method"] == NOOP:
            group[0] = r
        else:
            group.append(r)
            if group[0] is None and "do_nothing" in r:
                group[0] = {**r["do_nothing"], "method": NOOP}
    used = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    judged = first["attr_set"]["attrs"]
    out = ["| method | run | size | attrs | " + " | ".join(c[1] for c in used) + " |",
           "|---|---|---|---|" + "---|" * len(used)]
    notes = []
    order = sorted(groups, key=lambda s: (int(s.split()[0].split("×")[0]), s))  # by pixels
    for size in order:
        group = [r for r in groups[size] if r is not None]
        methods = [r for r in group if r["method"] != NOOP]
        best = {key: min((r[key] for r in methods if r.get(key) is not None), default=None)
                for key in RANKED if sum(r.get(key) is not None for r in methods) > 1}
        for r in group:
            cells = []
            for key, _, spec in used:
                cell = fmt(r.get(key), spec)
                if r["method"] != NOOP and key in best and r.get(key) == best[key]:
                    cell = f"**{cell}**"
                cells.append(cell)
            name = "do nothing" if r["method"] == NOOP else r["method"]
            run = "–" if not r.get("ckpt") else f"`{Path(r['ckpt']).parent.as_posix()}`"
            attrs = f"{len(r['attrs'])}/{len(judged)}" if r["method"] != NOOP else f"{len(judged)}/{len(judged)}"
            if r.get("attrs_missing"):
                attrs += " †"
                notes.append(f"† {name} {run} edits {len(r['attrs'])} of the {len(judged)} judged "
                             f"attributes; it lacks {', '.join(r['attrs_missing'])}, so its edit, "
                             f"oracle, preservation and judge columns average over the other "
                             f"{len(r['attrs'])}.")
            out.append(f"| {name} | {run} | {size} | {attrs} | " + " | ".join(cells) + " |")
    s = first["attr_set"]
    out.append("")
    out.append(f"Judged attributes ({len(judged)}; the judge at its own {s['judge_size']} px on these "
               f"{s['images']} {first['split']} images, majority rate in brackets): " + ", ".join(
                   f"{n} {s['judge_acc'][n]:.3f} ({s['majority'][n]:.3f})" for n in judged) + ".")
    if s["not_judged"]:
        out.append(f"Not judged (less than {100 * s['min_margin']:.0f} points above the majority "
                   f"rate): " + ", ".join(f"{n} {s['judge_acc'][n]:.3f} ({s['majority'][n]:.3f})"
                                          for n in s["not_judged"]) + ".")
    if len(order) > 1 and any(c[0] in RANKED for c in used):
        out.append("FD is compared only within one size (bold: the lowest among the methods of "
                   "that size); sizes are never ranked against each other.")
    return "\n".join(out + notes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", choices=METHODS + (NOOP,),
                        help="the method file the checkpoint is from ('noop': the do-nothing editor)")
    parser.add_argument("--ckpt", help="the method's ckpt.pt (not for noop)")
    parser.add_argument("--data", default="demo", help="dataset to score on")
    parser.add_argument("--judge", help="judge checkpoint (benchmarks/judge.py)")
    parser.add_argument("--split", default="test", help="'test', 'val' or 'train'")
    parser.add_argument("--max-images", type=int, default=500, help="test images used")
    parser.add_argument("--true-images", type=int, default=64,
                        help="demo only: images whose counterfactuals are rendered per attribute")
    parser.add_argument("--min-margin", type=float, default=MIN_MARGIN,
                        help="judge an attribute only where the judge beats its majority rate "
                             "by this much on the test images")
    parser.add_argument("--img-size", type=int, help="noop only: the size to score at "
                        "(default: the judge's)")
    parser.add_argument("--crop", type=int, default=170, help="noop only: centre crop")
    parser.add_argument("--device", default="cpu", help="device for the method and the judge")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--table", nargs="+", help="print a Markdown table of these result files")
    args = vet(parser.parse_args(argv), positive=("max_images", "img_size"),
               at_least_zero=("true_images", "min_margin", "crop"))
    if args.table:
        print(table(args.table))
        return None
    if not (args.method and args.judge and (args.ckpt or args.method == NOOP)):
        raise InputError("--method, --ckpt and --judge are required (--ckpt not for noop; "
                         "or --table FILES)")
    if args.json:  # checked before the scoring, written (atomically) after it
        output_path(args.json, "--json", args.overwrite)
    result = evaluate(args.method, args.ckpt, args.data, args.judge, args.split, args.max_images,
                      args.true_images, args.device, args.min_margin, args.img_size, args.crop)
    if args.json:
        write_output(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    run(main)
