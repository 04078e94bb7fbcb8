"""Tests for common.py: every CelebA layout (the Google Drive folder and its zip included), partial
and corrupt folders, annotation checks, errors, partitions, the disk cache (exact crop at every
size, key, memory), batches (GPU-resident and streamed paths), pairs, photos, image output, and the
synthetic demo set.

Fixtures are built in temporary folders from the demo generator (users cloning the repository do
not have CelebA), then rearranged into each layout a user might arrive with. Pixels are checked
against a plain reference written here: decode the whole image, crop the box computed by hand,
resize with PIL's bicubic filter.
"""
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, commands

ATTRS = ["Eyeglasses", "Smiling", "Male", "Blond_Hair"]


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """A small demo set in the official layout (6 identities x 5 images)."""
    return common.make_demo(tmp_path_factory.mktemp("official") / "celeba", n_identities=6,
                            images_per_identity=5, seed=0)


def _copy_official(src, dst, image_dir, anno_dir, csv_stems=(), drop=(), eval_dir=None):
    """Rearrange an official-layout folder: images into dst/image_dir, annotations into
    dst/anno_dir (the partition into dst/eval_dir if given), the stems in csv_stems converted to
    Kaggle csv, the stems in drop left out."""
    shutil.copytree(src / "img_align_celeba", dst / image_dir)
    for stem in common.ANNOTATIONS:
        if stem in drop:
            continue
        folder = dst / (eval_dir if eval_dir and stem == "list_eval_partition" else anno_dir)
        folder.mkdir(parents=True, exist_ok=True)
        if stem not in csv_stems:
            shutil.copy(src / f"{stem}.txt", folder / f"{stem}.txt")
            continue
        header, rows = common.read_annotation(src / f"{stem}.txt")
        with open(folder / f"{stem}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", *(header or ["partition"])])
            writer.writerows([name, *values] for name, values in rows.items())
    return dst


