"""Dataset index, natural order, split files, frame selection and decoding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cut_file, damage_packet, rand_frames, write_faststart_mp4, write_frames, write_rotated_mp4
from PIL import Image

from pipeline.config import DatasetSpec, FrameSelection, FrameSpec
from pipeline.data import (DecodedFrame, FrameDecodeError, VideoDecodeError, apply_selection, decode_image_file,
                           index_dataset, iter_frame_batches, iter_video_file, list_frames, natural_key,
                           read_frames, select_by_rate, select_indices, selected_positions, source_signature)
from pipeline.demo import write_video
from pipeline.errors import DataError
from pipeline.preprocess import resize_frames, stack_frames


def frames_of(batches) -> list[DecodedFrame]:
    """Decoded batches, frame by frame."""
    return [DecodedFrame(i, None if b.frames is None else b.frames[k], b.error)
            for b in batches for k, i in enumerate(b.indices)]


def iter_frame_folder(d: Path, sel: FrameSelection, n: int = 64) -> list[DecodedFrame]:
    """The extraction's decoding of a frame folder, frame by frame."""
    return frames_of(iter_frame_batches(d, "frames", sel, n))


def one_by_one(d: Path, sel: FrameSelection) -> list[DecodedFrame]:
    """The oracle: each selected file decoded alone, as predict reads frames."""
    files, out = list_frames(d), []
    for i in selected_positions(d, "frames", sel):
        try:
            out.append(DecodedFrame(i, decode_image_file(files[i]), None))
        except FrameDecodeError as e:
            out.append(DecodedFrame(i, None, str(e)))
    return out


def test_natural_order():
    names = ["frame_10.jpg", "frame_2.jpg", "frame_1.jpg", "Frame_3.jpg", "frame_100.jpg", "frame_20.jpg"]
    assert sorted(names, key=natural_key) == [
        "frame_1.jpg", "frame_2.jpg", "Frame_3.jpg", "frame_10.jpg", "frame_20.jpg", "frame_100.jpg"]
    assert sorted(["10000.jpg", "9999.jpg", "10001.jpg"], key=natural_key) == [
        "9999.jpg", "10000.jpg", "10001.jpg"]


def test_list_frames_natural_and_filters(tmp_path):
    rng = np.random.default_rng(0)
    write_frames(tmp_path / "v", rand_frames(rng, 12), ".jpg")
    (tmp_path / "v" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "v" / "notes.txt").write_text("x")
    (tmp_path / "v" / "frame_13.JPEG").write_bytes((tmp_path / "v" / "frame_1.jpg").read_bytes())
    assert [p.name for p in list_frames(tmp_path / "v")] == [f"frame_{i}.jpg" for i in range(1, 13)] + [
        "frame_13.JPEG"]


