"""Tests for benchmarks/: each metric on a known case, the judge on a tiny set, the true edit error
on a perfect editor, and evaluate.py on a smoke checkpoint of every method."""
import json
import sys
import types

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import evaluate  # noqa: E402
import judge as judge_module  # noqa: E402

import common  # noqa: E402

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# Metrics on known cases
# ------------------------------------------------------------------------------------------------
def test_psnr_known_values():
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    assert evaluate.psnr(images, images).tolist() == [100.0] * 3  # identical: the floor's value
    zeros = torch.zeros(2, 3, 8, 8)
    assert evaluate.psnr(zeros + 0.2, zeros).tolist() == pytest.approx([20.0, 20.0])  # 4 / 0.04


def test_ssim_is_one_for_identical_images_and_bounded_otherwise():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    assert evaluate.ssim(images, images).tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    noisy = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    values = evaluate.ssim(noisy, images)
    assert (values < 0.99).all() and (values > -1).all()
    other = torch.rand(4, 3, 32, 32) * 2 - 1
    unrelated = evaluate.ssim(other, images)
    assert (unrelated.abs() < 0.2).all() and (unrelated < values).all()
    assert (evaluate.ssim(-images, images) < 0).all()  # inverted structure: negative correlation
    assert evaluate.ssim(images[:, :, :6, :6], images[:, :, :6, :6]).tolist() == \
        pytest.approx([1.0] * 4, abs=1e-5)  # smaller than the window


def test_frechet_distance_known_cases():
    torch.manual_seed(0)
    features = torch.randn(500, 6)
    assert evaluate.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    # same covariance, means apart by `shift`: FD = ‖shift‖² = 5
    assert evaluate.frechet_distance(features, features + shift) == pytest.approx(5.0, rel=1e-6)
    # N(0, I) vs N(0, 4I) in 6-d: each dimension adds 1 + 4 − 2·2 = 1
    assert evaluate.frechet_distance(features, 2 * features) == pytest.approx(6 * 1.0, rel=0.15)


def test_retrieval_matrix_has_a_perfect_diagonal_on_a_disentangled_toy_code():
    torch.manual_seed(0)
    identity = torch.arange(40) // 4  # 10 people, 4 images each
    expression = torch.arange(40) % 2
    codes = {"identity": torch.eye(10)[identity] + 0.01 * torch.randn(40, 10),
             "expression": torch.eye(2)[expression] + 0.01 * torch.randn(40, 2)}
    matrix = evaluate.retrieval_matrix(codes, {"identity": identity, "expression": expression})
    assert matrix["identity"]["identity"] == 1.0 and matrix["expression"]["expression"] == 1.0
    assert matrix["identity"]["expression"] < 0.5  # the expression code does not find the person
    singletons = torch.arange(5)  # no label occurs twice: nothing to retrieve
    assert torch.isnan(torch.tensor(evaluate.retrieval_accuracy(torch.randn(5, 3), singletons)))


# ------------------------------------------------------------------------------------------------
# The judge
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smoke_judge(tmp_path_factory, face_attr_cache):
    path = tmp_path_factory.mktemp("judge") / "judge.pt"
    judge_module.main(["--smoke", "--out", str(path)])
    return path


def test_judge_trains_on_a_tiny_set_and_reports_test_accuracy(smoke_judge, capsys):
    state = torch.load(smoke_judge, weights_only=True)
    train = common.load_celeba("demo:16", None, "train", 32, verbose=False)
    varying = judge_module.varying_attrs(train.labels, train.attr_names)
    assert state["attr_names"] == varying and "Eyeglasses" in varying
    assert "Attractive" not in varying  # the demo never draws it: constant, not judged
    assert set(state["test_accuracy"]) == set(varying)
    assert all(0 <= v <= 1 for v in state["test_accuracy"].values())
    judge = judge_module.load_judge(smoke_judge)
    images = torch.rand(5, 3, 48, 48) * 2 - 1  # another size: resized to the judge's
    probs, features = judge(images)
    assert probs.shape == (5, len(varying)) and ((probs >= 0) & (probs <= 1)).all()
    assert features.shape == (5, 8 * state["config"]["width"])
    with pytest.raises(common.InputError, match="Eyeglasses"):
        judge.columns(["Attractive"])  # the message lists what it knows


def test_missing_judge_file_is_a_clear_error(tmp_path):
    with pytest.raises(common.InputError, match="benchmarks/judge.py"):
        judge_module.load_judge(tmp_path / "none.pt")


