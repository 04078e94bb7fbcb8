"""Tests for benchmarks/: each metric against an independent reference, the judge against the
majority rate, the scoring rules on a toy judge whose readings are known exactly (do nothing
scores 0, flipping everything preserves nothing, a missing attribute is flagged, FD is ranked
only within one size), a perfect demo editor against the oracle, and evaluate.py on a smoke
checkpoint of every method."""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, commands

sys.path.insert(0, str(ROOT / "benchmarks"))
import evaluate  # noqa: E402
import judge as judge_module  # noqa: E402

import common  # noqa: E402

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Metrics against independent references
# ------------------------------------------------------------------------------------------------
def test_psnr_against_the_formula():
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    assert evaluate.psnr(images, images).tolist() == [100.0] * 3  # identical: the floor's value
    zeros = torch.zeros(2, 3, 8, 8)
    assert evaluate.psnr(zeros + 0.2, zeros).tolist() == pytest.approx([20.0, 20.0])  # 4 / 0.04
    other = torch.rand(3, 3, 8, 8) * 2 - 1
    a, b = images.double().numpy(), other.double().numpy()
    expected = [10 * math.log10(2.0 ** 2 / ((a[i] - b[i]) ** 2).mean()) for i in range(3)]
    assert evaluate.psnr(images, other).tolist() == pytest.approx(expected, rel=1e-5)


