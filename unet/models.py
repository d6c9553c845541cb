"""The post's two U-Nets, written on minitensor line for line like its Keras code.

* ``unet``: the 2015 paper's network: 'valid' 3x3 convolutions (each shrinks the map by 2 px),
  so the encoder's maps are larger than the decoder's and are cropped before each skip
  concatenation (88/40/16/4 px per side at 572x572); 572x572 in, 388x388 out; ~31M parameters.
* ``small_unet``: the post's Shape-dataset network: 'same' convolutions, no crops, 32..256
  channels, 4 classes.

``base_filters`` scales every channel count (64 -> 64, 128, ..., 1024 for ``unet``), so tests and
learners can run a narrow copy of exactly the same wiring.

The two builders repeat the post's encoder/decoder ladder instead of sharing one loop, on purpose:
each reads next to the post's Keras function line for line (bench/keras_seed.py is that Keras code,
its own ``compose`` included, kept as the post wrote it so the comparison tests build the post's
model, not ours), and tests/test_unet_vs_keras.py holds them to each other weight by weight.
"""
from __future__ import annotations

from functools import reduce

from minitensor import Concatenate, Conv2D, Cropping2D, Input, MaxPool2D, Model, UpSampling2D


def compose(*funcs):
    """compose(f, g, h)(x) == h(g(f(x))), as in the seed."""
    if not funcs:
        raise ValueError("Composition of empty sequence not supported.")
    return reduce(lambda f, g: lambda *a, **kw: g(f(*a, **kw)), funcs)


def _check_input_shape(input_shape):
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be (height, width, channels) with positive ints, got {input_shape!r}")
    return shape


# ----- which input sizes line up -----------------------------------------------------------

