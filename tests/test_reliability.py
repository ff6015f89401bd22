"""Reliability cases not covered elsewhere: decompression bombs, tiny images, non-images, determinism, atomic writes."""

import os
import struct
import zlib

import numpy as np
import pytest
import torch

from pole_hf import image_cams
from pole_hf.atomic import atomic_path, atomic_write_text, remove_partial_files
from pole_hf.images import ImageInputError, load_image


def png_header_only(path, width, height):
    """A PNG that declares `width x height` pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_with_the_name(tmp_path):
    path = tmp_path / "bomb.png"
    png_header_only(path, 40000, 40000)
    with pytest.raises(ImageInputError, match=r"bomb.png.*(too large|pixel limit)"):
        load_image(str(path))


def test_text_file_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am not a JPEG")
    with pytest.raises(ImageInputError, match="notes.jpg.*not an image"):
        load_image(str(path))


def test_folder_and_unsupported_types():
    with pytest.raises(ImageInputError, match="is a folder"):
        load_image(os.path.dirname(__file__))
    with pytest.raises(ImageInputError, match="cannot read an image from a int"):
        load_image(3)


def test_one_pixel_image_is_refused_by_the_processor(tiny_model, tiny_processor):
    image = load_image(np.zeros((1, 1, 3), np.uint8))
    assert image.size == (1, 1)
    with pytest.raises(ValueError, match="1x1 is smaller than one 8x8 patch"):
        image_cams(tiny_model, tiny_processor, image, [0])


def test_cams_are_deterministic(tiny_model, tiny_processor, random_image):
    image = random_image(3, 40, 40)
    first = image_cams(tiny_model, tiny_processor, image, [0, 1], refine=True).cams
    second = image_cams(tiny_model, tiny_processor, image, [0, 1], refine=True).cams
    assert torch.equal(first, second)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "selection.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp, open(tmp, "w") as f:
        f.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["selection.json"]


def test_partial_files_are_cleaned(tmp_path):
    (tmp_path / ".a.npy.x1.tmp").write_bytes(b"partial")
    (tmp_path / "a.npy").write_bytes(b"done")
    assert remove_partial_files(tmp_path) == 1
    assert os.listdir(tmp_path) == ["a.npy"]
