"""Masks in the layouts a user has, read unchanged, and images read by their content in training as in
predict.py (unet/imagefiles.py, unet/data.py)."""
import cv2 as cv
import numpy as np
import pytest

from unet import data
from unet.data import DatasetError

SIZE = 32
MASK = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 3, 3]], np.uint8)
VOC_COLORS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]     # RGB, as a palette PNG stores them


def write_palette_png(path, indices, colors=VOC_COLORS, bits=8):
    """A VOC-style palette PNG (indices into a colour table) written with Pillow (matplotlib's own
    dependency, used here only to make the file)."""
    from PIL import Image

    image = Image.fromarray(np.asarray(indices, np.uint8), "P")
    image.putpalette([value for color in colors for value in color])
    image.save(path, bits=bits)


@pytest.mark.parametrize("layout", ["8-bit gray", "16-bit", "palette", "palette 2-bit", "palette with transparency",
                                    "3 equal channels", "colour in the class palette", "opaque BGRA palette colours"])
def test_a_mask_in_every_usual_layout_reads_as_its_class_indices(tmp_path, layout):
    path = tmp_path / "m.png"
    if layout == "8-bit gray":
        cv.imwrite(str(path), MASK)
    elif layout == "16-bit":
        cv.imwrite(str(path), MASK.astype(np.uint16))
    elif layout.startswith("palette"):
        write_palette_png(path, MASK, bits=2 if "2-bit" in layout else 8)
        if "transparency" in layout:               # VOC files carry none, but editors add a tRNS chunk
            from PIL import Image
            image = Image.open(path)
            image.save(path, transparency=0)
    elif layout == "3 equal channels":
        cv.imwrite(str(path), np.repeat(MASK[:, :, None], 3, axis=2))
    elif layout == "colour in the class palette":
        cv.imwrite(str(path), data.colorize_mask(MASK))
    else:
        cv.imwrite(str(path), np.dstack([data.colorize_mask(MASK), np.full(MASK.shape, 255, np.uint8)]))
    mask = data.load_mask(path, 4)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, MASK)


def test_a_palette_mask_with_voc_void_pixels_names_the_value(tmp_path):
    indices = MASK.copy()
    indices[0, 0] = 255                                   # VOC marks object borders 255 ("void")
    write_palette_png(tmp_path / "m.png", indices, VOC_COLORS + [(0, 0, 0)] * 251 + [(224, 224, 192)])
    with pytest.raises(DatasetError, match=r"mask values \[255\] outside 0..3"):
        data.load_mask(tmp_path / "m.png", 4)


@pytest.mark.parametrize("layout,found", [
    ("colour photo", "a colour image whose colours are not the class palette"),
    ("16-bit colour", "a 16-bit colour image"),
    ("float", "float32 pixels"),
    ("transparent", "4 channels (colour with transparency)"),
    ("jpeg", "a JPEG file"),
])
def test_a_mask_of_any_other_layout_is_refused_saying_what_was_found(tmp_path, layout, found):
    path = tmp_path / "m.png"
    colour = data.colorize_mask(MASK)
    if layout == "colour photo":
        colour = colour.copy()
        colour[0, 0] = (10, 200, 30)
        cv.imwrite(str(path), colour)
    elif layout == "16-bit colour":
        cv.imwrite(str(path), colour.astype(np.uint16))
    elif layout == "float":
        ok, encoded = cv.imencode(".tiff", MASK.astype(np.float32))
        path.write_bytes(encoded.tobytes())
    elif layout == "transparent":
        cv.imwrite(str(path), np.dstack([colour, np.full(MASK.shape, 100, np.uint8)]))
    else:
        ok, encoded = cv.imencode(".jpg", MASK)
        path.write_bytes(encoded.tobytes())
    with pytest.raises(DatasetError) as caught:
        data.load_mask(path, 4)
    (problem_path, reason), = caught.value.problems
    assert problem_path == str(path) and found in reason, reason


def test_a_colour_mask_outside_the_palette_is_no_longer_a_puzzle_of_values(tmp_path):
    """The old read took channel 0 of a colour mask: squares gave "values [128]", circles became background."""
    path = tmp_path / "m.png"
    colour = data.colorize_mask(MASK)
    colour[1, 1] = (0, 0, 200)
    cv.imwrite(str(path), colour)
    with pytest.raises(DatasetError) as caught:
        data.load_mask(path, 4)
    reason = caught.value.problems[0][1]
    assert "[128]" not in reason and "colour image" in reason and "(200, 0, 0) (RGB)" in reason


def jpeg_bytes(image):
    ok, encoded = cv.imencode(".jpg", image)
    return encoded.tobytes()


@pytest.mark.parametrize("content", ["JPEG with data after its end", "PNG named .jpg", "JPEG with a scan after its end",
                                     "JPEG padded with zeros"])
def test_an_image_opencv_decodes_is_read_in_training_as_by_predict(tmp_path, content):
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path = tmp_path / "0.jpg"
    if content == "PNG named .jpg":
        ok, encoded = cv.imencode(".png", image)
        path.write_bytes(encoded.tobytes())
    else:
        trailer = {"JPEG with data after its end": b"camera maker's notes",
                   "JPEG with a scan after its end": b"\xff\xda\x00\x08junk without an end",
                   "JPEG padded with zeros": bytes(100)}[content]
        path.write_bytes(jpeg_bytes(image) + trailer)
    expected = cv.imread(str(path))
    np.testing.assert_array_equal(data.read_bgr(path), expected)
    assert data.load_image(path, SIZE).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("content", ["JPEG", "progressive JPEG", "PNG", "PNG named .jpg"])
def test_a_truncated_image_is_still_found_whatever_its_name(tmp_path, content):
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    if content.startswith("PNG"):
        encoded = cv.imencode(".png", image)[1].tobytes()
    else:
        params = [cv.IMWRITE_JPEG_PROGRESSIVE, 1] if content == "progressive JPEG" else []
        encoded = cv.imencode(".jpg", image, params)[1].tobytes()
    path = tmp_path / ("0.jpg" if content.endswith(("JPEG", ".jpg")) else "0.png")
    path.write_bytes(encoded[:len(encoded) * 2 // 3])
    with pytest.raises(DatasetError, match="truncated"):
        data.read_bgr(path)
