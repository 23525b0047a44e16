"""Decoding image files into 8-bit RGB, whatever mode PIL opens them in, with errors that name the file.

PIL's `convert("RGB")` clips 16-bit and 32-bit values at 255 (a 16-bit grayscale PNG becomes pure white) and drops
transparency to whatever colour hides under it. Here every mode is mapped on purpose:

    I;16 / I;16B / I;16L   16-bit grayscale, scaled by 255/65535
    I                      32-bit integers: scaled like 16-bit data when any value exceeds 255, else taken as is
    F                      32-bit floats: values in [0, 1] scaled by 255, anything else clipped to [0, 255]
    RGBA, LA, PA, P with transparency, RGBa, La
                           composited onto white (a transparent logo is a logo on white, not on black)
    everything else        PIL's own conversion (L, 1, P, CMYK, YCbCr, LAB, HSV, RGB)

Every image is turned upright first: phone cameras store photos sideways with an EXIF orientation tag, which
PIL's decoder does not apply (ImageOps.exif_transpose does). Without it a portrait photo trains and predicts as its
raw, sideways pixels.

Images larger than PIL's decompression-bomb limit (MAX_PIXELS) are refused with a message naming the file, before
any memory is spent on them; `python -m liteclip.data prepare` writes a smaller copy of a dataset.
"""

from __future__ import annotations

import hashlib
import io

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from liteclip.errors import DataError

