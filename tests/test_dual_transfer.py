"""Tests for dual_transfer.py: pair building, the missing-identity error, module shapes, each loss
term on a toy case, the frozen classifier, both stages through the command line, exact resume."""
import json
import shutil

import pytest
import torch
from PIL import Image

import common
import dual_transfer as dt

torch.set_num_threads(1)


def smoke_config(**changes):
    """The --smoke configuration as a config dict and an Args."""
    args = dt.Args(**{k: v for k, v in dt.SMOKE.items()})
    config = dict(vars(args), **changes)
    return config, dt.Args(**config)


# ------------------------------------------------------------------------------------------------
# Pairs
# ------------------------------------------------------------------------------------------------
def test_pairs_share_identity_differ_in_attributes_and_cover_all_such_pairs():
    identities = torch.tensor([7, 3, 7, 3, 7, 9, 3])
    labels = torch.tensor([[1.], [0.], [0.], [0.], [1.], [1.], [1.]])
    pairs = common.identity_pairs(identities, labels)
    # identity 7: images 0, 2, 4 (labels 1, 0, 1) -> (0, 2), (2, 4); identity 3: images 1, 3, 6
    # (0, 0, 1) -> (1, 6), (3, 6); identity 9 has one image: no pair
    assert sorted(map(tuple, pairs.tolist())) == [(0, 2), (1, 6), (2, 4), (3, 6)]
    assert (identities[pairs[:, 0]] == identities[pairs[:, 1]]).all()
    assert (labels[pairs[:, 0]] != labels[pairs[:, 1]]).any(1).all()


def test_pair_batch_returns_the_two_images_of_each_pair():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    labels = torch.tensor([[0.], [1.], [0.], [1.], [0.], [1.]])
    data = common.FaceData(images=images, labels=labels, attr_names=["Eyeglasses"], files=[],
                           identities=torch.tensor([1, 1, 2, 2, 3, 3]), landmarks=None, root=None,
                           layout="test", split="train", img_size=(2, 2))
    pairs = common.identity_pairs(data.identities, data.labels)
    img_1, img_2, attr_1, attr_2 = dt.pair_batch(data, pairs, step=0, batch_size=3, seed=0,
                                                 device="cpu")
    first = common.to_uint8(img_1)[:, 0, 0, 0].tolist()
    second = common.to_uint8(img_2)[:, 0, 0, 0].tolist()
    assert sorted(zip(first, second)) == [(0, 1), (2, 3), (4, 5)]
    assert torch.equal(attr_1, labels[first]) and torch.equal(attr_2, labels[second])


def test_missing_identity_file_names_it(tmp_path, run_script):
    root = common.demo_root("demo:16")
    copy = tmp_path / "no_ids"
    shutil.copytree(root, copy)
    (copy / "identity_CelebA.txt").unlink()
    proc = run_script("dual_transfer.py", "--smoke", "--data", copy, "--out", tmp_path / "out",
                      check=False)
    assert proc.returncode != 0
    assert "identity_CelebA.txt" in proc.stderr and "Anno" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,layers", [(32, 3), (64, 4), (128, 5)])
