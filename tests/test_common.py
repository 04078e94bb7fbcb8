"""Tests for common.py: every CelebA layout, partial and corrupt folders, errors, partitions, the
uint8 cache, batches, pairs, photos, image output, and the synthetic demo set.

Fixtures are built in temporary folders from the demo generator (users cloning the repository do
not have CelebA), then rearranged into each layout a user might arrive with.
"""
import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT

ATTRS = ["Eyeglasses", "Smiling", "Male", "Blond_Hair"]


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """A small demo set in the official layout (6 identities x 5 images)."""
    return common.make_demo(tmp_path_factory.mktemp("official") / "celeba", n_identities=6,
                            images_per_identity=5, seed=0)


def _copy_official(src, dst, image_dir, anno_dir, csv_stems=(), drop=()):
    """Rearrange an official-layout folder: images into dst/image_dir, annotations into
    dst/anno_dir, the stems in csv_stems converted to Kaggle csv, the stems in drop left out."""
    shutil.copytree(src / "img_align_celeba", dst / image_dir)
    (dst / anno_dir).mkdir(parents=True, exist_ok=True)
    for stem in common.ANNOTATIONS:
        if stem in drop:
            continue
        if stem not in csv_stems:
            shutil.copy(src / f"{stem}.txt", dst / anno_dir / f"{stem}.txt")
            continue
        header, rows = common.read_annotation(src / f"{stem}.txt")
        with open(dst / anno_dir / f"{stem}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", *(header or ["partition"])])
            writer.writerows([name, *values] for name, values in rows.items())
    return dst


@pytest.fixture(scope="session")
def layouts(official, tmp_path_factory):
    """The same images and labels in every layout load_celeba detects."""
    base = tmp_path_factory.mktemp("layouts")
    stems = list(common.ANNOTATIONS)
    return {
        "official": official,
        "torchvision": _copy_official(official, base / "tv", "celeba/img_align_celeba", "celeba"),
        "kaggle": _copy_official(official, base / "kaggle", "img_align_celeba/img_align_celeba", ".",
                                 csv_stems=stems, drop=("identity_CelebA",)),
        "csv": _copy_official(official, base / "csv", "img_align_celeba", ".",
                              csv_stems=("list_attr_celeba",), drop=stems[1:]),
    }


def test_every_layout_gives_the_same_images_and_labels(layouts):
    ref = common.load_celeba(layouts["official"], ATTRS, split="all", img_size=32)
    assert ref.images.shape == (30, 3, 32, 32) and ref.images.dtype == torch.uint8
    assert ref.labels.shape == (30, 4) and set(ref.labels.unique().tolist()) <= {0.0, 1.0}
    for name, path in layouts.items():
        data = common.load_celeba(path, ATTRS, split="all", img_size=32)
        assert data.layout == name
        assert data.files == ref.files and data.attr_names == ATTRS
        assert torch.equal(data.labels, ref.labels) and torch.equal(data.images, ref.images)
    assert common.load_celeba(layouts["kaggle"], ATTRS, split="all", img_size=32).identities is None
    kaggle = common.load_celeba(layouts["kaggle"], ATTRS, split="all", img_size=32)
    assert torch.allclose(kaggle.landmarks, ref.landmarks)  # csv landmarks read like the txt ones


def test_labels_follow_the_requested_order_and_match_the_annotation_file(official):
    data = common.load_celeba(official, ["Male", "Eyeglasses"], split="all", img_size=32)
    header, rows = common.read_annotation(official / "list_attr_celeba.txt")
    for i, name in enumerate(data.files):
        assert data.labels[i].tolist() == [float(rows[name][header.index(a)] == "1")
                                           for a in ("Male", "Eyeglasses")]


def test_partial_folder_and_unlabelled_images_are_counted(official, tmp_path, capsys):
    root = _copy_official(official, tmp_path / "partial", "img_align_celeba", ".")
    images = sorted((root / "img_align_celeba").iterdir())
    for path in images[:7]:
        path.unlink()
    shutil.copy(images[8], root / "img_align_celeba" / "999999.jpg")  # on disk, no label row
    data = common.load_celeba(root, ATTRS, split="all", img_size=32)
    assert len(data.files) == 23 and "999999.jpg" not in data.files
    err = capsys.readouterr().err
    assert "23 of 30 labelled images found" in err and "1 unlabelled images ignored" in err


