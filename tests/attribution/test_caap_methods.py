"""CAAP by attribution patching: verified patches and the Attributor option."""

import pytest
import torch

from vitlens_patch.attribution.caap import CAAP, caap


def test_caap_attribution_and_verified_patches(tiny_model, tiny_pair):
    clean, _ = tiny_pair
    exact = caap(tiny_model, clean, layers=(0, 2), progress=False)
    maps, mask = caap(tiny_model, clean, layers=(0, 2), method="attribution", verify_top_k=3, return_exact=True,
                      progress=False)
    assert maps.shape == exact.shape == mask.shape
    assert mask.flatten(1).sum(1).tolist() == [3, 3]
    torch.testing.assert_close(maps[mask], exact[mask])
    attributor = CAAP(tiny_model, layers=(0, 2), method="attribution", progress=False)
    assert attributor.requires_gradients
    torch.testing.assert_close(
        attributor.attribute(clean), caap(tiny_model, clean, layers=(0, 2), method="attribution", progress=False)
    )


def test_caap_attributor_rejects_an_unknown_method(tiny_model):
    with pytest.raises(ValueError, match=r"method must be one of \('exact', 'attribution'\), got 'fast'"):
        CAAP(tiny_model, method="fast")