# PIL refuses images above twice its MAX_IMAGE_PIXELS (89.5 million by default): 179 million pixels, a 13,000 px
# square. Raise PIL.Image.MAX_IMAGE_PIXELS yourself for files you trust.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 0)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
ADVICE = "run `python -m liteclip.data check` on the dataset, or remove the file"
# the formats liteclip reads from a folder of photos; AVIF, HEIC and JPEG XL too where the installed Pillow (or a
# plugin such as pillow-heif) registers them
IMAGE_SUFFIXES = ({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
                  | {suffix for suffix in (".avif", ".heic", ".heif", ".jxl")
                     if suffix in Image.registered_extensions()})
# the decoders those files need (PIL's JPEG one also opens the MPO files phones write); pictures from outside
# (uploads, photo folders) are decoded by these alone, so bytes that claim an exotic format never reach its rarely
# used decoder
Image.init()
PHOTO_FORMATS = tuple(sorted({Image.registered_extensions()[suffix] for suffix in IMAGE_SUFFIXES
                              if suffix in Image.registered_extensions()} & set(Image.OPEN)))
EXIF_ORIENTATION = 0x0112  # the EXIF tag: 1 is upright, 2-8 name a flip and/or a rotation


class UndecodableImageError(DataError):
    """An image file that cannot be decoded; `path` and `reason` are kept for reports of skipped files."""

    def __init__(self, message: str, path: Path | None = None, reason: str = ""):
        super().__init__(message)  # one positional argument: DataLoader workers re-raise errors as type(message)
        self.path, self.reason = path, reason

    @classmethod
    def of(cls, path: Path, reason: str, advice: str) -> UndecodableImageError:
        return cls(f"{path}: {reason}; {advice}", Path(path), reason)


def upright(image: Image.Image) -> Image.Image:
    """The image as its EXIF orientation tag says it is seen (a new image), or the image itself when untagged."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block (PIL raises several kinds): the pixels are still good
        return image
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """An upright 8-bit RGB copy of a PIL image in any mode (see the module docstring for how each mode maps)."""
    image = upright(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if image.mode == "F":
            values = values * 255.0 if values.size and values.max() <= 1.0 else values
        elif image.mode in SIXTEEN_BIT_MODES or (values.size and values.max() > 255):
            values = np.clip(values, 0, 65535) * (255.0 / 65535.0)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    return image.convert("RGB")


def shrunk(image: Image.Image, side: int) -> Image.Image:
    """The image turned upright and reduced by a whole factor (box filter) to a shorter side of at least `side`."""
    image = upright(image)
    if image.mode in ("P", "PA", "1"):  # palettes cannot be averaged: their colours first
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode in SIXTEEN_BIT_MODES:  # PIL does not reduce these: to 8 bits first, rounded as to_rgb rounds
        wide = np.asarray(image)
        narrow = np.empty(wide.shape, dtype=np.uint8)
        for start in range(0, len(wide), 256):  # a band of rows at a time: no full-size array wider than the input
            narrow[start:start + 256] = (wide[start:start + 256].astype(np.uint32) + 128) // 257
        image = Image.fromarray(narrow, mode="L")
    try:
        return image.reduce(max(1, min(image.size) // side))
    except (ValueError, NotImplementedError):  # a mode PIL does not reduce: converted whole, as before
        return image


def load_image(path: Path, min_size: int | None = None) -> np.ndarray:
    """Decodes an image file to an RGB uint8 array (H, W, 3); a file that cannot be decoded is a DataError.

    For JPEGs, `min_size` lets the decoder scale down by powers of two in the DCT (PIL's draft mode), which is much
    cheaper than decoding full resolution and resizing afterwards.
    """
    return np.asarray(open_rgb(path, min_size))


def open_rgb(path: Path | BinaryIO, min_size: int | None = None, name: str | Path | None = None,
             shrink_to: int | None = None, formats: tuple[str, ...] | None = None) -> Image.Image:
    """The decoded 8-bit RGB PIL image of a file, or of an open binary stream such as a tar member's bytes, whose
    errors then name `name` (see load_image).

    shrink_to: shrink by a whole factor right after decoding, to a shorter side of at least this many pixels,
    before any mode conversion (a 16-bit or transparent image converts through float arrays eight times its size):
    for pictures only ever seen small (uploads, thumbnails), never for the pixels a model trains or evaluates on.
    formats: the decoders allowed (PHOTO_FORMATS for pictures from outside); None: any PIL has.
    """
    name = Path(name if name is not None else path)
    try:
        with Image.open(path, formats=formats) as image:
            if min_size is not None and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            image.load()
            if shrink_to is not None and min(image.size) >= 2 * shrink_to:
                return to_rgb(shrunk(image, shrink_to))
            return to_rgb(image)
    except Image.DecompressionBombError as error:
        raise UndecodableImageError.of(
            name, f"too large to decode safely ({error}; the limit is {MAX_PIXELS:,} pixels)",
            "shrink the dataset with `python -m liteclip.data prepare SRC DST --size 512`, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
    except (PermissionError, FileNotFoundError) as error:
        raise unreadable(name, error) from None
    except UnidentifiedImageError:  # PIL's own message repeats the path, or names a stream object's address
        raise UndecodableImageError.of(name, "cannot decode image (not a format PIL recognises)", ADVICE) from None
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for broken or truncated files
        raise UndecodableImageError.of(name, f"cannot decode image ({error})", ADVICE) from None
    except (MemoryError, RecursionError):
        raise
    except Exception as error:  # a decoder's own failure on damaged bytes (RuntimeError, AttributeError, ...)
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        raise UndecodableImageError.of(name, f"cannot decode image ({reason})", ADVICE) from None


def unreadable(path: Path, error: OSError) -> UndecodableImageError:
    """The error for a file that cannot even be read, saying why in words (not "cannot decode")."""
    if isinstance(error, PermissionError):
        return UndecodableImageError.of(path, "cannot be read (permission denied)",
                                        "check the file's permissions, or remove it")
    if isinstance(error, FileNotFoundError):
        return UndecodableImageError.of(path, "is gone (moved or deleted since it was listed)", "run the command again")
    return UndecodableImageError.of(path, f"cannot be read ({error.strerror or error})", ADVICE)


def read_hashed(path: Path, min_size: int | None = None) -> tuple[np.ndarray, str]:
    """A file's decoded RGB pixels (H, W, 3) and the SHA-256 of the very bytes they were decoded from: the file is
    read once, so a file changed meanwhile can never pair one content's hash with another's pixels."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise unreadable(Path(path), error) from None
    pixels = np.asarray(open_rgb(io.BytesIO(data), min_size, name=path, formats=PHOTO_FORMATS))
    return pixels, hashlib.sha256(data).hexdigest()