def test_list_frames_of_several_sequences(tmp_path):
    """mmaction2's rawframes keep each video's RGB frames and its optical flow in one folder:
    natural order would read flow_x, flow_y, then the RGB frames as one long video."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    write_frames(raw, rand_frames(rng, 4), ".jpg", name="img_{:05d}")
    for axis in ("x", "y"):
        write_frames(raw, rand_frames(rng, 3), ".jpg", name=f"flow_{axis}_{{:05d}}")
    assert [p.name for p in list_frames(raw)] == [f"img_{i:05d}.jpg" for i in range(1, 5)]
    (raw / "flow_y_00001.jpg").rename(raw / "y_00001.jpg")  # older mmaction2 names; a single one is no sequence
    assert len(list_frames(raw)) == 4
    bare = tmp_path / "bare"  # mmaction2 with filename_tmpl '{:05}.jpg' and x_/y_ flow
    write_frames(bare, rand_frames(rng, 3), ".jpg", name="{:05d}")
    for axis in ("x", "y"):
        write_frames(bare, rand_frames(rng, 2), ".jpg", name=f"{axis}_{{:05d}}")
    assert [p.name for p in list_frames(bare)] == ["00001.jpg", "00002.jpg", "00003.jpg"]
    # One sequence, however its numbers are padded; clips numbered inside one sequence.
    one = tmp_path / "one"
    write_frames(one, rand_frames(rng, 3), ".jpg", name="clip1_frame{}")
    write_frames(one, rand_frames(rng, 2), ".jpg", name="clip2_frame{:03d}")
    assert [p.name for p in list_frames(one)] == ["clip1_frame1.jpg", "clip1_frame2.jpg", "clip1_frame3.jpg",
                                                  "clip2_frame001.jpg", "clip2_frame002.jpg"]
    # A stray image beside it was read as a frame (until 2 Dec), where natural order put it: first for
    # a.jpg, which shifted every frame index (and --folder-fps time) by one against the video file.
    Image.fromarray(rand_frames(rng, 1)[0]).save(one / "a_cover.jpg")
    with pytest.raises(VideoDecodeError, match=r"one: a_cover\.jpg is no frame of its numbered sequence "
                                               r"\(clip#_frame#, # a number\) .*; move it out of the video folder$"):
        list_frames(one)
    (one / "a_cover.jpg").unlink()
    # Two cameras in one folder: no order to read them in. The video fails, naming both sequences.
    cams = tmp_path / "cams"
    write_frames(cams, rand_frames(rng, 2), ".png", name="left_{}")
    write_frames(cams, rand_frames(rng, 2), ".png", name="right_{}")
    with pytest.raises(VideoDecodeError, match=r"cams: frames of 2 numbered sequences in one folder \(left_#, right_#, "
                                                r"# a number\); keep one sequence per video folder"):
        list_frames(cams)
    with pytest.raises(VideoDecodeError, match="numbered sequences"):
        list(iter_frame_batches(cams, "frames", FrameSelection(), 8))
    from pipeline.predict import find_inputs

    assert find_inputs([cams]) == ([(cams, "frames")], [])  # predict then reports the decoding error for it


def test_index_classes_stable_across_splits(tiny_dataset):
    idx = index_dataset(DatasetSpec(str(tiny_dataset)))
    assert idx.classes == ["jump", "run", "walk"]
    assert sorted(idx.splits) == ["test", "train"]
    labels = {v.rel: idx.classes[v.label] for vs in idx.splits.values() for v in vs}
    assert labels["train/walk/w1"] == "walk" and labels["test/walk/w3"] == "walk"
    assert labels["test/jump/j1"] == "jump" and labels["train/run/r2.mkv"] == "run"
    # choosing one split does not change the mapping
    only_train = index_dataset(DatasetSpec(str(tiny_dataset), splits=("train",)))
    assert only_train.classes == idx.classes and list(only_train.splits) == ["train"]
    assert {v.kind for v in idx.videos("train")} == {"frames", "file"}


def test_hidden_entries_ignored(tiny_dataset):
    (tiny_dataset / ".cache").mkdir()
    (tiny_dataset / "train" / ".DS_Store").write_bytes(b"x")
    (tiny_dataset / "train" / "walk" / ".w9").mkdir()
    idx = index_dataset(DatasetSpec(str(tiny_dataset)))
    assert sorted(idx.splits) == ["test", "train"]
    assert [v.rel for v in idx.videos("train") if "walk" in v.rel] == ["train/walk/w1", "train/walk/w2"]


def test_missing_split_names_it(tiny_dataset):
    with pytest.raises(DataError, match=r"split 'val' not found under .*found: test, train"):
        index_dataset(DatasetSpec(str(tiny_dataset), splits=("val",)))


def test_duplicate_video_in_two_classes_refused(tiny_dataset):
    """The same video copied into two classes is refused. Other videos of one name, as datasets
    numbered per class have (walk/0001.mp4, run/0001.mp4), are told apart by their content: no
    refusal, and none is taken for train/test leakage; a copy in another split is."""
    import shutil

    write_frames(tiny_dataset / "train" / "run" / "w1", rand_frames(np.random.default_rng(1), 3))  # another w1
    write_frames(tiny_dataset / "test" / "walk" / "w2", rand_frames(np.random.default_rng(2), 5), ".jpg")  # another w2
    shutil.copytree(tiny_dataset / "train" / "run" / "r1", tiny_dataset / "test" / "jump" / "r1")  # a leaked copy
    rng = np.random.default_rng(3)
    for cls in ("run", "walk"):  # two files of one size (uncompressed video, say), not one video
        (tiny_dataset / "train" / cls / "0001.avi").write_bytes(rng.bytes(5000))
        frames = tiny_dataset / "train" / cls / "0002"  # and frame folders whose frames are all of one size
        frames.mkdir()
        for k in range(3):  # (uncompressed PNG): names and sizes alike, the pixels not
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(frames / f"f{k}.png",
                                                                                     compress_level=0)
    idx = index_dataset(DatasetSpec(str(tiny_dataset)))
    assert "train/run/w1" in [v.rel for v in idx.videos("train")] and "test/walk/w2" in [v.rel for v in idx.videos("test")]
    leaks = [w for w in idx.warnings if "more than one split" in w]
    assert leaks == ["1 video(s) appear in more than one split, the same name and content (e.g. 'r1'): check for "
                     "train/test leakage"], idx.warnings
    shutil.copy(tiny_dataset / "train" / "run" / "r2.mkv", tiny_dataset / "train" / "walk" / "r2.mkv")
    with pytest.raises(DataError, match=r"'r2' is in two classes of split 'train', the same content in both: "
                                        r".*train/run/r2\.mkv and .*train/walk/r2\.mkv; a video must have one label"):
        index_dataset(DatasetSpec(str(tiny_dataset)))


def _flat_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("brush_hair", "cartwheel"):
        for k in range(3):
            write_frames(root / cls / f"{cls}_v{k}", rand_frames(rng, 3))
    write_video(root / "cartwheel" / "cartwheel_v3.avi", rand_frames(rng, 4))


def test_hmdb51_split_files(tmp_path):
    root = tmp_path / "hmdb"
    _flat_tree(root)
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    (splits / "brush_hair_test_split1.txt").write_text(
        "brush_hair_v0.avi 1 \nbrush_hair_v1.avi 2 \nbrush_hair_v2.avi 0 \n")
    (splits / "cartwheel_test_split1.txt").write_text(
        "cartwheel_v0.avi 1\ncartwheel_v1.avi 1\ncartwheel_v2.avi 2\ncartwheel_v3.avi 2\n")
    (splits / "brush_hair_test_split2.txt").write_text("brush_hair_v0.avi 2\n")
    idx = index_dataset(DatasetSpec(str(root), split_dir=str(splits), split_id=1))
    assert idx.classes == ["brush_hair", "cartwheel"]
    assert [v.rel for v in idx.videos("train")] == [
        "brush_hair/brush_hair_v0", "cartwheel/cartwheel_v0", "cartwheel/cartwheel_v1"]
    assert [v.rel for v in idx.videos("test")] == [
        "brush_hair/brush_hair_v1", "cartwheel/cartwheel_v2", "cartwheel/cartwheel_v3.avi"]
    assert [v.label for v in idx.videos("test")] == [0, 1, 1]


def test_a_video_and_its_frame_folder_are_one_video(tmp_path):
    """clip.avi and the folder clip/ it was decoded into (or one video in two containers) are one
    video in the folder layout too, as to split files: counted twice, one could be carved into
    validation and the other trained on. Split files find a frame folder named like the file
    (clip.avi/), and a listed name with a dot and no extension (A.B_run_2)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    (root / "train" / "a").mkdir(parents=True)
    write_video(root / "train" / "a" / "clip.avi", rand_frames(rng, 3))
    write_frames(root / "train" / "a" / "clip", rand_frames(rng, 3))
    write_video(root / "train" / "a" / "other.avi", rand_frames(rng, 3))
    write_video(root / "train" / "a" / "other.mp4", rand_frames(rng, 3))
    write_frames(root / "train" / "b" / "b1", rand_frames(rng, 3))
    idx = index_dataset(DatasetSpec(str(root)))
    assert [v.rel for v in idx.videos("train")] == ["train/a/clip", "train/a/other.avi", "train/b/b1"]
    assert sum("are one video (one name" in w for w in idx.warnings) == 2, idx.warnings
    flat, splits = tmp_path / "flat", tmp_path / "splits"
    write_frames(flat / "run" / "run_clip1.avi", rand_frames(rng, 3))
    write_frames(flat / "run" / "A.B_run_2", rand_frames(rng, 3))
    splits.mkdir()
    (splits / "run_test_split1.txt").write_text("run_clip1.avi 1\nA.B_run_2 2\n")
    idx = index_dataset(DatasetSpec(str(flat), split_dir=str(splits)))
    assert [v.rel for v in idx.videos("train")] == ["run/run_clip1.avi"]
    assert [v.rel for v in idx.videos("test")] == ["run/A.B_run_2"] and not idx.skipped


def test_ucf101_split_files(tmp_path):
    root = tmp_path / "ucf"
    _flat_tree(root)
    (tmp_path / "trainlist01.txt").write_text("brush_hair/brush_hair_v0.avi 1\ncartwheel/cartwheel_v1.avi 2\n")
    (tmp_path / "testlist01.txt").write_text("cartwheel/cartwheel_v3.avi\r\nbrush_hair/brush_hair_v2.avi\n")
    idx = index_dataset(DatasetSpec(str(root), split_files=(str(tmp_path / "trainlist01.txt"),
                                                             str(tmp_path / "testlist01.txt"))))
    assert [v.rel for v in idx.videos("train")] == ["brush_hair/brush_hair_v0", "cartwheel/cartwheel_v1"]
    assert [v.rel for v in idx.videos("test")] == ["brush_hair/brush_hair_v2", "cartwheel/cartwheel_v3.avi"]
    by_dir = index_dataset(DatasetSpec(str(root), split_dir=str(tmp_path), split_id=1))
    assert [v.rel for v in by_dir.videos("test")] == [v.rel for v in idx.videos("test")]


