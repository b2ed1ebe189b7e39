"""Decoding: every kind of bad file, colour modes, parity with keras.utils.load_img, and batches that keep each row's listing index."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_tree, write_image
from pipeline.core.errors import PipelineError
from pipeline.images.decode import RejectedImage, iter_batches, load_image
from pipeline.images.listing import list_images


def _bomb(path: Path) -> None:
    # 10000 x 9000 = 90M pixels: just over Pillow's default limit of 89,478,485, a few KB as PNG.
    Image.new("1", (10000, 9000)).save(path)


def _truncated(path: Path) -> None:
    write_image(path, size=(64, 64), fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "empty.png": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.jpg": (_truncated, "truncated or corrupt"),
    "garbage.png": (lambda p: p.write_bytes(os.urandom(2000)), "not an image"),
    "text.jpg": (lambda p: p.write_text("hello, I am not a picture\n" * 20), "not an image"),
    "html.png": (lambda p: p.write_text("<html><body>404 not found</body></html>"), "not an image"),
    "postscript.png": (lambda p: p.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), "not an image"),
    "bomb.png": (_bomb, "decompression bomb"),
    "dangling.png": (lambda p: os.symlink(p.parent / "no-such-file.png", p), "dangling symbolic link"),
    "badpng.png": (lambda p: p.write_bytes(write_image(p).read_bytes()[:60] + b"\0" * 200), "corrupt"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_rejected_with_reason(tmp_path, name):
    make, reason = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(RejectedImage, match=reason):
        load_image(path, 32, "bilinear")


GOOD_MODES = {
    "gray.png": lambda p: write_image(p, mode="L"),
    "palette.png": lambda p: write_image(p, mode="P"),
    "rgba.png": lambda p: write_image(p, mode="RGBA"),
    "cmyk.jpg": lambda p: write_image(p, mode="CMYK", fmt="JPEG"),
    "upper.JPEG": lambda p: write_image(p, fmt="JPEG"),
    "bitmap.bmp": lambda p: write_image(p),
    "anim.gif": None,
    "photo.webp": lambda p: write_image(p, fmt="WEBP"),
    "scan.tiff": lambda p: write_image(p, fmt="TIFF"),
    "deep16.png": lambda p: Image.fromarray((np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)).save(p),
}


@pytest.mark.parametrize("name", sorted(GOOD_MODES))
def test_every_format_and_mode_becomes_rgb(tmp_path, name):
    path = tmp_path / name
    if name == "anim.gif":
        frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    else:
        GOOD_MODES[name](path)
    arr = load_image(path, 32, "bilinear")
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    if name == "anim.gif":  # the first frame, red
        assert arr[..., 0].min() > 200 and arr[..., 2].max() < 50
    if name == "deep16.png":  # 16-bit values are rescaled to 8 bits, not clipped to white
        assert 0 < arr.mean() < 255 and arr.max() > arr.min()


@pytest.mark.parametrize("name", sorted(GOOD_MODES) + ["sideways.png", "float.tiff"])
def test_the_portable_reader_gives_the_pixels_load_image_gives(tmp_path, name):
    """Fifteenth pass: an exported model's metadata named keras.utils.load_img, which clips 16-bit images and ignores EXIF
    orientation (scores 0.44 vs predict's 0.62 on a 16-bit PNG). Its `reader` source, run where this package is not, decodes as predict does."""
    import subprocess
    import sys

    from pipeline.images.decode import portable_reader

    path = tmp_path / name
    if name == "anim.gif":
        frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    elif name == "sideways.png":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.open(write_image(tmp_path / "u.png", size=(20, 40))).save(path, exif=exif)
    elif name == "float.tiff":
        Image.fromarray((np.arange(30 * 40).reshape(30, 40) / 4.0).astype(np.float32), mode="F").save(path)
    else:
        GOOD_MODES[name](path)
    (tmp_path / "reader.py").write_text(portable_reader() + "\nimport sys\nnp.save(sys.argv[3], load_pixels(sys.argv[2], 32, 'bilinear'))\n")
    run = subprocess.run([sys.executable, "-c", "import sys; sys.modules['pipeline'] = None; exec(open(sys.argv[1]).read())", str(tmp_path / "reader.py"),
                          str(path), str(tmp_path / "x.npy")], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "x.npy")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, load_image(path, 32, "bilinear").astype(np.float32))  # the same steps: copied, exact


def test_exif_orientation_is_applied(tmp_path):
    upright = write_image(tmp_path / "upright.png", size=(20, 40))
    img = Image.open(upright).transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with "rotate 90 CW to display"
    img.save(tmp_path / "sideways.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "sideways.png", 32, "bilinear"), load_image(upright, 32, "bilinear"))


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest", "bicubic"])
def test_pixels_match_keras_load_img(tmp_path, interpolation):
    import keras

    from pipeline.backbones.network import preprocess

    paths = [
        write_image(tmp_path / "a.png", size=(28, 28)),
        write_image(tmp_path / "b.jpg", size=(300, 200), fmt="JPEG", seed=3),
        write_image(tmp_path / "c.png", size=(50, 70), mode="L", seed=4),
    ]
    for p in paths:
        ref = keras.utils.img_to_array(keras.utils.load_img(p, target_size=(64, 64), interpolation=interpolation))
        ref = keras.applications.vgg16.preprocess_input(ref[None])[0]
        ours = np.asarray(preprocess(load_image(p, 64, interpolation)[None]))[0]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_batches_keep_index_with_rejects_in_order(tmp_path):
    root = make_tree(tmp_path / "d", per_class=5)
    (root / "cat" / "002.png").write_bytes(b"")
    listing = list_images(root)
    # 10 images in batches of 4: [4, 4, 2], the empty file rejected in place.
    batches = list(iter_batches(listing, np.arange(10), size=32, interpolation="bilinear", batch_size=4, workers=2))
    assert [len(b.indices) for b in batches] == [4, 4, 2]
    assert np.concatenate([b.indices for b in batches]).tolist() == list(range(10))
    ok = np.concatenate([b.ok for b in batches])
    assert ok.tolist() == [i != 2 for i in range(10)]
    assert batches[0].reasons[2] == "empty file (0 bytes)"
    np.testing.assert_array_equal(batches[1].pixels[1], load_image(root / listing.paths[5], 32, "bilinear"))


@pytest.mark.parametrize("setting", [dict(batch_size=0), dict(batch_size=-3), dict(prefetch=-1), dict(workers=-1)])
def test_a_batch_of_no_rows_is_refused_never_a_silent_empty_read(tmp_path, setting):
    """Second adversarial pass (#22): batch_size 0 ended the reader at once, every row lost without a reject."""
    listing = list_images(make_tree(tmp_path / "d", per_class=2))
    args = dict(size=8, interpolation="bilinear", batch_size=2) | setting
    name, value = next(iter(setting.items()))
    with pytest.raises(PipelineError, match=rf"^{name} {value}: must be a whole number of at least"):
        list(iter_batches(listing, np.arange(len(listing)), **args))
