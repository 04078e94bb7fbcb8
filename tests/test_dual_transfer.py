"""Tests for dual_transfer.py: the original's networks (shapes, U-Net shortcuts, the classifier's
parameter count by hand), its preprocessing, each loss on known values, one step of each stage
against a reference computation, stage 1's pairs and label weights, the eval.json numbers by hand,
the classifier-reuse key (the bug), the command line (help, argument checks, foreign checkpoints,
both stages, edit), exact resume, and the evaluation adapter."""
import copy
import json
import os
import shutil
import sys

import numpy
import pytest
import torch
from PIL import Image

import common
import dual_transfer as dt
from conftest import ROOT, commands

torch.set_num_threads(1)


def smoke_args(**changes):
    return dt.Args(**{**dt.PRESETS["smoke"], **changes})


# ------------------------------------------------------------------------------------------------
# The original's networks (model.py)
# ------------------------------------------------------------------------------------------------
def test_classifier_has_the_originals_layers_and_parameter_count():
    classifier = dt.Classifier(num_attrs=1)  # defaults: 128 px, 5 layers, 64 ... 1024, FC 1024
    widths = [3, 64, 128, 256, 512, 1024]
    # each block: conv 4x4 weights + bias, BatchNorm weight + bias
    convs = sum(c_in * c_out * 16 + c_out + 2 * c_out for c_in, c_out in zip(widths, widths[1:]))
    fc = (1024 * 4 * 4) * 1024 + 1024 + 1024 * 1 + 1
    assert convs + fc == 27_929_409  # the hand computation itself: 11,150,144 + 16,779,265
    assert sum(p.numel() for p in classifier.parameters()) == convs + fc
    kinds = [type(m) for m in classifier.blocks if isinstance(m, torch.nn.Sequential)]
    assert len(kinds) == 5
    for block, (c_in, c_out) in zip(classifier.blocks, zip(widths, widths[1:])):
        conv = block[0]
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == \
            (c_in, c_out, (4, 4), (2, 2))
        assert isinstance(block[1], torch.nn.BatchNorm2d) and isinstance(block[2], torch.nn.ReLU)
    assert classifier.fc1.in_features == 16384 and classifier.fc1.out_features == 1024