def test_split_files_with_spaces_in_names_and_one_name_for_two_files(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    write_frames(root / "My Class" / "clip 1", rand_frames(rng, 2))
    (root / "other").mkdir(parents=True)
    write_video(root / "other" / "c1.avi", rand_frames(rng, 3))
    write_video(root / "other" / "c1.mp4", rand_frames(rng, 3))
    (tmp_path / "trainlist01.txt").write_text("My Class/clip 1.avi 1\nother/c1.avi 2\n")
    idx = index_dataset(DatasetSpec(str(root), split_files=(str(tmp_path / "trainlist01.txt"),)))
    assert [v.rel for v in idx.videos("train")] == ["My Class/clip 1", "other/c1.avi"]
    assert idx.warnings == [f"{root / 'other' / 'c1.mp4'} and {root / 'other' / 'c1.avi'} are one video to the split "
                            f"files; using {root / 'other' / 'c1.avi'}"]
    hmdb = tmp_path / "hmdb"
    hmdb.mkdir()
    (hmdb / "My Class_test_split1.txt").write_text("clip 1.avi 2\n")
    idx = index_dataset(DatasetSpec(str(root), split_files=(str(hmdb / "My Class_test_split1.txt"),)))
    assert [v.rel for v in idx.videos("test")] == ["My Class/clip 1"]


def test_split_file_listing_missing_video_warns(tmp_path):
    root = tmp_path / "ucf"
    _flat_tree(root)
    (tmp_path / "testlist01.txt").write_text("cartwheel/nope.avi\ncartwheel/cartwheel_v0.avi\n")
    idx = index_dataset(DatasetSpec(str(root), split_files=(str(tmp_path / "testlist01.txt"),)))
    assert len(idx.videos("test")) == 1
    assert any("nope.avi is listed in the split files but not on disk" in w for w in idx.warnings)


def test_split_file_repeats_are_used_once_and_a_video_in_two_splits_refused(tmp_path):
    # Listed twice, and once more under another extension (the same video, found by its stem).
    spec = _ucf(tmp_path, "brush_hair/brush_hair_v0.avi 1\ncartwheel/cartwheel_v1.avi 2\n"
                          "brush_hair/brush_hair_v0.avi 1\nbrush_hair/brush_hair_v0.mp4 1\n")
    idx = index_dataset(spec)
    assert [v.rel for v in idx.videos("train")] == ["brush_hair/brush_hair_v0", "cartwheel/cartwheel_v1"]
    train = tmp_path / "trainlist01.txt"
    assert [w.split(": ", 1)[0] for w in idx.warnings] == [f"{train}:3", f"{train}:4"]
    assert all(w.endswith(f"is listed again (first at {train}:1); it is used once") for w in idx.warnings)
    spec = _ucf(tmp_path, "brush_hair/brush_hair_v0.avi 1\n", "cartwheel/cartwheel_v1.avi\nbrush_hair/brush_hair_v0.avi\n")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'testlist01.txt'}:2: .*brush_hair_v0 is listed for split 'test', "
                                        rf"but {train}:1 lists it for 'train'; a video can be in one split only"):
        index_dataset(spec)


def test_index_warns_of_classes_a_model_cannot_learn(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    for split, cls in (("train", "Walk"), ("train", "run"), ("test", "walk"), ("test", "run")):
        write_frames(root / split / cls / f"{split}_{cls}", rand_frames(rng, 2))
    idx = index_dataset(DatasetSpec(str(root)))
    assert idx.classes == ["Walk", "run", "walk"]
    assert idx.warnings == [
        "class folders 'Walk' and 'walk' differ only in case: they are 2 classes; rename them to one name if they are one",
        f"1 class(es) have no videos in {root / 'train'} (walk): a model trained on it cannot learn them"]
    # HMDB51 with one class's split file missing: that class folder is in no split.
    flat = tmp_path / "hmdb"
    _flat_tree(flat)
    (tmp_path / "brush_hair_test_split1.txt").write_text("brush_hair_v0.avi 1\nbrush_hair_v1.avi 2\n")
    idx = index_dataset(DatasetSpec(str(flat), split_files=(str(tmp_path / "brush_hair_test_split1.txt"),)))
    assert idx.classes == ["brush_hair"]
    assert idx.warnings == [f"1 class folder(s) of {flat} are in no split file (cartwheel): their videos are not "
                            "used; check that every class has its split file"]


def test_select_indices():
    assert select_indices(10) == list(range(10))
    assert select_indices(10, stride=3) == [0, 3, 6, 9]
    assert select_indices(100, max_frames=4) == [12, 37, 62, 87]
    assert select_indices(10, stride=2, max_frames=2) == [2, 6]  # of [0,2,4,6,8]: centres of 2 halves
    assert select_indices(3, max_frames=8) == [0, 1, 2]


def test_select_by_rate():
    times = [i / 30 for i in range(30)]  # one second at 30 fps
    assert select_by_rate(times, 10) == list(range(0, 30, 3))
    assert select_by_rate(times, 60) == list(range(30))  # never duplicates
    assert select_by_rate([i / 25 for i in range(25)], 10) == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23]
    assert apply_selection(times, 30, FrameSelection(fps=10, stride=2)) == [0, 6, 12, 18, 24]


def test_lossless_video_decodes_exactly(tmp_path):
    frames = rand_frames(np.random.default_rng(3), 11)
    write_video(tmp_path / "v.mkv", frames, fps=30)
    got = list(iter_video_file(tmp_path / "v.mkv", FrameSelection()))
    assert [g.index for g in got] == list(range(11))
    for g, f in zip(got, frames):
        assert torch.equal(g.frame, torch.from_numpy(f).permute(2, 0, 1))


@pytest.mark.parametrize("sel, expected", [
    (FrameSelection(stride=3), [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]),
    (FrameSelection(fps=10), list(range(0, 30, 3))),
    (FrameSelection(max_frames=3), [5, 15, 25]),
    (FrameSelection(fps=10, max_frames=2), [6, 21]),
])
def test_video_selection_indices(tmp_path, sel, expected):
    frames = rand_frames(np.random.default_rng(4), 30)
    write_video(tmp_path / "v.mkv", frames, fps=30)
    got = list(iter_video_file(tmp_path / "v.mkv", sel))
    assert [g.index for g in got] == expected
    for g in got:  # each kept row is the frame it claims to be
        assert torch.equal(g.frame, torch.from_numpy(frames[g.index]).permute(2, 0, 1))


def test_folder_grey_rgba_mixed_sizes(tmp_path):
    rng = np.random.default_rng(5)
    d = tmp_path / "v"
    d.mkdir()
    rgb = rand_frames(rng, 1, 24, 32)[0]
    Image.fromarray(rgb).save(d / "1.png")
    Image.fromarray(rgb[..., 0]).save(d / "2.png")  # grey
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(d / "3.png")  # RGBA
    Image.fromarray(rand_frames(rng, 1, 40, 20)[0]).save(d / "10.png")  # other size, portrait
    got = iter_frame_folder(d, FrameSelection())
    assert [g.index for g in got] == [0, 1, 2, 3]
    assert all(g.frame.shape[0] == 3 and g.frame.dtype == torch.uint8 for g in got)
    assert torch.equal(got[1].frame, torch.from_numpy(rgb[..., 0]).expand(3, -1, -1))
    assert torch.equal(got[2].frame, got[0].frame)
    spec = FrameSpec(size=16)
    assert {tuple(resize_frames(g.frame, spec).shape) for g in got} == {(3, 16, 16)}


