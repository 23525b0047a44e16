"""Every image mode PIL opens decodes to the right 8-bit RGB, checked against conversions written here; files that
cannot be decoded, or are too large to decode safely, fail with the file named."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from liteclip.data.images import UndecodableImageError, load_image
from tests.conftest import save_as_phone_photo, upright_picture

GRADIENT16 = np.array([[0, 257, 1000, 32768], [40000, 60000, 65534, 65535]], dtype=np.uint16)


def white_composite(rgb, alpha):
    """The image as seen on white paper: rgb * a + 255 * (1 - a)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def gray_to_rgb(gray):
    return np.repeat(gray[..., None], 3, axis=-1)


def test_16_bit_grayscale_png_keeps_its_tones_instead_of_turning_white(tmp_path):
    Image.fromarray(GRADIENT16).save(tmp_path / "deep.png")
    expected = gray_to_rgb(np.rint(GRADIENT16 / 257.0).astype(np.uint8))
    decoded = load_image(tmp_path / "deep.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 4, 3)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.min() == 0 and (decoded < 255).mean() > 0.5  # not the all-white image PIL's convert gives


def test_32_bit_integer_image(tmp_path):
    values = GRADIENT16.astype(np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "wide.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "wide.tif"),
                                  gray_to_rgb(np.rint(values / 257.0).astype(np.uint8)))


def test_32_bit_float_image_in_0_1(tmp_path):
    values = np.array([[0.0, 0.25, 0.5], [0.75, 0.999, 1.0]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "float.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "float.tif"),
                                  gray_to_rgb(np.rint(values.astype(np.float64) * 255).astype(np.uint8)))


def test_palette_with_a_transparent_entry_is_composited_onto_white(tmp_path):
    palette = [0, 0, 0, 200, 30, 30, 30, 30, 200] + [0] * (256 * 3 - 9)
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    image.info["transparency"] = 0  # index 0 (black) is fully transparent
    image.save(tmp_path / "logo.png", transparency=0)
    colors = np.array(palette[:9], dtype=np.uint8).reshape(3, 3)
    expected = np.where((indices == 0)[..., None], 255, colors[indices]).astype(np.uint8)
    np.testing.assert_array_equal(load_image(tmp_path / "logo.png"), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_modes_are_composited_onto_white(tmp_path, mode):
    rng = np.random.default_rng(0)
    channels = 4 if mode == "RGBA" else 2
    pixels = rng.integers(0, 256, (5, 6, channels), dtype=np.uint8)
    Image.fromarray(pixels, mode=mode).save(tmp_path / "alpha.png")
    color = pixels[..., :3] if mode == "RGBA" else gray_to_rgb(pixels[..., 0])
    np.testing.assert_array_equal(load_image(tmp_path / "alpha.png"), white_composite(color, pixels[..., -1]))


def test_cmyk(tmp_path):
    cmyk = np.array([[[200, 50, 10, 30], [0, 0, 0, 255], [10, 20, 30, 0]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "print.tif")
    ink = cmyk.astype(np.float64)
    expected = np.rint((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255).astype(np.uint8)
    np.testing.assert_array_equal(load_image(tmp_path / "print.tif"), expected)


def png_claiming(width, height):
    """A tiny PNG file whose header claims a width x height grayscale image."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_naming_the_file_and_the_limit(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_claiming(14000, 14000))
    with pytest.raises(UndecodableImageError, match=r"huge\.png: too large to decode safely.*limit") as caught:
        load_image(path)
    assert caught.value.path == path and "too large" in caught.value.reason


def test_broken_and_truncated_files_name_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8)).save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:300])
    for name in ("broken.jpg", "cut.jpg"):
        with pytest.raises(UndecodableImageError, match=f"{name}: cannot decode image"):
            load_image(tmp_path / name)


# ------------------------------------------------------------------------- EXIF orientation (issue 26)


def test_a_phone_photo_with_an_orientation_tag_decodes_upright(tmp_path):
    upright = upright_picture()
    photo = save_as_phone_photo(upright, tmp_path / "phone.jpg")
    with Image.open(photo) as raw:
        assert raw.size == (32, 48)  # stored sideways: PIL alone reads it so
    decoded = load_image(photo)
    assert decoded.shape == upright.shape
    assert np.abs(decoded.astype(int) - upright.astype(int)).mean() < 4  # JPEG's loss only
    assert decoded[16, 10, 1] < 100 and decoded[16, 38, 1] > 150  # the red block is on the left, not the right


def test_orientation_is_applied_to_bytes_and_to_pil_images_as_well(tmp_path):
    import io

    from liteclip.data.images import open_rgb, to_rgb

    upright = upright_picture()
    photo = save_as_phone_photo(upright, tmp_path / "phone.jpg")
    from_bytes = np.asarray(open_rgb(io.BytesIO(photo.read_bytes()), name="shard/phone.jpg"))  # a shard's member
    with Image.open(photo) as opened:  # what a user passes to the pipeline
        from_pil = np.asarray(to_rgb(opened))
    assert from_bytes.shape == from_pil.shape == upright.shape
    assert np.array_equal(from_bytes, load_image(photo)) and np.array_equal(from_pil, load_image(photo))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.filterwarnings("ignore:Tag data larger than file")
def test_a_malformed_exif_block_costs_the_orientation_not_the_photo(tmp_path):
    pixels = upright_picture()
    # an orientation tag whose value points past the end of the block
    corrupt = b"Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\xff\xff\xff\x0f\x06\x00\x00\x00"
    Image.fromarray(pixels).save(tmp_path / "odd.jpg", quality=95, exif=corrupt)
    decoded = load_image(tmp_path / "odd.jpg")
    assert decoded.shape == pixels.shape and np.abs(decoded.astype(int) - pixels.astype(int)).mean() < 4