def test_encoder_features_and_decoder_shapes_at_128_px():
    encoder = dt.Encoder(n_layers=5, dim=4)
    feats = encoder(torch.rand(2, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(2, 4 * 2 ** k, 64 >> k, 64 >> k) for k in range(5)]
    decoder = dt.Decoder(num_attrs=2, n_layers=5, dim=4, shortcut_layers=3)
    out = decoder(feats, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert out.shape == (2, 3, 128, 128) and 0 <= out.min() and out.max() <= 1  # sigmoid
    # the original decoder's parameters: deconvs 4x4 with bias + BatchNorm; 1024 + A in; no concat
    chans = [4 * 16 + 2, 4 * 8, 4 * 4, 4 * 2, 4, 3]
    expected = sum(a * b * 16 + b + 2 * b for a, b in zip(chans, chans[1:]))
    assert sum(p.numel() for p in decoder.parameters()) == expected


@pytest.mark.parametrize("shortcut_layers", [0, 1, 3])
def test_decoder_adds_exactly_the_first_shortcut_layers_encoder_maps(shortcut_layers):
    """Dec block i < shortcut_layers adds E's feature map feats[-2 - i]; the others are unused."""
    torch.manual_seed(0)
    decoder = dt.Decoder(num_attrs=1, n_layers=5, dim=2, shortcut_layers=shortcut_layers).eval()
    feats = dt.Encoder(n_layers=5, dim=2).eval()(torch.rand(2, 3, 64, 64))
    attrs = torch.ones(2, 1)
    base = decoder(feats, attrs)
    used = []
    for k in range(5):
        changed = [f.clone() for f in feats]
        changed[k] = changed[k] + 1.0
        used.append(not torch.allclose(decoder(changed, attrs), base))
    # feats[4] is the bottleneck (always used); block i reads feats[3 - i]
    assert used == [3 - k < shortcut_layers for k in range(4)] + [True]


def test_init_follows_the_originals_weight_init():
    torch.manual_seed(0)
    classifier = dt.Classifier(1, img_size=32, n_layers=2, dim=64, fc=256)
    conv = classifier.blocks[1][0]  # 64 -> 128, Kaiming normal, fan_out = 128 * 16
    assert conv.weight.std().item() == pytest.approx((2 / (128 * 16)) ** 0.5, rel=0.05)
    fc1 = classifier.fc1  # Xavier normal: std = sqrt(2 / (fan_in + fan_out))
    assert fc1.weight.std().item() == pytest.approx((2 / (fc1.in_features + 256)) ** 0.5, rel=0.05)
    assert torch.equal(classifier.blocks[0][1].weight, torch.ones(64))


# ------------------------------------------------------------------------------------------------
# Preprocessing (celebA.py + main.py): full frame resized to a square, [0, 1]
# ------------------------------------------------------------------------------------------------
def test_defaults_are_the_originals_and_images_are_the_full_frame_in_0_1():
    args = dt.Args()
    assert (args.img_size, args.crop, args.n_layers, args.dim, args.shortcut_layers) == \
        (128, 0, 5, 64, 1)
    assert (args.lambda_lat, args.lambda_self, args.lambda_cls, args.lambda_cross, args.lr,
            args.weight_decay, args.batch_size) == (1.0, 1.0, 0.1, 0.0, 1e-5, 1e-3, 128)  # opts.py 84e46c8
    data, _, pairs, _ = dt.prepare(smoke_args())  # 32 px, crop 0
    with Image.open(data.root / "img_align_celeba" / data.files[0]) as photo:
        assert photo.size == (178, 218)
        full = photo.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
        cropped = photo.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC,
                                              box=(4, 24, 174, 194))  # a 170 centre crop
    error = {name: (data.images[0].float() - torch.from_numpy(numpy.asarray(picture).copy())
                    .permute(2, 0, 1).float()).abs().mean().item()
             for name, picture in (("full", full), ("cropped", cropped))}
    assert error["full"] < 1.5 and error["cropped"] > 8  # the whole frame (JPEG draft: not exact)
    chosen = pairs[:4]
    img_1, img_2, _, _ = dt.pair_tensors(data, chosen, "cpu")
    assert torch.allclose(img_1, data.images[chosen[:, 0]].float() / 255, atol=1e-6)
    assert torch.allclose(img_2, data.images[chosen[:, 1]].float() / 255, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Losses (model_loss.py) and one stage-2 step
# ------------------------------------------------------------------------------------------------
def test_losses_on_known_values():
    target = torch.zeros(2, 3, 4, 4)
    assert dt.loss_recon(target + 0.5, target).item() == pytest.approx(0.25 + 0.5)  # MSE + L1
    early, late = torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 2, 2)
    assert dt.loss_lat([early, late], [early + 5, late]).item() == 0.0  # the bottleneck only
    assert dt.loss_lat([early, late], [early, late - 3]).item() == 3.0
    logits, labels = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    bce = (0.693147 + 2.126928) / 2  # -log(1/2), -log(1 - sigmoid(2))
    assert dt.loss_cls(logits, labels).item() == pytest.approx(bce, rel=1e-5)
    assert dt.loss_cls(logits, labels, torch.tensor([3.0, 3.0])).item() == \
        pytest.approx((3 * 0.693147 + 2.126928) / 2, rel=1e-5)
    assert dt.psnr(target, target + 0.1).tolist() == pytest.approx([20.0, 20.0], rel=1e-5)


def test_dual_step_matches_a_reference_and_leaves_the_frozen_classifier_alone():
    args = smoke_args(lambda_lat=0.3, lambda_self=0.7, lambda_cls=0.2, lambda_cross=0.5)
    torch.manual_seed(0)
    encoder, decoder, classifier = dt.build_models(vars(args), 1)
    classifier.eval().requires_grad_(False)
    torch.manual_seed(1)
    img_1, img_2 = torch.rand(4, 3, 32, 32) * 0.5, 0.5 + torch.rand(4, 3, 32, 32) * 0.5  # apart
    attr_1, attr_2 = torch.tensor([[0.], [1.], [0.], [1.]]), torch.tensor([[1.], [0.], [1.], [0.]])
    with torch.no_grad():  # reference, written out term by term (train-mode BN, one pass each)
        f1, f2 = encoder(img_1), encoder(img_2)
        rec = lambda a, b: ((a - b) ** 2).mean() + (a - b).abs().mean()  # noqa: E731
        bce = torch.nn.functional.binary_cross_entropy
        x21, x12 = decoder(f2, attr_1), decoder(f1, attr_2)
        reference = (0.3 * (f1[-1] - f2[-1]).abs().mean()
                     + 0.7 * (rec(decoder(f1, attr_1), img_1) + rec(decoder(f2, attr_2), img_2))
                     + 0.2 * (bce(torch.sigmoid(classifier(x21)), attr_1)
                              + bce(torch.sigmoid(classifier(x12)), attr_2))
                     + 0.5 * (rec(x21, img_1) + rec(x12, img_2)))
    frozen = {k: v.clone() for k, v in classifier.state_dict().items()}
    before = [p.detach().clone() for p in [*encoder.parameters(), *decoder.parameters()]]
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    stats = dt.dual_step([encoder, decoder, classifier], optimizer, img_1, img_2, attr_1, attr_2,
                         args, lambda: dt.autocast(torch.device("cpu"), False))
    assert stats["loss"] == pytest.approx(reference.item(), rel=2e-4)
    for key, value in classifier.state_dict().items():  # weights AND BatchNorm running statistics
        assert torch.equal(value, frozen[key]), key
    after = [*encoder.parameters(), *decoder.parameters()]
    assert all(not torch.equal(p, q) for p, q in zip(before, after) if p.dim() > 1)


def test_classification_error_reaches_the_decoder_through_the_frozen_classifier():
    args = smoke_args(lambda_lat=0.0, lambda_self=0.0, lambda_cross=0.0, lambda_cls=1.0)
    torch.manual_seed(0)
    encoder, decoder, classifier = dt.build_models(vars(args), 1)
    classifier.eval().requires_grad_(False)
    optimizer = torch.optim.SGD([*encoder.parameters(), *decoder.parameters()], lr=0.0)
    img = torch.rand(2, 4, 3, 32, 32)
    attrs = torch.tensor([[0.], [1.], [0.], [1.]])
    dt.dual_step([encoder, decoder, classifier], optimizer, img[0], img[1], attrs, 1 - attrs,
                 args, lambda: dt.autocast(torch.device("cpu"), False))
    assert sum(p.grad.abs().sum() for p in decoder.parameters()) > 0
    assert all(p.grad is None for p in classifier.parameters())


def test_classifier_step_sums_the_two_photos_losses_in_two_passes():
    """Stage 1 (Train_Classifier.py): C sees x1 and x2 in two train-mode passes (BatchNorm statistics of
    each photo batch) and descends BCE(C(x1), a1) + BCE(C(x2), a2), present labels weighted."""
    torch.manual_seed(0)
    classifier = dt.build_models(vars(smoke_args()), 2)[2]
    reference = copy.deepcopy(classifier)
    torch.manual_seed(1)
    img_1, img_2 = torch.rand(4, 3, 32, 32) * 0.5, 0.5 + torch.rand(4, 3, 32, 32) * 0.5  # apart
    attr_1 = torch.tensor([[0., 1.], [1., 1.], [0., 0.], [1., 0.]])
    attr_2 = torch.tensor([[1., 1.], [0., 1.], [1., 0.], [0., 0.]])
    pos_weight = torch.tensor([3.0, 1.5])

    def bce(logits, labels):  # written out: -(w·a·log σ(l) + (1 - a)·log(1 - σ(l))), mean
        prob = torch.sigmoid(logits)
        return -(pos_weight * labels * torch.log(prob) + (1 - labels) * torch.log(1 - prob)).mean()
    logits_1, logits_2 = reference(img_1), reference(img_2)
    loss = bce(logits_1, attr_1) + bce(logits_2, attr_2)
    loss.backward()
    hits = torch.cat([(logits_1 > 0).float() == attr_1, (logits_2 > 0).float() == attr_2]).float().mean()
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    stats = dt.classifier_step(classifier, optimizer, img_1, img_2, attr_1, attr_2, pos_weight,
                               lambda: dt.autocast(torch.device("cpu"), False))
    assert stats["c_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert stats["c_acc"] == pytest.approx(hits.item())
    for after, before in zip(classifier.parameters(), reference.parameters()):
        assert torch.allclose(after, before - 0.1 * before.grad, atol=1e-6)


def test_stage_1_trains_on_both_photos_of_the_training_pairs(tmp_path, monkeypatch):
    """Train_Classifier.py feeds C both photos of each pair of the pair file: stage 1 draws stage 2's
    pairs (one person, target attributes differ), not single images, and weighs present labels by
    neg/pos among those photos, clamped to [1, 50]."""
    args = smoke_args(attrs=["Mustache", "No_Beard"], out=str(tmp_path), cls_steps=3)
    data, val, pairs, _ = dt.prepare(args)
    drawn = []

    def recording_step(classifier, optimizer, img_1, img_2, attr_1, attr_2, pos_weight, amp_ctx):
        drawn.append((img_1, img_2, attr_1, attr_2, pos_weight))
        return {"c_loss": 0.0, "c_acc": 0.0}
    monkeypatch.setattr(dt, "classifier_step", recording_step)
    dt.get_classifier(args, data, val, pairs, torch.device("cpu"))
    assert len(drawn) == 3
    pixels = data.images.flatten(1).float() / 255

    def row_of(images):  # each drawn photo's index in the training split, found by its pixels
        match = (images.flatten(1)[:, None] - pixels[None]).abs().amax(-1) < 1e-5
        assert (match.sum(1) == 1).all()
        return match.float().argmax(1)
    listed, labels = {tuple(pair) for pair in pairs.tolist()}, data.labels
    for img_1, img_2, attr_1, attr_2, _ in drawn:
        first, second = row_of(img_1), row_of(img_2)
        assert len(first) == args.batch_size
        assert torch.equal(data.identities[first], data.identities[second]) and (first != second).all()
        assert torch.equal(attr_1, labels[first]) and torch.equal(attr_2, labels[second])
        assert (attr_1 != attr_2).any(1).all()
        assert all(pair in listed for pair in zip(first.tolist(), second.tolist()))
    photos = labels[pairs.flatten()]
    ratio = (photos == 0).sum(0) / (photos == 1).sum(0)  # Mustache 1.60, No_Beard 0.77 on demo:16
    assert ratio[1] < 1 < ratio[0]
    expected = ratio.clamp(1.0, 50.0)
    everyone = ((labels == 0).sum(0) / (labels == 1).sum(0)).clamp(1.0, 50.0)  # all photos: not this
    assert not torch.allclose(expected, everyone)
    assert torch.allclose(drawn[0][4], expected)


def test_the_train_score_pairs_are_drawn_from_every_identity():
    """train() scores at most 2,000 training pairs with common.identity_pairs(max_pairs=2000): drawn
    from all people, where the first 2,000 (the old pairs[:2000]) cover only a few."""
    identities = torch.arange(50).repeat_interleave(20)  # 50 people, 20 photos: 190 pairs each
    pairs = common.identity_pairs(identities)
    assert len(pairs) == 50 * 190
    assert len(identities[pairs[:2000, 0]].unique()) <= 11  # what the first 2000 would cover
    drawn = common.identity_pairs(identities, max_pairs=2000, seed=0)
    assert len(drawn) == 2000 and len(identities[drawn[:, 0]].unique()) == 50
    assert len(torch.unique(drawn, dim=0)) == 2000  # no pair twice


def test_evaluate_pairs_against_a_hand_computation():
    """eval.json's numbers: PSNR of Dec(E(x1), a1) and of Dec(E(x2), a1) against x1, and how often the
    frozen C reads a1 on the attributes where a1 != a2 (the others do not count)."""
    torch.manual_seed(0)
    encoder, decoder, classifier = (m.eval() for m in dt.build_models(vars(smoke_args()), 2))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([[0., 1.], [1., 1.], [0., 0.], [1., 0.], [1., 1.], [0., 0.]])
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5]])
    data = common.FaceData(images, labels, ["A", "B"], [], None, None, ROOT, "demo", "train", (32, 32))
    result = dt.evaluate_pairs((encoder, decoder, classifier), data, pairs, "test", "cpu")
    unit = images.float() / 255
    x1, x2, a1, a2 = unit[pairs[:, 0]], unit[pairs[:, 1]], labels[pairs[:, 0]], labels[pairs[:, 1]]
    with torch.no_grad():
        own, moved = decoder(encoder(x1), a1), decoder(encoder(x2), a1)
        read = (torch.sigmoid(classifier(moved)) > 0.5).float()
    mean_psnr = lambda a, b: (10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1))).mean().item()  # noqa: E731
    changed = a1 != a2  # 4 of the 6 entries
    assert result["pairs"] == 3
    assert result["psnr_self"] == pytest.approx(mean_psnr(own, x1), rel=1e-4)
    assert result["psnr_transfer"] == pytest.approx(mean_psnr(moved, x1), rel=1e-4)
    assert result["transfer_acc_changed"] == pytest.approx(((read == a1) & changed).sum().item() / 4)


