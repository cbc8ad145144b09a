"""The random map."""

import torch

from vitlens_patch.attribution import RandomAttribution


def test_random_maps_are_seeded_uniform_noise(tiny_model, tiny_images):
    maps = RandomAttribution(tiny_model, seed=3).attribute(tiny_images)
    torch.testing.assert_close(maps, RandomAttribution(tiny_model, seed=3).attribute(tiny_images, 7))
    assert not torch.equal(maps, RandomAttribution(tiny_model, seed=4).attribute(tiny_images))
    assert ((maps >= 0) & (maps < 1)).all()
    assert len(maps.flatten().unique()) == maps.numel()


def test_random_maps_do_not_call_the_model(tiny_model, tiny_images, monkeypatch):
    monkeypatch.setattr(tiny_model, "forward", None)
    assert RandomAttribution(tiny_model).attribute(tiny_images).shape == (3, 4, 4)
