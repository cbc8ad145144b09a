"""Shared fixtures: tiny random models built the way users build them."""

import os
from pathlib import Path

import jaxtyping
import pytest
import timm
import torch

# Runtime shape and type checks on every vitlens_patch function and dataclass (jaxtyping + beartype),
# installed before the package is first imported; VITLENS_SHAPE_CHECKS=0 turns them off.
if os.environ.get("VITLENS_SHAPE_CHECKS", "1") == "1":
    # is_pep484_tower: an int is a valid float, as PEP 484 says
    jaxtyping.install_import_hook("vitlens_patch", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

from vitlens_patch.model import HookedViT  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: no oversubscription on 2 cores


@pytest.fixture
def without_type_checks():
    """Switch the runtime checks off, for tests that pass a wrongly typed argument on purpose to
    check the package's own ``ValueError`` (what a user without the checks sees)."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


def tiny_timm_vit(**overrides) -> torch.nn.Module:
    """A 2-layer, d_model 32 timm VisionTransformer on 32x32 images, patch 8, in eval mode."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(**kwargs).eval()


@pytest.fixture
def tiny_model() -> HookedViT:
    return HookedViT.from_timm(tiny_timm_vit())


@pytest.fixture
def tiny_images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """Two clean images and a noisy corruption of them: [2, 3, 32, 32] each."""
    generator = torch.Generator().manual_seed(3)
    clean = torch.randn(2, 3, 32, 32, generator=generator)
    return clean, clean + 1.5 * torch.randn(2, 3, 32, 32, generator=generator)


@pytest.fixture(scope="session")
def chromium():
    """The system Chromium, headless, driven by Playwright (see tests/browser.py)."""
    from playwright.sync_api import sync_playwright

    from tests.browser import launch_chromium

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def browser_artifacts(tmp_path_factory) -> Path:
    """Folder for screenshots: $VITLENS_ARTIFACTS, else <pytest basetemp>/artifacts."""
    folder = Path(os.environ.get("VITLENS_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser_page(chromium, browser_artifacts):
    """A fresh page (1280x900) that records console errors, page errors and external requests."""
    from tests.browser import BrowserPage

    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = BrowserPage(context.new_page(), browser_artifacts)
    yield page
    context.close()