# ------------------------------------------------------------------------------------------------
# The stage-1 classifier is reused only when everything that determines it matches (the bug)
# ------------------------------------------------------------------------------------------------
def test_classifier_key_changes_with_every_setting_and_with_the_pixels():
    data, _, _, _ = dt.prepare(smoke_args())
    base = dt.classifier_key(smoke_args(), data)
    assert base == dt.classifier_key(smoke_args(), data)
    for name, value in dict(seed=1, cls_steps=5, cls_lr=2e-3, cls_dim=4, cls_fc=8, crop=170,
                            img_size=64, n_layers=2, batch_size=4, weight_decay=0.0).items():
        assert dt.classifier_key(smoke_args(**{name: value}), data)[name] != base[name], name
    data.images[0, 0, 0, 0] ^= 1  # one pixel of one image: another data set
    assert dt.classifier_key(smoke_args(), data)["data_digest"] != base["data_digest"]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
class Commands(dict):
    """name -> CompletedProcess of each command line below; .folder."""


@pytest.fixture(scope="module")
def cli(smoke_run, tmp_path_factory, face_attr_cache):
    """This file's command lines, in order, in ONE fresh interpreter (conftest.commands): --help of
    the script, train and edit; a bad --batch-size; edit with another script's checkpoint; an edit
    of a photo with the smoke run's checkpoint."""
    folder = tmp_path_factory.mktemp("dual_cli")
    foreign = folder / "attgan_ckpt.pt"
    torch.save({"script": "attgan.py", "config": {}, "step": 3}, foreign)
    photo = folder / "me.jpg"
    Image.new("RGB", (120, 150), (200, 150, 120)).save(photo)
    calls = {"help": ["--help"], "train_help": ["train", "--help"], "edit_help": ["edit", "--help"],
             "bad_argument": ["--batch-size", "-4", "--out", folder / "bad"],
             "foreign": ["edit", "--ckpt", foreign, "--image", foreign],
             "edit": ["edit", "--ckpt", smoke_run / "ckpt.pt", "--image", photo, "--set", "eyeglasses=1",
                      "--out", folder / "me_glasses.png"]}
    env = dict(os.environ, FACE_ATTR_CACHE=str(face_attr_cache), OMP_NUM_THREADS="1")
    result = Commands(zip(calls, commands([("dual_transfer.py", argv) for argv in calls.values()],
                                          env, folder / "driver")))
    result.folder = folder
    return result