def _zip_folder(folder, inner="img_align_celeba"):
    """Replace `folder` by folder.zip holding inner/NAME for each file, as the official zip does."""
    archive = folder.with_name(folder.name + ".zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.iterdir()):
            z.write(path, f"{inner}/{path.name}")
    shutil.rmtree(folder)
    return archive


@pytest.fixture(scope="session")
def layouts(official, tmp_path_factory):
    """The same images and labels in every layout load_celeba detects."""
    base = tmp_path_factory.mktemp("layouts")
    stems = list(common.ANNOTATIONS)
    drive_zip = _copy_official(official, base / "drive_zip", "Img/img_align_celeba", "Anno", eval_dir="Eval")
    _zip_folder(drive_zip / "Img" / "img_align_celeba")
    official_zip = _copy_official(official, base / "official_zip", "img_align_celeba", ".")
    _zip_folder(official_zip / "img_align_celeba")
    return {
        "official": official,
        "torchvision": _copy_official(official, base / "tv", "celeba/img_align_celeba", "celeba"),
        "kaggle": _copy_official(official, base / "kaggle", "img_align_celeba/img_align_celeba", ".",
                                 csv_stems=stems, drop=("identity_CelebA",)),
        "csv": _copy_official(official, base / "csv", "img_align_celeba", ".",
                              csv_stems=("list_attr_celeba",), drop=stems[1:]),
        "drive": _copy_official(official, base / "drive", "Img/img_align_celeba", "Anno", eval_dir="Eval"),
        "drive_zip": drive_zip,
        "official_zip": official_zip,
    }


def _by_file(data):
    return {name: (data.images[i], data.labels[i]) for i, name in enumerate(data.files)}


def test_every_layout_gives_the_same_images_and_labels(layouts):
    ref = common.load_celeba(layouts["official"], ATTRS, split="all", img_size=32)
    assert ref.images.shape == (30, 3, 32, 32) and ref.images.dtype == torch.uint8
    assert ref.labels.shape == (30, 4) and set(ref.labels.unique().tolist()) <= {0.0, 1.0}
    expected = _by_file(ref)
    for name, path in layouts.items():
        data = common.load_celeba(path, ATTRS, split="all", img_size=32)
        assert data.layout == name.replace("_zip", "")
        assert sorted(data.files) == sorted(ref.files) and data.attr_names == ATTRS
        for file, (image, labels) in _by_file(data).items():
            assert torch.equal(image, expected[file][0]) and torch.equal(labels, expected[file][1]), (name, file)
    kaggle = common.load_celeba(layouts["kaggle"], ATTRS, split="all", img_size=32)
    assert kaggle.identities is None
    ref_points = dict(zip(ref.files, ref.landmarks))
    for file, points in zip(kaggle.files, kaggle.landmarks):  # csv landmarks read like the txt ones
        assert torch.allclose(points, ref_points[file])
    drive = common.load_celeba(layouts["drive_zip"], ATTRS, split="test", img_size=32)
    assert drive.files == common.load_celeba(layouts["official"], ATTRS, split="test", img_size=32).files
    assert drive.identities is not None and drive.landmarks is not None  # Anno/ files found


def test_drive_layout_is_named_and_a_half_unpacked_folder_does_not_hide_the_zip(layouts, tmp_path, capsys):
    common.info(layouts["drive_zip"])
    out = capsys.readouterr().out
    assert "layout: drive" in out and "img_align_celeba.zip (zip, read in place)" in out
    assert "Eval/list_eval_partition.txt" in out and "partition: official" in out
    root = tmp_path / "unpacking"
    shutil.copytree(layouts["drive_zip"], root)
    partial = root / "Img" / "img_align_celeba"
    partial.mkdir()
    with zipfile.ZipFile(root / "Img" / "img_align_celeba.zip") as z:  # unzip interrupted after 4
        for member in z.namelist()[:4]:
            (partial / member.split("/")[-1]).write_bytes(z.read(member))
    assert common.find_layout(root).image_dir.name == "img_align_celeba.zip"
    assert len(common.load_celeba(root, ATTRS, split="all", img_size=16, verbose=False).files) == 30
    (root / "Img" / "img_align_celeba.zip").write_bytes(b"PK broken")  # a truncated download
    shutil.rmtree(partial)
    with pytest.raises(common.InputError, match="img_align_celeba.zip"):
        common.load_celeba(root, ATTRS, img_size=16)


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
    clean = _by_file(common.load_celeba(official, ATTRS, split="all", img_size=32, verbose=False))
    for file, (image, _) in _by_file(data).items():  # the rows after a skipped image are not shifted
        assert torch.equal(image, clean[file][0]), file


def test_missing_folder_names_the_layouts_tried(tmp_path):
    with pytest.raises(common.InputError, match="data folder not found"):
        common.load_celeba(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.InputError) as err:
        common.load_celeba(tmp_path / "empty")
    for name in ("drive", "Img/img_align_celeba/ (or .zip)", "Anno/", "kaggle", "torchvision",
                 "official", "demo"):
        assert name in str(err.value)


def test_unknown_attribute_suggests_the_closest_name(official):
    with pytest.raises(common.InputError) as err:
        common.load_celeba(official, ["Eyeglass"], img_size=32)
    assert "did you mean Eyeglasses?" in str(err.value) and "Wearing_Hat" in str(err.value)
    assert common.resolve_attrs(["eyeglasses", "MALE"]) == ["Eyeglasses", "Male"]


@pytest.fixture(scope="module")
def cli(official, tmp_path_factory):
    """This file's `python common.py ...` command lines in ONE fresh interpreter (conftest.commands),
    with a cache folder of their own (bench must build its cache): bench, info of a missing folder,
    --help, info of the official-layout set."""
    folder = tmp_path_factory.mktemp("common_cli")
    calls = {"bench": ["bench", "--data", official, "--img-size", "16", "--batch-size", "4",
                       "--steps", "3", "--device", "cpu"],
             "missing": ["info", folder / "x"], "help": ["--help"], "info": ["info", official]}
    env = dict(os.environ, FACE_ATTR_CACHE=str(folder / "cache"), OMP_NUM_THREADS="1")
    return dict(zip(calls, commands([("common.py", argv) for argv in calls.values()], env, folder / "driver")))


def test_command_line_errors_are_one_line(cli):
    proc = cli["missing"]  # `python common.py info <a folder that does not exist>`
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: data folder not found") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_of_the_script_and_every_sub_command(capsys, cli):
    proc = cli["help"]
    assert proc.returncode == 0 and proc.stdout.startswith("usage: common.py")
    assert "info" in proc.stdout and "bench" in proc.stdout and "download" in proc.stdout
    for command in ("info", "download", "bench"):  # the same parser, in this process
        with pytest.raises(SystemExit) as done:
            common.main([command, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and f" {command} [-h]" in out.splitlines()[0], out
    assert "--img-size" in out and "streamed" in out


# ------------------------------------------------------------------------------------------------
# Annotation files are checked when read
# ------------------------------------------------------------------------------------------------
def _rewrite_line(path, line, edit):
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = edit(lines[line - 1])
    path.write_text("".join(lines))


@pytest.mark.parametrize("stem,line,edit,message", [
    # one name missing from the header: every later column would shift silently
    ("list_attr_celeba", 2, lambda s: s.replace("Young", ""),
     r"line 3: 40 values after 000001.jpg; expected 39 \(one per name in the header, line 2\)"),
    ("list_attr_celeba", 5, lambda s: s.rsplit(" ", 1)[0] + "\n", "line 5: 39 values after 000003.jpg; expected 40"),
    ("list_attr_celeba", 4, lambda s: s.replace("-1", "x", 1), "line 4: .*expected 1 or -1 for every attribute"),
    ("list_attr_celeba", 3, lambda s: s.replace(" 1", " 2", 1), "line 3: .*expected 1 or -1"),
    ("list_attr_celeba", 2, lambda s: s.replace("Young", "Male"), "line 2: the header names Male twice"),
    ("list_eval_partition", 7, lambda s: s.split()[0] + " 3\n", "line 7: .*expected 0, 1 or 2"),
    ("identity_CelebA", 2, lambda s: s.split()[0] + " Alice\n", "line 2: .*expected a whole number"),
    ("identity_CelebA", 3, lambda s: s.split()[0] + "\n", "line 3: 0 values after 000003.jpg; expected 1"),
    ("list_landmarks_align_celeba", 9, lambda s: s.replace(" ", " y", 1), "line 9: .*expected numbers"),
    ("list_attr_celeba", 6, lambda s: "image.txt " + s.split(" ", 1)[1], "line 6: 'image.txt' is not an image file name"),
])
def test_bad_annotation_files_stop_with_the_file_and_line(official, tmp_path, stem, line, edit, message):
    root = _copy_official(official, tmp_path / "bad", "img_align_celeba", ".")
    _rewrite_line(root / f"{stem}.txt", line, edit)
    with pytest.raises(common.InputError, match=re.escape(f"{stem}.txt, ") + message):
        common.load_celeba(root, ATTRS, split="all", img_size=16, verbose=False)


def test_csv_attributes_may_be_0_and_1_but_nothing_else(layouts, tmp_path):
    root = tmp_path / "zero_one"
    shutil.copytree(layouts["csv"], root)
    path = root / "list_attr_celeba.csv"
    rows = list(csv.reader(path.open()))
    path.write_text("\n".join(",".join([r[0]] + [v.replace("-1", "0") for v in r[1:]]) for r in rows) + "\n")
    ref = _by_file(common.load_celeba(layouts["csv"], ATTRS, split="all", img_size=16, verbose=False))
    for file, (_, labels) in _by_file(common.load_celeba(root, ATTRS, split="all", img_size=16, verbose=False)).items():
        assert torch.equal(labels, ref[file][1])
    path.write_text(path.read_text().replace(",0,", ",5,", 1))
    with pytest.raises(common.InputError, match=r"list_attr_celeba.csv, line 2: .*1 or -1 \(or 0/1\)"):
        common.load_celeba(root, ATTRS, img_size=16, verbose=False)



@pytest.mark.parametrize("layout,files", [("official", 5), ("kaggle", 4)])  # kaggle: no identities
def test_a_byte_order_mark_is_read_as_in_csv_files(layouts, tmp_path, layout, files):
    """Windows editors start a saved file with a UTF-8 BOM: every annotation file of the set gets
    one, and the set loads exactly as without (labels, identities, split, landmarks)."""
    root = tmp_path / layout
    shutil.copytree(layouts[layout], root)
    marked = [p for p in root.rglob("*") if p.stem in common.ANNOTATIONS]
    assert len(marked) == files
    for path in marked:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    for split in ("train", "test"):
        ref = common.load_celeba(layouts[layout], ATTRS, split, img_size=16, verbose=False)
        got = common.load_celeba(root, ATTRS, split, img_size=16, verbose=False)
        assert got.files == ref.files and torch.equal(got.labels, ref.labels)
        assert torch.equal(got.landmarks, ref.landmarks)  # files: the same split, so the same partition
        assert (got.identities is None and ref.identities is None) or torch.equal(got.identities, ref.identities)


def test_demo_0_is_refused_before_any_folder_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv("FACE_ATTR_CACHE", str(tmp_path / "cache"))
    for spec in ("demo:0", "demo:00"):
        with pytest.raises(common.InputError, match=f"^{spec}: demo:N needs N ≥ 1 "):
            common.load_celeba(spec, ATTRS, img_size=16, verbose=False)
    assert not (tmp_path / "cache").exists()

# ------------------------------------------------------------------------------------------------
# Partitions, tiny folders
# ------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("keep", [1, 5])  # one image; one identity (5 images)
def test_one_identity_or_one_image_loads_and_info_says_why_parts_are_empty(official, tmp_path, keep, capsys):
    root = _copy_official(official, tmp_path / "tiny", "img_align_celeba", ".", drop=("list_eval_partition",))
    _, ids = common.read_annotation(root / "identity_CelebA.txt")
    first = sorted(ids)[0]
    keep_files = sorted(f for f in ids if ids[f] == ids[first])[:keep]
    for path in (root / "img_align_celeba").iterdir():
        if path.name not in keep_files:
            path.unlink()
    train = common.load_celeba(root, ATTRS, split="train", img_size=16, verbose=False)
    val = common.load_celeba(root, ATTRS, split="val", img_size=16, verbose=False)
    assert train.files == keep_files and val.files == [] and val.images.shape == (0, 3, 16, 16)
    common.info(root)
    out = capsys.readouterr().out
    assert f"split sizes: train {keep}, val 0, test 0" in out
    assert "val and test empty" in out and "needs at least 3 identities" in out
    with pytest.raises(common.InputError, match=rf"only {keep} training images \(what the train/val/test "
                                                rf"split left of this dataset\).*--batch-size {keep} or less"):
        common.get_batch(train, 0, 8)


def test_info_says_how_many_images_the_identity_file_covers(official, tmp_path, capsys):
    root = _copy_official(official, tmp_path / "partial_ids", "img_align_celeba", ".")
    path = root / "identity_CelebA.txt"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:25]))
    common.info(root)
    out = capsys.readouterr().out
    assert "identity_CelebA.txt covers 25 of the 30 images" in out and "no identity" not in out