def reference_ssim(x, y, window=11, sigma=1.5):
    """SSIM written out window by window (numpy, float64): the Gaussian-weighted mean, variance
    and covariance of each valid window, the paper's formula, averaged over windows and channels."""
    x, y = (x.double().numpy() + 1) / 2, (y.double().numpy() + 1) / 2
    window = min(window, *x.shape[-2:])
    g = np.exp(-(np.arange(window) - (window - 1) / 2) ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for xi, yi in zip(x, y):
        values = []
        for c in range(xi.shape[0]):
            for top in range(xi.shape[1] - window + 1):
                for left in range(xi.shape[2] - window + 1):
                    px = xi[c, top:top + window, left:left + window]
                    py = yi[c, top:top + window, left:left + window]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                    cov = (w * (px - mx) * (py - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cov + c2) /
                                  ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        out.append(np.mean(values))
    return out


def test_ssim_against_a_window_by_window_reference():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 14, 13) * 2 - 1
    noisy = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    assert evaluate.ssim(noisy, images).tolist() == pytest.approx(reference_ssim(noisy, images), abs=1e-5)
    assert evaluate.ssim(-images, images).tolist() == pytest.approx(reference_ssim(-images, images), abs=1e-5)
    small = images[:, :, :6, :7]  # smaller than the window: a 6x6 window
    assert evaluate.ssim(small * 0.5, small).tolist() == pytest.approx(reference_ssim(small * 0.5, small), abs=1e-5)
    assert evaluate.ssim(images, images).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_frechet_distance_against_closed_forms_and_a_reference():
    torch.manual_seed(0)
    features = (torch.randn(200, 5) @ torch.randn(5, 5)).double()  # a correlated covariance
    assert evaluate.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    # b = 2a + m: Σ_b = 4Σ_a exactly, so Tr(Σ_a + 4Σ_a − 2·2Σ_a) = Tr Σ_a and the means differ by μ_a + m
    m = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    expected = (features.mean(0) + m).pow(2).sum() + torch.cov(features.T).trace()
    assert evaluate.frechet_distance(features, 2 * features + m) == pytest.approx(expected.item(), rel=1e-9)
    # two unrelated covariances: Tr (Σ_a Σ_b)^½ from the eigenvalues of the product (numpy)
    other = (torch.randn(300, 5) @ torch.randn(5, 5) + 1).double()
    a, b = features.numpy(), other.numpy()
    ca, cb = np.cov(a.T), np.cov(b.T)
    cross = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross
    assert evaluate.frechet_distance(features, other) == pytest.approx(reference, rel=1e-9)


def test_retrieval_matrix_has_a_perfect_diagonal_on_a_disentangled_toy_code():
    torch.manual_seed(0)
    identity = torch.arange(40) // 4  # 10 people, 4 images each
    expression = torch.arange(40) % 2
    codes = {"identity": torch.eye(10)[identity] + 0.01 * torch.randn(40, 10),
             "expression": torch.eye(2)[expression] + 0.01 * torch.randn(40, 2)}
    matrix = evaluate.retrieval_matrix(codes, {"identity": identity, "expression": expression})
    assert matrix["identity"]["identity"] == 1.0 and matrix["expression"]["expression"] == 1.0
    # the expression code ties all same-expression images: its nearest neighbour is a stranger
    # 3 times in 4 at best; the identity code finds a same-expression partner only by chance
    assert matrix["identity"]["expression"] < 0.5
    # hand case: a, a', b with labels 0, 0, 1: a and a' find each other, b's partner is absent
    toy = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert evaluate.retrieval_accuracy(toy, torch.tensor([0, 0, 1, 2])) == 1.0  # only 2 queries count
    assert evaluate.retrieval_accuracy(toy, torch.tensor([0, 1, 0, 1])) == 0.0
    assert math.isnan(evaluate.retrieval_accuracy(torch.randn(5, 3), torch.arange(5)))


# ------------------------------------------------------------------------------------------------
# The judge
# ------------------------------------------------------------------------------------------------
HELP_SCRIPTS = ["benchmarks/evaluate.py", "benchmarks/judge.py", "benchmarks/speed.py"]


@pytest.fixture(scope="session")
def cli(tmp_path_factory, face_attr_cache):
    """This file's command lines, in order, in ONE fresh interpreter (conftest.commands): a --smoke
    judge (200 steps on demo:16, 32 px) for the whole file, --help of the three scripts, a text
    file given as the judge, and evaluate.py's do-nothing floor scored by that judge."""
    folder = tmp_path_factory.mktemp("judge")
    (folder / "some.txt").write_text("a note, not a judge\n")
    calls = {"judge": ("benchmarks/judge.py", ["--smoke", "--out", folder / "judge.pt"]),
             **{script: (script, ["--help"]) for script in HELP_SCRIPTS},
             "not_a_judge": ("benchmarks/evaluate.py", ["--method", "noop", "--judge", folder / "some.txt"]),
             "noop": ("benchmarks/evaluate.py", ["--method", "noop", "--data", "demo:16", "--judge",
                                                 folder / "judge.pt", "--img-size", "16", "--true-images",
                                                 "4", "--json", folder / "noop.json"])}
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    result = dict(zip(calls, commands(list(calls.values()), env, folder / "driver")))
    result["folder"] = folder
    return result


@pytest.fixture(scope="session")
def smoke_judge(cli):
    """The --smoke judge, trained through the command line."""
    assert cli["judge"].returncode == 0, cli["judge"].stdout[-3000:] + cli["judge"].stderr[-3000:]
    return cli["folder"] / "judge.pt"


def test_judge_beats_the_majority_rate_on_the_demo_test_split(smoke_judge):
    """Accuracy recomputed here, from the test images and labels, against the majority rate.
    The margins come from runs of --smoke at seeds 0-2: Black_Hair (dyed per photo) 0.32-0.37
    above its 0.63 majority, the per-photo Bangs / Black_Hair / Wearing_Hat 0.15-0.21 on average.
    A judge trained on inverted or shuffled labels lands at or far below the majority rate."""
    state = torch.load(smoke_judge, weights_only=True)
    judge = judge_module.load_judge(smoke_judge)
    train = common.load_celeba("demo:16", None, "train", 32, verbose=False)
    assert judge.attr_names == judge_module.varying_attrs(train.labels, train.attr_names)
    assert "Eyeglasses" in judge.attr_names and "Attractive" not in judge.attr_names  # never drawn
    test = common.load_celeba("demo:16", judge.attr_names, "test", 32, 170, verbose=False)
    probs, features = judge(common.to_float(test.images))
    accuracy = ((probs > 0.5).float() == test.labels).float().mean(0)
    rate = test.labels.mean(0)
    majority = torch.maximum(rate, 1 - rate)
    assert accuracy.tolist() == pytest.approx([state["test_accuracy"][n] for n in judge.attr_names], abs=1e-6)
    assert majority.tolist() == pytest.approx([state["majority"][n] for n in judge.attr_names], abs=1e-6)
    margin = dict(zip(judge.attr_names, (accuracy - majority).tolist()))
    assert margin["Black_Hair"] >= 0.2
    assert (margin["Bangs"] + margin["Black_Hair"] + margin["Wearing_Hat"]) / 3 >= 0.1
    assert features.shape == (len(test.images), 8 * state["config"]["width"])


def test_judge_reads_other_sizes_through_an_antialiased_resize(smoke_judge):
    judge = judge_module.load_judge(smoke_judge)
    images = torch.rand(5, 3, 48, 48) * 2 - 1
    by_hand = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True,
                            align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        logits, features = judge.net(by_hand)
    probs, feats = judge(images)
    assert torch.allclose(probs, torch.sigmoid(logits), atol=1e-6)
    assert torch.allclose(feats, features, atol=1e-5)
    with pytest.raises(common.InputError, match="Eyeglasses"):
        judge.columns(["Attractive"])  # the message lists what it knows


def test_missing_judge_file_is_a_clear_error(tmp_path):
    with pytest.raises(common.InputError, match="benchmarks/judge.py"):
        judge_module.load_judge(tmp_path / "none.pt")


# ------------------------------------------------------------------------------------------------
# The scoring rules, on a toy judge whose readings are known exactly
# ------------------------------------------------------------------------------------------------
TOY_ATTRS = ["Bangs", "Eyeglasses", "Smiling", "Male"]


class ToyJudge:
    """Reads attribute k from band k of an 8-row image (rows 2k, 2k+1): present when the band
    is bright. It never reads Male (always 'absent'). Features: the band means."""
    attr_names, img_size, crop = TOY_ATTRS, 8, 170

    def __call__(self, images):
        x = F.interpolate(images.float(), size=(8, 8), mode="area")
        bands = x.mean(dim=(1, 3)).view(len(x), 4, 2).mean(2)  # (B, 4)
        probs = torch.sigmoid(20 * bands)
        probs[:, 3] = 0.0
        return probs, bands

    def columns(self, names):
        return [self.attr_names.index(n) for n in names]


def toy_data(size=8, n=24):
    """Images whose band k is bright where label k is 1, except MISREAD images of Bangs whose
    label says 1 over a dark band (the judge misreads them before any edit)."""
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(n, 4, generator=g) < 0.5).float()
    labels[:, 3] = (torch.arange(n) < 3).float()  # Male: majority 21/24, the judge never sees it
    bands = labels.clone()
    bands[:3, 0], labels[:3, 0] = 0.0, 1.0  # 3 mislabelled Bangs images
    images = (bands[:, :, None].repeat(1, 1, 2).view(n, 8)[:, None, :, None]
              .expand(n, 3, 8, 8) * 255).to(torch.uint8)
    images = F.interpolate(images.float(), size=(size, size), mode="nearest").to(torch.uint8)
    return common.FaceData(images=images, labels=labels, attr_names=list(TOY_ATTRS),
                           files=[f"{i:06d}.png" for i in range(n)], identities=None,
                           landmarks=None, root=None, layout="toy", split="test",
                           img_size=(size, size))