@pytest.mark.parametrize("command", ["help", "train_help", "edit_help"])
def test_help_of_the_script_and_each_sub_command(cli, command):
    proc = cli[command]  # `python dual_transfer.py [train | edit] --help`
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: dual_transfer.py" in proc.stdout and "Traceback" not in proc.stderr
    assert ("--set" if command == "edit_help" else "--shortcut-layers") in proc.stdout


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--lr", "-1"),
                                        ("--log-every", "0"), ("--ckpt-every", "0"),
                                        ("--lambda-cls", "-0.1"), ("--lr", "nan"),
                                        ("--shortcut-layers", "9"), ("--img-size", "48")])
def test_out_of_range_arguments_are_refused_before_any_data_loads(tmp_path, flag, value):
    with pytest.raises(common.InputError, match=flag) as error:
        dt.main(["--data", str(tmp_path / "no_such_folder"), flag, value, "--out",
                 str(tmp_path / "out")])
    assert "no_such_folder" not in str(error.value)  # the argument is checked first
    assert not (tmp_path / "out").exists()


def test_a_bad_argument_is_one_line_on_the_command_line(cli):
    proc = cli["bad_argument"]  # --batch-size -4
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: --batch-size -4: expected a finite number above 0"]


def test_checkpoints_of_other_scripts_are_refused_in_one_line(cli, smoke_run):
    foreign = cli.folder / "attgan_ckpt.pt"  # {"script": "attgan.py", "config": {}, "step": 3}
    proc = cli["foreign"]  # edit --ckpt <it> --image <it>
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"error: {foreign}: expected a checkpoint written by dual_transfer.py, found attgan.py"]
    with pytest.raises(common.InputError, match="expected a stage-2 ckpt.pt of dual_transfer.py, found its "
                                                "stage-1 classifier"):
        dt.load(smoke_run / "classifier.pt")