def valid_unet_sizes(size):
    """Per-stage sizes of the 'valid' U-Net for one spatial side, or None if the skips cannot line up.

    Every 3x3 'valid' conv removes 2 px, every pool halves (and must divide exactly, or the
    upsampled decoder map and the cropped encoder map would differ by one pixel).
    Returns (encoder sizes [x1..x4], bottom size x5, decoder sizes after each up-conv block, crops).
    """
    encoder = []
    current = size - 4                          # encoder_conv*_1 and *_2
    for _ in range(4):
        if current <= 0 or current % 2:
            return None
        encoder.append(current)
        current = current // 2 - 4              # pool, then two valid convs
    if current <= 0:
        return None
    bottom, decoder, crops = current, [], []
    upsampled = 2 * bottom
    for skip in reversed(encoder):
        margin = skip - upsampled
        if margin < 0 or margin % 2:
            return None
        crops.append(margin // 2)
        current = upsampled - 4                 # decoder_conv*_1 and *_2
        if current <= 0:
            return None
        decoder.append(current)
        upsampled = 2 * current
    return encoder, bottom, decoder, crops[::-1]   # crops ordered crop1..crop4


def nearest_valid_sizes(size, is_valid, count=2, search=4096):
    """The closest sizes (below and above) for which ``is_valid(size)`` holds."""
    below = [s for s in range(size - 1, 0, -1) if is_valid(s)][:count]
    above = [s for s in range(size + 1, size + search) if is_valid(s)][:count]
    return sorted(below + above, key=lambda s: (abs(s - size), s))[:count * 2]


def _reject_size(model_name, side_name, size, is_valid, rule):
    sizes = sorted(nearest_valid_sizes(size, is_valid))
    raise ValueError(
        f"{model_name}: an input {side_name} of {size} px does not fit: {rule}. "
        f"Nearest valid sizes: {', '.join(map(str, sizes))}"
    )


# ----- the two models ------------------------------------------------------------------------

def unet(input_shape=(572, 572, 3), num_classes=21, base_filters=64, dtype="float32"):
    """The original U-Net of the seed (and of Ronneberger et al. 2015).

    Args:
        input_shape: (H, W, C); H and W must be sizes for which the skip connections line up
            (572, 556, 540, ... for 'valid' convolutions: 16 px apart).
        num_classes: channels of the softmax output (21 in the seed).
        base_filters: channels of the first block; later blocks use 2x, 4x, 8x, 16x.
    Returns:
        A Model named 'UNet' with output (H - 184, W - 184, num_classes) (388 for 572).
    """
    input_shape = _check_input_shape(input_shape)
    crops = []
    for side_name, size in zip(("height", "width"), input_shape[:2]):
        stages = valid_unet_sizes(size)
        if stages is None:
            _reject_size("unet", side_name, size, lambda s: valid_unet_sizes(s) is not None,
                         "with 'valid' 3x3 convolutions every max-pool input must be even and every decoder map "
                         "must fit inside its skip connection")
        crops.append(stages[3])
    # Cropping2D per skip: ((top, bottom), (left, right)), computed from the sizes, not hard-coded.
    crop = [((crops[0][i], crops[0][i]), (crops[1][i], crops[1][i])) for i in range(4)]
    f = base_filters

    def conv(filters, name, kernel=(3, 3), padding="valid", activation="relu"):
        return Conv2D(filters, kernel, (1, 1), padding, activation=activation, name=name, dtype=dtype)

    input_tensor = Input(shape=input_shape, name="input", dtype=dtype)
    x = input_tensor

    x1 = compose(conv(f, "encoder_conv1_1"), conv(f, "encoder_conv1_2"))(x)
    x2 = compose(MaxPool2D((2, 2), name="encoder_maxpool1", dtype=dtype),
                 conv(2 * f, "encoder_conv2_1"), conv(2 * f, "encoder_conv2_2"))(x1)
    x3 = compose(MaxPool2D((2, 2), name="encoder_maxpool2", dtype=dtype),
                 conv(4 * f, "encoder_conv3_1"), conv(4 * f, "encoder_conv3_2"))(x2)
    x4 = compose(MaxPool2D((2, 2), name="encoder_maxpool3", dtype=dtype),
                 conv(8 * f, "encoder_conv4_1"), conv(8 * f, "encoder_conv4_2"))(x3)
    x5 = compose(MaxPool2D((2, 2), name="encoder_maxpool4", dtype=dtype),
                 conv(16 * f, "encoder_conv5_1"), conv(16 * f, "encoder_conv5_2"))(x4)

    crop1 = Cropping2D(crop[0], name="crop1", dtype=dtype)(x1)
    crop2 = Cropping2D(crop[1], name="crop2", dtype=dtype)(x2)
    crop3 = Cropping2D(crop[2], name="crop3", dtype=dtype)(x3)
    crop4 = Cropping2D(crop[3], name="crop4", dtype=dtype)(x4)

    y4 = UpSampling2D((2, 2), name="decoder_upsampling4", dtype=dtype)(x5)
    concatenate4 = Concatenate(name="decoder_concatenate4", dtype=dtype)([crop4, y4])
    y3 = compose(conv(8 * f, "decoder_conv4_1"), conv(8 * f, "decoder_conv4_2"),
                 UpSampling2D((2, 2), name="decoder_upsampling3", dtype=dtype))(concatenate4)
    concatenate3 = Concatenate(name="decoder_concatenate3", dtype=dtype)([crop3, y3])
    y2 = compose(conv(4 * f, "decoder_conv3_1"), conv(4 * f, "decoder_conv3_2"),
                 UpSampling2D((2, 2), name="decoder_upsampling2", dtype=dtype))(concatenate3)
    concatenate2 = Concatenate(name="decoder_concatenate2", dtype=dtype)([crop2, y2])
    y1 = compose(conv(2 * f, "decoder_conv2_1"), conv(2 * f, "decoder_conv2_2"),
                 UpSampling2D((2, 2), name="decoder_upsampling1", dtype=dtype))(concatenate2)
    concatenate1 = Concatenate(name="decoder_concatenate1", dtype=dtype)([crop1, y1])
    y0 = compose(conv(f, "decoder_conv1_1"), conv(f, "decoder_conv1_2"))(concatenate1)

    output = conv(num_classes, "conv_softmax", kernel=(1, 1), padding="same", activation="softmax")(y0)
    return Model(input_tensor, output, name="UNet")


def small_unet(input_shape=(128, 128, 3), num_classes=4, base_filters=32, dtype="float32"):
    """The post's small U-Net for the Shape dataset: 'same' convolutions, no crops.

    Args:
        input_shape: (H, W, C) with H and W multiples of 16 (four 2x poolings, then four 2x
            upsamplings that must land on the encoder's sizes again).
        num_classes: output channels (4: background, circle, triangle, square).
        base_filters: channels of the first block (32); the blocks use 1x, 1x, 2x, 4x, 8x.
    Returns:
        A Model named 'Small_UNet' with output (H, W, num_classes).
    """
    input_shape = _check_input_shape(input_shape)
    for side_name, size in zip(("height", "width"), input_shape[:2]):
        if size % 16:
            _reject_size("small_unet", side_name, size, lambda s: s % 16 == 0,
                         "four 2x max-pools need a multiple of 16")
    f = base_filters

    def conv(filters, name, kernel=(3, 3), activation="relu"):
        return Conv2D(filters, kernel, (1, 1), "same", activation=activation, name=name, dtype=dtype)

    input_tensor = Input(shape=input_shape, name="input", dtype=dtype)
    x = input_tensor

    x1 = compose(conv(f, "encoder_conv1_1"), conv(f, "encoder_conv1_2"))(x)
    x2 = compose(MaxPool2D((2, 2), name="encoder_maxpool1", dtype=dtype),
                 conv(f, "encoder_conv2_1"), conv(f, "encoder_conv2_2"))(x1)
    x3 = compose(MaxPool2D((2, 2), name="encoder_maxpool2", dtype=dtype),
                 conv(2 * f, "encoder_conv3_1"), conv(2 * f, "encoder_conv3_2"))(x2)
    x4 = compose(MaxPool2D((2, 2), name="encoder_maxpool3", dtype=dtype),
                 conv(4 * f, "encoder_conv4_1"), conv(4 * f, "encoder_conv4_2"))(x3)
    x5 = compose(MaxPool2D((2, 2), name="encoder_maxpool4", dtype=dtype),
                 conv(8 * f, "encoder_conv5_1"), conv(8 * f, "encoder_conv5_2"))(x4)

    y4 = UpSampling2D((2, 2), name="decoder_upsampling4", dtype=dtype)(x5)
    concatenate4 = Concatenate(name="decoder_concatenate4", dtype=dtype)([x4, y4])
    y3 = compose(conv(4 * f, "decoder_conv4_1"), conv(4 * f, "decoder_conv4_2"),
                 UpSampling2D((2, 2), name="decoder_upsampling3", dtype=dtype))(concatenate4)
    concatenate3 = Concatenate(name="decoder_concatenate3", dtype=dtype)([x3, y3])
    y2 = compose(conv(2 * f, "decoder_conv3_1"), conv(2 * f, "decoder_conv3_2"),
                 UpSampling2D((2, 2), name="decoder_upsampling2", dtype=dtype))(concatenate3)
    concatenate2 = Concatenate(name="decoder_concatenate2", dtype=dtype)([x2, y2])
    y1 = compose(conv(f, "decoder_conv2_1"), conv(f, "decoder_conv2_2"),
                 UpSampling2D((2, 2), name="decoder_upsampling1", dtype=dtype))(concatenate2)
    concatenate1 = Concatenate(name="decoder_concatenate1", dtype=dtype)([x1, y1])
    y0 = compose(conv(f, "decoder_conv1_1"), conv(f, "decoder_conv1_2"))(concatenate1)

    output = conv(num_classes, "conv_softmax", kernel=(1, 1), activation="softmax")(y0)
    return Model(input_tensor, output, name="Small_UNet")