# ------------------------------------------------------------------------------------------------
# The crop, against a plain reference: whole decode, box by hand, bicubic resize
# ------------------------------------------------------------------------------------------------
def _reference(path, size, box):
    with Image.open(path) as image:
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()


# Mean |cache - reference| in 0..255 allowed per size. The reduced-scale JPEG decode (1/8 at 16 px,
# 1/4 at 32, 1/2 at 64) filters a little differently from a full decode: measured 1.34, 0.89, 0.66
# and 0.00 on these images. A crop shifted by 10 % measures 18-21, the full frame read as a 170 crop
# 12-13, the scale taken from the rounded reduced size (44.5 read as 45) 2.3-3.4.
CROP_TOLERANCE = {16: 1.8, 32: 1.3, 64: 1.0, 128: 0.1}


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_cached_crop_is_the_documented_box_at_every_size(official, size):
    data = common.load_celeba(official, ATTRS, split="all", img_size=size, verbose=False)
    errors = [(data.images[i].float() - _reference(official / "img_align_celeba" / data.files[i],
                                                   (size, size), (4, 24, 174, 194))).abs().mean()
              for i in range(0, 30, 3)]  # 178x218: left (178-170)/2 = 4, top (218-170)/2 = 24
    assert float(np.mean(errors)) < CROP_TOLERANCE[size], f"{size} px: {np.mean(errors):.2f}"


def test_full_frame_and_rectangular_sizes(official):
    data = common.load_celeba(official, ATTRS, split="all", img_size=(109, 89), crop=None, verbose=False)
    assert data.images.shape[1:] == (3, 109, 89) and data.img_size == (109, 89)
    for size in ((16, 16), (26, 22)):  # (H, W)
        data = common.load_celeba(official, ATTRS, split="all", img_size=size, crop=None, verbose=False)
        errors = [(data.images[i].float() - _reference(official / "img_align_celeba" / data.files[i],
                                                       size[::-1], None)).abs().mean() for i in range(0, 30, 5)]
        assert float(np.mean(errors)) < 1.5, f"{size}: {np.mean(errors):.2f}"