def test_missing_identity_file_names_it(tmp_path):
    copy = tmp_path / "no_ids"
    shutil.copytree(common.demo_root("demo:16"), copy)
    (copy / "identity_CelebA.txt").unlink()
    with pytest.raises(common.InputError, match="identity_CelebA.txt .*Anno"):
        dt.main(["--smoke", "--data", str(copy), "--out", str(tmp_path / "out")])


@pytest.fixture(scope="module")
def smoke_run(dual_transfer_smoke):
    """Both stages through the real command line, as a user runs them (conftest.py's session run,
    shared with tests/test_benchmarks.py)."""
    return dual_transfer_smoke[0]


def test_smoke_run_writes_every_file(smoke_run):
    state = torch.load(smoke_run / "ckpt.pt", weights_only=True)
    assert state["script"] == "dual_transfer.py" and state["kind"] == "dual" and state["step"] == 4
    assert {"encoder", "decoder", "classifier", "optimizer", "config", "attr_names"} <= set(state)
    stage1 = torch.load(smoke_run / "classifier.pt", weights_only=True)
    for key, value in stage1["classifier"].items():  # stage 2 carries the frozen C unchanged
        assert torch.equal(state["classifier"][key], value), key
    records = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "lat", "self", "cls", "cross", "transfer_acc", "img_per_s"} <= set(records[0])
    grid = Image.open(smoke_run / "samples" / "step_000004.png")
    assert grid.width > 5 * 32 and grid.height > 3 * 32  # 5 columns, 3 pairs
    result = json.loads((smoke_run / "eval.json").read_text())
    assert result["train"]["pairs"] == 2000 and result["val"]["pairs"] > 0


