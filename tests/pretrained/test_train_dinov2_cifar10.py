"""The DINOv2 fine-tuning script: which keys are trained, warm starts, argument checks."""

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_timm_vit
from vitlens_patch.pretrained.dinov2 import is_trained_key
from vitlens_patch.pretrained.train_dinov2_cifar10 import forward_frozen, forward_trained, initial_weights, load_trained, main


def test_trained_keys_are_the_last_blocks_the_final_norm_and_the_head():
    assert [is_trained_key(key, 7) for key in ("blocks.6.mlp.fc1.weight", "blocks.7.mlp.fc1.weight")] == [False, True]
    assert is_trained_key("norm.weight", 7) and is_trained_key("head.bias", 7)
    assert not is_trained_key("pos_embed", 7) and not is_trained_key("patch_embed.proj.weight", 7)


def test_frozen_then_trained_forward_is_the_model_forward():
    model = tiny_timm_vit()
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(forward_trained(model, forward_frozen(model, inputs, 1), 1), model(inputs))


def test_warm_start_from_fewer_trained_blocks_and_refusal_of_frozen_keys():
    model, source = tiny_timm_vit(), tiny_timm_vit(depth=2)
    torch.nn.init.ones_(source.head.weight)
    load_trained(model, {key: value for key, value in source.state_dict().items() if is_trained_key(key, 1)}, 0)
    assert torch.equal(model.head.weight, source.head.weight)
    with pytest.raises(ValueError, match=r"checkpoint holds keys outside the trained part: \['blocks.0.norm1.weight'\]"):
        load_trained(model, {"blocks.0.norm1.weight": torch.ones(32)}, 1)


def test_first_trained_block_must_be_a_block(capsys):
    with pytest.raises(SystemExit):
        main(["--first-trained-block", "12"])
    assert "--first-trained-block must be in [0, 11], got 12" in capsys.readouterr().err


def test_init_from_reads_a_checkpoint_or_an_exported_float16_part(tmp_path):
    trained = {"head.weight": torch.randn(10, 32, generator=torch.Generator().manual_seed(0))}
    torch.save({"trained": trained, "step": 3}, tmp_path / "checkpoint.pt")
    save_file({key: value.half() for key, value in trained.items()}, tmp_path / "part.safetensors")
    assert torch.equal(initial_weights(tmp_path / "checkpoint.pt")["head.weight"], trained["head.weight"])
    exported = initial_weights(tmp_path / "part.safetensors")["head.weight"]
    assert exported.dtype == torch.float32 and torch.equal(exported, trained["head.weight"].half().float())