def test_frames_that_are_no_file_are_broken_frames_and_one_number_twice_is_refused(tmp_path):
    """A dangling link or a folder under a frame's name was left out without a word, and the gap
    closed; it is a frame that does not decode, dropped with its index. Two files of one frame
    number (frame_1.jpg and frame_1.png, or frame_001.png) are refused, not read twice."""
    rng = np.random.default_rng(0)
    d = tmp_path / "v"
    write_frames(d, rand_frames(rng, 5), ".png")
    names = [p.name for p in list_frames(d)]
    (d / names[2]).unlink()
    (d / names[2]).symlink_to(tmp_path / "gone.png")
    (d / names[4]).unlink()
    (d / names[4]).mkdir()
    got = iter_frame_folder(d, FrameSelection())
    assert [(f.index, f.frame is None) for f in got] == [(0, False), (1, False), (2, True), (3, False), (4, True)]
    assert "cannot read" in got[2].error and names[2] in got[2].error
    assert source_signature(d, "frames").startswith("frames:")
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("frame_1.png", "frame_1.jpg", "frame_2.png"):
        Image.fromarray(rand_frames(rng, 1)[0]).save(twice / name)
    with pytest.raises(VideoDecodeError, match=r"twice: frame_1\.jpg and frame_1\.png are one frame number twice; "
                                               r"keep one of them$"):
        list_frames(twice)
    (twice / "frame_1.jpg").rename(twice / "frame_001.png")
    with pytest.raises(VideoDecodeError, match=r"frame_001\.png and frame_1\.png are one frame number twice"):
        list_frames(twice)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_frames_are_turned_upright_by_their_exif_orientation(tmp_path, ext):
    """A camera's portrait photo is stored sideways with an EXIF orientation, which a viewer (and
    OpenCV's imread, as mmaction2 reads frames) applies: all eight, through both the frame-by-frame
    and the batched decoding."""
    from PIL import ImageOps

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    d = tmp_path / "v"
    d.mkdir()
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        base.save(d / f"frame_{o}{ext}", exif=exif.tobytes(), **({"quality": 95} if ext == ".jpg" else {}))
    want = [np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB")) for p in list_frames(d)]
    assert [w.shape[:2] for w in want] == [(24, 32)] * 4 + [(32, 24)] * 4
    tol = 2 if ext == ".jpg" else 0  # PIL's JPEG decoder against libjpeg-turbo's
    for got in (iter_frame_folder(d, FrameSelection()), one_by_one(d, FrameSelection())):
        assert len(got) == 8
        for f, w in zip(got, want):
            assert f.frame.permute(1, 2, 0).shape == w.shape
            assert np.abs(f.frame.permute(1, 2, 0).numpy().astype(int) - w).max() <= tol


def test_broken_frames_are_reported_not_fatal(tmp_path):
    rng = np.random.default_rng(6)
    paths = write_frames(tmp_path / "v", rand_frames(rng, 4), ".jpg")
    paths[1].write_bytes(b"")
    paths[2].write_bytes(b"not a jpeg at all")
    got = iter_frame_folder(tmp_path / "v", FrameSelection())
    assert [(g.index, g.frame is None) for g in got] == [(0, False), (1, True), (2, True), (3, False)]
    assert "empty file" in got[1].error
    # torchvision's own words listed webp and gif, which frame folders do not take
    assert got[2].error == f"{paths[2]}: not a JPEG or PNG image (its bytes are neither); replace or remove it"


@pytest.mark.parametrize("cut", ["between_keys", "edit_list", "open_gop", "radl"])
def test_a_stream_copied_cut_starts_at_its_first_shown_frame(tmp_path, cut):
    """Three ways `ffmpeg -ss … -c copy` cuts a clip. ``between_keys`` (Matroska): the cut starts 3
    packets after a key frame, so the decoder cannot rebuild the 7 frames before the next one;
    ``edit_list`` (MP4): every packet from the key frame on is kept and an edit list hides the
    first 3, which a player never shows; ``open_gop``: the cut starts at a key frame whose leading
    B-frames (shown before it) refer to the GOP cut away; ``radl`` (HEVC): its leading pictures
    refer to the key frame only, so they are shown. Either way frame 0 is the first frame shown,
    at 0 s, as in a frame folder ffmpeg extracts from the file; each row is the frame it claims to
    be, and the positions finetune reads (``selected_positions`` → ``read_frames``) are the frames
    extraction stores, whatever the selection."""
    import av
    from fractions import Fraction

    frames = [np.full((64, 64, 3), 8 * i, np.uint8) for i in range(30)]
    ext = ".mp4" if cut == "edit_list" else ".mkv"
    src, out = tmp_path / f"src{ext}", tmp_path / f"cut{ext}"
    with av.open(str(src), "w") as c:
        s = c.add_stream("libx265" if cut == "radl" else "libx264", rate=Fraction(25))
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.options = {  # open GOPs lossy: lossless x264 has no B-frames
            "open_gop": {"x264-params": "keyint=10:min-keyint=10:open-gop=1:bframes=3:scenecut=0"},
            "radl": {"x265-params": "keyint=10:min-keyint=10:open-gop=0:radl=2:bframes=3:scenecut=0:log-level=error"},
        }.get(cut, {"crf": "0", "g": "10", "bf": "0", "keyint_min": "10", "sc_threshold": "0"})
        for f in frames:
            for q in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(q)
        for q in s.encode():
            c.mux(q)
    with av.open(str(src)) as i, av.open(str(out), "w") as o:
        ist = i.streams.video[0]
        ost = o.add_stream_from_template(ist)
        shift = round(3 / (25 * ist.time_base))  # three frames
        keys = 0
        for n, pkt in enumerate(i.demux(ist)):
            keys += bool(pkt.is_keyframe)
            if pkt.dts is None or cut == "between_keys" and n < 3 or cut in ("open_gop", "radl") and keys < 2:
                continue
            if cut == "edit_list":  # negative timestamps: the MP4 muxer writes an edit list hiding them
                pkt.pts, pkt.dts = pkt.pts - shift, pkt.dts - shift
            pkt.stream = ost
            o.mux(pkt)
    with av.open(str(out)) as c:  # what a player shows: the reference
        shown = [round(f.to_ndarray(format="rgb24").mean() / 8) for f in c.decode(video=0)]
    first, n_shown = shown[0], len(shown)  # the source frame shown first; frames shown
    assert shown == list(range(first, first + n_shown))
    assert (first, n_shown) == {"between_keys": (10, 20), "edit_list": (3, 27), "open_gop": (first, 30 - first),
                                "radl": (8, 22)}[cut]  # radl: the key frame is source frame 10
    for sel in (FrameSelection(), FrameSelection(max_frames=4), FrameSelection(fps=5), FrameSelection(stride=3)):
        got = [g for g in iter_video_file(out, sel) if g.frame is not None]
        want = apply_selection([k / 25 for k in range(n_shown)], n_shown, sel)
        assert [g.index for g in got] == want, sel  # as many frames as asked for, none unreachable
        for g in got:  # content 8·k identifies source frame k
            assert round(g.frame.float().mean().item() / 8) - first == g.index, (sel, g.index)
        positions = selected_positions(out, "file", sel)
        assert positions == want, sel
        assert all(torch.equal(a, b.frame) for a, b in zip(read_frames(out, "file", positions), got)), sel


def test_fps_keeps_the_same_frames_whatever_the_container(tmp_path):
    """One 30 fps video as an MP4 (fine time base), a Matroska and a WebM (milliseconds: frame 4
    at 133.33 ms is stored as 133 ms), an AVI (a tick of 1/30 s, a frame) and a frame folder:
    --fps keeps the same frames from each, in extraction, in finetune's positions and in a live
    reading of the file."""
    import av
    from fractions import Fraction

    from pipeline.stream import LiveStream

    frames = rand_frames(np.random.default_rng(7), 30, 32, 32)

    def write(path: Path, codec: str, fps: int) -> None:
        with av.open(str(path), "w") as c:
            s = c.add_stream(codec, rate=Fraction(fps))
            s.width = s.height = 32
            s.pix_fmt = "yuv420p"
            for f in frames:
                for q in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(q)
            for q in s.encode():
                c.mux(q)

    write_frames(tmp_path / "folder", frames, ".png")
    for ext, codec in ((".mp4", "libx264"), (".mkv", "libx264"), (".webm", "libvpx-vp9"), (".avi", "mpeg4")):
        write(tmp_path / f"v{ext}", codec, 30)
    for fps in (15.0, 10.0, 7.5):
        sel = FrameSelection(fps=fps, folder_fps=30.0)
        want = list(range(0, 30, round(30 / fps)))
        assert selected_positions(tmp_path / "folder", "frames", sel) == want
        for ext in (".mp4", ".mkv", ".webm", ".avi"):  # AVI: one tick is one frame, no slack
            video = tmp_path / f"v{ext}"
            assert [f.index for f in iter_video_file(video, sel)] == want, (fps, ext)
            assert selected_positions(video, "file", sel) == want, (fps, ext)
            with LiveStream(str(video), selection=sel, transform=lambda f: f[:, :2, :2]) as live:
                assert [f.index for f in live] == want, (fps, ext)
    # 120 fps (slow motion) in Matroska: a millisecond is an eighth of a frame, still rounded
    write(tmp_path / "fast.mkv", "libx264", 120)
    assert [f.index for f in iter_video_file(tmp_path / "fast.mkv", FrameSelection(fps=30.0))] == list(range(0, 30, 4))


def test_resize_crop_matches_torchvision_and_stacks_channels_last(monkeypatch):
    import torchvision.transforms.v2.functional as TF

    import pipeline.preprocess as P

    g = torch.Generator().manual_seed(0)
    # (33, 17): the crop offset rounds 7.5; (10, 12): upsampling; (18, 29): 25.8 px truncates to 25
    sizes = [(24, 32), (33, 17), (16, 16), (40, 40), (16, 50), (10, 12), (18, 29), (1, 40), (240, 320),
             (320, 240)]
    chw = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    hwc = [f.permute(1, 2, 0).contiguous().permute(2, 0, 1) for f in chw]  # a decoder's memory layout
    hwc.append(hwc[-2][:, 7:20])  # a row slice: (H, W, 3) memory at a storage offset
    spec, squash = FrameSpec(size=16), FrameSpec(size=16, resize="squash")
    tv_resize, calls, out, direct = TF.resize, [], {}, P._direct_is_torchvision("bilinear")  # probe before patching
    monkeypatch.setattr(TF, "resize", lambda *a, **k: calls.append(a[0].shape) or tv_resize(*a, **k))
    for name, frames in (("chw", chw), ("hwc", hwc)):
        calls.clear()
        out[name] = [resize_frames(f, spec) for f in frames], [resize_frames(f, squash) for f in frames]
    # decoded frames skip torchvision's dispatch wherever the direct call gives torchvision's bits
    assert not calls if direct else calls, calls
    for f, x in zip(chw, hwc):  # the direct call is ATen's uint8 kernel, whatever torchvision does here
        ref = torch.nn.functional.interpolate(f[None], size=(16, 23), mode="bilinear", antialias=True)[0]
        got_direct = P._interpolate(P.nhwc_view(x), 16, 23)[0]
        assert torch.equal(got_direct, ref) and got_direct.stride()[0] == 1  # (H, W, 3) memory out
    monkeypatch.undo()
    for name, frames in (("chw", chw), ("hwc", hwc)):
        for f, x, y in zip(frames, *out[name]):
            assert torch.equal(x, TF.center_crop(TF.resize(f, 16, antialias=True), [16, 16])), (name, f.shape)
            assert torch.equal(y, TF.resize(f, [16, 16], antialias=True)), (name, f.shape)
    video = torch.stack(chw[:1] * 3)  # a (N, 3, H, W) batch goes through torchvision itself
    ref = TF.center_crop(TF.resize(video, 16, antialias=True), [16, 16])
    assert torch.equal(resize_frames(video, spec), ref)
    # a decoder's batch, (N, H, W, 3) memory (frame folders decode into one buffer), takes the
    # direct call, batched or alone, with torchvision's bits
    for n in (1, 3):
        nhwc = torch.randint(0, 256, (n, 240, 320, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
        calls.clear()
        monkeypatch.setattr(TF, "resize", lambda *a, **k: calls.append(a[0].shape) or tv_resize(*a, **k))
        got = resize_frames(nhwc, spec)
        monkeypatch.undo()
        assert (not calls) == direct and got.shape == (n, 3, 16, 16)
        assert torch.equal(got, TF.center_crop(TF.resize(nhwc.contiguous(), 16, antialias=True), [16, 16]))
    got = out["hwc"][0]
    batch = stack_frames(got)
    assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch, torch.stack(got))


def _ucf(tmp_path: Path, train: str, test: str = "brush_hair/brush_hair_v2.avi\n") -> DatasetSpec:
    root = tmp_path / "ucf"
    _flat_tree(root)
    (tmp_path / "trainlist01.txt").write_text(train)
    (tmp_path / "testlist01.txt").write_text(test)
    return DatasetSpec(str(root), split_files=(str(tmp_path / "trainlist01.txt"), str(tmp_path / "testlist01.txt")))


@pytest.mark.parametrize("listfile, line", [
    ("trainlist01.txt", "a/../../outside/secret/secret_vid.avi 1"),
    ("trainlist01.txt", "brush_hair/../../outside/secret/secret_vid.avi 1"),  # reads outside without the check
    ("testlist01.txt", "../outside/secret/secret_vid.avi"),
    ("testlist01.txt", "/abs/outside/secret_vid.avi"),
    ("testlist01.txt", "./cartwheel/cartwheel_v0.avi"),
    ("testlist01.txt", "cartwheel//cartwheel_v0.avi"),
    ("testlist01.txt", "cartwheel/../cartwheel/cartwheel_v0.avi"),
    ("testlist01.txt", "cartwheel/sub/cartwheel_v0.avi"),
    ("testlist01.txt", "cartwheel/.."),
    ("testlist01.txt", "nope/cartwheel_v0.avi"),  # no such class folder
])
def test_ucf101_split_paths_stay_in_root_and_name_a_class(tmp_path, listfile, line):
    """A listed path is exactly <class>/<video>: it can neither read outside the dataset folder nor
    invent a class (which would shift every later class's label)."""
    secret = tmp_path / "outside" / "secret"
    secret.mkdir(parents=True)
    write_video(secret / "secret_vid.avi", rand_frames(np.random.default_rng(0), 2))
    lines = {"trainlist01.txt": "brush_hair/brush_hair_v0.avi 1\n", "testlist01.txt": "cartwheel/cartwheel_v3.avi\n"}
    lines[listfile] += line + "\n"
    spec = _ucf(tmp_path, lines["trainlist01.txt"], lines["testlist01.txt"])
    with pytest.raises(DataError) as e:
        index_dataset(spec)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / listfile}:2: ") and "\n" not in msg, msg


def test_split_file_class_symlinked_outside_root_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "jump"
    write_frames(elsewhere / "jump_v0", rand_frames(np.random.default_rng(0), 2))
    spec = _ucf(tmp_path, "brush_hair/brush_hair_v0.avi 1\njump/jump_v0.avi 2\n")
    (Path(spec.root) / "jump").symlink_to(elsewhere)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'trainlist01.txt'}:2: .*outside"):
        index_dataset(spec)