def test_a_run_on_other_data_trains_its_own_classifier(smoke_run, tmp_path, capsys):
    """The bug: classifier.pt in --out was reused whatever data it was trained on (here: a folder that
    holds only stage 1, as a run stopped after stage 1 leaves it)."""
    same, other_run, other = tmp_path / "same", tmp_path / "other_run", tmp_path / "other_demo"
    for folder in (same, other_run):
        folder.mkdir()
        shutil.copy(smoke_run / "classifier.pt", folder / "classifier.pt")  # trained on demo:16
    first = torch.load(smoke_run / "classifier.pt", weights_only=True)
    dt.main(["--smoke", "--out", str(same), "--steps", "2"])
    assert f"classifier: {same / 'classifier.pt'}" in capsys.readouterr().out  # same settings: reused
    shutil.copytree(common.demo_root("demo:16"), other)  # another data set: half the labels off
    attr_file = other / "list_attr_celeba.txt"
    lines = attr_file.read_text().splitlines()
    lines[2:] = [line.replace(" 1", " -1") if i % 2 else line for i, line in enumerate(lines[2:])]
    attr_file.write_text("\n".join(lines) + "\n")
    dt.main(["--smoke", "--out", str(other_run), "--data", str(other), "--steps", "2"])
    printed = capsys.readouterr().out
    assert "stage 1:" in printed and "data='demo:16' (this run: " in printed
    second = torch.load(other_run / "classifier.pt", weights_only=True)
    assert second["key"]["data"] == str(other.resolve())
    stage2 = torch.load(other_run / "ckpt.pt", weights_only=True)["classifier"]
    assert any(not torch.equal(stage2[k], first["classifier"][k]) for k in stage2)
    for k in stage2:
        assert torch.equal(stage2[k], second["classifier"][k]), k
    with pytest.raises(common.InputError, match="this run: 'demo:16'"):  # a given file: refused
        dt.main(["--smoke", "--out", str(tmp_path / "third"), "--classifier", str(other_run / "classifier.pt")])


