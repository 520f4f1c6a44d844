"""DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""

from __future__ import annotations


import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm
from torchfg._validation import check_int as _check_int

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """Projection head of DINO: an MLP, an L2-normalised bottleneck, a weight-normalised last layer.

    ``n_layers`` linear layers map ``in_dim -> hidden_dim -> ... -> bottleneck_dim`` (GELU between
    them, BatchNorm1d before each GELU when ``use_bn``; a single layer maps straight to the
    bottleneck). The bottleneck is L2-normalised and fed to a bias-free linear layer with weight
    normalisation, ``W = g * V / ||V||`` per output row, whose magnitude ``g`` starts at 1. With
    ``norm_last_layer=True`` ``g`` stays fixed at 1 (no gradient), so the logits are cosine
    similarities to ``out_dim`` learned prototypes, which stabilises training.

    Linear weights are initialised from a truncated normal (std 0.02), biases at 0.

    Args:
        in_dim: width of the backbone's embedding.
        out_dim: K, the number of prototypes.
        use_bn: BatchNorm1d in the MLP.
        norm_last_layer: freeze the weight-norm magnitude at 1.
        n_layers: number of linear layers in the MLP (>= 1).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width of the normalised bottleneck.

    Shapes:
        (N, in_dim) -> (N, out_dim).

    Example:
        >>> head = DINOHead(384, out_dim=4096, hidden_dim=512, bottleneck_dim=128)
        >>> head(torch.randn(8, 384)).shape
        torch.Size([8, 4096])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        n_layers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        in_dim = _check_int(in_dim, "in_dim", 1)
        out_dim = _check_int(out_dim, "out_dim", 1)
        n_layers = _check_int(n_layers, "n_layers", 1)
        hidden_dim = _check_int(hidden_dim, "hidden_dim", 1)
        bottleneck_dim = _check_int(bottleneck_dim, "bottleneck_dim", 1)
        self.norm_last_layer = bool(norm_last_layer)
        if n_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            width = in_dim
            for _ in range(n_layers - 1):
                layers.append(nn.Linear(width, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                width = hidden_dim
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = weight_norm(last)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        if self.norm_last_layer:
            magnitude.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) embeddings -> (N, out_dim) logits."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
