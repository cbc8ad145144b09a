"""A tiny timm ViT, as deep as the test module's N_LAYERS, shared by the recipe tests."""

import pytest

from tests.conftest import tiny_timm_vit
from vitlens_patch.model import HookedViT


@pytest.fixture(scope="module")
def model(request) -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit(depth=request.module.N_LAYERS))