def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(smoke_run):
    before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*")}
    with pytest.raises(common.InputError, match="holds a run"):
        dt.main(["--smoke", "--out", str(smoke_run), "--data", "demo:16"])
    assert {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*") if p.name != ".lock"} == \
        {p: t for p, t in before.items() if p.name != ".lock"}


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(smoke_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    kept = (run / "ckpt.pt").read_bytes()
    monkeypatch.setattr(dt, "loss_lat", lambda a, b: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="step 6: non-finite"):
        dt.main(["--smoke", "--out", str(run), "--steps", "8", "--resume"])
    assert (run / "ckpt.pt").read_bytes() == kept


def test_edit_a_photo_through_the_command_line(smoke_run, cli):
    photo, edited = cli.folder / "me.jpg", cli.folder / "me_glasses.png"  # a 120x150 plain photo
    proc = cli["edit"]  # edit --image <photo> --set eyeglasses=1 --out <edited>
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Eyeglasses" in proc.stdout
    assert Image.open(edited).size == (32, 32)
    assert edited.with_name("me_glasses_compare.png").is_file()
    with pytest.raises(common.InputError, match="Eyeglasses"):
        dt.main(["edit", "--ckpt", str(smoke_run / "ckpt.pt"), "--image", str(photo), "--set",
                 "Glasses=1"])


def test_resume_continues_exactly_and_refuses_another_configuration(tmp_path, smoke_run):
    resumed = tmp_path / "resumed"
    shutil.copy(smoke_run / "classifier.pt", tmp_path / "c.pt")
    dt.main(["--smoke", "--out", str(resumed), "--steps", "2", "--classifier", str(tmp_path / "c.pt")])
    dt.main(["--smoke", "--out", str(resumed), "--steps", "4", "--resume"])
    a = torch.load(smoke_run / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    for part in ("encoder", "decoder", "optimizer"):
        flat_a, flat_b = torch.utils._pytree.tree_flatten(a[part])[0], \
            torch.utils._pytree.tree_flatten(b[part])[0]
        for x, y in zip(flat_a, flat_b):
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), part
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    with pytest.raises(common.InputError, match="shortcut_layers=1, this run has shortcut_layers=2"):
        dt.main(["--smoke", "--out", str(resumed), "--steps", "6", "--resume",
                 "--shortcut-layers", "2"])


# ------------------------------------------------------------------------------------------------
# The evaluation adapter (benchmarks/adapters/dual_transfer.py)
# ------------------------------------------------------------------------------------------------
def test_adapter_maps_the_contract_onto_the_networks(smoke_run):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from adapters import dual_transfer as adapter
    model = adapter.load(smoke_run / "ckpt.pt")
    assert (model.attr_names, model.img_size, model.crop, model.generate) == \
        (["Eyeglasses"], 32, None, None)
    _, _, (encoder, decoder, classifier) = dt.load(smoke_run / "ckpt.pt")
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    target = torch.tensor([[1.0], [0.0], [1.0]])
    with torch.no_grad():  # in [0, 1] inside the networks, [-1, 1] outside
        unit = (images + 1) / 2
        expected_edit = decoder(encoder(unit), target) * 2 - 1
        read = (classifier(unit) > 0).float()
        expected_recon = decoder(encoder(unit), read) * 2 - 1
    assert torch.allclose(model.edit(images, 1 - target, target), expected_edit, atol=1e-6)
    assert torch.allclose(model.reconstruct(images), expected_recon, atol=1e-6)
    assert model.encode(images)["z"].shape == (3, 32 * 4 * 4)