def test_crops_scale_with_the_image_size(official, tmp_path):
    """The official half-size release (89x109) must give the same face region as 178x218."""
    root = _copy_official(official, tmp_path / "half", "img_align_celeba", ".")
    for path in (root / "img_align_celeba").iterdir():
        with Image.open(path) as image:
            image.convert("RGB").resize((89, 109), Image.Resampling.LANCZOS).save(path, quality=95)
    half = common.load_celeba(root, ATTRS, split="all", img_size=32, verbose=False)
    errors = [(half.images[i].float() - _reference(root / "img_align_celeba" / half.files[i],
                                                   (32, 32), (2, 12, 87, 97))).abs().mean()
              for i in range(0, 30, 3)]  # 89x109: the crop is 85 px, left 2, top 12 (measured 1.0)
    assert float(np.mean(errors)) < 1.3, f"{np.mean(errors):.2f}"
    full = common.load_celeba(official, ATTRS, split="all", img_size=32, verbose=False)
    assert torch.allclose(full.landmarks, half.landmarks)


def test_landmarks_are_mapped_into_the_crop(official):
    data = common.load_celeba(official, ATTRS, split="all", img_size=64)
    _, rows = common.read_annotation(official / "list_landmarks_align_celeba.txt")
    for i in (0, 17):
        x, y = (float(v) for v in rows[data.files[i]][:2])  # left eye in the 178x218 frame
        # crop 170: left = (178-170)/2 = 4, top = (218-170)/2 = 24, then scaled by 64/170
        assert data.landmarks[i, 0].tolist() == pytest.approx([(x - 4) * 64 / 170, (y - 24) * 64 / 170])
    assert data.landmarks.min() > 0 and data.landmarks.max() < 64


# ------------------------------------------------------------------------------------------------
# The disk cache: key, reuse, memory
# ------------------------------------------------------------------------------------------------
def _png_set(root, colours):
    """A flat folder of uncompressed PNGs (same byte size whatever the pixels) with labels."""
    (root / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.png" for i in range(len(colours))]
    for name, colour in zip(names, colours):
        _two_tone(colour).save(root / "img_align_celeba" / name, compress_level=0)
    (root / "list_attr_celeba.txt").write_text(
        f"{len(names)}\n{' '.join(common.CELEBA_ATTRS)}\n"
        + "".join(f"{n} " + " ".join(["1"] * 40) + "\n" for n in names))
    return names


def _two_tone(colour):
    """178x218, `colour` above row 60 and its complement below: crops see different mixes."""
    image = np.empty((218, 178, 3), np.uint8)
    image[:60], image[60:] = colour, [255 - c for c in colour]
    return Image.fromarray(image)


def test_cache_key_follows_the_bytes_the_time_the_crop_and_the_size(tmp_path):
    names = _png_set(tmp_path, [(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)])
    path = tmp_path / "img_align_celeba" / names[0]
    folder = tmp_path / "img_align_celeba"

    def first_row(**kw):
        data = common.load_celeba(tmp_path, ATTRS, split="all", verbose=False, **kw)
        return data.images[data.files.index(names[0])].float()

    def expected(size=24, box=(4, 24, 174, 194)):
        return _reference(path, (size, size), box)

    assert (first_row(img_size=24) - expected()).abs().max() <= 1
    cached = set(os.listdir(common.cache_root() / "images"))
    assert (first_row(img_size=24) - expected()).abs().max() <= 1  # reused: no new cache
    assert set(os.listdir(common.cache_root() / "images")) == cached
    # same byte size, new pixels, a later time
    old = path.stat()
    _two_tone((10, 250, 120)).save(path, compress_level=0)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    assert path.stat().st_size == old.st_size
    assert (first_row(img_size=24) - expected()).abs().max() <= 1
    # new size, the same time as before (a copy that kept its time stamp)
    stamp = path.stat()
    _two_tone((250, 250, 0)).save(path, compress_level=9)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size != stamp.st_size
    assert (first_row(img_size=24) - expected()).abs().max() <= 1
    # another crop, another size
    assert (first_row(img_size=24, crop=100) - expected(box=(39, 59, 139, 159))).abs().max() <= 1
    assert first_row(img_size=20).shape == (3, 20, 20)
    assert not list(folder.parent.glob("*.tmp")) and not list((common.cache_root() / "images").glob("*.tmp"))


def test_a_build_killed_outright_leaves_no_half_cache_and_is_cleaned_up(tmp_path):
    _png_set(tmp_path, [(200, 30, 30), (30, 200, 30), (30, 30, 200)])
    probe = ("import sys, os; sys.path.insert(0, {root!r}); import common\n"
             "common._decode = lambda *a: os._exit(9)  # dies mid-build, like kill -9\n"
             "common.load_celeba({data!r}, img_size=30, verbose=False)")
    proc = subprocess.Popen([sys.executable, "-c", probe.format(root=str(ROOT), data=str(tmp_path))],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert proc.wait() == 9
    images = common.cache_root() / "images"
    left = [p for p in images.glob("*.tmp") if p.name.split(".")[1] == str(proc.pid)]
    assert len(left) == 1 and not (left[0] / "index.json").exists()  # never renamed into place
    data = common.load_celeba(tmp_path, ATTRS, split="all", img_size=30, verbose=False)
    assert len(data.files) == 3 and not left[0].exists()


def test_a_disk_too_small_for_the_cache_stops_before_decoding(official, monkeypatch):
    usage = shutil.disk_usage(common.cache_root())
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=30 * 3 * 64 * 60))
    # 30 images x 3 x 64 x 64 bytes = 368,640 > 345,600 free
    with pytest.raises(common.InputError, match=r"the 64x64 cache of 30 images needs 0.0 GB .*0.0 GB "
                                                r"free; set FACE_ATTR_CACHE to a folder with room"):
        common.load_celeba(official, ATTRS, img_size=64, crop=150, verbose=False)
    assert not list((common.cache_root() / "images").glob("*.tmp"))


