"""HookedViT: a Vision Transformer whose every activation is a TransformerLens hook point."""

from __future__ import annotations

import dataclasses
import difflib
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from vitlens_patch import checks
from vitlens_patch.model.components import (
    AttentionPool,
    ClassifierHead,
    PatchEmbed,
    PosEmbed,
    PrefixTokens,
    TransformerBlock,
    ZeroShotHead,
    pool_tokens,
    make_norm,
    pooled_features,
)
from vitlens_patch.model.config import ViTConfig
from vitlens_patch.model.preprocess import DataConfig


class HookedViT(HookedRootModule):
    """A ViT classifier (or backbone) with TransformerLens hook points.

    Forward: images [batch, channel, height, width] (normalised, see ``preprocess``) ->
    logits [batch, n_classes]; a backbone without a classifier (``cfg.n_classes == 0``) returns
    its features instead, exactly what timm returns for it: the pooled vector [batch, d_pooled]
    (distilled: the mean of class and distillation token), or every token [batch, pos, d_model]
    when ``cfg.pooling == "none"``. ``with_head`` attaches a classifier. Token order: prefix tokens (class, distillation, registers), then
    patches row-major; patch p is token ``cfg.n_prefix_tokens + p`` at grid cell
    ``divmod(p, cfg.grid_size[1])``.

    Hook points (shapes):
        embed.hook_stem         [batch, stem_channels, feature_h, feature_w]  CNN stem output (hybrids)
        embed.ln.hook_*         [batch, n_patches, ...]      only when cfg.embed_norm (AIMv2)
        hook_embed              [batch, n_patches, d_model]  patch embeddings
        hook_pos_embed          [batch, pos, d_model]        position embeddings added
        hook_full_embed         [batch, pos, d_model]        tokens + positions (prefix included);
                                                             a hook may return fewer tokens
        ln_pre.hook_*           [batch, pos, ...]            only when cfg.pre_norm (CLIP)
        blocks.{i}.hook_resid_pre / hook_resid_mid / hook_resid_post   [batch, pos, d_model]
        blocks.{i}.ln1/ln2.hook_scale [batch, pos, 1], .hook_normalized [batch, pos, d_model]
        blocks.{i}.attn.hook_q/k/v/z                         [batch, pos, head, d_head]
                                                             (q, k after qk-norm and rotary)
        blocks.{i}.attn.ln.hook_*    [batch, pos, head * d_head]  only when cfg.attn_norm
        blocks.{i}.attn.hook_attn_scores / hook_pattern      [batch, head, query_pos, key_pos]
                                                             (scores: scaled, plus the relative
                                                             position bias when cfg.n_relative_positions)
        blocks.{i}.attn.hook_result                          [batch, pos, head, d_model]
                                                             (after set_use_attn_result(True))
        blocks.{i}.hook_attn_out / hook_mlp_out              [batch, pos, d_model]
        blocks.{i}.mlp.hook_pre / hook_post                  [batch, pos, d_mlp]
        blocks.{i}.mlp.hook_pre_linear                       [batch, pos, d_mlp]  (cfg.gated_mlp:
                                                             hook_pre is the gate, hook_post the product)
        blocks.{i}.mlp.ln.hook_*                             [batch, pos, d_mlp]  only when cfg.mlp_norm
        ln_final.hook_normalized  [batch, pos, d_model] ([batch, d_model] if final_norm="pooled")
        attn_pool.hook_q / hook_z    [batch, 1, head, d_head]   only when cfg.pooling == "map":
        attn_pool.hook_k / hook_v    [batch, key_pos, head, d_head]   the latent query attends
        attn_pool.hook_attn_scores / hook_pattern  [batch, head, 1, key_pos]   over the tokens
        attn_pool.hook_attn_out / hook_mlp_out, attn_pool.ln.hook_normalized   [batch, d_model]
        attn_pool.mlp.hook_pre / hook_post   [batch, d_mlp]
        hook_pooled             [batch, d_pooled]  ([batch, 2, d_model] for distilled models,
                                                    [batch, pos, d_model] for pooling="none")
        hook_logits             [batch, n_classes]  (the features, when there is no classifier)

    Loaders: ``HookedViT.from_timm`` and ``HookedViT.from_hf`` build the model on the meta device
    (``with torch.device("meta")``: no memory, no random initialisation) and assign the converted
    weights; built anywhere else the model is randomly initialised by ``init_weights``.
    ``data_config`` holds the preprocessing the weights expect; ``class_names`` the label of each
    logit when known; ``stem`` is the CNN stem module of a hybrid model (``cfg.stem_channels`` >
    0, see ``PatchEmbed``), None otherwise.
    """

    def __init__(
        self,
        cfg: ViTConfig,
        data_config: DataConfig | None = None,
        class_names: tuple[str, ...] | None = None,
        stem: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.data_config = data_config or DataConfig(input_size=(cfg.in_chans, *cfg.img_size))
        self.class_names = tuple(class_names) if class_names is not None else None
        self.embed = PatchEmbed(cfg, stem)
        self.hook_embed = HookPoint()  # [batch, n_patches, d_model]
        self.prefix_tokens = PrefixTokens(cfg)
        self.pos_embed = PosEmbed(cfg)
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.hook_full_embed = HookPoint()  # [batch, pos, d_model]
        self.ln_pre = make_norm(cfg, cfg.d_model) if cfg.pre_norm else None
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = make_norm(cfg, cfg.d_model) if cfg.final_norm != "none" else None
        self.attn_pool = AttentionPool(cfg) if cfg.pooling == "map" else None
        self.hook_pooled = HookPoint()  # [batch, d_model] ([batch, 2, d_model] distilled)
        self.head = ClassifierHead(cfg) if cfg.n_classes else None
        self.hook_logits = HookPoint()  # [batch, n_classes] (features without a classifier)
        if self.device.type != "meta":  # built on the meta device, a loader assigns the weights next
            self.init_weights()
        self.setup()

    def init_weights(self, seed: int | None = None) -> None:
        """Random init for tests and from-scratch use (truncated normal, std 0.02, as timm)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.startswith("embed.stem."):  # a hybrid's CNN stem comes initialised
                    continue
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("w", "gamma_attn", "gamma_mlp"):
                    param.fill_(1.0)
                elif leaf == "b" or leaf.startswith("b_"):
                    param.zero_()
                else:
                    nn.init.trunc_normal_(param, std=0.02, a=-0.04, b=0.04, generator=generator)

    # ----------------------------------------------------------------- properties and checks
    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.W_E.dtype

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head outputs (``attn.hook_result``); slower, as in TransformerLens.

        Raises:
            ValueError: for a model with a LayerNorm across the heads' outputs (``cfg.attn_norm``),
                whose output is not a sum of per-head terms.
        """
        if use_attn_result and self.cfg.attn_norm:
            raise ValueError("use_attn_result needs per-head outputs; cfg.attn_norm normalises across heads")
        for block in self.blocks:
            block.attn.use_attn_result = use_attn_result

    def _check_device(self, x: Tensor, argument: str) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"{argument} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != self.device:
            raise ValueError(f"{argument} must be on the model's device {self.device}, got {x.device}")
        if not x.is_floating_point():
            raise ValueError(f"{argument} must be a float tensor (see preprocess), got {x.dtype}")
        return x.to(self.dtype)

    def check_images(self, images: Tensor) -> Float[Tensor, "batch channel height width"]:
        """``images`` checked as this model's inputs, in its dtype.

        Raises:
            ValueError: unless ``images`` is a non-empty float tensor [batch, in_chans, height,
                width] at ``cfg.img_size`` (any size of at least one patch with
                ``cfg.dynamic_img_size``) on the model's device.
        """
        dynamic = self.cfg.dynamic_img_size
        images = checks.check_images(images, channels=self.cfg.in_chans, size=None if dynamic else self.cfg.img_size)
        if dynamic and any(size < patch for size, patch in zip(images.shape[2:], self.cfg.patch_size)):
            raise ValueError(
                f"images must be at least one patch {self.cfg.patch_size} high and wide, got {tuple(images.shape)}"
            )
        return self._check_device(images, "images")

    def _check_layer(self, layer: int, argument: str) -> int:
        n_layers = self.cfg.n_layers
        if not isinstance(layer, int) or not -n_layers <= layer <= n_layers:
            raise ValueError(f"{argument} must be an int in [-{n_layers}, {n_layers}], got {layer!r}")
        return layer % n_layers if layer < 0 else layer

    # --------------------------------------------------------------------------- forward
    def embed_tokens(
        self, images: Float[Tensor, "batch channel height width"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """Images -> the residual stream entering block 0."""
        patches = self.hook_embed(self.embed(images))
        grid = (images.shape[2] // self.cfg.patch_size[0], images.shape[3] // self.cfg.patch_size[1])
        pos = self.hook_pos_embed(self.pos_embed(patches, grid))
        tokens = self.hook_full_embed(self.prefix_tokens(patches) + pos)
        return tokens if self.ln_pre is None else self.ln_pre(tokens)

    def forward_head(self, resid: Float[Tensor, "batch pos d_model"]) -> Tensor:
        """Residual stream after the last block -> logits [batch, n_classes] (the features when
        there is no classifier, see the class docstring)."""
        if self.cfg.final_norm == "tokens":
            resid = self.ln_final(resid)
        pooled = pool_tokens(resid, self.cfg) if self.attn_pool is None else self.attn_pool(resid)
        if self.cfg.final_norm == "pooled":
            pooled = self.ln_final(pooled)
        pooled = self.hook_pooled(pooled)
        if isinstance(self.head, ClassifierHead):  # reads both pooled tokens of a distilled model
            return self.hook_logits(self.head(pooled))
        features = pooled_features(pooled, self.cfg)
        return self.hook_logits(features if self.head is None else self.head(features))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one image's features, what ``with_head``'s head reads: (d_pooled,), or
        (pos, d_model) when ``cfg.pooling == "none"``."""
        if self.cfg.pooling == "none":
            return (self.cfg.n_pos, self.cfg.d_model)
        return (self.cfg.d_pooled,)

    # ------------------------------------------------------------------------- heads
    def with_head(self, head: nn.Module, class_names: tuple[str, ...] | None = None) -> "HookedViT":
        """This backbone with ``head`` as its classifier (a linear probe, ``ZeroShotHead``, any module).

        ``head`` maps the features [batch, *feature_shape] (what the model returns without a
        classifier) to logits [batch, n_classes]; it replaces the current classifier, if any. The
        returned HookedViT shares this model's modules (parameters and hook points: a hook added
        to one runs in both) and its data config; its ``cfg.n_classes`` is the head's output
        width, found by one call of ``head`` on zeros. Every tool then works on it unchanged.

        Raises:
            ValueError: if ``head`` is not an ``nn.Module`` or does not return [batch, n_classes].
        """
        if not isinstance(head, nn.Module):
            raise ValueError(f"head must be an nn.Module mapping features to logits, got {type(head).__name__}")
        with torch.no_grad():
            logits = head(torch.zeros(1, *self.feature_shape, device=self.device, dtype=self.dtype))
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != 1 or logits.shape[1] < 1:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"head must map features [batch, {', '.join(map(str, self.feature_shape))}] to logits "
                f"[batch, n_classes], got {got} for a batch of 1"
            )
        headless = dataclasses.replace(self.cfg, n_classes=0)
        with torch.device("meta"):
            model = HookedViT(headless, data_config=self.data_config, class_names=class_names, stem=self.embed.stem)
        for name, module in self.named_children():
            if name not in ("head", "hook_pooled", "hook_logits"):
                setattr(model, name, module)
        model.head = head
        model.cfg = dataclasses.replace(self.cfg, n_classes=logits.shape[1])
        model.setup()
        return model.train(self.training)

    def with_zero_shot_head(
        self,
        text_embeddings: Float[Tensor, "n_classes d_embed"],
        logit_scale: float | Tensor,
        logit_bias: float | Tensor | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> "HookedViT":
        """CLIP / SigLIP zero-shot classifier from one text embedding per class (see ``ZeroShotHead``).

        The model's current output is the image embedding: a tower with a projection (CLIP's
        ``visual_projection``, converted as the classifier) keeps it inside the new head; a tower
        without one uses its features. ``logit_scale`` is the log of the multiplier, as CLIP and
        SigLIP store it; ``logit_bias`` is SigLIP's (None for CLIP).
        """
        head = ZeroShotHead(text_embeddings, logit_scale, logit_bias, projection=self.head)
        return self.with_head(head.to(self.device), class_names)

    def forward(
        self,
        x: Tensor,
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
    ) -> Tensor:
        """Run the model, or part of it (as TransformerLens's ``start_at_layer``/``stop_at_layer``).

        Args:
            x: normalised images [batch, channel, height, width], or with ``start_at_layer=l``
                the residual stream entering block l, [batch, pos, d_model].
            start_at_layer: first block to run (default: embed the images and start at 0).
            stop_at_layer: return the residual stream entering this block instead of logits.

        Returns:
            logits [batch, n_classes], or the residual stream [batch, pos, d_model].
        """
        if start_at_layer is None:
            start, resid = 0, self.embed_tokens(self.check_images(x))
        else:
            start = self._check_layer(start_at_layer, "start_at_layer")
            resid = self._check_device(x, "x")
            if resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model:
                raise ValueError(
                    f"x must be a residual stream [batch, pos, {self.cfg.d_model}] when "
                    f"start_at_layer is given, got {tuple(resid.shape)}"
                )
        stop = self.cfg.n_layers if stop_at_layer is None else self._check_layer(stop_at_layer, "stop_at_layer")
        if stop < start:
            raise ValueError(f"stop_at_layer ({stop}) must be >= start_at_layer ({start})")
        for block in self.blocks[start:stop]:
            resid = block(resid)
        if stop_at_layer is not None:
            return resid
        if torch.is_autocast_enabled(resid.device.type):
            # Under autocast (bf16 patching) the head runs in float32: every score is computed
            # from the logits, and bf16 logits (8-bit mantissa) would bury small effects.
            with torch.autocast(resid.device.type, enabled=False):
                return self.forward_head(resid.float())
        return self.forward_head(resid)

    def run_with_cache(self, *model_args, return_cache_object: bool = True, **kwargs):
        """Run and cache activations: (output, ActivationCache) so ``cache["resid_post", 3]`` works.

        Takes TransformerLens's arguments (``names_filter``, ``device``, ``incl_bwd``...). A
        ``names_filter`` naming hooks (a string or a list of strings) must name hooks of this
        model: a typo raises ``KeyError`` with near matches instead of caching nothing.
        """
        names_filter = kwargs.get("names_filter")
        if isinstance(names_filter, str):
            self.check_hook_name(names_filter)
        elif isinstance(names_filter, (list, tuple)):
            for name in names_filter:
                self.check_hook_name(name)
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        return out, (ActivationCache(cache_dict, self) if return_cache_object else cache_dict)

    def preprocess(self, images) -> Float[Tensor, "batch channel height width"]:
        """PIL images, uint8 arrays/tensors or [0, 1] float tensors -> normalised model input
        [batch, channel, height, width] on the model's device and dtype."""
        return self.data_config.preprocess(images).to(self.device, self.dtype)

    # ------------------------------------------------------------------------ hook lookup
    def check_hook_name(self, name: str) -> str:
        """``name`` if it is a hook point of this model, else ``KeyError`` naming the near matches."""
        if not isinstance(name, str) or name not in self.hook_dict:
            near = difflib.get_close_matches(str(name), list(self.hook_dict), n=3, cutoff=0.5)
            raise KeyError(f"unknown hook name {name!r}; did you mean {near}?")
        return name

    def hook_point(self, name: str) -> HookPoint:
        """The hook point called ``name``; unknown names raise ``KeyError`` with near matches."""
        return self.hook_dict[self.check_hook_name(name)]

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """TransformerLens's temporary-hooks context manager (also behind ``run_with_hooks``); every
        hook given by name must name a hook point of this model (``KeyError`` with near matches,
        raised before any hook is added). Names may also be boolean functions of hook names."""
        fwd_hooks, bwd_hooks = list(fwd_hooks), list(bwd_hooks)
        for name, _ in fwd_hooks + bwd_hooks:
            if not callable(name):
                self.check_hook_name(name)
        with super().hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as model:
            yield model

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        """TransformerLens's ``add_hook``; a hook name must name a hook point of this model
        (``KeyError`` with near matches)."""
        if not callable(name):
            self.check_hook_name(name)
        super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    # ---------------------------------------------------------------------------- loaders
    @classmethod
    def from_timm(cls, model_or_name: Any, pretrained: bool = False, **timm_kwargs) -> "HookedViT":
        """Convert a timm VisionTransformer (a built module, or a name for ``timm.create_model``)."""
        from vitlens_patch.conversion.timm import from_timm

        return from_timm(model_or_name, pretrained=pretrained, **timm_kwargs)

    @classmethod
    def from_hf(cls, model_or_name: Any) -> "HookedViT":
        """Convert a Hugging Face ``ViTForImageClassification`` (a built model or a hub name/path)."""
        from vitlens_patch.conversion.hf import from_hf

        return from_hf(model_or_name)