def test_corrupt_and_truncated_jpegs_are_skipped_and_counted(official, tmp_path, capsys):
    root = _copy_official(official, tmp_path / "corrupt", "img_align_celeba", ".")
    first, second = sorted((root / "img_align_celeba").iterdir())[:2]
    first.write_bytes(first.read_bytes()[:300])  # truncated
    second.write_bytes(b"this is not a jpeg")
    data = common.load_celeba(root, ATTRS, split="all", img_size=32)
    assert len(data.files) == 28 and first.name not in data.files and second.name not in data.files
    assert "2 corrupt images skipped" in capsys.readouterr().err


def test_missing_folder_names_the_layouts_tried(tmp_path):
    with pytest.raises(common.InputError, match="data folder not found"):
        common.load_celeba(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.InputError) as err:
        common.load_celeba(tmp_path / "empty")
    for name in ("kaggle", "torchvision", "official", "demo"):
        assert name in str(err.value)


def test_unknown_attribute_suggests_the_closest_name(official):
    with pytest.raises(common.InputError) as err:
        common.load_celeba(official, ["Eyeglass"], img_size=32)
    assert "did you mean Eyeglasses?" in str(err.value) and "Wearing_Hat" in str(err.value)
    assert common.resolve_attrs(["eyeglasses", "MALE"]) == ["Eyeglasses", "Male"]


def test_command_line_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "common.py"), "info", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: data folder not found") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_official_partition_is_used_when_complete(official):
    _, rows = common.read_annotation(official / "list_eval_partition.txt")
    for code, split in enumerate(("train", "val", "test")):
        data = common.load_celeba(official, ATTRS, split=split, img_size=32)
        assert data.files == sorted(f for f, v in rows.items() if v == [str(code)])


