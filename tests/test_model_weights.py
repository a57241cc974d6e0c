"""The seed profile's ImageNet weights: found in a configured folder or Keras' cache under the
standard Keras file names, or a clear error when neither has them and downloading is off."""
from __future__ import annotations

import numpy as np
import pytest

from shoplens.vision import backbones, weights
from shoplens.config import Settings


def test_missing_weights_fail_with_a_message_that_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    settings = Settings().with_overrides(model_profile="seed", model_weights_dir=str(tmp_path))
    with pytest.raises(weights.WeightsUnavailable) as err:
        backbones.member("mobilenetv3large").build(32, settings)
    message = str(err.value)
    assert "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5" in message
    assert str(tmp_path) in message and "SHOPLENS_MODEL_WEIGHTS_DIR" in message


def test_download_is_only_requested_when_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    allowed = Settings().with_overrides(model_weights_download=True)
    assert weights.resolve("resnet50", allowed) == "imagenet"
    assert weights.resolve("resnet50", Settings().with_overrides(model_init="random")) is None


def test_a_standard_weights_file_in_the_configured_folder_initialises_the_backbone(tmp_path, monkeypatch):
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    # Stand-in for the downloaded file: same architecture, same legacy-HDF5 layout, known values.
    keras.utils.set_random_seed(3)
    donor = keras.applications.MobileNetV3Large(input_shape=(32, 32, 3), include_top=False,
                                                weights=None, pooling="avg")
    path = tmp_path / weights.KERAS_WEIGHT_FILES["mobilenetv3large"]
    donor.save(path)  # .h5: Keras' legacy format, the one the published weight files use
    settings = Settings().with_overrides(model_profile="seed", model_weights_dir=str(tmp_path))

    keras.utils.set_random_seed(4)  # a different random init, so equality proves the load
    built = backbones.member("mobilenetv3large").build(32, settings)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(built.predict(x, verbose=0), donor.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_keras_cache_is_used_when_no_folder_is_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / weights.KERAS_WEIGHT_FILES["vgg19"]
    target.write_bytes(b"placeholder: only the lookup is tested here")
    assert weights.resolve("vgg19", Settings()) == str(target)
