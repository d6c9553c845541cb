"""The seed's two Keras models, as the blog post writes them, with the channel width as a parameter.

Used by the test suite (tests/test_unet_vs_keras.py: same numbers as minitensor) and by the
benchmark (the TensorFlow side). Only the width (``base_filters``), the class count and the
dtype are parameters; layer names, kernel sizes, paddings and crops are the seed's.
"""
from functools import reduce


def compose(*funcs):
    if funcs:
        return reduce(lambda f, g: lambda *a, **kw: g(f(*a, **kw)), funcs)
    raise ValueError("Composition of empty sequence not supported.")


def keras_unet(input_shape=(572, 572, 3), num_classes=21, base_filters=64, dtype="float32", crops=(88, 40, 16, 4)):
    import keras

    f = base_filters

    def conv(filters, name, kernel=(3, 3), padding="valid", activation="relu"):
        return keras.layers.Conv2D(filters, kernel, (1, 1), padding, activation=activation, name=name, dtype=dtype)

    def pool(name):
        return keras.layers.MaxPool2D((2, 2), name=name, dtype=dtype)

    def up(name):
        return keras.layers.UpSampling2D((2, 2), name=name, dtype=dtype)

    input_tensor = keras.layers.Input(shape=input_shape, name="input", dtype=dtype)
    x1 = compose(conv(f, "encoder_conv1_1"), conv(f, "encoder_conv1_2"))(input_tensor)
    x2 = compose(pool("encoder_maxpool1"), conv(2 * f, "encoder_conv2_1"), conv(2 * f, "encoder_conv2_2"))(x1)
    x3 = compose(pool("encoder_maxpool2"), conv(4 * f, "encoder_conv3_1"), conv(4 * f, "encoder_conv3_2"))(x2)
    x4 = compose(pool("encoder_maxpool3"), conv(8 * f, "encoder_conv4_1"), conv(8 * f, "encoder_conv4_2"))(x3)
    x5 = compose(pool("encoder_maxpool4"), conv(16 * f, "encoder_conv5_1"), conv(16 * f, "encoder_conv5_2"))(x4)

    crop1 = keras.layers.Cropping2D(((crops[0],) * 2, (crops[0],) * 2), name="crop1", dtype=dtype)(x1)
    crop2 = keras.layers.Cropping2D(((crops[1],) * 2, (crops[1],) * 2), name="crop2", dtype=dtype)(x2)
    crop3 = keras.layers.Cropping2D(((crops[2],) * 2, (crops[2],) * 2), name="crop3", dtype=dtype)(x3)
    crop4 = keras.layers.Cropping2D(((crops[3],) * 2, (crops[3],) * 2), name="crop4", dtype=dtype)(x4)

    y4 = up("decoder_upsampling4")(x5)
    concatenate4 = keras.layers.Concatenate(name="decoder_concatenate4", dtype=dtype)([crop4, y4])
    y3 = compose(conv(8 * f, "decoder_conv4_1"), conv(8 * f, "decoder_conv4_2"), up("decoder_upsampling3"))(concatenate4)
    concatenate3 = keras.layers.Concatenate(name="decoder_concatenate3", dtype=dtype)([crop3, y3])
    y2 = compose(conv(4 * f, "decoder_conv3_1"), conv(4 * f, "decoder_conv3_2"), up("decoder_upsampling2"))(concatenate3)
    concatenate2 = keras.layers.Concatenate(name="decoder_concatenate2", dtype=dtype)([crop2, y2])
    y1 = compose(conv(2 * f, "decoder_conv2_1"), conv(2 * f, "decoder_conv2_2"), up("decoder_upsampling1"))(concatenate2)
    concatenate1 = keras.layers.Concatenate(name="decoder_concatenate1", dtype=dtype)([crop1, y1])
    y0 = compose(conv(f, "decoder_conv1_1"), conv(f, "decoder_conv1_2"))(concatenate1)
    output = conv(num_classes, "conv_softmax", kernel=(1, 1), padding="same", activation="softmax")(y0)
    return keras.Model(input_tensor, output, name="UNet")


def keras_small_unet(input_shape=(128, 128, 3), num_classes=4, base_filters=32, dtype="float32"):
    import keras

    f = base_filters

    def conv(filters, name, kernel=(3, 3), activation="relu"):
        return keras.layers.Conv2D(filters, kernel, (1, 1), "same", activation=activation, name=name, dtype=dtype)

    def pool(name):
        return keras.layers.MaxPool2D((2, 2), name=name, dtype=dtype)

    def up(name):
        return keras.layers.UpSampling2D((2, 2), name=name, dtype=dtype)

    input_tensor = keras.layers.Input(shape=input_shape, name="input", dtype=dtype)
    x1 = compose(conv(f, "encoder_conv1_1"), conv(f, "encoder_conv1_2"))(input_tensor)
    x2 = compose(pool("encoder_maxpool1"), conv(f, "encoder_conv2_1"), conv(f, "encoder_conv2_2"))(x1)
    x3 = compose(pool("encoder_maxpool2"), conv(2 * f, "encoder_conv3_1"), conv(2 * f, "encoder_conv3_2"))(x2)
    x4 = compose(pool("encoder_maxpool3"), conv(4 * f, "encoder_conv4_1"), conv(4 * f, "encoder_conv4_2"))(x3)
    x5 = compose(pool("encoder_maxpool4"), conv(8 * f, "encoder_conv5_1"), conv(8 * f, "encoder_conv5_2"))(x4)

    y4 = up("decoder_upsampling4")(x5)
    concatenate4 = keras.layers.Concatenate(name="decoder_concatenate4", dtype=dtype)([x4, y4])
    y3 = compose(conv(4 * f, "decoder_conv4_1"), conv(4 * f, "decoder_conv4_2"), up("decoder_upsampling3"))(concatenate4)
    concatenate3 = keras.layers.Concatenate(name="decoder_concatenate3", dtype=dtype)([x3, y3])
    y2 = compose(conv(2 * f, "decoder_conv3_1"), conv(2 * f, "decoder_conv3_2"), up("decoder_upsampling2"))(concatenate3)
    concatenate2 = keras.layers.Concatenate(name="decoder_concatenate2", dtype=dtype)([x2, y2])
    y1 = compose(conv(f, "decoder_conv2_1"), conv(f, "decoder_conv2_2"), up("decoder_upsampling1"))(concatenate2)
    concatenate1 = keras.layers.Concatenate(name="decoder_concatenate1", dtype=dtype)([x1, y1])
    y0 = compose(conv(f, "decoder_conv1_1"), conv(f, "decoder_conv1_2"))(concatenate1)
    output = conv(num_classes, "conv_softmax", kernel=(1, 1), activation="softmax")(y0)
    return keras.Model(input_tensor, output, name="Small_UNet")