@pytest.mark.parametrize("line", ["../brush_hair/brush_hair_v0.avi 1", "sub/brush_hair_v0.avi 1", ".. 1", "/x.avi 2"])
def test_hmdb51_split_video_must_be_a_plain_name(tmp_path, line):
    root = tmp_path / "hmdb"
    _flat_tree(root)
    f = tmp_path / "cartwheel_test_split1.txt"
    f.write_text(f"cartwheel_v0.avi 1\n{line}\n")
    with pytest.raises(DataError, match=rf"^{f}:2: "):
        index_dataset(DatasetSpec(str(root), split_files=(str(f),)))


def test_hmdb51_split_file_for_missing_class_names_file_and_line(tmp_path):
    root = tmp_path / "hmdb"
    _flat_tree(root)
    f = tmp_path / "jump_test_split1.txt"
    f.write_text("\n\njump_v0.avi 1\n")
    with pytest.raises(DataError, match=rf"^{f}:3: class folder {root / 'jump'} .*does not exist"):
        index_dataset(DatasetSpec(str(root), split_files=(str(f),)))
    dots = tmp_path / ".._test_split1.txt"
    dots.write_text("x.avi 1\n")
    with pytest.raises(DataError, match=rf"^{dots}:1: "):
        index_dataset(DatasetSpec(str(root), split_files=(str(dots),)))