def toy_editor(kind, attr_names=TOY_ATTRS, size=8):
    """noop: return the input; exact: repaint the band of each attribute whose target differs;
    flip_all: negate the image (every band, so every reading, flips)."""
    def edit(images, attr_src, attr_tgt):
        if kind == "noop":
            return images.clone()
        if kind == "flip_all":
            return -images
        out, rows = images.clone(), size // 8
        for i, k in zip(*torch.nonzero(attr_tgt != attr_src, as_tuple=True)):
            band = TOY_ATTRS.index(attr_names[k])
            out[i, :, 2 * band * rows:(2 * band + 2) * rows] = 1.0 if attr_tgt[i, k] else -1.0
        return out
    return types.SimpleNamespace(attr_names=list(attr_names), img_size=size, crop=170, edit=edit,
                                 reconstruct=None, generate=None, encode=None)


def score_toy(kind, attr_names=TOY_ATTRS, size=8):
    data = toy_data(size)
    names = list(attr_names)
    test = dataclasses.replace(data, labels=data.labels[:, [TOY_ATTRS.index(n) for n in names]],
                               attr_names=names)
    attr_set = evaluate.judged_attributes(ToyJudge(), toy_data(8))
    return evaluate.score_model(toy_editor(kind, names, size), ToyJudge(), test, attr_set)


