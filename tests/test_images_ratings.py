"""Image discovery, decoding and fingerprints; ratings tables and their matching to image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fluency.core.errors import InputError
from fluency.core.inputs.images import (FolderSource, Preprocessing, TensorSource, find_images, find_unreadable,
                                 image_problem, iter_batches, load_image)
from fluency.core.inputs.ratings import (check_any_matched, check_strict, empty_rating_ids, match_ids, read_ratings,
                                  read_table)


def make_image(path: Path, value: int = 128, size: tuple[int, int] = (12, 8), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "P") else (value,) * len(mode)).save(path)
    return path


def folder(root: Path, names: list[str]) -> list[Path]:
    for i, name in enumerate(names):
        make_image(root / name, value=10 * i)
    return find_images(root)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- finding images -------------------------------------------------------------------------------------------

def test_find_images_recursive_sorted_skips_hidden_and_other_files(tmp_path):
    folder(tmp_path, ["b.png", "a/z.JPG", "a/c.jpeg", ".hidden/x.png", "._b.png"])
    (tmp_path / "a" / "readme.txt").write_text("hi")
    (tmp_path / "a" / "photo.png.txt").write_text("hi")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/c.jpeg", "a/z.JPG", "b.png"]


def test_find_images_errors_name_the_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no images in .*\.jpg.*\.png"):
        find_images(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        find_images(tmp_path / "notes.txt")


# --- matching ids ---------------------------------------------------------------------------------------------

def test_match_stems(tmp_path):
    files = folder(tmp_path, ["a.jpg", "b.png", "c.jpg"])
    report = match_ids(["a", "b", "c"], tmp_path, files)
    assert report.mode == "stem" and report.ok
    assert report.matched == {"a": tmp_path / "a.jpg", "b": tmp_path / "b.png", "c": tmp_path / "c.jpg"}


def test_match_relpath_with_extension(tmp_path):
    files = folder(tmp_path, ["f/x.jpg", "g/x.jpg", "y.png"])
    report = match_ids(["g\\x.jpg", "./f/x.jpg", "y.png"], tmp_path, files)
    assert report.mode == "relpath" and report.ok
    assert report.matched["g\\x.jpg"] == tmp_path / "g" / "x.jpg"
    assert report.matched["./f/x.jpg"] == tmp_path / "f" / "x.jpg"


def test_match_relpath_without_extension(tmp_path):
    files = folder(tmp_path, ["f/x.jpg", "g/x.png", "g/y.png"])
    report = match_ids(["f/x", "g/x", "g/y"], tmp_path, files)
    assert report.mode == "relpath-noext" and report.ok
    assert list(report.matched) == ["f/x", "g/x", "g/y"]
    assert report.matched["g/x"] == tmp_path / "g" / "x.png"


def test_numeric_looking_ids_stay_text(tmp_path):
    files = folder(tmp_path, ["1.jpg", "007.jpg", "7.jpg", "10.jpg"])
    table = read_ratings(write_csv(tmp_path / "r.csv", "image_id,rating\n1,3\n007,4\n7,5\n10,6\n"))
    assert list(table["image_id"]) == ["1", "007", "7", "10"]
    report = match_ids(list(table["image_id"]), tmp_path, files)
    assert report.ok
    assert report.matched["1"].name == "1.jpg"
    assert report.matched["007"].name == "007.jpg"
    assert report.matched["7"].name == "7.jpg"


def test_ambiguous_stems_are_reported_not_guessed(tmp_path):
    files = folder(tmp_path, ["f/x.jpg", "g/x.jpg", "g/y.jpg", "g/z.jpg"])
    report = match_ids(["x", "y", "z"], tmp_path, files)
    assert report.mode == "stem"
    assert "x" not in report.matched and set(report.matched) == {"y", "z"}
    assert report.ambiguous == {"x": ["f/x.jpg", "g/x.jpg"]}
    assert report.unrated_images == [] and report.missing_images == []
    assert not report.ok
    assert any("'x' → f/x.jpg, g/x.jpg" in line for line in report.summary_lines())
    with pytest.raises(InputError, match="several images"):
        check_strict(report, "r.csv")


def test_missing_and_unrated_images_are_reported(tmp_path):
    files = folder(tmp_path, ["a.jpg", "b.jpg", "extra.png"])
    report = match_ids(["a", "b", "ghost"], tmp_path, files, empty_ratings=["b"])
    assert report.mode == "stem"
    assert set(report.matched) == {"a", "b"}
    assert report.missing_images == ["ghost"]
    assert report.unrated_images == ["extra.png"]
    assert report.empty_ratings == ["b"]
    assert not report.ok
    text = "\n".join(report.summary_lines())
    assert "'ghost'" in text and "extra.png" in text
    as_dict = report.as_dict()
    assert as_dict["missing_images"] == ["ghost"] and as_dict["matched"]["a"] == str(tmp_path / "a.jpg")
    with pytest.raises(InputError) as err:
        check_strict(report, tmp_path / "r.csv")
    assert "ghost" in str(err.value) and "extra.png" in str(err.value) and "r.csv" in str(err.value)
    check_strict(match_ids(["a", "b", "extra"], tmp_path, files), "r.csv")  # all matched: no error


def test_two_ids_naming_one_file_is_an_error(tmp_path):
    files = folder(tmp_path, ["f/a.jpg"])
    with pytest.raises(InputError, match="both name"):
        match_ids(["f/a", "f\\a"], tmp_path, files)


# --- reading ratings ------------------------------------------------------------------------------------------

def test_duplicate_ids_error_names_rows(tmp_path):
    path = write_csv(tmp_path / "r.csv", "image_id,rating\na,1\nb,2\na,3\nc,4\n b ,5\n")
    with pytest.raises(InputError) as err:
        read_ratings(path)
    message = str(err.value)
    assert "r.csv" in message and "'image_id'" in message
    assert "'a' (rows 2, 4)" in message and "'b' (rows 3, 6)" in message


def test_non_numeric_rating_error_names_row_and_value(tmp_path):
    path = write_csv(tmp_path / "r.csv", "image_id,rating\na,1.5\nb,abc\nc,5\nd,\"5,5\"\n")
    with pytest.raises(InputError) as err:
        read_ratings(path)
    message = str(err.value)
    assert "r.csv" in message and "'rating'" in message
    assert "row 3: 'abc'" in message and "row 5: '5,5'" in message


def test_many_bad_values_are_elided(tmp_path):
    rows = "".join(f"i{k},bad{k}\n" for k in range(25))
    with pytest.raises(InputError, match="and 15 more"):
        read_ratings(write_csv(tmp_path / "r.csv", "image_id,rating\n" + rows))


def test_empty_ids_are_an_error_empty_ratings_are_not(tmp_path):
    with pytest.raises(InputError, match=r"empty ids in row 3"):
        read_ratings(write_csv(tmp_path / "a.csv", "image_id,rating\na,1\n ,2\n"))
    table = read_ratings(write_csv(tmp_path / "b.csv", "image_id,rating\na,1\nb,\nc,NA\n"))
    assert table["rating"].isna().tolist() == [False, True, True]
    assert empty_rating_ids(table) == ["b", "c"]


def test_missing_column_error_lists_columns_and_suggests(tmp_path):
    path = write_csv(tmp_path / "r.csv", "image_id,Rating,sex\na,1,f\n")
    with pytest.raises(InputError) as err:
        read_ratings(path)
    message = str(err.value)
    assert "r.csv" in message and "'rating'" in message
    assert "'image_id', 'Rating', 'sex'" in message and "did you mean 'Rating'" in message
    with pytest.raises(InputError, match="no id column 'file'"):
        read_ratings(path, id_column="file", rating_column="Rating")


def test_csv_tsv_and_parquet_read_alike(tmp_path):
    frame = pd.DataFrame({"file": ["1", "007", "x"], "beauty": [1.5, 2.0, np.nan], "sex": ["f", "m", "f"],
                          "age": [20, 30, 40]})
    frame.to_parquet(tmp_path / "r.parquet")
    write_csv(tmp_path / "r.csv", "file,beauty,sex,age\n1,1.5,f,20\n007,2,m,30\nx,,f,40\n")
    write_csv(tmp_path / "r.tsv", "file\tbeauty\tsex\tage\n1\t1.5\tf\t20\n007\t2\tm\t30\nx\t\tf\t40\n")
    tables = [read_ratings(tmp_path / name, "file", "beauty") for name in ("r.csv", "r.tsv", "r.parquet")]
    for table in tables:
        assert list(table.columns) == ["image_id", "beauty", "sex", "age"]
        assert list(table["image_id"]) == ["1", "007", "x"]
        assert table["beauty"].dtype == np.float64
        np.testing.assert_array_equal(table["beauty"].to_numpy(), [1.5, 2.0, np.nan])
        assert list(table["sex"]) == ["f", "m", "f"] and list(table["age"]) == [20, 30, 40]


def test_parquet_errors_use_one_based_rows_and_integer_ids(tmp_path):
    pd.DataFrame({"image_id": [1, 2, 1], "rating": [1.0, 2.0, 3.0]}).to_parquet(tmp_path / "r.pq")
    with pytest.raises(InputError, match=r"'1' \(rows 1, 3\)"):
        read_ratings(tmp_path / "r.pq")


def test_read_table_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nope.csv does not exist"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "r.xlsx").write_bytes(b"x")
    with pytest.raises(InputError, match=r"r\.xlsx.*unknown extension"):
        read_table(tmp_path / "r.xlsx")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="bad.parquet"):
        read_table(tmp_path / "bad.parquet")
    write_csv(tmp_path / "bad.csv", "image_id,rating\na,1\nb,2,3,4\n")
    with pytest.raises(InputError, match="bad.csv"):
        read_table(tmp_path / "bad.csv")


# --- loading images -------------------------------------------------------------------------------------------

def test_grayscale_is_replicated_or_kept(tmp_path):
    path = make_image(tmp_path / "g.png", value=51, size=(20, 10), mode="L")
    x = load_image(path, 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((3, 8, 8), 0.2), atol=1e-4, rtol=0)
    assert load_image(path, 8, channels=1).shape == (1, 8, 8)


def test_rgb_to_luminance(tmp_path):
    path = make_image(tmp_path / "red.png", size=(8, 8))
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    torch.testing.assert_close(load_image(path, 4, channels=1), torch.full((1, 4, 4), 0.299), atol=1e-4, rtol=0)


def test_rgba_is_composited_onto_white(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(path)
    torch.testing.assert_close(load_image(path, 5), torch.ones(3, 5, 5), atol=1e-4, rtol=0)
    Image.new("RGBA", (10, 10), (0, 0, 0, 255)).save(path)
    torch.testing.assert_close(load_image(path, 5), torch.zeros(3, 5, 5), atol=1e-4, rtol=0)


def test_palette_image(tmp_path):
    path = tmp_path / "p.png"
    img = Image.new("P", (10, 6), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.save(path)
    x = load_image(path, 4)
    assert x.shape == (3, 4, 4)
    torch.testing.assert_close(x[0], torch.ones(4, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(x[1:], torch.zeros(2, 4, 4), atol=1e-4, rtol=0)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    data = np.full((8, 8), 65535, dtype=np.uint16)
    data[:, 4:] = 32768
    Image.fromarray(data).save(path)
    x = load_image(path, 8, channels=1)
    assert x.shape == (1, 8, 8)
    torch.testing.assert_close(x[0, :, :2], torch.ones(8, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(x[0, :, -2:], torch.full((8, 2), 32768 / 65535), atol=1e-3, rtol=0)
    assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0


def test_shorter_side_resize_and_centre_crop(tmp_path):
    data = np.zeros((10, 30, 3), dtype=np.uint8)
    data[:, 10:20] = 255  # a white middle third: the centre crop keeps only it
    Image.fromarray(data).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 6)
    assert x.shape == (3, 6, 6)
    assert float(x[:, :, 1:-1].min()) > 0.9


def test_exif_orientation_is_applied(tmp_path):
    data = np.zeros((10, 20, 3), dtype=np.uint8)
    data[:, :10] = 255  # left half white
    img = Image.fromarray(data)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: the white half ends up on top
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "o.jpg", 10)
    assert float(x[:, :3].mean()) > 0.9 and float(x[:, -3:].mean()) < 0.1


def test_truncated_and_fake_images_raise_input_error(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.jpg"):
        load_image(truncated, 8)
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    with pytest.raises(InputError, match="fake.png"):
        load_image(fake, 8)


def test_unreadable_images_are_found_up_front_with_the_reason(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    png = make_image(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes(png.read_bytes()[:-20])
    (tmp_path / "fake.png").write_text("this is not an image")
    assert image_problem(good) is None and image_problem(png) is None
    problems = find_unreadable(find_images(tmp_path))
    assert [p.name for p in problems] == ["cut.jpg", "cut.png", "fake.png"]
    assert "truncated" in problems[tmp_path / "cut.jpg"].lower()
    assert problems[tmp_path / "fake.png"].startswith("UnidentifiedImageError: ")
    assert all("\n" not in why for why in problems.values())


def test_unreadable_images_leave_the_match_report(tmp_path):
    files = folder(tmp_path, ["a.png", "b.png", "c.png"])
    report = match_ids(["a", "b"], tmp_path, files)
    report.drop_unreadable(tmp_path, {tmp_path / "b.png": "OSError: bad", tmp_path / "c.png": "OSError: worse"})
    assert list(report.matched) == ["a"] and report.unreadable_ids == ["b"] and report.unrated_images == []
    assert report.unreadable_images == {"b.png": "OSError: bad", "c.png": "OSError: worse"} and not report.ok
    assert report.as_dict()["unreadable_images"]["c.png"] == "OSError: worse"
    lines = report.summary_lines()
    assert lines[0].startswith("1 of 2 rated ids matched a readable image") and "b.png (OSError: bad)" in lines[1]
    check_any_matched(report, "r.csv")  # 'a' names a readable image
    report.drop_unreadable(tmp_path, {tmp_path / "a.png": "OSError: also bad"})
    with pytest.raises(InputError, match=r"every image its ids name cannot be read, e\.g\. .*a\.png \(OSError"):
        check_any_matched(report, "r.csv")


def test_a_table_naming_no_image_is_an_error_with_examples_and_hint(tmp_path):
    files = folder(tmp_path, ["x/IMG_1.png", "x/IMG_2.png"])
    expected = r"(?s)'subject'.*'face1', 'face2'.*x/IMG_1\.png, x/IMG_2\.png.*stems.*--id-column"
    with pytest.raises(InputError, match=expected):
        check_any_matched(match_ids(["face1", "face2"], tmp_path, files), "r.csv", "subject")
    with pytest.raises(InputError, match="if case were ignored"):
        check_any_matched(match_ids(["img_1"], tmp_path, files), "r.csv")
    with pytest.raises(InputError, match="has no rows"):
        check_any_matched(match_ids([], tmp_path, files), "r.csv")
    check_any_matched(match_ids(["IMG_1", "nope"], tmp_path, files), "r.csv")  # one match is enough


# --- sources and batches --------------------------------------------------------------------------------------

def test_fingerprint_changes_with_content_and_names(tmp_path):
    files = folder(tmp_path, ["a.png", "b.png"])
    pre = Preprocessing(4)
    fp = FolderSource(tmp_path, {p.stem: p for p in files}, pre).fingerprint()
    assert len(fp) == 64 and fp == FolderSource(tmp_path, {p.stem: p for p in files}, pre).fingerprint()
    make_image(tmp_path / "b.png", value=200)
    changed = FolderSource(tmp_path, {p.stem: p for p in files}, pre).fingerprint()
    assert changed != fp
    (tmp_path / "b.png").rename(tmp_path / "c.png")
    renamed = FolderSource(tmp_path, {"a": files[0], "b": tmp_path / "c.png"}, pre).fingerprint()
    assert renamed != changed


def test_iter_batches_yields_all_images_in_order(tmp_path):
    names = [f"im{i:02d}.png" for i in range(11)]
    files = folder(tmp_path, names)
    source = FolderSource(tmp_path, {p.stem: p for p in files}, Preprocessing(4, channels=1))
    batches = list(iter_batches(source, 4))
    assert [len(ids) for ids, _ in batches] == [4, 4, 3]
    assert [i for ids, _ in batches for i in ids] == [p.stem for p in files]
    x = torch.cat([x for _, x in batches])
    assert x.shape == (11, 1, 4, 4)
    torch.testing.assert_close(x[:, 0, 0, 0], torch.tensor([10 * i / 255 for i in range(11)]), atol=1e-4, rtol=0)


def test_iter_batches_propagates_the_bad_file(tmp_path):
    files = folder(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "c.png").write_text("broken")
    source = FolderSource(tmp_path, {p.stem: p for p in files}, Preprocessing(4))
    with pytest.raises(InputError, match="c.png"):
        list(iter_batches(source, 2))


def test_iter_batches_can_skip_the_bad_file(tmp_path):
    files = folder(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    (tmp_path / "b.png").write_text("broken")
    (tmp_path / "c.png").write_text("broken")
    source = FolderSource(tmp_path, {p.stem: p for p in files}, Preprocessing(4))
    skipped: list[tuple[int, str]] = []
    batches = list(iter_batches(source, 2, on_error=lambda i, exc: skipped.append((i, str(exc)))))
    assert [ids for ids, _ in batches] == [["a"], ["d"]] and [x.shape[0] for _, x in batches] == [1, 1]
    assert [i for i, _ in skipped] == [1, 2] and "b.png" in skipped[0][1]
    only_bad = FolderSource(tmp_path, {"b": tmp_path / "b.png"}, Preprocessing(4))
    assert list(iter_batches(only_bad, 2, on_error=lambda i, exc: None)) == []


def test_tensor_source():
    images = torch.rand(5, 3, 4, 4)
    source = TensorSource([f"s{i}" for i in range(5)], images, {"kind": "test"})
    assert len(source) == 5 and source.describe()["kind"] == "test"
    ids, x = next(iter_batches(source, 8))
    assert ids == source.ids and torch.equal(x, images)
    fp = source.fingerprint()
    images[2, 0, 0, 0] += 0.5
    assert TensorSource(source.ids, images, {}).fingerprint() != fp


# --- the London faces ----------------------------------------------------------------------------------------

def test_london_faces_all_match_by_stem(london_faces):
    files = find_images(london_faces / "images")
    assert len(files) == 102
    table = read_ratings(london_faces / "ratings.csv", rating_column="attractiveness")
    report = match_ids(list(table["image_id"]), london_faces / "images", files,
                       empty_rating_ids(table, "attractiveness"))
    assert report.mode == "stem" and report.ok and len(report.matched) == 102
    assert load_image(report.matched["X001"], 32).shape == (3, 32, 32)