MEMORY_PROBE = """
import resource, sys
sys.path.insert(0, {root!r})
import common
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB
start = peak()
common.load_celeba({small!r}, split="all", img_size=256, crop=None, verbose=False)
small = peak()
for split in ("all", "train", "val"):
    common.load_celeba({large!r}, split=split, img_size=256, crop=None, verbose=False)
print(small - start, peak() - small)
"""


def test_cache_build_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Tiny JPEGs cached at 256 px: 192 kB each, 46 MB for 240. Building (and loading three
    splits of) 240 must take no more peak memory than building 24: the pixels go to disk."""
    tiny = tmp_path / "tiny.jpg"
    _two_tone((200, 40, 90)).resize((18, 22)).save(tiny, quality=90)
    for count in (24, 240):
        root = tmp_path / f"n{count}"
        (root / "img_align_celeba").mkdir(parents=True)
        names = [f"{i + 1:06d}.jpg" for i in range(count)]
        for name in names:
            os.link(tiny, root / "img_align_celeba" / name)
        (root / "list_attr_celeba.txt").write_text(
            f"{count}\n{' '.join(common.CELEBA_ATTRS)}\n" + "".join(f"{n}" + " -1" * 40 + "\n" for n in names))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(
        root=str(ROOT), small=str(tmp_path / "n24"), large=str(tmp_path / "n240"))],
        capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    small_growth, large_growth = map(float, proc.stdout.split())
    assert large_growth < 12, f"240 images raised the peak by {large_growth:.0f} MB (24: {small_growth:.0f} MB)"



# ------------------------------------------------------------------------------------------------
# Faults of the machine around the cache: damage, an unusable folder, a full disk, Ctrl-C
# ------------------------------------------------------------------------------------------------
def _linked_set(root, count, colour=(200, 40, 90)):
    """`count` labelled PNGs that are hard links of one file: a set of any size in no space."""
    (root / "img_align_celeba").mkdir(parents=True)
    one = root / "one.png"
    _two_tone(colour).save(one, compress_level=0)
    names = [f"{i + 1:06d}.png" for i in range(count)]
    for name in names:
        os.link(one, root / "img_align_celeba" / name)
    (root / "list_attr_celeba.txt").write_text(
        f"{count}\n{' '.join(common.CELEBA_ATTRS)}\n" + "".join(f"{n}" + " -1" * 40 + "\n" for n in names))
    return names


@pytest.mark.parametrize("damage", ["truncated", "too long", "index not JSON", "no pixels"])
def test_a_damaged_cache_is_rebuilt_saying_why(tmp_path, capsys, damage):
    _png_set(tmp_path, [(200, 30, 30), (30, 200, 30), (30, 30, 200)])
    images = common.cache_root() / "images"
    before = set(images.iterdir()) if images.is_dir() else set()
    common.load_celeba(tmp_path, ATTRS, split="all", img_size=20, verbose=False)
    (folder,) = set(images.iterdir()) - before
    pixels, size = folder / "pixels.u8", 3 * 3 * 20 * 20
    assert pixels.stat().st_size == size
    if damage == "truncated":  # a full disk or a copy cut short
        os.truncate(pixels, size // 2)
    elif damage == "too long":
        with open(pixels, "ab") as f:
            f.write(b"\0" * 7)
    elif damage == "index not JSON":
        (folder / "index.json").write_text('{"shape": [3, 3,')
    else:
        pixels.unlink()
    capsys.readouterr()
    data = common.load_celeba(tmp_path, ATTRS, split="all", img_size=20, verbose=False)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"the image cache {folder} is damaged (") and err.endswith("): building it again")
    assert len(err.splitlines()) == 1
    if damage == "truncated":
        assert f"pixels.u8 holds {size // 2:,} bytes, its index.json says 3 x 3 x 20 x 20 = {size:,}" in err
    assert pixels.stat().st_size == size and not list(folder.parent.glob("*.tmp"))
    for i, name in enumerate(data.files):  # the rebuilt pixels, against PIL by hand
        expected = _reference(tmp_path / "img_align_celeba" / name, (20, 20), (4, 24, 174, 194))
        assert (data.images[i].float() - expected).abs().max() <= 1
    common.load_celeba(tmp_path, ATTRS, split="all", img_size=20, verbose=False)
    assert capsys.readouterr().err == ""  # the rebuilt cache is reopened, not rebuilt again


@pytest.mark.parametrize("where,message", [
    ("file", r"FACE_ATTR_CACHE=\S+/file is a file; expected a folder"),
    ("file/cache", r"cannot write \S+/file/cache/\w+ \(Not a directory\); .*FACE_ATTR_CACHE=\S+/file/cache "
                   "must be a writable folder"),
    ("/proc/face_attr_cache", r"cannot write /proc/face_attr_cache/\w+ \(No such file or directory\); "
                              ".*FACE_ATTR_CACHE=/proc/face_attr_cache must be a writable folder"),
])
@pytest.mark.parametrize("data", ["demo:1", "folder"])
def test_an_unusable_cache_folder_names_the_variable(tmp_path, monkeypatch, where, message, data):
    """A regular file, a folder that would have to be made under a file, a folder under /proc:
    none can be written, even by root (which ignores permission bits)."""
    (tmp_path / "file").write_text("not a folder")
    if data == "folder":
        _png_set(tmp_path / "set", [(200, 30, 30)])
    monkeypatch.setenv("FACE_ATTR_CACHE", where if where.startswith("/") else str(tmp_path / where))
    with pytest.raises(common.InputError, match=message) as err:
        common.load_celeba(tmp_path / "set" if data == "folder" else data, ATTRS, img_size=16, verbose=False)
    assert "\n" not in str(err.value)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_an_unusable_cache_folder_is_one_line_on_the_command_line(tmp_path):
    (tmp_path / "file").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "common.py"), "info", "demo:1"], cwd=ROOT,
                          env=dict(os.environ, FACE_ATTR_CACHE=str(tmp_path / "file" / "cache")),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: cannot write {tmp_path}/file/cache/demo (Not a directory)")
    assert len(proc.stderr.strip().splitlines()) == 1


def _no_sigxfsz_and_a_small_file_limit(limit):
    """preexec_fn: files may grow to `limit` bytes; a write beyond fails with EFBIG (the signal
    that would kill the process is ignored), as on a full disk."""
    def apply():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_disk_that_fills_during_the_build_gets_one_line_and_no_partial_cache(tmp_path, monkeypatch):
    _linked_set(tmp_path / "set", 12)  # 12 x 3 x 64 x 64 = 147,456 bytes of cache
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, str(ROOT / "common.py"), "bench", "--data", tmp_path / "set",
                           "--img-size", "64", "--steps", "1", "--device", "cpu"], cwd=ROOT,
                          env=dict(os.environ, FACE_ATTR_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1"),
                          capture_output=True, text=True, preexec_fn=_no_sigxfsz_and_a_small_file_limit(50_000))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot write {cache}/images/\w{{16}} \(File too large\); nothing partial "
                        rf"was kept; FACE_ATTR_CACHE={cache} must be a writable folder with room: set "
                        r"FACE_ATTR_CACHE to one", line), line
    assert os.listdir(cache / "images") == []  # neither the temporary folder nor a cache
    monkeypatch.setenv("FACE_ATTR_CACHE", str(cache))  # nothing in the way of the next run
    assert len(common.load_celeba(tmp_path / "set", ATTRS, "all", 64, verbose=False).files) == 12


SLOW_BUILD = """
import runpy, sys, time
sys.path.insert(0, {root!r})
import common
decode = common._decode
common._decode = lambda *a: (time.sleep(0.05), decode(*a))[1]  # 20 images/s per thread
sys.argv = ["common.py", *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("what", ["image cache", "demo set"])
def test_ctrl_c_during_a_build_leaves_nothing_partial_and_says_so(tmp_path, what):
    """SIGINT to the whole process group, as a terminal's Ctrl-C, once the partial files are on
    disk: one line, exit 130, and no partial folder in the way of the next run."""
    cache = tmp_path / "cache"
    if what == "image cache":
        _linked_set(tmp_path / "set", 96)
        argv, partial = ["bench", "--data", str(tmp_path / "set"), "--img-size", "16"], "images/*.tmp/pixels.u8"
    else:
        argv, partial = ["info", "demo:4"], "demo/seed0_ids4.*/img_align_celeba/*.jpg"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD.format(root=str(ROOT), argv=argv,
                                                                     script=str(ROOT / "common.py"))],
                            cwd=ROOT, env=dict(os.environ, FACE_ATTR_CACHE=str(cache)), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(6000):  # up to 60 s for the interpreter to start and the first file to appear
        if list(cache.glob(partial)) or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    folder = "images/\\w{16}" if what == "image cache" else "demo/seed0_ids4"
    assert re.fullmatch(rf"interrupted while building the {what} {cache}/{folder}; nothing partial was "
                        "kept; the same command starts it again", lines[-1]), lines[-1]
    assert [p.name for p in cache.glob("*/*")] == []  # no partial folder, no finished one


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
def test_batches_are_a_pure_function_of_the_step_and_shard_across_ranks(official):
    data = common.load_celeba(official, ATTRS, split="all", img_size=32)
    a, la, ia = common.get_batch(data, 3, 8, seed=1, hflip=True)
    b, lb, ib = common.get_batch(data, 3, 8, seed=1, hflip=True)
    assert torch.equal(a, b) and torch.equal(ia, ib) and torch.equal(la, data.labels[ia])
    plain = data.images[ia].float() / 127.5 - 1  # [0, 255] -> [-1, 1] by hand
    mirrored = (a == plain.flip(-1)).flatten(1).all(1)
    assert torch.equal(a[~mirrored], plain[~mirrored]) and 0 < mirrored.sum() < 8
    epoch = torch.cat([common.get_batch(data, s, 10)[2] for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(30))  # one epoch visits every image once
    r0 = common.get_batch(data, 0, 5, rank=0, world_size=2)[2]
    r1 = common.get_batch(data, 0, 5, rank=1, world_size=2)[2]
    assert not set(r0.tolist()) & set(r1.tolist())
    with pytest.raises(common.InputError, match="only 30 training images .* batch of 64: use "
                                                "--batch-size 30 or less"):
        common.get_batch(data, 0, 64)
    with pytest.raises(common.InputError, match="fewer than one batch of 16 on each of 2 ranks: "
                                                "use --batch-size 15 or less"):
        common.get_batch(data, 0, 16, world_size=2)


def test_streamed_batches_equal_the_resident_ones_in_any_order(official):
    data = common.load_celeba(official, ATTRS, split="train", img_size=32, verbose=False)
    streamed = common.to_device(data, "cpu", gpu_cache="off", ahead=3)
    assert streamed.stream is not None and streamed.images.data_ptr() == data.images.data_ptr()
    for step in (0, 1, 2, 3, 7, 2, 3):  # ahead, then a jump forward, then a resume from step 2
        got = common.get_batch(streamed, step, 4, seed=5, hflip=True)
        want = common.get_batch(data, step, 4, seed=5, hflip=True)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), step
        assert sorted(k[1] for k in streamed.stream.pending) == [step + 1, step + 2, step + 3]
    # step 4 is queued for (batch 4, seed 5): other settings must not get those rows
    got = common.get_batch(streamed, 4, 2, seed=0, rank=1, world_size=2)
    assert torch.equal(got[0], common.get_batch(data, 4, 2, seed=0, rank=1, world_size=2)[0])
    resident = common.to_device(data, "cpu")
    assert resident.stream is None and resident.images.data_ptr() == data.images.data_ptr()
    with pytest.raises(common.InputError, match="auto, on, off"):
        common.to_device(data, "cpu", gpu_cache="sometimes")


