"""``flash_attn.models.vit``: flash-attn 2.8.x's Vision Transformer (timm's ``VisionTransformer`` layout, built
from :mod:`flash_attn.modules`).

* :class:`VisionTransformer`: :class:`flash_attn.layers.patch_embed.PatchEmbed` (a linear projection of the
  flattened patches), CLS token + learned position embeddings, pre-norm :class:`flash_attn.modules.block.Block`
  layers with the residual kept in float32, the final norm and a linear classification head on the CLS token.
  The last layer's attention is a cross-attention (``Wq`` / ``Wkv``) so that :meth:`VisionTransformer.forward`
  computes only the CLS token's output there; :meth:`VisionTransformer.load_state_dict` takes timm's state
  dicts (``Conv2d`` patch weights, ``attn.qkv`` / ``attn.proj``, the last layer's ``qkv`` split);
* :func:`create_mixer_cls` (:class:`flash_attn.modules.mha.MHA`), :func:`create_mlp_cls`
  (:class:`flash_attn.modules.mlp.Mlp`, or :class:`flash_attn.modules.mlp.FusedMLP` with ``fused_mlp``),
  :func:`create_block`;
* :func:`init_weights_vit_timm` (timm's original ViT init: truncated normal of std 0.02 for the linear
  weights, zero biases) applied by :meth:`VisionTransformer.init_weights` through :func:`named_apply`;
* :func:`vit_base_patch16_224`: ViT-B/16.

flash-attn imports ``named_apply`` from timm and ``StochasticDepth`` from torchvision; here
:func:`named_apply` is this module's own and the stochastic depth is
:class:`flash_attn.modules.block.StochasticDepth` (same semantics), so neither package is needed.

Only flash-attn's configurations are supported: ``global_pool="token"`` with a class token, no layer scale
(``init_values``), ``weight_init=""``, ``fc_norm=None``, ``pre_norm=False``; others raise ``ValueError`` (an
``assert`` in flash-attn). Differences from flash-attn 2.8.3, all supersets: ``vit_base_patch16_224(
pretrained=True)`` loads timm's ImageNet weights (it needs timm, else ``ImportError``; flash-attn asserts
``pretrained=False``); :meth:`VisionTransformer.load_state_dict` converts a copy of the given dict (flash-attn
rewrites the caller's patch weight in place) and also splits a last-layer ``qkv`` without bias.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.init import trunc_normal_

from flash_attn.layers.patch_embed import PatchEmbed
from flash_attn.modules.block import Block, StochasticDepth
from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import FusedMLP, Mlp
from flash_attn.ops.triton.layer_norm import layer_norm_fn
from flash_attn.utils.pretrained import _import_optional

__all__ = [
    "VisionTransformer",
    "create_block",
    "create_mixer_cls",
    "create_mlp_cls",
    "init_weights_vit_timm",
    "named_apply",
    "trunc_normal_",
    "vit_base_patch16_224",
]


def create_mixer_cls(
    num_heads: int,
    qkv_bias: bool,
    attn_drop: float,
    use_flash_attn: bool,
    fused_bias_fc: bool,
    cross_attn: bool = False,
) -> Callable[[int], nn.Module]:
    """``MHA`` of ``num_heads`` heads (not causal), called with the width: ``qkv_bias`` for the input
    projections, attention dropout ``attn_drop``; ``cross_attn`` builds separate ``Wq`` / ``Wkv``."""
    return partial(
        MHA,
        num_heads=num_heads,
        cross_attn=cross_attn,
        qkv_proj_bias=qkv_bias,
        dropout=attn_drop,
        fused_bias_fc=fused_bias_fc,
        use_flash_attn=use_flash_attn,
    )


def create_mlp_cls(
    embed_dim: int, mlp_ratio: float, act_layer: Callable[[], Any], fused_mlp: bool
) -> Callable[[int], nn.Module]:
    """An MLP of hidden width ``int(embed_dim * mlp_ratio)``: ``Mlp`` with the activation ``act_layer()``, or
    with ``fused_mlp`` ``FusedMLP`` (its own default activation)."""
    hidden = int(embed_dim * mlp_ratio)
    if fused_mlp:
        return partial(FusedMLP, hidden_features=hidden)
    return partial(Mlp, hidden_features=hidden, activation=act_layer())


def create_block(
    embed_dim: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    drop_rate: float,
    attn_drop_rate: float,
    drop_path1: float,
    drop_path2: float,
    norm_layer: Callable[[int], nn.Module],
    act_layer: Callable[[], Any],
    use_flash_attn: bool,
    fused_bias_fc: bool,
    fused_mlp: bool,
    fused_dropout_add_ln: bool,
    layer_idx: int | None = None,
    n_layer: int | None = None,
    last_layer_subset: bool = False,
) -> Block:
    """A pre-norm :class:`Block` (residual in float32) of :func:`create_mixer_cls` and :func:`create_mlp_cls`,
    with residual dropout ``drop_rate`` after both sub-layers and stochastic depth ``drop_path1`` /
    ``drop_path2``; with ``last_layer_subset`` the last layer (``layer_idx == n_layer - 1``) gets a
    cross-attention mixer."""
    cross_attn = last_layer_subset and n_layer is not None and layer_idx == n_layer - 1
    mixer_cls = create_mixer_cls(
        num_heads, qkv_bias, attn_drop_rate, use_flash_attn, fused_bias_fc, cross_attn=cross_attn
    )
    mlp_cls = create_mlp_cls(embed_dim, mlp_ratio, act_layer, fused_mlp)
    return Block(
        embed_dim,
        mixer_cls,
        mlp_cls,
        norm_cls=norm_layer,
        prenorm=True,
        resid_dropout1=drop_rate,
        resid_dropout2=drop_rate,
        drop_path1=drop_path1,
        drop_path2=drop_path2,
        fused_dropout_add_ln=fused_dropout_add_ln,
        residual_in_fp32=True,
    )


def named_apply(
    fn: Callable[..., Any],
    module: nn.Module,
    name: str = "",
    depth_first: bool = True,
    include_root: bool = False,
) -> nn.Module:
    """``fn(module=m, name=qualified_name)`` on every submodule of ``module`` (children before parents with
    ``depth_first``), and on ``module`` itself with ``include_root``; returns ``module`` (timm's helper)."""
    if not depth_first and include_root:
        fn(module=module, name=name)
    for child_name, child in module.named_children():
        qualified = f"{name}.{child_name}" if name else child_name
        named_apply(fn, child, name=qualified, depth_first=depth_first, include_root=True)
    if depth_first and include_root:
        fn(module=module, name=name)
    return module


def init_weights_vit_timm(module: nn.Module, name: str = "") -> None:
    """timm's original ViT init of one module: ``nn.Linear`` weights truncated normal (std 0.02), biases zero;
    a module with an ``init_weights`` method runs it."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "init_weights"):
        init: Any = module.init_weights
        init()


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv:2010.11929), timm's layout
    and parameter names with flash-attn's blocks: images (B, in_chans, H, W) -> logits (B, num_classes)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        pre_norm: bool = False,
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: Callable[[], Any] | None = None,
        use_flash_attn: bool = False,
        fused_bias_fc: bool = False,
        fused_mlp: bool = False,
        fused_dropout_add_ln: bool = False,
    ) -> None:
        """
        Arguments:
            img_size, patch_size, in_chans: the input images and their patches (ints: square).
            num_classes: width of the classification head ``head`` (0: ``nn.Identity``).
            global_pool: only ``"token"`` (the CLS token's features). class_token: only True.
            embed_dim, depth, num_heads, mlp_ratio: width, number of blocks, heads, MLP hidden width ratio.
            qkv_bias: biases of the q / k / v projections.
            init_values: layer scale, only None. pre_norm: only False. fc_norm: only None. weight_init: only "".
            no_embed_class: the position embeddings cover the patches only (added before the CLS token is
                prepended), else the CLS token too.
            drop_rate: residual dropout of every sub-layer and before the final norm; attn_drop_rate: attention
                dropout; drop_path_rate: stochastic depth, growing linearly to this value over the blocks.
            embed_layer: the patch embedding class (``PatchEmbed``, which also gets ``fused_bias_fc``).
            norm_layer: called with the width (default ``nn.LayerNorm`` with eps 1e-6).
            act_layer: called with no argument for the MLP activation (default ``nn.GELU``).
            use_flash_attn, fused_bias_fc, fused_mlp, fused_dropout_add_ln: flash-attn's fused paths.
        """
        super().__init__()
        if global_pool != "token":
            raise ValueError(f"global_pool {global_pool!r} is not supported (only 'token')")
        if not class_token:
            raise ValueError("class_token=False is not supported")
        if init_values is not None:
            raise ValueError("init_values (LayerScale) is not supported")
        if weight_init != "":
            raise ValueError(f"weight_init {weight_init!r} is not supported (only '')")
        if fc_norm is not None:
            raise ValueError("fc_norm is not supported (only None)")
        if pre_norm:
            raise ValueError("pre_norm=True is not supported")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = no_embed_class

        extra: dict[str, Any] = {"fused_bias_fc": fused_bias_fc} if embed_layer is PatchEmbed else {}
        self.patch_embed = embed_layer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=not pre_norm,
            **extra,
        )
        patch_embed: Any = self.patch_embed
        num_patches = int(patch_embed.num_patches)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)

        drop_path_rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        # flash-attn's block order (dropout -> add -> norm -> sub-layer): block i applies the previous block's
        # stochastic depth before its first norm
        self.blocks = nn.ModuleList(
            [
                create_block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    drop_path1=drop_path_rates[i - 1] if i > 0 else 0.0,
                    drop_path2=drop_path_rates[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    use_flash_attn=use_flash_attn,
                    fused_bias_fc=fused_bias_fc,
                    fused_mlp=fused_mlp,
                    fused_dropout_add_ln=fused_dropout_add_ln,
                    layer_idx=i,
                    n_layer=depth,
                    last_layer_subset=(global_pool == "token"),
                )
                for i in range(depth)
            ]
        )
        self.dropout = nn.Dropout(p=drop_rate)
        self.drop_path = StochasticDepth(p=drop_path_rates[-1], mode="row")
        self.norm = norm_layer(embed_dim)
        self.fused_dropout_add_ln = fused_dropout_add_ln
        self.head: nn.Module = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(weight_init)

    def init_weights(self, mode: str = "") -> None:
        """timm's init: position embeddings truncated normal (std 0.02), CLS token normal (std 1e-6), every
        submodule by :func:`init_weights_vit_timm`."""
        if mode != "":
            raise ValueError(f"weight init mode {mode!r} is not supported (only '')")
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        named_apply(init_weights_vit_timm, self)

    def _init_weights(self, m: nn.Module) -> None:
        init_weights_vit_timm(m)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The parameters to exclude from weight decay."""
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, x: Tensor) -> Tensor:
        cls = None if self.cls_token is None else self.cls_token.expand(x.shape[0], -1, -1)
        if self.no_embed_class:
            x = x + self.pos_embed
            return x if cls is None else torch.cat((cls, x), dim=1)
        if cls is not None:
            x = torch.cat((cls, x), dim=1)
        return x + self.pos_embed

    def forward_features(self, x: Tensor, all_tokens: bool = True) -> Tensor:
        """Images (B, C, H, W) -> the final norm's output (B, 1 + num_patches, embed_dim); with
        ``all_tokens=False`` (and ``global_pool == "token"``) only the CLS token's, (B, 1, embed_dim), the last
        block attending from the CLS token alone."""
        hidden_states = self._pos_embed(self.patch_embed(x))
        residual: Tensor | None = None
        blocks: list[Any] = list(self.blocks)
        if self.global_pool != "token" or all_tokens:
            for block in blocks:
                hidden_states, residual = block(hidden_states, residual)
        else:
            for block in blocks[:-1]:
                hidden_states, residual = block(hidden_states, residual)
            hidden_states, residual = blocks[-1](hidden_states, residual, mixer_subset=slice(0, 1))
        assert residual is not None
        norm: Any = self.norm
        if not self.fused_dropout_add_ln:
            residual = self.drop_path(self.dropout(hidden_states)) + residual
            return norm(residual.to(dtype=norm.weight.dtype))
        rowscale = None
        if self.training and self.drop_path.p > 0:
            rowscale = self.drop_path(
                torch.ones(hidden_states.shape[:-1], device=hidden_states.device, dtype=hidden_states.dtype)
            )
        return layer_norm_fn(
            hidden_states,
            norm.weight,
            norm.bias,
            residual=residual,
            eps=norm.eps,
            dropout_p=self.dropout.p if self.training else 0.0,
            rowscale=rowscale,
            prenorm=False,
        )

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features (B, L, embed_dim) -> the pooled token (the CLS token, or the patches' mean with
        ``global_pool == "avg"``) through ``head``, or the pooled features with ``pre_logits``."""
        if self.global_pool:
            x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x, all_tokens=False))

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> Any:
        """``nn.Module.load_state_dict``, also taking timm's names (converted on a copy): a ``Conv2d``
        ``patch_embed.proj.weight`` (O, C, ph, pw) is flattened to (O, C * ph * pw), ``attn.qkv`` /
        ``attn.proj`` become ``mixer.Wqkv`` / ``mixer.out_proj``, and the last block's ``Wqkv`` is split into
        its cross-attention's ``Wq`` (first ``embed_dim`` rows) and ``Wkv``."""
        sd: OrderedDict[str, Any] = OrderedDict()
        for key, value in state_dict.items():
            key = re.sub(r"^blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.mixer.Wqkv.", key)
            key = re.sub(r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.mixer.out_proj.", key)
            sd[key] = value
        patch_weight = sd.get("patch_embed.proj.weight")
        if patch_weight is not None and patch_weight.dim() == 4:
            sd["patch_embed.proj.weight"] = patch_weight.flatten(1)
        last = len(self.blocks) - 1
        last_mixer: Any = self.blocks[last].mixer
        if last_mixer.cross_attn:
            for kind in ("weight", "bias"):
                wqkv = sd.pop(f"blocks.{last}.mixer.Wqkv.{kind}", None)
                if wqkv is not None:
                    sd[f"blocks.{last}.mixer.Wq.{kind}"] = wqkv[: self.embed_dim]
                    sd[f"blocks.{last}.mixer.Wkv.{kind}"] = wqkv[self.embed_dim :]
        return super().load_state_dict(sd, strict=strict)


def vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-B/16 (patch 16, width 768, 12 blocks of 12 heads); ``kwargs`` go to :class:`VisionTransformer`.
    ``pretrained=True`` loads timm's ``vit_base_patch16_224`` weights (needs timm and its weights)."""
    timm = _import_optional("timm", "vit_base_patch16_224(pretrained=True)") if pretrained else None
    model = VisionTransformer(**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs))
    if timm is not None:
        reference = timm.create_model(
            "vit_base_patch16_224",
            pretrained=True,
            num_classes=model.num_classes,
            img_size=model.patch_embed.img_size,
        )
        model.load_state_dict(reference.state_dict())
    return model