def test_split_files_with_bom_keep_their_first_video(tmp_path):
    bom = "\ufeff"
    spec = _ucf(tmp_path, bom + "brush_hair/brush_hair_v0.avi 1\r\ncartwheel/cartwheel_v1.avi 2\r\n",
                bom + "cartwheel/cartwheel_v3.avi\n")
    idx = index_dataset(spec)
    assert [v.rel for v in idx.videos("train")] == ["brush_hair/brush_hair_v0", "cartwheel/cartwheel_v1"]
    assert [v.rel for v in idx.videos("test")] == ["cartwheel/cartwheel_v3.avi"]
    f = tmp_path / "brush_hair_test_split1.txt"
    f.write_bytes((bom + "brush_hair_v0.avi 1\nbrush_hair_v1.avi 2\n").encode())
    idx = index_dataset(DatasetSpec(spec.root, split_files=(str(f),)))
    assert [v.rel for v in idx.videos("train")] == ["brush_hair/brush_hair_v0"]


def test_no_videos_in_split_file_mode_describes_split_files(tmp_path):
    spec = _ucf(tmp_path, "brush_hair/gone_v0.avi 1\n", "cartwheel/gone_v1.avi\n")
    with pytest.raises(DataError) as e:
        index_dataset(spec)
    msg = str(e.value)
    assert "split files" in msg and "<root>/<class>/<video>" in msg and "<split>" not in msg, msg


def _write_120(path: Path) -> list[np.ndarray]:
    """120 frames at 25 fps: mpeg4 .avi, faststart h264 .mp4, ffv1 .mkv."""
    frames = rand_frames(np.random.default_rng(7), 120, 24, 32)
    (write_faststart_mp4 if path.suffix == ".mp4" else write_video)(path, frames, fps=25)
    return frames


@pytest.mark.parametrize("ext, declares", [(".avi", "of 120 frames the header declares"),
                                           (".mp4", "of 120 frames the header declares"),
                                           (".mkv", "of the 4.80 s the header declares")])
def test_truncated_video_keeps_its_frames_and_says_so(tmp_path, ext, declares):
    path = tmp_path / f"v{ext}"
    frames = _write_120(path)
    got = list(iter_video_file(path, FrameSelection()))
    assert len(got) == 120 and all(g.frame is not None for g in got)
    cut_file(path, path.stat().st_size // 2)
    got = list(iter_video_file(path, FrameSelection()))
    decoded, last = got[:-1], got[-1]
    assert 30 < len(decoded) < 90 and all(g.frame is not None for g in decoded)
    assert [g.index for g in decoded] == list(range(len(decoded)))
    assert last.frame is None and last.skipped == "frames", (last.index, last.error)
    assert last.error.startswith(f"{path}: truncated: decoded {len(decoded)} ") and declares in last.error
    assert "bytes its container declares" in last.error
    if ext == ".mkv":  # lossless: the frames that are kept are the right ones
        assert all(torch.equal(g.frame, torch.from_numpy(frames[g.index]).permute(2, 0, 1)) for g in decoded)
    # a selection decodes every frame all the same and reports the same
    assert list(iter_video_file(path, FrameSelection(max_frames=4)))[-1].error == last.error


@pytest.mark.parametrize("name, codec", [("v.avi", "mjpeg"), ("v.mp4", "libx264")])
def test_a_damaged_packet_costs_its_frame_not_the_rest(tmp_path, name, codec):
    """One damaged packet early in a video: its frame is skipped and reported, the 24 after it are
    kept (decoding used to stop there, losing them). Intra-only MJPEG decodes them to the same
    pixels; in H.264 the decoder conceals what refers to the lost frame, as ffmpeg does."""
    path = tmp_path / name
    write_video(path, rand_frames(np.random.default_rng(0), 30), codec=codec)
    clean = {g.index: g.frame for g in iter_video_file(path, FrameSelection())}
    assert len(clean) == 30
    damage_packet(path, 5)
    got = list(iter_video_file(path, FrameSelection()))
    frames, (report,) = got[:-1], got[-1:]
    assert [g.index for g in frames] == [i for i in range(30) if i != 5]
    assert report.frame is None and report.skipped == "frame"
    assert report.error.startswith(f"{path}: damaged: 1 frame(s) could not be decoded (5: 1 damaged packet(s), ")
    if codec == "mjpeg":
        assert all(torch.equal(g.frame, clean[g.index]) for g in frames)
    # a selection that leaves the damaged frame out has nothing to report
    assert all(g.error is None for g in iter_video_file(path, FrameSelection(stride=2)))


def test_video_with_a_wrong_header_count_but_complete_passes(tmp_path):
    """Writers get the AVI frame count wrong (this happens); a file that is all there and decodes
    cleanly is not truncated, whatever its header says. FFmpeg reads the count from the stream
    header (strh dwLength), not the main header (avih dwTotalFrames): both are rewritten."""
    import struct

    import av

    path = tmp_path / "v.avi"
    _write_120(path)
    data = bytearray(path.read_bytes())
    for chunk, offset in ((b"avih", 16), (b"strh", 32)):
        at = data.find(chunk) + 8 + offset
        assert struct.unpack_from("<I", data, at)[0] == 120
        struct.pack_into("<I", data, at, 200)
    path.write_bytes(bytes(data))
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 200
    got = list(iter_video_file(path, FrameSelection()))
    assert len(got) == 120 and all(g.error is None for g in got)


@pytest.mark.parametrize("ext, cut", [(".avi", 10), (".mkv", 50)])
def test_video_cut_only_in_its_trailing_index_passes(tmp_path, ext, cut):
    """The AVI idx1 index and the Matroska cues/tags come after the frames: every frame is there."""
    path = tmp_path / f"v{ext}"
    _write_120(path)
    cut_file(path, path.stat().st_size - cut)
    got = list(iter_video_file(path, FrameSelection()))
    assert len(got) == 120 and all(g.error is None for g in got)


def test_split_file_errors_name_the_first_bad_line(tmp_path):
    spec = _ucf(tmp_path, "brush_hair/brush_hair_v0.avi 1\nzebra/z.avi 1\nant/a.avi 1\n")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'trainlist01.txt'}:2: class folder .*zebra does not exist"):
        index_dataset(spec)


# ------------------------------------------------------------------------- validation carve