def test_judged_set_keeps_the_attributes_the_judge_beats_the_majority_on():
    s = evaluate.judged_attributes(ToyJudge(), toy_data())
    rate = toy_data().labels.mean(0)
    # Bangs: 3 of 24 misread; Eyeglasses, Smiling: read perfectly; Male: always 'absent' =
    # exactly its majority rate (21/24), 0 points above it
    assert s["judge_acc"] == pytest.approx({"Bangs": 21 / 24, "Eyeglasses": 1.0, "Smiling": 1.0, "Male": 21 / 24})
    assert s["majority"]["Male"] == pytest.approx(21 / 24)
    assert s["majority"]["Bangs"] == pytest.approx(max(rate[0], 1 - rate[0]).item())
    assert s["attrs"] == ["Bangs", "Eyeglasses", "Smiling"] and s["not_judged"] == ["Male"]


def test_a_do_nothing_editor_scores_zero_edit_accuracy_and_full_preservation():
    result = score_toy("noop")
    # the judge misreads 3 Bangs inputs, so "reads the flipped value" would credit doing nothing
    # with 3/24 on Bangs; those images do not count
    assert result["edit_acc_per_attr"] == {"Bangs": 0.0, "Eyeglasses": 0.0, "Smiling": 0.0}
    assert result["edit_counted_per_attr"] == {"Bangs": 21, "Eyeglasses": 24, "Smiling": 24}
    assert result["edit_acc"] == 0.0 and result["preservation"] == 1.0
    assert result["edit_fd"] == pytest.approx(0.0, abs=1e-9)  # the edits ARE the inputs


def test_an_exact_editor_scores_one_and_preserves_everything():
    result = score_toy("exact")
    assert result["edit_acc_per_attr"] == {"Bangs": 1.0, "Eyeglasses": 1.0, "Smiling": 1.0}
    assert result["preservation_per_attr"] == {"Bangs": 1.0, "Eyeglasses": 1.0, "Smiling": 1.0}


def test_an_editor_that_flips_every_attribute_preserves_nothing():
    result = score_toy("flip_all")
    assert result["edit_acc"] == 1.0  # it does flip the asked attribute...
    assert result["preservation_per_attr"] == {"Bangs": 0.0, "Eyeglasses": 0.0, "Smiling": 0.0}


def test_a_method_without_some_judged_attributes_is_flagged_not_averaged_quietly(tmp_path):
    short = score_toy("exact", attr_names=["Eyeglasses", "Bangs"])
    assert short["attrs"] == ["Bangs", "Eyeglasses"] and short["attrs_missing"] == ["Smiling"]
    assert set(short["edit_acc_per_attr"]) == {"Bangs", "Eyeglasses"}
    # preservation still reads all three judged attributes (Smiling included)
    assert short["preservation"] == 1.0
    full = score_toy("exact")
    paths = []
    for name, r in (("attgan", full), ("feature_ae", short)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"method": name, "ckpt": f"runs/{name}/ckpt.pt",
                                         "data": "toy", **r}))
    text = evaluate.table(paths)
    assert "| feature_ae | `runs/feature_ae` | 8 px | 2/3 † |" in text
    assert "| attgan | `runs/attgan` | 8 px | 3/3 |" in text
    assert "† feature_ae `runs/feature_ae` edits 2 of the 3 judged attributes; it lacks Smiling" in text
    assert "Judged attributes (3;" in text and "Not judged" in text and "Male 0.875 (0.875)" in text


def write_rows(tmp_path, rows):
    paths = []
    for i, (method, size, fd) in enumerate(rows):
        r = score_toy("exact", size=size)
        r.update(method=method, ckpt=f"runs/{method}_{i}/ckpt.pt", data="toy", edit_fd=fd,
                 do_nothing={**score_toy("noop", size=size), "edit_fd": 0.0})
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    return paths


def test_fd_is_ranked_within_one_size_never_across_sizes(tmp_path):
    paths = write_rows(tmp_path, [("cgan", 16, 50.0), ("attgan", 8, 3.0), ("feature_ae", 8, 1.0),
                                  ("mad", 16, 70.0)])
    lines = evaluate.table(paths).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]
    assert "size" in header and "edit FD" in header
    fd, size = header.index("edit FD"), header.index("size")
    assert [(r[0], r[size], r[fd]) for r in rows] == [
        ("do nothing", "8 px", "0.000"), ("attgan", "8 px", "3.000"), ("feature_ae", "8 px", "**1.000**"),
        ("do nothing", "16 px", "0.000"), ("cgan", "16 px", "**50.000**"), ("mad", "16 px", "70.000")]


