"""The Aff-Wild2 reader against hand-written trees in the organisers' formats."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fercache.data.affwild2 import AffWild2, frame_filename, read_annotation
from fercache.data.tasks import AU, EXPR, VA
from fercache.errors import FercacheError

EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
AU_HEADER = "AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"


def write_images(root: Path, video: str, frames: list[int]) -> None:
    folder = root / "cropped_aligned" / video
    folder.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        (folder / frame_filename(frame)).write_bytes(b"not decoded by the reader")


def write_annotation(
    root: Path, text: str, video: str, task_set="EXPR_Recognition_Challenge", split="Train_Set"
) -> Path:
    folder = root / "6th_ABAW_Annotations" / task_set / split
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{video}.txt"
    path.write_bytes(text.encode())
    return path


def test_hand_written_expr_file_with_every_quirk(tmp_path):
    # 10 frames annotated; CRLF; two trailing blank lines; frames 4-5 and 9-10 have no image
    # (the last two are the "annotation longer than the images" case); frame 2 is -1.
    labels = [0, -1, 4, 4, 7, 7, 1, 1, 3, 3]
    text = "\r\n".join([EXPR_HEADER, *map(str, labels)]) + "\r\n\r\n\r\n"
    write_annotation(tmp_path, text, "video1")
    write_images(tmp_path, "video1", [1, 2, 3, 6, 7, 8])

    (video,) = AffWild2(tmp_path).load("expr", "train")

    assert video.video == "video1" and video.split == "train"
    np.testing.assert_array_equal(video.labels, labels)
    np.testing.assert_array_equal(video.image_frames, [1, 2, 3, 6, 7, 8])
    np.testing.assert_array_equal(video.image_labels, [0, -1, 4, 7, 1, 1])
    np.testing.assert_array_equal(video.frames_without_image, [4, 5, 9, 10])
    np.testing.assert_array_equal(video.labelled_frames_without_image, [4, 5, 9, 10])
    kinds = {note.kind for note in video.notes}
    assert kinds == {"crlf", "trailing_blank_lines", "annotation_longer"}
    longer = next(n for n in video.notes if n.kind == "annotation_longer")
    assert "2 annotated frame(s) after the last image (frame 8)" in longer.message


def test_images_beyond_a_short_annotation_get_no_label(tmp_path):
    write_annotation(tmp_path, f"{EXPR_HEADER}\n5\n5\n-1\n", "video2")
    write_images(tmp_path, "video2", [1, 2, 3, 4, 5])

    (video,) = AffWild2(tmp_path).load("expr", "train")

    np.testing.assert_array_equal(video.image_labels, [5, 5, -1, -1, -1])
    np.testing.assert_array_equal(video.frame_valid, [True, True, False])
    assert len(video.frames_without_image) == 0
    (note,) = video.notes
    assert note.kind == "images_beyond_annotation"
    assert "2 image(s) lie beyond (up to frame 5)" in note.message


def test_stray_files_are_ignored_and_reported(tmp_path):
    write_annotation(tmp_path, f"{EXPR_HEADER}\n1\n2\n", "video3")
    write_images(tmp_path, "video3", [1, 2])
    images = tmp_path / "cropped_aligned" / "video3"
    for stray in ("Thumbs.db", "00003.png", "00000.jpg", "frame.jpg"):
        (images / stray).write_bytes(b"")
    annotations = tmp_path / "6th_ABAW_Annotations" / "EXPR_Recognition_Challenge" / "Train_Set"
    (annotations / "README.md").write_text("notes")

    dataset = AffWild2(tmp_path)
    (video,) = dataset.load("expr", "train")

    np.testing.assert_array_equal(video.image_frames, [1, 2])
    (image_note,) = video.notes
    assert image_note.kind == "stray_files" and "4 file(s)" in image_note.message
    assert [n.kind for n in dataset.notes] == ["stray_files"]
    assert "README.md" in dataset.notes[0].message


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("abc", "4: 'abc' for frame 3"),
        ("9", "4: bad label '9' (frame 3)"),
        ("3.5", "4: bad label '3.5' (frame 3)"),
        ("-2", "4: bad label '-2' (frame 3)"),
        ("", "4: a blank line for frame 3"),
        ("1,2", "4: '1,2' for frame 3"),
    ],
)
def test_malformed_expr_line_names_file_and_line(tmp_path, bad_line, expected):
    path = write_annotation(tmp_path, f"{EXPR_HEADER}\n1\n2\n{bad_line}\n4\n", "video4")
    with pytest.raises(FercacheError) as error:
        read_annotation(path, EXPR)
    assert f"{path}:{expected}" in str(error.value)


def test_missing_header_is_an_error_not_a_silent_shift(tmp_path):
    path = write_annotation(tmp_path, "0\n1\n2\n", "video5")
    with pytest.raises(FercacheError, match=r"video5.txt:1: '0' is a label, not a header"):
        read_annotation(path, EXPR)


def test_empty_file_is_an_error_and_header_only_means_no_frames(tmp_path):
    empty = write_annotation(tmp_path, "", "empty")
    with pytest.raises(FercacheError, match="empty annotation file"):
        read_annotation(empty, EXPR)
    labels, _ = read_annotation(write_annotation(tmp_path, EXPR_HEADER + "\n", "header"), EXPR)
    assert labels.shape == (0,)


def test_utf8_bom_and_spaces_are_tolerated(tmp_path):
    path = write_annotation(tmp_path, "\ufeff" + EXPR_HEADER + "\n 3\n4 \n", "bom")
    labels, notes = read_annotation(path, EXPR)
    np.testing.assert_array_equal(labels, [3, 4])
    assert notes == []


def test_non_utf8_file_is_reported(tmp_path):
    path = write_annotation(tmp_path, "", "binary")
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(FercacheError, match=r"binary\.txt: not a UTF-8 text annotation file"):
        read_annotation(path, EXPR)


def test_au_and_va_files(tmp_path):
    au_rows = ["1,0,0,0,0,0,1,0,0,0,1,0", ",".join(["-1"] * 12), "0,0,1,0,1,0,0,0,1,1,0,0"]
    au_path = write_annotation(tmp_path, "\n".join([AU_HEADER, *au_rows]), "v", "AU_Set")
    va_path = write_annotation(tmp_path, "valence,arousal\n0.25,-0.5\n-5,-5\n1,1\n", "v", "VA_Set")

    au, _ = read_annotation(au_path, AU)
    va, _ = read_annotation(va_path, VA)

    assert au.shape == (3, 12) and au.dtype == np.int64
    np.testing.assert_array_equal(au[0, [0, 6, 10]], [1, 1, 1])
    np.testing.assert_array_equal(AU.valid_mask(au).all(axis=1), [True, False, True])
    np.testing.assert_allclose(va, [[0.25, -0.5], [-5, -5], [1, 1]])
    assert va.dtype == np.float32

    short_row = write_annotation(tmp_path, AU_HEADER + "\n1,0,0\n", "short", "AU_Set")
    with pytest.raises(FercacheError, match=r"short.txt:2: '1,0,0' for frame 1; expected 12"):
        read_annotation(short_row, AU)
    out_of_range = write_annotation(tmp_path, "valence,arousal\n0.1,1.5\n", "far", "VA_Set")
    with pytest.raises(FercacheError, match=r"far.txt:2: bad label '0.1,1.5'"):
        read_annotation(out_of_range, VA)


@pytest.mark.parametrize(
    ("release", "task_set", "split", "name"),
    [
        ("Third ABAW Annotations", "EXPR_Classification_Challenge", "Train_Set", "train"),
        ("6th_ABAW_Annotations", "EXPR_Recognition_Challenge", "Validation_Set", "val"),
        ("annotations", "EXPR_Set", "Training_Set", "train"),
        ("ABAW2", "expr_set", "validation_set", "val"),
    ],
)
def test_every_abaw_edition_folder_naming_is_found(tmp_path, release, task_set, split, name):
    folder = tmp_path / release / task_set / split
    folder.mkdir(parents=True)
    (folder / "v.txt").write_text(f"{EXPR_HEADER}\n2\n")
    write_images(tmp_path, "v", [1])

    dataset = AffWild2(tmp_path)

    assert dataset.splits("expr") == [name]
    assert dataset.load("expr", name)[0].labels.tolist() == [2]


def test_two_releases_side_by_side_need_a_choice(tmp_path):
    for release in ("5th", "6th"):
        folder = tmp_path / release / "EXPR_Set" / "Train_Set"
        folder.mkdir(parents=True)
        (folder / "v.txt").write_text(f"{EXPR_HEADER}\n{len(release)}\n")
    write_images(tmp_path, "v", [1])

    with pytest.raises(FercacheError, match="two EXPR train annotation folders"):
        AffWild2(tmp_path)
    dataset = AffWild2(tmp_path, annotations=tmp_path / "6th")
    assert dataset.load("expr", "train")[0].labels.tolist() == [3]


def test_left_and_right_subjects_are_separate_videos(tmp_path):
    write_annotation(tmp_path, f"{EXPR_HEADER}\n1\n1\n1\n", "10-60-1280x720_left")
    write_annotation(tmp_path, f"{EXPR_HEADER}\n4\n4\n4\n", "10-60-1280x720_right")
    write_images(tmp_path, "10-60-1280x720_left", [1, 2, 3])
    write_images(tmp_path, "10-60-1280x720_right", [2, 3])

    left, right = AffWild2(tmp_path).load("expr", "train")

    assert (left.video, right.video) == ("10-60-1280x720_left", "10-60-1280x720_right")
    np.testing.assert_array_equal(left.image_labels, [1, 1, 1])
    np.testing.assert_array_equal(right.frames_without_image, [1])


def test_annotation_without_image_folder_is_reported(tmp_path):
    write_annotation(tmp_path, f"{EXPR_HEADER}\n1\n-1\n", "lost")
    write_images(tmp_path, "other", [1])

    (video,) = AffWild2(tmp_path).load("expr", "train")

    assert [n.kind for n in video.notes] == ["no_image_folder"]
    np.testing.assert_array_equal(video.labelled_frames_without_image, [1])


def test_missing_pieces_give_clear_errors(tmp_path):
    with pytest.raises(FercacheError, match="no such directory"):
        AffWild2(tmp_path / "nope")
    with pytest.raises(FercacheError, match="no image folder"):
        AffWild2(tmp_path)
    write_images(tmp_path, "v", [1])
    dataset = AffWild2(tmp_path)
    with pytest.raises(FercacheError, match="no EXPR annotations for split 'train'"):
        dataset.load("expr", "train")
    with pytest.raises(FercacheError, match="unknown task 'pose'"):
        dataset.load("pose", "train")


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-1, 7), min_size=1, max_size=60),
    image_mask=st.lists(st.booleans(), min_size=1, max_size=70),
)
def test_alignment_matches_a_per_frame_reference(tmp_path_factory, labels, image_mask):
    root = tmp_path_factory.mktemp("tree")
    write_annotation(root, "\n".join([EXPR_HEADER, *map(str, labels)]), "v")
    frames = [i + 1 for i, has_image in enumerate(image_mask) if has_image]
    write_images(root, "v", frames)
    (root / "cropped_aligned" / "v").mkdir(parents=True, exist_ok=True)

    (video,) = AffWild2(root).load("expr", "train")

    expected = [labels[f - 1] if f <= len(labels) else -1 for f in frames]
    np.testing.assert_array_equal(video.image_labels, np.array(expected, dtype=np.int64))
    missing = [f for f in range(1, len(labels) + 1) if f not in frames]
    np.testing.assert_array_equal(video.frames_without_image, missing)
    labelled_missing = [f for f in missing if labels[f - 1] != -1]
    np.testing.assert_array_equal(video.labelled_frames_without_image, labelled_missing)
