"""``flash_attn.layers.patch_embed``: flash-attn 2.8.x's ``PatchEmbed``, the ViT image-to-patch embedding.

The constructor is timm's ``PatchEmbed`` (``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``,
``norm_layer``, ``flatten``, ``bias``) plus ``fused_bias_fc``. As in flash-attn the patch projection is an
``nn.Linear`` on the flattened patches instead of a strided ``Conv2d``: ``proj.weight`` is
``(embed_dim, in_chans * patch_h * patch_w)``, the ``Conv2d`` weight ``(embed_dim, in_chans, patch_h,
patch_w)`` reshaped, with the same parameter names (``proj``, ``norm``) as flash-attn.

Difference from flash-attn (a superset): ``fused_bias_fc=True`` builds the same ``nn.Linear`` (flash-attn
uses its CUDA ``FusedDense``, a subclass of ``nn.Linear`` with the same parameters and result, and raises
``ImportError`` without that extension); wrong image sizes raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """2-D image to patch embeddings: ``x`` (B, C, H, W) -> ``norm(proj(patches))``, (B, num_patches,
    embed_dim) (``flatten``) or (B, H / patch_h, W / patch_w, embed_dim)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten: bool = True,
        bias: bool = True,
        fused_bias_fc: bool = False,
    ) -> None:
        """
        Arguments:
            img_size: the input's (H, W) (an int: square); the forward accepts only this size.
            patch_size: (patch_h, patch_w) (an int: square); ``grid_size = (H // patch_h, W // patch_w)``.
            in_chans: C. embed_dim: output width.
            norm_layer: called with ``embed_dim`` to build ``norm`` (default: ``nn.Identity``).
            flatten: merge the patch grid into one sequence dimension.
            bias: whether ``proj`` has a bias.
            fused_bias_fc: accepted for compatibility; ``proj`` is an ``nn.Linear`` either way.
        """
        super().__init__()
        self.img_size: tuple[int, int] = _pair(img_size)
        self.patch_size: tuple[int, int] = _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        patch_dim = in_chans * self.patch_size[0] * self.patch_size[1]
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) with (H, W) == ``img_size`` -> (B, num_patches, embed_dim), or
        (B, grid_h, grid_w, embed_dim) without ``flatten``."""
        batch, chans, height, width = x.shape
        if height != self.img_size[0]:
            raise ValueError(f"Input image height ({height}) doesn't match model ({self.img_size[0]}).")
        if width != self.img_size[1]:
            raise ValueError(f"Input image width ({width}) doesn't match model ({self.img_size[1]}).")
        ph, pw = self.patch_size
        gh, gw = height // ph, width // pw
        # (B, C, gh, ph, gw, pw) -> (B, gh, gw, C, ph, pw): each patch flattened channel-major, as Conv2d
        patches = x.reshape(batch, chans, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        out = self.proj(patches.reshape(batch, gh, gw, chans * ph * pw))
        if self.flatten:
            out = out.reshape(batch, gh * gw, out.shape[-1])
        return self.norm(out)