def test_table_refuses_rows_scored_on_another_attribute_set(tmp_path):
    paths = write_rows(tmp_path, [("attgan", 8, 1.0), ("cgan", 8, 2.0)])
    other = json.loads(paths[1].read_text())
    other["attr_set"]["attrs"] = ["Bangs"]
    paths[1].write_text(json.dumps(other))
    with pytest.raises(common.InputError, match="attr_set"):
        evaluate.table(paths)


# ------------------------------------------------------------------------------------------------
# The demo set: a perfect editor scores the oracle; doing nothing scores 0
# ------------------------------------------------------------------------------------------------
def test_a_perfect_demo_editor_scores_the_oracle(smoke_judge):
    judge = judge_module.load_judge(smoke_judge)
    attr_set = evaluate.judged_attributes(judge, evaluate.load_test(
        "demo:16", judge.attr_names, "test", 32, 170, 60))
    names = attr_set["attrs"]
    test = evaluate.load_test("demo:16", names, "test", 32, 170, 8)

    def render(i, changes):
        return common.to_float(common.preprocess(
            common.render_counterfactual(test.root, test.files[i], changes), 32, 170))

    def perfect_edit(images, attr_src, attr_tgt):
        return torch.stack([render(i, {n: attr_tgt[i, k].item() for k, n in enumerate(names)
                                       if attr_tgt[i, k] != attr_src[i, k]}) for i in range(len(images))])

    model = types.SimpleNamespace(attr_names=names, img_size=32, crop=170, edit=perfect_edit,
                                  reconstruct=lambda x: x.clone(), generate=None, encode=None)
    result = evaluate.score_model(model, judge, test, attr_set, true_images=8)
    # the oracle, computed here: on the images whose input the judge reads right, the share
    # of counterfactuals it reads as flipped; and the other readings kept
    before = judge(common.to_float(test.images))[0] > 0.5
    for a, name in enumerate(names):
        truth = torch.stack([render(i, {name: 1 - test.labels[i, a].item()}) for i in range(8)])
        after = judge(truth)[0] > 0.5
        column = judge.attr_names.index(name)
        right = before[:, column] == test.labels[:, a].bool()
        expected = (after[right, column] == ~test.labels[right, a].bool()).float().mean().item()
        assert result["edit_acc_per_attr"][name] == pytest.approx(expected)
        assert result["oracle_edit_acc_per_attr"][name] == pytest.approx(expected)
        others = [judge.attr_names.index(n) for n in names if n != name]
        kept = (after[:, others] == before[:, others]).float().mean().item()
        assert result["preservation_per_attr"][name] == pytest.approx(kept)
        assert result["oracle_preservation_per_attr"][name] == pytest.approx(kept)
    assert result["true_edit_psnr"] == pytest.approx(100.0)  # edits ARE the counterfactuals
    assert result["unedited_psnr"] < 60  # doing nothing is measurably worse
    assert result["psnr"] == pytest.approx(100.0) and result["ssim"] == pytest.approx(1.0, abs=1e-5)


def test_noop_from_the_command_line_is_the_floor_of_a_table(smoke_judge, cli):
    out = cli["folder"] / "noop.json"
    proc = cli["noop"]  # evaluate.py --method noop --data demo:16 --img-size 16 --true-images 4
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert "noop on demo:16" in proc.stdout and r["img_size"] == 16 and r["images"] == 60
    assert set(r["edit_acc_per_attr"].values()) == {0.0} and r["preservation"] == 1.0
    assert r["true_edit_psnr"] == r["unedited_psnr"] and r["edit_fd"] == pytest.approx(0.0, abs=1e-6)
    assert evaluate.table([out]).splitlines()[2].startswith(
        f"| do nothing | – | 16 px | {len(r['attrs'])}/{len(r['attr_set']['attrs'])} | 0.000 |")