def _hmdb_names(rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """Real-looking HMDB51 clip names: several clips per source video, sources shared by actions."""
    actions = ["brush_hair", "cartwheel", "catch", "chew", "clap"]
    names, labels = [], []
    for s in range(40):
        src = f"{['April_09', 'Aussie_Brunette', 'Blonde_being_pulled', 'Veoh_Alpha_Dog'][s % 4]}_{s}"
        for a in rng.choice(len(actions), size=int(rng.integers(1, 3)), replace=False):
            tags = f"{['f', 'u', 'h'][s % 3]}_{['nm', 'cm'][s % 2]}_np{1 + s % 2}_{['fr', 'ba', 'le', 'ri'][s % 4]}_" \
                   f"{['goo', 'med', 'bad'][s % 3]}"
            for clip in range(int(rng.integers(1, 5))):
                names.append(f"{actions[a]}/{src}_{actions[a]}_{tags}_{clip}.avi")
                labels.append(int(a))
    return names, labels


def _ucf_names(rng: np.random.Generator) -> tuple[list[str], list[int]]:
    classes = ["ApplyEyeMakeup", "Archery", "BabyCrawling", "Basketball"]
    names, labels = [], []
    for c, cls in enumerate(classes):
        for g in range(8, 26):
            for clip in range(1, int(rng.integers(4, 8))):
                names.append(f"{cls}/v_{cls}_g{g:02d}_c{clip:02d}.avi")
                labels.append(c)
    return names, labels


@pytest.mark.parametrize("make", [_hmdb_names, _ucf_names])
def test_carve_never_splits_a_source_video(make):
    from pipeline.data import carve_validation, source_group

    names, labels = make(np.random.default_rng(0))
    val = carve_validation(names, labels, 0.15, seed=3)
    groups = {}
    for n, v in zip(names, val):
        groups.setdefault(source_group(n), set()).add(bool(v))
    assert all(len(sides) == 1 for sides in groups.values())  # no group on both sides
    assert len(groups) < len(names)  # the names really do share sources
    labels = np.array(labels)
    for c in np.unique(labels):  # every class on both sides, about the fraction held out
        assert val[labels == c].any() and (~val[labels == c]).any()
    assert 0.08 < val.mean() < 0.3
    assert np.array_equal(val, carve_validation(names, labels, 0.15, seed=3))  # deterministic
    assert not np.array_equal(val, carve_validation(names, labels, 0.15, seed=4))


def test_source_group_names_and_pattern():
    from pipeline.data import carve_validation, source_group

    assert source_group("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi") == "v_ApplyEyeMakeup_g08"
    assert source_group("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_2.avi") == "April_09_brush_hair"
    # HMDB51's tags are per clip: one source's clips of an action with other tags are one group
    assert {source_group(n) for n in ("walk/Movie_1_walk_f_nm_np1_fr_med_0.avi", "walk/Movie_1_walk_f_cm_np1_le_med_1",
                                      "walk/Movie_1_walk_u_nm_np2_ba_bad_2")} == {"Movie_1_walk"}
    assert source_group("run/Movie_1_run_f_cm_np1_ri_goo_0.avi") == "Movie_1_run"  # another class: its own group
    assert source_group("walk/video_12") == "walk/video_12"  # unknown naming: one group per video
    assert source_group("a/sub03_take2_clip7.mp4", r"^(sub\d+)") == "sub03"
    names = [f"c{c}/sub{s:02d}_clip{k}" for c in range(2) for s in range(6) for k in range(3)]
    labels = [int(n[1]) for n in names]
    val = carve_validation(names, labels, 0.3, pattern=r"^(sub\d+)_")
    by_subject = {}
    for n, v in zip(names, val):
        by_subject.setdefault(n.split("/")[1][:5], set()).add(bool(v))
    assert all(len(s) == 1 for s in by_subject.values())
    # A class with a single source stays in training rather than being carved away.
    one = carve_validation(["a/x_1", "a/x_2", "b/y_1", "b/z_1"], [0, 0, 1, 1], 0.5, pattern=r"^([a-z])_")
    assert not one[:2].any()


def test_the_same_file_name_in_several_classes_is_several_videos():
    """``class0/0000.mp4``, ``class1/0000.mp4``, ... were one source group (the file name alone),
    given to the class most of its clips have: the only video of a class could be held out, leaving
    the class nothing to train on (9 seeds in 100 here), with no word."""
    from pipeline.data import carve_validation

    counts = (20, 20, 1)
    names = [f"class{c}/{k:04d}.mp4" for c, n in enumerate(counts) for k in range(n)]
    labels = np.array([c for c, n in enumerate(counts) for _ in range(n)])
    for seed in range(100):
        val = carve_validation(names, labels, 0.1, seed=seed)
        assert all((~val[labels == c]).any() for c in range(3)), seed  # every class keeps training videos
        assert [int(val[labels == c].sum()) for c in range(3)] == [2, 2, 0], seed  # the fraction of each class


def test_a_group_pattern_that_matches_no_name_is_warned_about(caplog):
    from pipeline.data import carve_validation

    names = [f"c{c}/sub{s:02d}_clip{k}.avi" for c in range(2) for s in range(4) for k in range(2)]
    labels = [int(n[1]) for n in names]
    carve_validation(names, labels, 0.3, pattern=r"^(sub\d+)_")
    assert "matches none" not in caplog.text
    carve_validation(names, labels, 0.3, pattern=r"^(subject\d+)_")
    assert "--group-pattern '^(subject\\d+)_' matches none of the 16 video names" in caplog.text


@pytest.mark.parametrize("mode, kw", [("RGB", {}), ("RGB", {"subsampling": 0, "quality": 60}), ("L", {}),
                                      ("RGB", {"progressive": True}), ("CMYK", {})])
def test_jpeg_frames_decode_to_torchvisions_pixels(tmp_path, mode, kw):
    """The libjpeg-turbo path (simplejpeg) must give torchvision's pixels bit for bit, or step aside."""
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    from pipeline.data import _decode_jpeg_turbo

    pytest.importorskip("simplejpeg")
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, "JPEG", **kw)
    (tmp_path / "f.jpg").write_bytes(buf.getvalue())
    want = decode_image(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), mode=ImageReadMode.RGB)
    got = decode_image_file(tmp_path / "f.jpg")
    assert torch.equal(got, want) and got.shape == (3, 48, 64)
    assert got.stride() == (1, 64 * 3, 3)  # (H, W, 3) memory, as the pipeline keeps frames
    fast = _decode_jpeg_turbo(buf.getvalue())  # the fast path really ran (torchvision's frames are (H, W, 3) too)
    assert (fast is None) if mode == "CMYK" else torch.equal(fast, want)