# ------------------------------------------------------------------------------------------------
# The true edit error: a perfect editor scores as the oracle
# ------------------------------------------------------------------------------------------------
def test_a_perfect_demo_editor_matches_the_counterfactuals_and_the_oracle(smoke_judge):
    test = common.load_celeba("demo:16", ["Eyeglasses", "Smiling"], "test", 32, verbose=False)

    def perfect_edit(images, attr_src, attr_tgt):
        """Render each image's counterfactual (score_model passes the test split in order)."""
        out = []
        for i in range(len(images)):
            changes = {n: attr_tgt[i, k].item() for k, n in enumerate(test.attr_names)
                       if attr_tgt[i, k] != attr_src[i, k]}
            out.append(common.to_float(common.preprocess(
                common.render_counterfactual(test.root, test.files[i], changes), 32, 170)))
        return torch.stack(out)

    model = types.SimpleNamespace(attr_names=test.attr_names, img_size=32, crop=170,
                                  edit=perfect_edit, reconstruct=lambda x: x.clone(),
                                  generate=None, encode=None)
    judge = judge_module.load_judge(smoke_judge)
    result = evaluate.score_model(model, judge, "demo:16", "test", max_images=12, true_images=12)
    assert result["true_edit_psnr"] == pytest.approx(100.0)  # edits ARE the counterfactuals
    assert result["edit_acc"] == pytest.approx(result["oracle_edit_acc"])
    assert result["unedited_psnr"] < 60  # doing nothing is measurably worse
    assert result["psnr"] == pytest.approx(100.0) and result["ssim"] == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# evaluate.py on a smoke checkpoint of every method
# ------------------------------------------------------------------------------------------------
EXPECTED = {  # what each method supports, hence which numbers it must get
    "attgan": {"edit_acc", "true_edit_psnr", "oracle_edit_acc", "psnr", "ssim", "fd"},
    "dual_transfer": {"edit_acc", "true_edit_psnr", "oracle_edit_acc", "psnr", "ssim", "fd"},
    "cgan": {"gen_acc", "fd"},
    "feature_ae": {"edit_acc", "true_edit_psnr", "oracle_edit_acc", "psnr", "ssim", "fd"},
    "mad": {"retrieval", "psnr", "ssim", "fd"},
}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_evaluate_scores_a_smoke_checkpoint(method, smoke_judge, tmp_path, run_script):
    run_script(f"{method}.py", "--smoke", "--out", tmp_path / method)
    ckpt = tmp_path / method / ("ae" if method == "mad" else "") / "ckpt.pt"  # mad: one per stage
    out = tmp_path / f"{method}.json"
    proc = run_script("benchmarks/evaluate.py", "--method", method, "--ckpt", ckpt, "--data", "demo:16", "--judge", smoke_judge,
                      "--max-images", "16", "--true-images", "4", "--json", out)
    result = json.loads(out.read_text())
    assert EXPECTED[method] <= set(result)
    assert result["method"] == method and result["images"] == 16
    if method == "mad":  # four sub-codes x two kinds of labels, and no attribute score
        assert set(result["retrieval"]) == {"identity", "expression"}
        assert set(result["retrieval"]["identity"]) == {"pose", "identity", "style", "expression"}
        assert "gen_acc" not in result
    for key in ("edit_acc", "gen_acc", "oracle_edit_acc", "judge_acc_real"):
        if key in result:
            assert 0 <= result[key] <= 1
    if "psnr" in result:
        assert 0 < result["psnr"] < 100 and -1 <= result["ssim"] <= 1
    assert result["fd"] >= 0
    assert f"{method} on demo:16" in proc.stdout
    table = run_script("benchmarks/evaluate.py", "--table", out).stdout
    assert table.splitlines()[0].startswith("| method | run |")
    assert f"| {method} | `{ckpt.parent.as_posix()}` | 16 |" in table


def test_evaluate_refuses_an_unknown_method(run_script, tmp_path):
    proc = run_script("benchmarks/evaluate.py", "--method", "stargan", "--ckpt", tmp_path,
                      "--judge", tmp_path, check=False)
    assert proc.returncode != 0 and "attgan" in proc.stderr


def test_speed_reports_img_per_s_from_a_real_training_loop(run_script):
    proc = run_script("benchmarks/speed.py", "--quick", "--methods", "cgan", "--batch-sizes", "16",
                      "--amp", "off", "--compile", "off", "--steps", "4")
    row = [line.split() for line in proc.stdout.splitlines() if line.startswith("cgan")]
    assert len(row) == 1 and row[0][:4] == ["cgan", "16", "off", "off"]
    assert float(row[0][4]) > 0