# ------------------------------------------------------------------------------------------------
# evaluate.py on a smoke checkpoint of every method
# ------------------------------------------------------------------------------------------------
EXPECTED = {  # what each method supports, hence which numbers it must get
    "attgan": {"edit_acc", "preservation", "true_edit_psnr", "oracle_edit_acc", "psnr", "ssim", "edit_fd"},
    "dual_transfer": {"edit_acc", "preservation", "true_edit_psnr", "oracle_edit_acc", "psnr", "ssim", "edit_fd"},
    "cgan": {"gen_acc", "sample_fd"},
    "feature_ae": {"edit_acc", "preservation", "true_edit_psnr", "oracle_edit_acc", "psnr", "ssim", "edit_fd"},
    "mad": {"retrieval", "psnr", "ssim", "sample_fd"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_evaluate_scores_a_smoke_checkpoint(method, smoke_judge, tmp_path, request, capsys):
    """The session's `python <method>.py --smoke` run (conftest.py), copied here: an adapter may
    write beside the checkpoint (feature_ae's vectors.pt)."""
    run, _ = request.getfixturevalue(f"{method}_smoke")
    shutil.copytree(run, tmp_path / method)
    ckpt = tmp_path / method / ("ae" if method == "mad" else "") / "ckpt.pt"  # mad: one per stage
    out = tmp_path / f"{method}.json"
    evaluate.main(["--method", method, "--ckpt", str(ckpt), "--data", "demo:16", "--judge",
                   str(smoke_judge), "--true-images", "4", "--json", str(out)])
    result = json.loads(out.read_text())
    edits = {"edit_acc", "preservation", "true_edit_psnr", "oracle_edit_acc", "edit_fd"}
    # an editor whose attributes the judge does not read well enough is not scored on edits
    assert EXPECTED[method] - (set() if result["attrs"] else edits) <= set(result)
    assert result["method"] == method and result["images"] == 60  # the whole demo:16 test split
    judged = result["attr_set"]["attrs"]
    assert sorted(result["attrs"] + result["attrs_missing"]) == sorted(judged)
    floor = result["do_nothing"]  # the do-nothing editor at the method's size
    assert floor["img_size"] == result["img_size"] and floor["edit_acc"] == 0.0
    assert floor["preservation"] == 1.0 and floor["edit_fd"] == pytest.approx(0.0, abs=1e-6)
    if "edit_acc" in result:  # each attribute: successes among the images read right, a fraction
        for name, acc in result["edit_acc_per_attr"].items():
            n = result["edit_counted_per_attr"][name]
            assert acc is None or abs(acc * n - round(acc * n)) < 1e-4  # (float32 sums)
    if method == "mad":  # four sub-codes x two kinds of labels, and no attribute score
        assert set(result["retrieval"]) == {"identity", "expression"}
        assert set(result["retrieval"]["identity"]) == {"pose", "identity", "style", "expression"}
        assert "gen_acc" not in result and "edit_fd" not in result
    if "psnr" in result:
        assert result["psnr"] < 100  # a smoke model does not reconstruct exactly
    assert f"{method} on demo:16" in capsys.readouterr().out
    table = evaluate.table([out])
    assert f"| {method} | `{ckpt.parent.as_posix()}` |" in table and "| do nothing | – |" in table


def test_evaluate_refuses_an_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--method", "stargan", "--ckpt", str(tmp_path), "--judge", str(tmp_path)])
    err = capsys.readouterr().err
    assert "attgan" in err and "noop" in err


def test_evaluate_scores_the_do_nothing_floor_at_the_method_size(smoke_judge, monkeypatch, capsys):
    """A stand-in adapter (16 px, two attributes, edits by doing nothing): the floor comes at
    16 px over the whole judged set, the method's row over its own two, the rest named."""
    fake = types.ModuleType("adapters.fake")
    fake.load = lambda ckpt, device: types.SimpleNamespace(
        attr_names=["Eyeglasses", "Black_Hair"], img_size=16, crop=170, reconstruct=None,
        edit=lambda images, src, tgt: images.clone(), generate=None, encode=None)
    monkeypatch.setitem(sys.modules, "adapters.attgan", fake)
    result = evaluate.evaluate("attgan", "unused.pt", "demo:16", smoke_judge, true_images=2,
                               say=lambda text: None)
    judged = result["attr_set"]["attrs"]
    assert result["img_size"] == 16 and result["do_nothing"]["img_size"] == 16
    assert result["attrs"] == [n for n in judged if n in ("Eyeglasses", "Black_Hair")]
    assert result["attrs_missing"] == [n for n in judged if n not in ("Eyeglasses", "Black_Hair")]
    assert result["do_nothing"]["attrs"] == judged and result["do_nothing"]["attrs_missing"] == []
    for r in (result, result["do_nothing"]):  # both do nothing: 0 and 1 exactly
        assert set(r["edit_acc_per_attr"].values()) == {0.0} and r["preservation"] == 1.0


@pytest.mark.parametrize("script", HELP_SCRIPTS)
def test_help(script, cli):
    proc = cli[script]  # `python benchmarks/<script>.py --help`
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {script.split('/')[1]}") and "--data" in proc.stdout


def test_speed_reports_img_per_s_from_a_real_training_loop(capsys):
    """speed.main in this process; the training loop it times runs through cgan.py's command line."""
    import speed
    speed.main(["--quick", "--methods", "cgan", "--batch-sizes", "16", "--amp", "off", "--compile",
                "off", "--steps", "4"])
    row = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("cgan")]
    assert len(row) == 1 and row[0][:4] == ["cgan", "16", "off", "off"]
    assert float(row[0][4]) > 0


@pytest.mark.parametrize("script,argv,message", [
    ("judge", ["--smoke", "--batch-size", "0"], "--batch-size 0: expected a finite number above 0"),
    ("judge", ["--smoke", "--lr", "-1"], "--lr -1.0: expected a finite number above 0"),
    ("judge", ["--smoke", "--device", "gpu"], "--device gpu: not on this machine"),
    ("evaluate", ["--method", "noop", "--max-images", "0"], "--max-images 0: expected a finite"),
    ("evaluate", ["--method", "noop", "--device", "cuda:9"], "--device cuda:9: not on this machine"),
    ("speed", ["--batch-sizes", "32", "0"], "--batch-sizes 0: expected a finite number above 0"),
])
def test_bad_arguments_get_one_line_before_any_work(script, argv, message):
    import speed
    module = {"judge": judge_module, "evaluate": evaluate, "speed": speed}[script]
    with pytest.raises(common.InputError) as err:
        module.main(argv)
    assert message in str(err.value) and "\n" not in str(err.value)



# ------------------------------------------------------------------------------------------------
# Every file given is checked for what it is; every output before the work; faults in one line
# ------------------------------------------------------------------------------------------------
def test_a_text_file_given_as_the_judge_is_one_line(cli):
    proc = cli["not_a_judge"]  # evaluate.py --method noop --judge some.txt
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == (f"error: {cli['folder'] / 'some.txt'}: expected a judge written by "
                           "benchmarks/judge.py, found a file that is not a checkpoint\n")


@pytest.mark.parametrize("content,found", [
    ({"script": "attgan.py", "generator": {}, "config": {}}, "found a checkpoint of attgan.py"),
    ({"weights": torch.zeros(2)}, "found a checkpoint of another program"),
    ([1, 2, 3], "found a file that is not a checkpoint"),
    ("narrower", "its weights do not fit its configuration"),
])
def test_a_file_that_is_not_a_judge_is_named(smoke_judge, tmp_path, content, found):
    path = tmp_path / "judge.pt"
    if content == "narrower":  # a judge's weights under another width
        state = torch.load(smoke_judge, weights_only=True)
        content = {**state, "config": {**state["config"], "width": state["config"]["width"] // 2}}
    torch.save(content, path)
    with pytest.raises(common.InputError) as err:
        evaluate.main(["--method", "noop", "--judge", str(path)])
    assert str(err.value).startswith(f"{path}: expected a judge written by benchmarks/judge.py")
    assert found in str(err.value) and "\n" not in str(err.value)


def test_table_names_a_file_that_is_not_a_result(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "other.json").write_text('{"rows": []}')
    for name, found in (("notes.txt", "found no JSON"), ("other.json", "found JSON without its fields"),
                        ("none.json", "No such file or directory")):
        with pytest.raises(common.InputError, match=f"^--table {tmp_path / name}: .*{found}"):
            evaluate.main(["--table", str(tmp_path / name)])


@pytest.mark.parametrize("where,message", [
    ("file/judge.pt", "{tmp}/file is a file, not a folder"),
    ("/proc/face_attr/judge.pt", r"cannot write there \(No such file or directory\)"),  # no such folder
    ("/proc/self/judge.pt", r"cannot write there \(No such file or directory\)"),  # refuses even root
    ("old.pt", "exists; pass --overwrite to replace it"),
])
def test_judge_checks_its_output_before_it_draws_data_or_trains(tmp_path, monkeypatch, where, message):
    """A fresh cache folder stays absent: the refusal comes before the demo set is drawn."""
    monkeypatch.setenv("FACE_ATTR_CACHE", str(tmp_path / "fresh_cache"))
    (tmp_path / "file").write_text("a file")
    (tmp_path / "old.pt").write_bytes(b"the previous judge")
    out = where if where.startswith("/") else str(tmp_path / where)
    with pytest.raises(common.InputError, match=f"^--out {out}" + ".*" + message.format(tmp=tmp_path)):
        judge_module.main(["--smoke", "--out", out])
    assert not (tmp_path / "fresh_cache").exists()
    assert (tmp_path / "old.pt").read_bytes() == b"the previous judge"
    assert (tmp_path / "file").read_text() == "a file"
    if where == "old.pt":  # the flag lets it through (to the training, which is not run here)
        assert judge_module.parse_args(["--smoke", "--out", out, "--overwrite"]).overwrite


@pytest.mark.parametrize("script", ["evaluate", "speed"])
def test_json_outputs_are_checked_before_the_work_and_never_overwritten_silently(tmp_path, monkeypatch, script):
    import speed
    module = {"evaluate": evaluate, "speed": speed}[script]
    work = "evaluate" if script == "evaluate" else "measure"
    monkeypatch.setattr(module, work, lambda *a, **k: pytest.fail(f"{work} ran before the check"))
    argv = (["--method", "noop", "--judge", "unused.pt"] if script == "evaluate" else
            ["--methods", "cgan", "--batch-sizes", "8", "--amp", "off", "--compile", "off"])
    (tmp_path / "file").write_text("a file")
    (tmp_path / "old.json").write_text('{"old": 1}')
    for out, message in ((tmp_path / "old.json", "exists; pass --overwrite to replace it"),
                         (tmp_path / "file" / "r.json", f"{tmp_path}/file is a file, not a folder")):
        with pytest.raises(common.InputError, match=f"^--json {out}" + ".*" + message):
            module.main(argv + ["--json", str(out)])
    assert (tmp_path / "old.json").read_text() == '{"old": 1}'
    monkeypatch.setattr(module, work, lambda *a, **k: (1.0, None) if script == "speed" else {"ok": 1})
    module.main(argv + ["--json", str(tmp_path / "old.json"), "--overwrite"])
    assert (tmp_path / "old.json").read_text() != '{"old": 1}' and not list(tmp_path.glob("*.tmp"))


WRITE_PROBE = """
import sys
sys.path.insert(0, {bench!r})
import torch, cli
cli.run(lambda: cli.write_output(sys.argv[1], {{"weights": torch.zeros(100_000)}}))
"""


def test_a_disk_that_fills_while_an_output_is_written_gets_one_line_and_keeps_the_old_file(tmp_path):
    """RLIMIT_FSIZE of 100 kB with SIGXFSZ ignored: the 400 kB write fails with EFBIG, as on a
    full disk; the previous file survives and no temporary file is left."""
    path = tmp_path / "judge.pt"
    path.write_bytes(b"the previous judge")

    def small_file_limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-c", WRITE_PROBE.format(bench=str(ROOT / "benchmarks")),
                           str(path)], cwd=ROOT, capture_output=True, text=True, preexec_fn=small_file_limit,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr == f"error: cannot write {path} (File too large); nothing was written there\n"
    assert path.read_bytes() == b"the previous judge" and sorted(os.listdir(tmp_path)) == ["judge.pt"]


def test_ctrl_c_during_judge_training_is_one_line_and_writes_nothing(tmp_path):
    """SIGINT to the process group (a terminal's Ctrl-C) once training has started."""
    out = tmp_path / "judge.pt"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "judge.py"), "--smoke", "--steps",
                             "1000000", "--out", str(out)], cwd=ROOT, start_new_session=True, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    started = proc.stdout.readline()  # the line printed just before the first step
    assert started.startswith("judge: "), started + proc.communicate()[1][-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1] == "interrupted (Ctrl-C); nothing was written"  # after the data notes
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_a_checkpoint_of_another_program_is_refused_before_any_data_is_read(method, smoke_judge, tmp_path,
                                                                            monkeypatch):
    """The judge given as --ckpt: each method's loader names what it expected and what it found,
    before the test images are drawn or cached (a fresh cache folder stays absent)."""
    monkeypatch.setenv("FACE_ATTR_CACHE", str(tmp_path / "fresh_cache"))
    with pytest.raises(common.InputError) as err:
        evaluate.main(["--method", method, "--ckpt", str(smoke_judge), "--judge", str(smoke_judge),
                       "--data", "demo:1"])
    assert str(err.value) == f"{smoke_judge}: expected a checkpoint written by {method}.py, found judge.py"
    assert not (tmp_path / "fresh_cache").exists()