def test_module_shapes(size, layers):
    num_attrs, batch, latent = 2, 3, 16
    encoder = dt.Encoder(layers, dim=4, max_dim=32, latent_dim=latent)
    decoder = dt.Decoder(num_attrs, layers, dim=4, max_dim=32, latent_dim=latent)
    classifier = dt.Classifier(num_attrs, size, layers, dim=4, max_dim=32)
    images = torch.rand(batch, 3, size, size) * 2 - 1
    z = encoder(images)
    assert z.shape == (batch, latent, size // 2 ** layers, size // 2 ** layers)
    out = decoder(z, dt.signed(torch.tensor([[0., 1.], [1., 1.], [0., 0.]])))
    assert out.shape == images.shape and out.abs().max() <= 1
    assert classifier(images).shape == (batch, num_attrs)


def test_code_is_normalised_so_latent_loss_cannot_shrink_it():
    """E's last layer is an affine-free BatchNorm: per channel, zero mean and unit variance over
    the batch whatever the weights, so scaling the weights down leaves z unchanged."""
    encoder = dt.Encoder(3, dim=4, max_dim=16, latent_dim=8)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    z = encoder(images)
    assert z.mean((0, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(z.var((0, 2, 3), unbiased=False), torch.ones(8), atol=1e-3)
    with torch.no_grad():
        encoder.to_code[0].weight.mul_(0.5)
    assert torch.allclose(encoder(images), z, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def test_loss_terms_on_toy_cases():
    target = torch.zeros(2, 3, 4, 4)
    assert dt.loss_rec(target, target).item() == 0
    assert dt.loss_rec(target + 0.5, target).item() == pytest.approx(0.25 + 0.5)  # MSE + L1
    assert dt.loss_lat(torch.ones(2, 3, 2, 2), torch.full((2, 3, 2, 2), -1.0)).item() == 2.0
    logits, labels = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert dt.loss_cls(logits, labels).item() == pytest.approx(0.693147, rel=1e-5)  # log 2
    weighted = dt.loss_cls(logits, labels, pos_weight=torch.tensor([3.0, 3.0]))
    assert weighted.item() == pytest.approx((3 + 1) / 2 * 0.693147, rel=1e-5)
    assert dt.psnr(target, target + 0.2).tolist() == pytest.approx([20.0, 20.0], rel=1e-5)  # 4/0.04


def test_positive_weights_balance_a_rare_label():
    labels = torch.tensor([[1.0, 1.0]] + [[0.0, 1.0]] * 9)  # 1 of 10 vs 10 of 10
    assert dt.positive_weights(labels).tolist() == [9.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Stage 2: the classifier stays frozen, E and Dec learn
# ------------------------------------------------------------------------------------------------
def test_dual_step_updates_encoder_and_decoder_but_not_the_frozen_classifier():
    config, args = smoke_config()
    torch.manual_seed(0)
    encoder, decoder, classifier = dt.build_models(config, 1)
    dt.freeze(classifier)
    classifier_before = {k: v.clone() for k, v in classifier.state_dict().items()}
    decoder_before = [p.detach().clone() for p in decoder.parameters()]
    optimizer = dt.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)
    img_1, img_2 = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    attr_1, attr_2 = torch.tensor([[0.], [1.], [0.], [1.]]), torch.tensor([[1.], [0.], [1.], [0.]])
    stats = dt.dual_step([encoder, decoder, classifier], optimizer, img_1, img_2, attr_1, attr_2,
                         args, lambda: dt.autocast(torch.device("cpu"), False))
    assert set(stats) == {"loss", "rec", "cls", "lat", "transfer_acc", "self"}
    expected = (args.lambda_rec * stats["rec"] + args.lambda_cls * stats["cls"]
                + args.lambda_lat * stats["lat"] + args.lambda_self * stats["self"])
    assert stats["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    for key, value in classifier.state_dict().items():  # weights AND BatchNorm running stats
        assert torch.equal(value, classifier_before[key]), key
    assert all(p.grad is None for p in classifier.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(decoder.parameters(), decoder_before))


def test_classifier_errors_reach_the_decoder_through_the_frozen_classifier():
    config, args = smoke_config(lambda_rec=0.0, lambda_lat=0.0, lambda_self=0.0)
    torch.manual_seed(0)
    encoder, decoder, classifier = dt.build_models(config, 1)
    dt.freeze(classifier)
    optimizer = dt.make_optimizer([*encoder.parameters(), *decoder.parameters()], args)
    img = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    attrs = torch.tensor([[0.], [1.], [0.], [1.]])
    dt.dual_step([encoder, decoder, classifier], optimizer, img[0], img[1], attrs, 1 - attrs,
                 args, lambda: dt.autocast(torch.device("cpu"), False))
    grads = [p.grad for p in decoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


# ------------------------------------------------------------------------------------------------
# Command line: both stages, eval, edit, resume
# ------------------------------------------------------------------------------------------------
def test_smoke_run_of_both_stages_writes_every_file(tmp_path, run_script):
    out = tmp_path / "run"
    proc = run_script("dual_transfer.py", "classifier", "--smoke", "--out", out)
    assert "Eyeglasses" in proc.stdout and (out / "classifier.pt").is_file()
    proc = run_script("dual_transfer.py", "--smoke", "--out", out)
    assert f"classifier: {out / 'classifier.pt'}" in proc.stdout  # stage 1 reused, not retrained
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert {"encoder", "decoder", "classifier", "optimizer", "step", "config", "attr_names",
            "rng"} <= set(state)
    assert state["step"] == 4 and state["attr_names"] == ["Eyeglasses"]
    stage1 = torch.load(out / "classifier.pt", weights_only=True)
    for key, value in stage1["classifier"].items():  # stage 2 carries the frozen C unchanged
        assert torch.equal(state["classifier"][key], value), key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "rec", "cls", "lat", "self", "transfer_acc", "img_per_s"} <= set(records[0])
    grid = Image.open(out / "samples" / "step_000004.png")
    assert grid.width > 5 * 32 and grid.height > 32  # 5 columns of 32 px images, labelled
    assert (out / "losses.png").is_file()
    result = json.loads((out / "eval.json").read_text())
    assert result["train"]["pairs"] > 0 and 0 <= result["train"]["transfer_acc_changed"] <= 1
    assert result["train"]["psnr"] > 0


def test_eval_and_edit_on_a_photo(tmp_path, run_script):
    out = tmp_path / "run"
    run_script("dual_transfer.py", "--smoke", "--out", out)
    proc = run_script("dual_transfer.py", "eval", "--ckpt", out / "ckpt.pt", "--split", "val")
    assert "pairs; transfer PSNR" in proc.stdout
    photo = tmp_path / "me.jpg"
    Image.new("RGB", (120, 150), (200, 150, 120)).save(photo)
    edited = tmp_path / "me_glasses.png"
    proc = run_script("dual_transfer.py", "edit", "--ckpt", out / "ckpt.pt", "--image", photo,
                      "--set", "eyeglasses=1", "--out", edited)
    assert "Eyeglasses" in proc.stdout
    assert Image.open(edited).size == (32, 32)
    assert edited.with_name("me_glasses_compare.png").is_file()
    proc = run_script("dual_transfer.py", "edit", "--ckpt", out / "ckpt.pt", "--image", photo,
                      "--set", "Glasses=1", check=False)
    assert proc.returncode != 0 and "Eyeglasses" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_continues_exactly_and_refuses_another_configuration(tmp_path, run_script):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("dual_transfer.py", "--smoke", "--out", straight, "--steps", "4")
    run_script("dual_transfer.py", "--smoke", "--out", resumed, "--steps", "2")
    proc = run_script("dual_transfer.py", "--smoke", "--out", resumed, "--steps", "4", "--resume")
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    for part in ("encoder", "decoder"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    proc = run_script("dual_transfer.py", "--smoke", "--out", resumed, "--steps", "6", "--resume",
                      "--latent-dim", "32", check=False)
    assert proc.returncode != 0 and "latent_dim" in proc.stderr and "Traceback" not in proc.stderr


def test_grid_pairs_show_different_people():
    identities = torch.tensor([1, 1, 1, 2, 2, 3, 3, 3])
    pairs = common.identity_pairs(identities)  # 3 + 1 + 3 pairs, grouped by person
    shown = dt.one_pair_per_person(pairs, identities, 6)
    assert identities[shown[:, 0]].tolist() == [1, 2, 3]
    assert (identities[shown[:, 0]] == identities[shown[:, 1]]).all()