def test_bench_prints_build_memory_and_both_paths(cli):
    proc = cli["bench"]  # bench --img-size 16 --batch-size 4 --steps 3 --device cpu, a fresh cache
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cache build: 30 images in") and "img/s" in lines[0]
    assert "peak resident memory" in lines[0]
    assert any(s.startswith("in memory (memory map): ") and "batches/s" in s for s in lines)
    assert any(s.startswith("streamed (background thread): ") and "img/s into cpu" in s for s in lines)


def test_identity_pairs_share_the_person_and_differ_in_attributes(official):
    data = common.load_celeba(official, ["Eyeglasses", "Smiling"], split="all", img_size=32)
    pairs = common.identity_pairs(data.identities, data.labels)
    assert len(pairs) > 0
    for i, j in pairs.tolist():
        assert i < j and data.identities[i] == data.identities[j]
        assert not torch.equal(data.labels[i], data.labels[j])
    every = common.identity_pairs(data.identities)
    assert len(every) == 6 * (5 * 4 // 2)  # 6 people x C(5, 2) pairs each
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
    assert sorted(ours.files) == tv.filename and tv.attr_names[:40] == list(common.CELEBA_ATTRS)
    row = {name: i for i, name in enumerate(ours.files)}
    order = torch.tensor([row[name] for name in tv.filename])
    assert torch.equal(tv.attr.float(), ours.labels[order])
    assert torch.equal(tv.identity.squeeze(1), ours.identities[order])
    image, (attr, identity, landmarks) = tv[0]
    assert image.size == (178, 218) and landmarks.shape == (10,)


# ------------------------------------------------------------------------------------------------
# A user's own photo
# ------------------------------------------------------------------------------------------------
def test_load_photo_crops_like_training_and_rejects_bad_files(official, tmp_path):
    src = sorted((official / "img_align_celeba").iterdir())[0]
    photo = common.to_uint8(common.load_photo(src, 32)[0]).float()
    assert (photo - _reference(src, (32, 32), (4, 24, 174, 194))).abs().mean() < CROP_TOLERANCE[32]
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (200, 10, 10)).save(wide)
    out = common.load_photo(wide, 40)
    assert out.shape == (1, 3, 40, 40) and out[0, 0].mean() > 0.5 > out[0, 1].mean()
    with pytest.raises(common.InputError, match="image not found"):
        common.load_photo(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(common.InputError, match="cannot read image"):
        common.load_photo(tmp_path / "bad.jpg")


def test_load_photo_reads_16_bit_png_exif_rotation_and_refuses_huge_images(tmp_path, monkeypatch):
    grey = tmp_path / "grey16.png"
    values = np.full((60, 60), 32896, np.uint16)  # 32896 / 65535 * 255 = 128.0
    values[:30] = 13107  # 51.0
    Image.fromarray(values).save(grey)
    out = common.to_uint8(common.load_photo(grey, 20)[0])
    assert out[:, :7].unique().tolist() == [51] and out[:, 13:].unique().tolist() == [128]  # rows
    # 60 wide x 40 high, red on the left; EXIF 6 says: turn 90 degrees clockwise to show it, which
    # puts the red half on top
    sideways = np.zeros((40, 60, 3), np.uint8)
    sideways[:, :30] = (255, 0, 0)
    sideways[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = common.load_photo(tmp_path / "phone.jpg", 20)[0]
    assert upright[0, :8].mean() > 0.8 and upright[0, 12:].mean() < -0.8  # red on top, not left
    assert upright[2, :8].mean() < -0.8 and upright[2, 12:].mean() > 0.8
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60x60 = 3600 > 2 x 1000
    with pytest.raises(common.InputError, match=r"image too large: .*grey16.png \(3,600 pixels"):
        common.load_photo(grey, 20)


# ------------------------------------------------------------------------------------------------
# Image output and the command line
# ------------------------------------------------------------------------------------------------
def test_image_outputs(tmp_path):
    images = torch.linspace(-1, 1, 2 * 3 * 3 * 16 * 16).view(2, 3, 3, 16, 16)
    common.save_grid(images, tmp_path / "plain.png")
    with Image.open(tmp_path / "plain.png") as grid:
        assert grid.size == (3 * 18 + 2, 2 * 18 + 2)  # make_grid: 2 px padding around each image
        pixels = np.asarray(grid.convert("RGB"))
    # image (row 1, column 2), channel 0, pixel (5, 7): its place in the grid, its value by hand
    value = images[1, 2, 0, 5, 7].item()
    assert abs(int(pixels[2 + 18 + 5, 2 + 2 * 18 + 7, 0]) - round((value + 1) / 2 * 255)) <= 1
    common.save_grid(images, tmp_path / "labelled.png", ["a", "b"], ["x", "y", "z"], title="t")
    with Image.open(tmp_path / "labelled.png") as grid:
        assert grid.size[0] > 3 * 18 and grid.size[1] > 2 * 18  # room for the labels
    common.save_gif(images[0], tmp_path / "anim.gif", fps=5)
    with Image.open(tmp_path / "anim.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (16, 16) and gif.info["duration"] == 200
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write('{"step": 1, "loss": 2.0, "img_per_s": 10}\n{"step": 2, "loss": 1.0, "img_per_s": 12}\n')
    assert [r["loss"] for r in common.read_jsonl(tmp_path / "m.jsonl")] == [2.0, 1.0]
    common.plot_metrics(tmp_path / "m.jsonl", tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as plot:
        assert plot.size == (800, 260)  # two panels side by side (4 x 2.6 inches each, 100 dpi)


def test_save_gif_writes_every_distinct_frame_it_is_given(tmp_path):
    """Frames that differ by a single uint8 level (what a small edit strength gives) are all written,
    in order, pixel-exact and upscaled by nearest neighbour: the GIF keeps what save_gif decided."""
    levels = torch.tensor([[100, 20, 7], [101, 20, 7], [101, 21, 7], [101, 21, 8], [30, 200, 90]])
    frames = levels[:, :, None, None].expand(-1, -1, 6, 4).clone().float()
    frames[:, 0, :, :2] = 255 - frames[:, 0, :, :2]  # a left half, so the layout is checked too
    common.save_gif(frames / 127.5 - 1, tmp_path / "steps.gif", fps=4, scale=3)
    with Image.open(tmp_path / "steps.gif") as gif:
        assert gif.n_frames == len(frames) and gif.size == (12, 18) and gif.info["duration"] == 250
        for t in range(len(frames)):
            gif.seek(t)
            pixels = torch.from_numpy(np.asarray(gif.convert("RGB")).copy()).permute(2, 0, 1)
            expected = frames[t].repeat_interleave(3, 1).repeat_interleave(3, 2)
            assert torch.equal(pixels, expected.to(torch.uint8)), t


def test_info_command_describes_the_dataset(official, cli):
    proc = cli["info"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout: official" in proc.stdout and "identities: 6 (5.0 images each" in proc.stdout
    _, parts = common.read_annotation(official / "list_eval_partition.txt")
    sizes = [sum(v == [str(k)] for v in parts.values()) for k in range(3)]
    assert f"split sizes: train {sizes[0]}, val {sizes[1]}, test {sizes[2]}" in proc.stdout
    header, rows = common.read_annotation(official / "list_attr_celeba.txt")
    rate = sum(r[header.index("Eyeglasses")] == "1" for r in rows.values()) / 30
    assert f"Eyeglasses          {rate:>6.1%}" in proc.stdout


def test_info_reads_annotations_and_listing_only(official, tmp_path, capsys):
    """`info` decodes no image: with every image file replaced by garbage it still reports the same
    counts and rates (computed here from the annotation file), and no image cache is built."""
    root = _copy_official(official, tmp_path / "garbage", "img_align_celeba", ".")
    for path in (root / "img_align_celeba").iterdir():
        path.write_bytes(b"not a jpeg")
    before = set((common.cache_root() / "images").glob("*"))
    common.info(root)
    out = capsys.readouterr().out
    assert "labelled images present: 30 (30 image files, 30 label rows)" in out and "not decoded" in out
    header, rows = common.read_annotation(root / "list_attr_celeba.txt")
    for name in ("Eyeglasses", "Male", "Smiling"):
        rate = sum(r[header.index(name)] == "1" for r in rows.values()) / len(rows)
        assert f"{name:<20}{rate:>6.1%}" in out
    assert set((common.cache_root() / "images").glob("*")) == before


def test_download_failure_says_what_to_fetch(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CelebA", no_network)
    with pytest.raises(SystemExit):
        common.download(tmp_path)
    out = capsys.readouterr().out
    assert "img_align_celeba.zip" in out and "list_attr_celeba.txt" in out and str(tmp_path) in out
    assert "Eval/list_eval_partition.txt" in out and "read in place" in out


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


@pytest.mark.parametrize("degrees,pivot,shape", [(-12.0, (178, 250), (120, 140, 240, 330)),
                                                  (7.5, (60, 60), (0, 0, 90, 70)),  # at the corner
                                                  (45.0, (100, 100), (250, 300, 330, 380)),  # far off
                                                  (-30.0, (178, 218), (20, 300, 60, 340)),
                                                  (3.0, (178, 218), None)])  # nothing drawn
def test_paste_rotated_equals_rotating_the_whole_layer(degrees, pivot, shape):
    from PIL import ImageDraw
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.integers(0, 256, (436, 356, 3), dtype=np.uint8))
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    if shape:
        draw = ImageDraw.Draw(layer)
        draw.rectangle(shape, fill=(200, 30, 90, 255))  # square corners: the filter's spill shows
        draw.ellipse((shape[0] + 5, shape[1] + 5, shape[0] + 25, shape[1] + 15), fill=(10, 250, 40, 128))
    whole = layer.rotate(degrees, resample=Image.Resampling.BICUBIC, center=pivot)
    expected = canvas.copy()
    expected.paste(whole, (0, 0), whole)
    common.paste_rotated(canvas, layer, degrees, pivot)
    assert np.array_equal(np.asarray(canvas), np.asarray(expected))


def test_demo_partitions_are_identity_disjoint(official):
    _, parts = common.read_annotation(official / "list_eval_partition.txt")
    _, ids = common.read_annotation(official / "identity_CelebA.txt")
    owner = {}
    for name, (part,) in parts.items():
        assert owner.setdefault(ids[name][0], part) == part
    assert set(owner.values()) == {"0", "1", "2"}
