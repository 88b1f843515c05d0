import io
import os

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from archivecolor.errors import ImageReadError, ImageTooLarge, ImageWriteError
from archivecolor.imageio import (
    from_upright,
    icc_colour_space,
    output_icc,
    read_embedded_xmp,
    read_image,
    srgb_profile,
    to_upright,
    write_image,
)
from archivecolor.provenance import build_xmp, read_xmp_fields
from tests.conftest import colour_photos, gray_of

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.fixture
def photo():
    return colour_photos(1, (192, 128))[0]


def test_16bit_gray_tiff_in_16bit_rgb_tiff_out(tmp_path, photo):
    gray16 = gray_of(photo).astype(np.uint16) * 257 + 3
    src = tmp_path / "scan.tif"
    tifffile.imwrite(src, gray16, compression="zlib")
    scan = read_image(src)
    assert scan.format == "TIFF" and scan.bit_depth == 16 and scan.pixels.dtype == np.uint16
    assert np.array_equal(scan.pixels, gray16)
    xmp = build_xmp("scan.tif", "0" * 64, "key", [{"path": "ref.jpg"}], "sha256:" + "2" * 64)
    out = tmp_path / "out.tif"
    write_image(out, np.dstack([gray16] * 3), "TIFF", icc=SRGB, xmp=xmp)
    back = read_image(out)
    assert back.bit_depth == 16 and back.pixels.shape == (128, 192, 3)
    assert back.icc == SRGB
    fields = read_xmp_fields(read_embedded_xmp(out))
    assert fields["DerivedFrom"] == "sha256:" + "0" * 64 and fields["RecordDigest"] == "sha256:" + "2" * 64


@pytest.mark.parametrize("compression", ["lzw", "zlib"])
def test_compressed_tiffs(tmp_path, photo, compression):
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, photo, photometric="rgb", compression=compression)
    assert np.array_equal(read_image(path).pixels, photo)


def test_multipage_tiff_uses_first_page_with_warning(tmp_path, photo):
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(gray_of(photo))
        tif.write(np.zeros_like(gray_of(photo)))
    scan = read_image(path)
    assert np.array_equal(scan.pixels, gray_of(photo))
    assert any("multi-page" in w for w in scan.warnings)


def test_exif_rotated_jpeg(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(gray_of(photo)).save(path, exif=exif.tobytes(), quality=95)
    scan = read_image(path)
    assert scan.orientation == 6 and scan.pixels.shape == (128, 192)
    upright = to_upright(scan.pixels, scan.orientation)
    assert upright.shape == (192, 128)
    pil_upright = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(upright, pil_upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_inverse(orientation):
    x = np.arange(12).reshape(3, 4)
    assert np.array_equal(from_upright(to_upright(x, orientation), orientation), x)


def test_cmyk_jpeg_is_converted_with_warning(tmp_path, photo):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(path)
    scan = read_image(path)
    assert scan.pixels.shape == (128, 192, 3)
    assert any("CMYK" in w for w in scan.warnings)


def test_palette_png(tmp_path, photo):
    path = tmp_path / "palette.png"
    Image.fromarray(gray_of(photo)).convert("P").save(path)
    scan = read_image(path)
    assert scan.pixels.shape[:2] == (128, 192) and scan.bit_depth == 8


def test_rgba_png_keeps_alpha_and_16_bit(tmp_path, photo):
    rgb16 = photo.astype(np.uint16) * 257
    alpha = np.full(photo.shape[:2], 40000, np.uint16)
    out = tmp_path / "a.png"
    write_image(out, rgb16, "PNG", alpha=alpha, icc=SRGB, xmp=b"<x:xmpmeta>hi</x:xmpmeta>")
    scan = read_image(out)
    assert scan.bit_depth == 16 and np.array_equal(scan.pixels, rgb16) and np.array_equal(scan.alpha, alpha)
    assert scan.icc == SRGB
    assert read_embedded_xmp(out) == b"<x:xmpmeta>hi</x:xmpmeta>"


@pytest.mark.parametrize("fmt,suffix", [("BMP", ".bmp"), ("WEBP", ".webp"), ("JPEG", ".jpg")])
def test_other_formats_round_trip(tmp_path, photo, fmt, suffix):
    path = tmp_path / f"x{suffix}"
    write_image(path, photo, fmt, icc=SRGB if fmt != "BMP" else None)
    scan = read_image(path)
    assert scan.format == fmt and scan.pixels.shape == photo.shape
    assert np.abs(scan.pixels.astype(int) - photo).mean() < 3


def test_jpeg_carries_icc_exif_and_xmp(tmp_path, photo):
    exif = Image.Exif()
    exif[0x0110] = "Scanner X"
    out = tmp_path / "o.jpg"
    xmp = build_xmp("a.jpg", "1" * 64, "k", [{"path": "r.jpg"}], "sha256:" + "3" * 64)
    write_image(out, photo, "JPEG", icc=SRGB, exif=exif.tobytes(), xmp=xmp)
    scan = read_image(out)
    assert scan.icc == SRGB
    assert Image.open(out).getexif()[0x0110] == "Scanner X"
    fields = read_xmp_fields(read_embedded_xmp(out))
    assert fields["DigitalSourceType"].endswith("compositeWithTrainedAlgorithmicMedia")


def test_gray_icc_is_replaced_by_srgb_with_warning():
    gray_profile = bytearray(SRGB)
    gray_profile[16:20] = b"GRAY"
    icc, warning = output_icc(bytes(gray_profile))
    assert icc == srgb_profile() and icc_colour_space(icc) == "RGB" and "GRAY" in warning
    assert output_icc(SRGB) == (SRGB, None)


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, photo):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for path in (empty, truncated, text):
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message


def test_decompression_bomb_limit(tmp_path, photo):
    path = tmp_path / "big.png"
    Image.fromarray(photo).save(path)
    with pytest.raises(ImageTooLarge, match="--max-pixels"):
        read_image(path, max_pixels=1000)
    assert read_image(path, max_pixels=192 * 128).width == 192


def test_toned_scan_is_flagged(tmp_path, photo):
    g = gray_of(photo).astype(np.float32)
    sepia = np.stack([g, g * 0.88, g * 0.7], -1).astype(np.uint8)
    path = tmp_path / "sepia.jpg"
    Image.fromarray(sepia).save(path, quality=95)
    assert any("treated as gray" in w for w in read_image(path).warnings)
    Image.fromarray(photo).save(tmp_path / "colour.png")
    assert not read_image(tmp_path / "colour.png").warnings


def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    import errno

    from archivecolor import imageio

    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    real_write = os.write
    budget = {"bytes": 1000}

    def filling_disk(fd, data):  # the disk fills after 1000 bytes, as on a small tmpfs
        if budget["bytes"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: budget["bytes"]]))
        budget["bytes"] -= n
        return n

    monkeypatch.setattr(imageio.os, "write", filling_disk)
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(ImageWriteError, match="out.png.*free space"):
        write_image(target, rgb, "PNG")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    monkeypatch.undo()
    write_image(target, rgb, "PNG")  # with space again it completes
    assert np.array_equal(read_image(target).pixels, rgb)


def test_the_srgb_profile_is_the_same_bytes_in_every_process():
    """LittleCMS stamps profiles with the time; outputs must not depend on when their process started."""
    import subprocess
    import sys
    import time

    from archivecolor.imageio import srgb_profile

    time.sleep(1.1)  # at least a second after this process made its profile
    code = "import sys; from archivecolor.imageio import srgb_profile; sys.stdout.buffer.write(srgb_profile())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert other == srgb_profile() and len(other) > 128