def test_damaged_jpeg_is_named(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    with pytest.raises(FrameDecodeError, match="bad.jpg"):
        decode_image_file(tmp_path / "bad.jpg")


def test_folder_batches_are_the_frames_one_by_one(tmp_path):
    """Frame folders decode in batches (JPEGs of one size into one buffer, ``iter_frame_batches``):
    the same pixels, indices and errors, in the same order, as decoding each file alone, whatever
    breaks a run: another size, a PNG, a CMYK JPEG, a grey one, a damaged or an empty file."""
    import io

    pytest.importorskip("simplejpeg")
    rng = np.random.default_rng(7)

    def jpeg(h: int, w: int, mode: str = "RGB") -> bytes:
        img = np.kron(rng.integers(0, 256, (h // 4, w // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).convert(mode).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    d = tmp_path / "v"
    d.mkdir()
    files = [jpeg(24, 32) for _ in range(4)] + [jpeg(32, 24), jpeg(24, 32, "CMYK"), jpeg(24, 32, "L"),
                                               b"\xff\xd8\xff\xe0" + b"\x00" * 40, b""]
    files += [jpeg(24, 32) for _ in range(5)]
    for i, data in enumerate(files):
        (d / f"{i + 1}.jpg").write_bytes(data)
    Image.fromarray(rand_frames(rng, 1, 24, 32)[0]).save(d / "20.png")
    files.append(b"png")
    for sel in (FrameSelection(), FrameSelection(stride=2), FrameSelection(max_frames=5)):
        want = one_by_one(d, sel)
        for n in (1, 3, 64):
            got = list(iter_frame_batches(d, "frames", sel, n))
            assert all(len(b.indices) <= n and (b.frames is None) == (b.error is not None) for b in got)
            flat = frames_of(got)
            assert [(f.index, f.error) for f in flat] == [(w.index, w.error) for w in want]
            assert all(f.frame is None and w.frame is None or torch.equal(f.frame, w.frame) for f, w in zip(flat, want))
            for b in got:  # (k, H, W, 3) memory, as resize_frames takes it without a copy
                if b.frames is not None:
                    k, c, h, w = b.frames.shape
                    assert b.frames.stride()[1:] == (1, w * c, c)
            if n == 64 and sel == FrameSelection():  # runs of JPEGs really were batched: 1-4, then 10-14
                assert [len(b.indices) for b in got] == [4, 1, 1, 1, 1, 1, 5, 1]
                assert sum(b.error is not None for b in got) == 2
    # and the extraction's chunks of them: every good frame once, resized as alone, in order
    from pipeline.extract import VideoFrameStream

    spec = FrameSpec(size=16, resize_size=20)
    want = one_by_one(d, FrameSelection())
    for chunk_frames in (1, 3, 4, 64):
        chunks = list(VideoFrameStream([], spec, FrameSelection(), chunk_frames).video(0, d, "frames"))
        assert all(c.frames.shape[0] <= chunk_frames for c in chunks) and chunks[-1].last
        assert all(c.frames.is_contiguous(memory_format=torch.channels_last) for c in chunks if len(c.frames))
        assert [e for c in chunks if (e := c.error)] == [w.error for w in want if w.error]
        assert torch.cat([c.indices for c in chunks]).tolist() == [w.index for w in want if w.frame is not None]
        assert torch.equal(torch.cat([c.frames for c in chunks]),
                           torch.stack([resize_frames(w.frame, spec) for w in want if w.frame is not None]))


def test_a_file_of_several_video_streams_is_read_from_the_same_stream_live(tmp_path):
    """A Matroska file whose first video stream is a 5-frame thumbnail and whose second is the
    video: extract-features, predict and --live read the second (they read the first live before)."""
    import av

    from pipeline.stream import LiveStream

    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as c:
        small, big = c.add_stream("ffv1", rate=25), c.add_stream("ffv1", rate=25)
        (small.width, small.height), (big.width, big.height) = (16, 16), (64, 48)
        for k in range(20):
            for s, shade in ((small, 0), (big, 200))[(k >= 5):]:
                f = av.VideoFrame.from_ndarray(np.full((s.height, s.width, 3), shade, np.uint8), format="rgb24")
                f.pts = k
                for p in s.encode(f):
                    c.mux(p)
        for s in (small, big):
            for p in s.encode():
                c.mux(p)
    read = [f.frame for f in iter_video_file(path, FrameSelection())]
    with LiveStream(str(path)) as live:
        shown = [f.image for f in live]
    assert len(read) == len(shown) == 20 and tuple(read[0].shape) == (3, 48, 64)
    assert all(torch.equal(a, b) for a, b in zip(read, shown))


def _two_streams(path: Path, sizes: list[tuple[int, int]], shown_in: Callable[[int], tuple[int, ...]]) -> Path:
    """30 frames at 10 fps in two mpeg4 streams of ``sizes`` (width, height); frame i goes to the
    streams ``shown_in(i)`` names."""
    import av

    with av.open(str(path), "w") as c:
        streams = [c.add_stream("mpeg4", rate=10) for _ in sizes]
        for s, (w, h) in zip(streams, sizes):
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(30):
            for s in (streams[k] for k in shown_in(i)):
                f = av.VideoFrame.from_ndarray(np.full((s.height, s.width, 3), i * 8, np.uint8), format="rgb24")
                for p in s.encode(f):
                    c.mux(p)
        for s in streams:
            for p in s.encode():
                c.mux(p)
    return path


@pytest.mark.parametrize("ext", ["mkv", "mp4", "avi"])
def test_of_two_video_streams_of_one_size_the_longer_is_read(tmp_path, ext):
    """Matroska headers count no frames, so of two streams of one size the first was read, however
    short: 10 frames of a 30-frame video, without a word. Its per-stream DURATION tag says which."""
    from pipeline.data import _open_video

    path = _two_streams(tmp_path / f"two.{ext}", [(64, 48), (64, 48)], lambda i: (1, 0) if i < 10 else (1,))
    container, stream = _open_video(path)
    with container:
        assert stream.index == 1
    assert len(list(iter_video_file(path, FrameSelection()))) == 30


def test_of_two_streams_near_in_length_the_larger_picture_is_read(tmp_path):
    """Lengths estimated from Matroska's DURATION tags differ by a start offset: a preview stream
    one frame longer must not beat the main stream's picture size."""
    from pipeline.data import _open_video

    # the main stream starts a frame later
    path = _two_streams(tmp_path / "two.mkv", [(32, 24), (64, 48)], lambda i: (0, 1) if i else (0,))
    container, stream = _open_video(path)
    with container:
        assert (stream.width, stream.height) == (64, 48)


def test_a_video_file_that_cannot_be_opened_is_one_plain_line(tmp_path):
    (tmp_path / "empty.mkv").write_bytes(b"")
    (tmp_path / "garbage.webm").write_bytes(b"\x00" * 5000)
    with pytest.raises(VideoDecodeError) as e:
        list(iter_video_file(tmp_path / "empty.mkv", FrameSelection()))
    assert str(e.value) == f"{tmp_path / 'empty.mkv'}: empty file (0 bytes)"
    with pytest.raises(VideoDecodeError) as e:
        list(iter_video_file(tmp_path / "garbage.webm", FrameSelection()))
    # FFmpeg's reason alone: not its error number, nor the path a second time
    assert str(e.value) == f"{tmp_path / 'garbage.webm'}: cannot open video (Invalid data found when processing input)"


@pytest.mark.parametrize("degrees", [-90, 90, 180])
def test_a_phone_video_is_read_upright(tmp_path, degrees):
    """A recording stored landscape (left half red, right half blue) with a display rotation, as
    phones write portrait video: extraction, finetune's reads and --live all get the frames a
    player shows (and ffmpeg extracts), not the stored ones turned on their side."""
    from pipeline.stream import LiveStream

    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32, 0] = stored[:, 32:, 2] = 255
    path = tmp_path / "phone.mp4"
    write_rotated_mp4(path, [stored] * 4, degrees)
    # what is shown: -90 turns the frame clockwise (left → top), 90 counter-clockwise, 180 over
    shown = np.rot90(stored, {-90: -1, 90: 1, 180: 2}[degrees])
    frames = [f.frame for f in iter_video_file(path, FrameSelection())]
    with LiveStream(str(path)) as live:
        frames += [f.image for f in live]
    frames += read_frames(path, "file", [0, 3])
    assert len(frames) == 10
    for f in frames:
        assert tuple(f.shape) == (3, *shown.shape[:2])
        assert (f.permute(1, 2, 0).int() - torch.from_numpy(shown.copy()).int()).abs().float().mean() < 8  # h264 rounding


def test_video_files_of_other_containers_are_indexed_and_decoded(tmp_path):
    """A phone's .3gp and .m4v, an MPEG program stream (.mpg) and a camcorder's transport stream
    (.mts) are videos of the dataset, as .mp4 is, not files it passes over."""
    import av
    from fractions import Fraction

    frames = rand_frames(np.random.default_rng(8), 6, 32, 48)
    for name, fmt, codec in (("a.3gp", "3gp", "mpeg4"), ("b.m4v", "mp4", "libx264"), ("c.mpg", "mpeg", "mpeg2video"),
                             ("d.mts", "mpegts", "mpeg2video")):
        path = tmp_path / "ds" / "train" / "walk" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), "w", format=fmt) as c:
            s = c.add_stream(codec, rate=Fraction(25))
            s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
            for f in frames:
                for q in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(q)
            for q in s.encode():
                c.mux(q)
    index = index_dataset(DatasetSpec(str(tmp_path / "ds")))
    videos = index.splits["train"]
    assert sorted(Path(v.rel).name for v in videos) == ["a.3gp", "b.m4v", "c.mpg", "d.mts"]
    for v in videos:
        assert v.kind == "file" and [f.index for f in iter_video_file(v.path, FrameSelection())] == list(range(6)), v.rel
