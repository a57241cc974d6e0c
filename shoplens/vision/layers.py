"""Custom Keras layers that saved member models need (registered so .keras files reload)."""
from __future__ import annotations

import keras

# ImageNet channel means in BGR order, as the Caffe-trained VGG/ResNet weights expect.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="shoplens")
class CaffePreprocess(keras.layers.Layer):
    """RGB [0, 255] -> BGR minus the ImageNet mean: keras.applications' 'caffe' preprocessing
    as a layer, so that a saved model takes plain RGB photos."""

    def call(self, inputs):
        bgr = keras.ops.flip(inputs, axis=-1)
        return bgr - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=inputs.dtype)