def test_partition_fallback_keeps_identities_apart(official, tmp_path, capsys):
    root = _copy_official(official, tmp_path / "alltrain", "img_align_celeba", ".")
    _, rows = common.read_annotation(root / "list_eval_partition.txt")
    (root / "list_eval_partition.txt").write_text("".join(f"{f} 0\n" for f in rows))  # like the sample
    parts = {s: common.load_celeba(root, ATTRS, split=s, img_size=32) for s in ("train", "val", "test")}
    assert "deterministic 80/10/10 split by identity" in capsys.readouterr().err
    ids = {s: set(p.identities.tolist()) for s, p in parts.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert sum(len(p.files) for p in parts.values()) == 30 and all(p.files for p in parts.values())
    assert len(parts["train"].files) >= 20
    again = common.load_celeba(root, ATTRS, split="val", img_size=32, verbose=False)
    assert again.files == parts["val"].files  # deterministic


def test_fallback_without_identities_splits_images():
    files = [f"{i:06d}.jpg" for i in range(100)]
    parts = common.fallback_split(files, None)
    assert [parts.count(s) for s in ("train", "val", "test")] == [80, 10, 10]


def test_cache_equals_a_direct_decode_and_is_reused(official):
    data = common.load_celeba(official, ATTRS, split="all", img_size=48)
    for i in (0, 13, 29):
        with Image.open(official / "img_align_celeba" / data.files[i]) as image:
            assert torch.equal(data.images[i], common.preprocess(image, 48, 170))
    cached = sorted((common.cache_root() / "images").glob("*.pt"))
    again = common.load_celeba(official, ATTRS, split="all", img_size=48, verbose=False)
    assert sorted((common.cache_root() / "images").glob("*.pt")) == cached  # no new cache file
    assert torch.equal(again.images, data.images)


def test_crops_scale_with_the_image_size(official, tmp_path):
    """The official half-size release (89x109) must give the same face region as 178x218."""
    root = _copy_official(official, tmp_path / "half", "img_align_celeba", ".")
    for path in (root / "img_align_celeba").iterdir():
        with Image.open(path) as image:
            image.convert("RGB").resize((89, 109), Image.Resampling.LANCZOS).save(path, quality=95)
    full = common.load_celeba(official, ATTRS, split="all", img_size=32)
    half = common.load_celeba(root, ATTRS, split="all", img_size=32)
    diff = (full.images.float() - half.images.float()).abs().mean()
    assert diff < 6, f"half-size images crop a different region (mean abs diff {diff:.1f})"
    assert torch.allclose(full.landmarks, half.landmarks)


def test_landmarks_are_mapped_into_the_crop(official):
    data = common.load_celeba(official, ATTRS, split="all", img_size=64)
    _, rows = common.read_annotation(official / "list_landmarks_align_celeba.txt")
    x, y = (float(v) for v in rows[data.files[0]][:2])  # left eye in the 178x218 frame
    # crop 170: left = (178-170)/2 = 4, top = (218-170)/2 = 24, then scaled by 64/170
    assert data.landmarks[0, 0].tolist() == pytest.approx([(x - 4) * 64 / 170, (y - 24) * 64 / 170])
    assert data.landmarks.min() > 0 and data.landmarks.max() < 64


def test_full_frame_and_rectangular_sizes(official):
    data = common.load_celeba(official, ATTRS, split="all", img_size=(109, 89), crop=None)
    assert data.images.shape[1:] == (3, 109, 89) and data.img_size == (109, 89)


def test_batches_are_a_pure_function_of_the_step_and_shard_across_ranks(official):
    data = common.load_celeba(official, ATTRS, split="all", img_size=32)
    a, la, ia = common.get_batch(data, 3, 8, seed=1, hflip=True)
    b, lb, ib = common.get_batch(data, 3, 8, seed=1, hflip=True)
    assert torch.equal(a, b) and torch.equal(ia, ib) and torch.equal(la, data.labels[ia])
    assert a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
    epoch = torch.cat([common.get_batch(data, s, 10)[2] for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(30))  # one epoch visits every image once
    r0 = common.get_batch(data, 0, 5, rank=0, world_size=2)[2]
    r1 = common.get_batch(data, 0, 5, rank=1, world_size=2)[2]
    assert not set(r0.tolist()) & set(r1.tolist())
    with pytest.raises(common.InputError, match="cannot fill one batch"):
        common.get_batch(data, 0, 64)


def test_identity_pairs_share_the_person_and_differ_in_attributes(official):
    data = common.load_celeba(official, ["Eyeglasses", "Smiling"], split="all", img_size=32)
    pairs = common.identity_pairs(data.identities, data.labels)
    assert len(pairs) > 0
    for i, j in pairs.tolist():
        assert i < j and data.identities[i] == data.identities[j]
        assert not torch.equal(data.labels[i], data.labels[j])
    every = common.identity_pairs(data.identities)
    assert len(every) == sum(n * (n - 1) // 2 for n in torch.unique(data.identities, return_counts=True)[1].tolist())
    assert len(common.identity_pairs(data.identities, max_pairs=7, seed=3)) == 7
    with pytest.raises(common.InputError, match="identity_CelebA.txt"):
        common.identity_pairs(None)


def test_torchvision_celeba_reads_the_demo_set(official, monkeypatch):
    from torchvision.datasets import CelebA
    # torchvision checks the MD5 sums of the real annotation files, which a synthetic set cannot
    # match; everything else it reads is checked against our loader below.
    monkeypatch.setattr(CelebA, "_check_integrity", lambda self: True)
    tv = CelebA(official.parent, split="all", target_type=["attr", "identity", "landmarks"])
    ours = common.load_celeba(official, None, split="all", img_size=32)
    assert tv.filename == ours.files and tv.attr_names[:40] == list(common.CELEBA_ATTRS)
    assert torch.equal(tv.attr.float(), ours.labels)
    assert torch.equal(tv.identity.squeeze(1), ours.identities)
    image, (attr, identity, landmarks) = tv[0]
    assert image.size == (178, 218) and landmarks.shape == (10,)


def test_load_photo_crops_like_training_and_rejects_bad_files(official, tmp_path):
    src = sorted((official / "img_align_celeba").iterdir())[0]
    photo = common.load_photo(src, 32)
    with Image.open(src) as image:
        assert torch.equal(common.to_uint8(photo[0]), common.preprocess(image, 32))
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (200, 10, 10)).save(wide)
    out = common.load_photo(wide, 40)
    assert out.shape == (1, 3, 40, 40) and out[0, 0].mean() > 0.5 > out[0, 1].mean()
    with pytest.raises(common.InputError, match="image not found"):
        common.load_photo(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(common.InputError, match="cannot read image"):
        common.load_photo(tmp_path / "bad.jpg")


def test_image_outputs(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 3 * 16 * 16).view(2, 3, 3, 16, 16)
    common.save_grid(images, tmp_path / "plain.png")
    with Image.open(tmp_path / "plain.png") as grid:
        assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # make_grid: 2 px padding around each image
    common.save_grid(images, tmp_path / "labelled.png", ["a", "b"], ["x", "y", "z"], title="t")
    with Image.open(tmp_path / "labelled.png") as grid:
        assert grid.size[0] > 3 * 18 and grid.size[1] > 2 * 18  # room for the labels
    common.save_gif(images[0], tmp_path / "anim.gif", fps=5)
    with Image.open(tmp_path / "anim.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (16, 16)
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write('{"step": 1, "loss": 2.0, "img_per_s": 10}\n{"step": 2, "loss": 1.0, "img_per_s": 12}\n')
    assert [r["loss"] for r in common.read_jsonl(tmp_path / "m.jsonl")] == [2.0, 1.0]
    common.plot_metrics(tmp_path / "m.jsonl", tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as plot:
        assert plot.size == (800, 260)  # two panels side by side (4 x 2.6 inches each, 100 dpi)


def test_info_command_describes_the_dataset(official):
    proc = subprocess.run([sys.executable, str(ROOT / "common.py"), "info", str(official)],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    assert "layout: official" in proc.stdout and "identities: 6" in proc.stdout
    assert "Eyeglasses" in proc.stdout and "split sizes: train" in proc.stdout


def test_download_failure_says_what_to_fetch(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CelebA", no_network)
    with pytest.raises(SystemExit):
        common.download(tmp_path)
    out = capsys.readouterr().out
    assert "img_align_celeba.zip" in out and "list_attr_celeba.txt" in out and str(tmp_path) in out


# ------------------------------------------------------------------------------------------------
# The synthetic demo set
# ------------------------------------------------------------------------------------------------
def test_demo_is_deterministic_by_seed(official, tmp_path):
    again = common.make_demo(tmp_path / "again", n_identities=6, images_per_identity=5, seed=0)
    other = common.make_demo(tmp_path / "other", n_identities=6, images_per_identity=5, seed=1)
    for name in ("list_attr_celeba.txt", "identity_CelebA.txt", "list_landmarks_align_celeba.txt",
                 "img_align_celeba/000001.jpg", "img_align_celeba/000017.jpg"):
        assert (again / name).read_bytes() == (official / name).read_bytes()
    assert (other / "list_attr_celeba.txt").read_bytes() != (official / "list_attr_celeba.txt").read_bytes()


def test_demo_annotations_agree_with_the_render_parameters(official):
    params = common.load_demo_params(official)
    header, rows = common.read_annotation(official / "list_attr_celeba.txt")
    assert header == list(common.CELEBA_ATTRS) and len(rows) == 30
    for name, values in rows.items():
        labels = common.demo_labels(params[name])
        assert [int(v) for v in values] == [2 * labels[a] - 1 for a in header]
        assert sum(labels[a] for a in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")) <= 1
        assert not (labels["Bald"] and labels["Bangs"])
        assert all(labels[a] == v for a, v in common.DEMO_FIXED.items())


def test_demo_identities_keep_their_traits_and_vary_the_rest():
    faces = common.sample_demo_faces(40, 30, seed=0)
    by_id = {}
    for face in faces:
        by_id.setdefault(face["identity"], []).append(face)
    for group in by_id.values():
        for trait in ("male", "young", "pale", "bald", "skin", "face_w", "eye_color", "bg"):
            assert len({str(face[trait]) for face in group}) == 1, trait
    assert any(len({face["glasses"] for face in group}) == 2 for group in by_id.values())
    assert any(len({face["hair"] for face in group}) > 1 for group in by_id.values())
    male = [f for f in faces if f["male"]]
    female = [f for f in faces if not f["male"]]
    mustache_rate = lambda fs: sum(f["mustache"] for f in fs) / len(fs)  # noqa: E731
    assert mustache_rate(male) > 5 * mustache_rate(female) > 0  # correlated, not deterministic
    assert not any(f["hair"] == "gray" and f["young"] for f in faces if f["hair"] == f["natural_hair"])


@pytest.mark.parametrize("attr,region", [
    ("Eyeglasses", (40, 90, 138, 135)),   # (left, top, right, bottom) around the eyes
    ("Wearing_Hat", (0, 0, 178, 120)),    # the top of the head
    ("Mustache", (50, 135, 128, 175)),    # above the mouth
    ("Smiling", (50, 130, 128, 180)),     # the mouth
])
def test_counterfactual_changes_only_where_the_attribute_is_drawn(attr, region):
    frontal = dict(common.sample_demo_faces(3, 1, seed=2)[0], yaw=0.0, pitch=0.0, roll=0.0,
                   hat=False, glasses=False, mustache=False, smile=0.2, bald=False)
    before = np.asarray(common.render_face(frontal)[0], dtype=np.int16)
    after = np.asarray(common.render_face(common.apply_attr_changes(frontal, {attr: 1}))[0], dtype=np.int16)
    changed = np.abs(after - before).max(axis=2) > 8
    assert changed.sum() > 50, f"{attr} changed nothing visible"
    left, top, right, bottom = region
    inside = changed[top:bottom, left:right].sum()
    assert inside == changed.sum(), f"{attr} changed {changed.sum() - inside} pixels outside its region"
    assert common.demo_labels(common.apply_attr_changes(frontal, {attr: 1}))[attr] == 1


def test_counterfactual_rule_keeps_labels_consistent():
    face = dict(common.sample_demo_faces(2, 1, seed=0)[0], hair="black", bald=False, bangs=True)
    blond = common.demo_labels(common.apply_attr_changes(face, {"Blond_Hair": 1}))
    assert blond["Blond_Hair"] == 1 and blond["Black_Hair"] == 0
    bald = common.demo_labels(common.apply_attr_changes(face, {"Bald": 1}))
    assert bald["Bald"] == 1 and bald["Bangs"] == 0 and bald["Black_Hair"] == 0
    unchanged = common.demo_labels(face)
    for attr, value in (("Eyeglasses", 1), ("Smiling", 0), ("Young", 0)):
        labels = common.demo_labels(common.apply_attr_changes(face, {attr: value}))
        assert labels[attr] == value
        assert {a: v for a, v in labels.items() if a != attr} == {a: v for a, v in unchanged.items() if a != attr}
    with pytest.raises(common.InputError, match="does not draw"):
        common.apply_attr_changes(face, {"Goatee": 1})


def test_render_counterfactual_reproduces_the_stored_image(official):
    name = "000003.jpg"
    image = common.render_counterfactual(official, name, {})
    with Image.open(official / "img_align_celeba" / name) as stored:
        diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(stored, dtype=np.int16)).mean()
    assert diff < 2.0  # only JPEG compression separates them


def test_demo_landmarks_follow_the_pose():
    face = dict(common.sample_demo_faces(2, 1, seed=0)[0], yaw=0.0, pitch=0.0, roll=0.0)
    _, frontal, _ = common.render_face(face)
    assert frontal[0, 0] < frontal[1, 0] and abs(frontal[0, 1] - frontal[1, 1]) < 0.5  # level eyes
    assert abs(frontal[2, 0] - (frontal[0, 0] + frontal[1, 0]) / 2) < 1.0  # nose centred
    _, turned, _ = common.render_face(dict(face, yaw=25.0))
    assert turned[2, 0] > frontal[2, 0] + 5  # the nose swings towards the turn
    _, rolled, _ = common.render_face(dict(face, roll=10.0))
    angle = np.degrees(np.arctan2(rolled[1, 1] - rolled[0, 1], rolled[1, 0] - rolled[0, 0]))
    assert angle == pytest.approx(10.0, abs=0.5)
    assert (rolled > 0).all() and (rolled[:, 0] < 178).all() and (rolled[:, 1] < 218).all()


def test_demo_partitions_are_identity_disjoint(official):
    _, parts = common.read_annotation(official / "list_eval_partition.txt")
    _, ids = common.read_annotation(official / "identity_CelebA.txt")
    owner = {}
    for name, (part,) in parts.items():
        assert owner.setdefault(ids[name][0], part) == part
    assert set(owner.values()) == {"0", "1", "2"}
