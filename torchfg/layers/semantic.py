"""Semantic-map guided layers: channel attention, three simpler fusions, and a backbone wrapper.

The attention follows the "Semantic Embedded Deep Neural Network" idea: a spatial semantic map of
the region of interest (human parsing, segmentation, localisation; K channels, any resolution) is
embedded by a small conv stack and, together with the features pooled over the region of interest,
drives a squeeze-and-excitation style MLP whose per-channel weights rescale the backbone features.
:class:`SemanticFusion` holds the three baselines the method was compared with, and
:func:`wrap_backbone` inserts any of them after a named stage of a CNN (or, through
:class:`TokenGridAdapter`, after a block of a vision transformer).
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any, Callable, Literal, Sequence, cast, overload

import torch
import torch.nn.functional as F
from torch import nn

from torchfg._validation import check_bool, check_choice, check_float_tensor, in_backward
from torchfg.functional.semantic import (
    check_channel_indices,
    check_semantic,
    resize_semantic,
    semantic_foreground,
    semantic_weighted_pool,
)

__all__ = [
    "SemanticChannelAttention",
    "SemanticFusion",
    "SemanticBackbone",
    "TokenGridAdapter",
    "make_semantic_module",
    "widen_first_conv",
    "wrap_backbone",
]

FUSION_MODES = ("input_concat", "feature_concat", "mask")


def _check_channels(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _default_embed_channels(in_channels: int) -> int:
    return max(8, min(64, in_channels // 4))


def _semantic_embedding(semantic_channels: int, embed_channels: int) -> nn.Sequential:
    # No biases and ReLU(0) = 0: an all-zero map embeds to exactly zero, which the attention's
    # zero-map identity relies on.
    return nn.Sequential(
        nn.Conv2d(semantic_channels, embed_channels, kernel_size=3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Conv2d(embed_channels, embed_channels, kernel_size=3, padding=1, bias=False),
        nn.ReLU(inplace=True),
    )


class _IdentityProjection(nn.Conv2d):
    """A 1x1 convolution from C + E channels to C that starts as the identity on the first C
    (the features) and zero on the rest (the semantic embedding): a fusion layer that changes
    nothing at init. Its own reset_parameters gives that init, so a loop over the submodules in
    any order (FSDP's materialisation of a meta-device model) gives it too."""

    def reset_parameters(self) -> None:
        super().reset_parameters()  # the same draws from the global RNG as a plain Conv2d's
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, : self.out_channels, 0, 0].copy_(torch.eye(self.out_channels))


def _check_features(features: object, in_channels: int) -> torch.Tensor:
    features = check_float_tensor(features, "features", ndim=4)
    if features.shape[1] != in_channels:
        raise ValueError(f"features must have {in_channels} channels (in_channels), got {features.shape[1]}")
    return features


class SemanticChannelAttention(nn.Module):
    """Channel attention driven by a spatial semantic map (semantic embedded SE block).

    Given features ``f`` (B, C, H, W) and a semantic map ``s`` (B, K, h, w) at any resolution:

    1. ``s`` is resized to H x W (area averaging along each axis that shrinks, bilinear along
       each that grows; :func:`~torchfg.functional.semantic.resize_semantic`);
    2. a two-layer 3x3 conv stack embeds it into E channels, which are averaged over space
       (the semantic embedding, (B, E));
    3. the features are pooled with the region of interest as spatial weights: the map's channels
       summed with learned positive weights (initialised to 1, so at init this is the plain sum of
       the K channels; training can down-weight e.g. a background channel), giving (B, C);
    4. ``[pooled features, semantic embedding]`` (B, C + E) goes through a bias-free MLP
       ``C + E -> max(4, (C + E) // reduction) -> C`` and a sigmoid: weights ``w`` in (0, 1), (B, C);
    5. ``residual=False``: ``f * w`` (plain SE gating).
       ``residual=True``: ``f * 2w = f * (1 + tanh(z / 2))`` with ``z`` the MLP output, i.e. the
       identity plus a signed per-channel correction in (-1, 1).

    With ``residual=True`` an all-zero map yields exactly the input features, at init and after any
    amount of training: the embedding, the pooled features and the bias-free MLP output are all
    zero, so ``w = 0.5`` and ``2w = 1``. Images without a region of interest therefore fall back to
    the plain backbone.

    Args:
        in_channels: C, channels of the features.
        semantic_channels: K, channels of the semantic map.
        embed_channels: E, width of the semantic embedding; default ``max(8, min(64, C // 4))``.
        reduction: hidden width divisor of the MLP (as in squeeze-and-excitation).
        residual: rescale by ``2w`` (identity at zero map) instead of ``w``.

    Shapes:
        features (B, C, H, W), semantic (B, K, h, w) -> (B, C, H, W) in the features' dtype;
        with ``return_attention=True`` also the weights ``w`` (B, C).

    Example:
        >>> layer = SemanticChannelAttention(256, 20)
        >>> features = torch.randn(2, 256, 14, 14)
        >>> parsing = torch.rand(2, 20, 224, 224)   # e.g. human-parsing probabilities
        >>> out, weights = layer(features, parsing, return_attention=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 256, 14, 14]), torch.Size([2, 256]))
    """

    def __init__(
        self,
        in_channels: int,
        semantic_channels: int,
        *,
        embed_channels: int | None = None,
        reduction: int = 16,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = _check_channels(in_channels, "in_channels")
        self.semantic_channels = _check_channels(semantic_channels, "semantic_channels")
        if embed_channels is None:
            embed_channels = _default_embed_channels(in_channels)
        self.embed_channels = _check_channels(embed_channels, "embed_channels")
        self.reduction = _check_channels(reduction, "reduction")
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
        self.residual = residual
        hidden = max(4, (in_channels + embed_channels) // reduction)
        self.embedding = _semantic_embedding(semantic_channels, embed_channels)
        self.foreground_logits = nn.Parameter(torch.empty(semantic_channels))
        self._init_foreground()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels + embed_channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, in_channels, bias=False),
        )

    def _init_foreground(self) -> None:
        # softplus(log(e - 1)) = 1: the region of interest starts as the plain channel sum.
        with torch.no_grad():
            self.foreground_logits.fill_(math.log(math.e - 1.0))

    def reset_parameters(self) -> None:
        """Initialise every parameter as the constructor does (fresh draws for the convolutions
        and the MLP, the foreground logits at softplus^-1(1)).

        For a layer built on the meta device: ``layer.to_empty(device=...)``, then
        ``layer.reset_parameters()`` (or ``load_state_dict``): ``foreground_logits`` has no
        initialiser of PyTorch's, so ``to_empty`` leaves it as uninitialised memory.
        """
        for module in (*self.embedding, *self.mlp):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self._init_foreground()

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, semantic_channels={self.semantic_channels}, "
            f"embed_channels={self.embed_channels}, reduction={self.reduction}, residual={self.residual}"
        )

    # The return type follows return_attention: one tensor, or (features, weights).
    @overload
    def forward(
        self, features: torch.Tensor, semantic: torch.Tensor, *, return_attention: Literal[False] = False
    ) -> torch.Tensor: ...
    @overload
    def forward(
        self, features: torch.Tensor, semantic: torch.Tensor, *, return_attention: Literal[True]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    @overload
    def forward(
        self, features: torch.Tensor, semantic: torch.Tensor, *, return_attention: bool
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, features: torch.Tensor, semantic: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rescale ``features`` (B, C, H, W) by semantic-driven channel weights.

        Args:
            features: (B, C, H, W) backbone features.
            semantic: (B, K, h, w) semantic map (float or bool), any h, w.
            return_attention: also return the (B, C) weights in (0, 1).

        Returns:
            (B, C, H, W) rescaled features, and the (B, C) weights when ``return_attention``.
        """
        features = _check_features(features, self.in_channels)
        return_attention = check_bool(return_attention, "return_attention")
        semantic = check_semantic(
            semantic, "semantic", batch=features.shape[0], channels=self.semantic_channels, device=features.device
        )
        semantic = resize_semantic(semantic.to(features.dtype), features.shape[-2:])
        embedded = self.embedding(semantic).mean(dim=(-2, -1))
        channel_weights = F.softplus(self.foreground_logits).to(semantic.dtype)
        roi = torch.relu((semantic * channel_weights[None, :, None, None]).sum(dim=1, keepdim=True))
        pooled = semantic_weighted_pool(features, roi)
        logits = self.mlp(torch.cat([pooled.to(embedded.dtype), embedded], dim=1))
        weights = torch.sigmoid(logits)
        scale = 2.0 * weights if self.residual else weights
        out = features * scale[:, :, None, None].to(features.dtype)
        if return_attention:
            return out, weights
        return out


def widen_first_conv(conv: nn.Conv2d, extra_in_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` that accepts ``extra_in_channels`` more input channels (appended last).

    The original filters are copied and the filters of the new channels start at zero, so the
    widened network computes exactly the original function until training moves them (gradients do
    reach them: the gradient of a weight is its input times the output gradient). Use it with
    ``SemanticFusion(mode="input_concat")``, which appends the semantic map to the images.

    Args:
        conv: the backbone's first ``nn.Conv2d`` (``groups=1``).
        extra_in_channels: K, the number of channels appended to its input.

    Returns:
        A new ``nn.Conv2d`` with ``in_channels + K`` inputs, same device, dtype and hyper-parameters.

    Example:
        >>> conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        >>> widen_first_conv(conv1, 20).weight.shape
        torch.Size([64, 23, 7, 7])
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    extra_in_channels = _check_channels(extra_in_channels, "extra_in_channels")
    if conv.groups != 1:
        raise ValueError(f"conv must have groups=1 to be widened, got groups={conv.groups}")
    weight = conv.weight
    # A Conv2d holds pairs; torch's stubs type them as the base class's tuple[int, ...].
    widened = nn.Conv2d(
        conv.in_channels + extra_in_channels,
        conv.out_channels,
        kernel_size=cast("tuple[int, int]", conv.kernel_size),
        stride=cast("tuple[int, int]", conv.stride),
        padding=cast("str | tuple[int, int]", conv.padding),
        dilation=cast("tuple[int, int]", conv.dilation),
        groups=1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        widened.weight.zero_()
        widened.weight[:, : conv.in_channels].copy_(weight)
        if conv.bias is not None:
            cast(torch.Tensor, widened.bias).copy_(conv.bias)  # made with bias=True here
    widened.weight.requires_grad_(weight.requires_grad)
    return widened


class SemanticFusion(nn.Module):
    """The three simpler ways of using a semantic map, with the attention layer's call signature.

    Modes (``forward(features, semantic)``, semantic (B, K, h, w) at any resolution):

    * ``"input_concat"``: the map resized to H x W appended as extra channels,
      (B, C, H, W) -> (B, C + K, H, W). Meant for the images, before the first conv, which must be
      widened with :func:`widen_first_conv` (see :func:`wrap_backbone` with ``position="before"``).
    * ``"feature_concat"``: the map embedded by a 3x3 conv stack to E channels, concatenated to the
      features and projected back by a 1x1 conv ``C + E -> C``. The projection starts as the identity
      on the features and zero on the embedding, so inserting it into a pretrained backbone changes
      nothing at init (the embedding stack receives gradients once the projection moves off zero).
    * ``"mask"``: the features multiplied by the region-of-interest map, the clamped sum of the
      ``foreground_channels`` (all by default) in [0, 1], (B, 1, H, W). No parameters.

    Args:
        in_channels: C, channels of the tensor the fusion receives.
        semantic_channels: K, channels of the semantic map.
        mode: ``"input_concat"`` | ``"feature_concat"`` | ``"mask"``.
        embed_channels: E for ``"feature_concat"``; default ``max(8, min(64, C // 4))``.
        foreground_channels: for ``"mask"``, the map channels that form the region of interest
            (one int for a single channel).

    Attributes:
        out_channels: C + K for ``"input_concat"``, C otherwise.

    Example:
        >>> fusion = SemanticFusion(256, 20, mode="feature_concat")
        >>> fusion(torch.randn(2, 256, 14, 14), torch.rand(2, 20, 56, 56)).shape
        torch.Size([2, 256, 14, 14])
    """

    def __init__(
        self,
        in_channels: int,
        semantic_channels: int,
        *,
        mode: str,
        embed_channels: int | None = None,
        foreground_channels: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.mode = check_choice(mode, "mode", FUSION_MODES)
        self.in_channels = _check_channels(in_channels, "in_channels")
        self.semantic_channels = _check_channels(semantic_channels, "semantic_channels")
        # Arguments of another mode are refused, not ignored: a typo in `mode` would otherwise
        # build a different layer without a word.
        if foreground_channels is not None:
            if self.mode != "mask":
                raise ValueError(f"foreground_channels is used by mode='mask' only, got it with mode={self.mode!r}")
            foreground_channels = check_channel_indices(foreground_channels, "foreground_channels", semantic_channels)
        if embed_channels is not None and self.mode != "feature_concat":
            raise ValueError(f"embed_channels is used by mode='feature_concat' only, got it with mode={self.mode!r}")
        self.foreground_channels = foreground_channels
        self.out_channels = in_channels + semantic_channels if mode == "input_concat" else in_channels
        self.embed_channels = None
        if mode == "feature_concat":
            if embed_channels is None:
                embed_channels = _default_embed_channels(in_channels)
            self.embed_channels = _check_channels(embed_channels, "embed_channels")
            self.embedding = _semantic_embedding(semantic_channels, embed_channels)
            self.project = _IdentityProjection(in_channels + embed_channels, in_channels, kernel_size=1, bias=False)

    def reset_parameters(self) -> None:
        """Initialise every parameter as the constructor does (``feature_concat``: fresh draws
        for the embedding, the projection at the identity; the other modes have no parameters).

        For a layer built on the meta device: ``layer.to_empty(device=...)``, then
        ``layer.reset_parameters()``, or any loop over the submodules' own ``reset_parameters``
        (FSDP's): the projection's own reset is the identity (or ``load_state_dict``).
        """
        if self.mode != "feature_concat":
            return
        for module in (*self.embedding, self.project):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def extra_repr(self) -> str:
        extra = ""
        if self.embed_channels is not None:
            extra = f", embed_channels={self.embed_channels}"
        if self.foreground_channels is not None:
            extra = f", foreground_channels={self.foreground_channels}"
        return f"mode={self.mode!r}, in_channels={self.in_channels}, semantic_channels={self.semantic_channels}{extra}"

    def forward(self, features: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """Fuse ``semantic`` (B, K, h, w) into ``features`` (B, C, H, W).

        Returns:
            (B, C + K, H, W) for ``"input_concat"``, (B, C, H, W) otherwise.
        """
        features = _check_features(features, self.in_channels)
        semantic = check_semantic(
            semantic, "semantic", batch=features.shape[0], channels=self.semantic_channels, device=features.device
        )
        semantic = semantic.to(features.dtype)
        size = features.shape[-2:]
        if self.mode == "input_concat":
            return torch.cat([features, resize_semantic(semantic, size)], dim=1)
        if self.mode == "mask":
            return features * semantic_foreground(semantic, size, self.foreground_channels)
        embedded = self.embedding(resize_semantic(semantic, size))
        return self.project(torch.cat([features, embedded.to(features.dtype)], dim=1))


SEMANTIC_MODULE_KINDS = ("attention",) + FUSION_MODES


def make_semantic_module(kind: str, in_channels: int, semantic_channels: int, **kwargs: Any) -> nn.Module:
    """Build a semantic module by name, so experiments can sweep the methods.

    Args:
        kind: ``"attention"`` (:class:`SemanticChannelAttention`) or a :class:`SemanticFusion` mode
            (``"input_concat"``, ``"feature_concat"``, ``"mask"``).
        in_channels: C.
        semantic_channels: K.
        **kwargs: passed to the constructor.

    Returns:
        An ``nn.Module`` with ``forward(features, semantic)``.

    Example:
        >>> [type(make_semantic_module(k, 64, 4)).__name__ for k in ("attention", "mask")]
        ['SemanticChannelAttention', 'SemanticFusion']
    """
    check_choice(kind, "kind", SEMANTIC_MODULE_KINDS)
    if kind == "attention":
        return SemanticChannelAttention(in_channels, semantic_channels, **kwargs)
    return SemanticFusion(in_channels, semantic_channels, mode=kind, **kwargs)


class TokenGridAdapter(nn.Module):
    """Run a feature-map module (B, C, H, W) on the patch tokens (B, P + H * W, C) of a vision transformer.

    The output of a ViT block is a token sequence: ``P`` prefix tokens (the class token, register
    tokens) followed by one token per patch in row-major order. The adapter lays the patch tokens
    out as a (B, C, H, W) map, applies ``module(map, semantic)`` (e.g. :class:`SemanticChannelAttention`
    or :class:`SemanticFusion` ``"mask"``), and puts them back; the prefix tokens pass through
    unchanged. With :func:`wrap_backbone` it inserts a semantic module after any block of a timm
    ``VisionTransformer`` (``prefix_tokens=vit.num_prefix_tokens``, ``grid_size=vit.patch_embed.grid_size``).

    Args:
        module: a module with ``forward(features (B, C, H, W), semantic) -> (B, C, H, W)``.
        prefix_tokens: P, tokens before the patch tokens (1 for a class token, 0 for none).
        grid_size: (H, W) of the patch grid; default: a square grid inferred from the token count.

    Shapes:
        tokens (B, P + H * W, C), semantic (B, K, h, w) -> (B, P + H * W, C).

    Example:
        >>> adapter = TokenGridAdapter(SemanticChannelAttention(384, 20), prefix_tokens=1)
        >>> tokens = torch.randn(2, 1 + 14 * 14, 384)             # ViT-S/16 block output at 224 x 224
        >>> adapter(tokens, torch.rand(2, 20, 56, 56)).shape
        torch.Size([2, 197, 384])
    """

    def __init__(
        self, module: nn.Module, *, prefix_tokens: int = 1, grid_size: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module with forward(x, semantic), got {type(module).__name__}")
        if not isinstance(prefix_tokens, int) or isinstance(prefix_tokens, bool) or prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be an int >= 0, got {prefix_tokens!r}")
        if grid_size is not None:
            grid_size = tuple(grid_size)
            if len(grid_size) != 2 or any(not isinstance(g, int) or isinstance(g, bool) or g < 1 for g in grid_size):
                raise ValueError(f"grid_size must be two positive ints (H, W), got {grid_size!r}")
        self.module = module
        self.prefix_tokens = prefix_tokens
        self.grid_size: tuple[int, int] | None = grid_size  # len() == 2 above narrows the tuple

    def extra_repr(self) -> str:
        return f"prefix_tokens={self.prefix_tokens}, grid_size={self.grid_size}"

    def forward(self, tokens: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        """Tokens (B, P + H * W, C) with the patch tokens transformed by the module."""
        tokens = check_float_tensor(tokens, "tokens", ndim=3)
        b, n, c = tokens.shape
        patches = n - self.prefix_tokens
        if self.grid_size is not None:
            h, w = self.grid_size
        else:
            # Not math.isqrt: under torch.compile(dynamic=True) the token count is a SymInt, which
            # isqrt cannot trace. sqrt is exact on perfect squares (far below 2^52 tokens), and the
            # check below refuses the rest.
            h = w = int(math.sqrt(patches)) if patches > 0 else 0
        if patches < 1 or h * w != patches:
            raise ValueError(
                f"tokens must hold prefix_tokens={self.prefix_tokens} tokens and then "
                + (f"a {h} x {w} grid of patch tokens" if self.grid_size is not None else "a square grid of patch tokens")
                + f", got {n} tokens (pass grid_size for a non-square grid)"
            )
        prefix, grid = tokens[:, : self.prefix_tokens], tokens[:, self.prefix_tokens :]
        features = grid.transpose(1, 2).reshape(b, c, h, w)
        out = self.module(features, semantic)
        if not isinstance(out, torch.Tensor) or out.shape != features.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"module must return features of shape {tuple(features.shape)}, got {shape}")
        return torch.cat((prefix, out.flatten(2).transpose(1, 2)), dim=1)


class SemanticBackbone(nn.Module):
    """A CNN whose named stage is followed (or preceded) by a semantic module; see :func:`wrap_backbone`.

    ``forward(images, semantic, *args, **kwargs)`` stores the map for the duration of the call and
    runs ``getattr(backbone, method)(images, *args, **kwargs)``; a hook on the stage applies
    ``module(stage_tensor, semantic)``. The module is registered as a submodule, so its parameters
    are in ``parameters()`` and ``state_dict()``. Calling the backbone directly, without the
    wrapper, raises a ``RuntimeError`` from the hook instead of silently skipping the module.
    Threads may share one wrapped model (each call's map is kept per thread). Not tested with
    ``nn.DataParallel``; use DDP.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer_name: str,
        module: nn.Module,
        *,
        position: str = "after",
        method: str = "forward",
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module with forward(x, semantic), got {type(module).__name__}")
        _check_stage(backbone, layer_name, position, method)
        self.backbone = backbone
        self.semantic_module = module
        self.layer_name = layer_name
        self.position = position
        self.method = method
        # The map of the call in flight, per thread: a model shared by inference threads runs one
        # call per thread at once (one attribute gave each call another call's map, silently).
        # Under torch.compile, which cannot trace thread identities, the one attribute below.
        self._semantic_of_thread: dict[int, torch.Tensor] = {}
        self._semantic: torch.Tensor | None = None
        # The map each stage input met in a wrapped call, for as long as that input lives: activation
        # checkpointing re-runs the stage during backward, after the call has returned.
        # Keyed by identity (a tensor's == is elementwise); an entry leaves when its input dies.
        self._semantic_of_input: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        stage = backbone.get_submodule(layer_name)
        if position == "after":
            self._hook = stage.register_forward_hook(self._after_stage)
        else:
            self._hook = stage.register_forward_pre_hook(self._before_stage)

    def extra_repr(self) -> str:
        return f"layer_name={self.layer_name!r}, position={self.position!r}, method={self.method!r}"

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A whole-module pickle from before the per-thread maps has no such entry.
        state.setdefault("_semantic_of_thread", {})
        super().__setstate__(state)

    def __getstate__(self) -> dict[str, Any]:
        # The per-call maps are keyed by live tensors (weak references cannot be pickled, and a
        # saved or copied model starts with no call in flight).
        return {**super().__getstate__(), "_semantic_of_input": {}, "_semantic_of_thread": {}, "_semantic": None}

    def _current_semantic(self, stage_input: Any) -> torch.Tensor:
        # Under torch.compile the graph holds the map itself: no identity bookkeeping to trace.
        compiling = torch.compiler.is_compiling()
        keyable = isinstance(stage_input, torch.Tensor) and not compiling
        current = self._semantic if compiling else self._semantic_of_thread.get(threading.get_ident())
        if current is not None:
            if keyable:
                key = id(stage_input)
                self._semantic_of_input[key] = (weakref.ref(stage_input, _forget_entry(self, key)), current)
            return current
        # Only a recomputation in backward may take the map of a call that has returned: a direct
        # backbone call on a tensor a wrapped call already saw applied that call's map, silently.
        entry = self._semantic_of_input.get(id(stage_input)) if keyable and in_backward() else None
        semantic = entry[1] if entry is not None and entry[0]() is stage_input else None
        if semantic is None:
            if in_backward():
                # Activation checkpointing re-ran the stage after the call returned, on an input
                # the call never saw: a checkpointed region that contains the stage (timm's
                # checkpoint_seq over blocks, or use_reentrant=True, which detaches its inputs).
                raise RuntimeError(
                    f"stage {self.layer_name!r} (wrapped by a semantic module) was re-run by activation "
                    "checkpointing during backward, on an input its SemanticBackbone call never saw: "
                    "checkpoint the wrapped stage itself with use_reentrant=False, or wrap a module "
                    "that contains the whole checkpointed region; a checkpointed region that contains "
                    "the wrapped stage is not supported"
                )
            raise RuntimeError(
                f"stage {self.layer_name!r} is wrapped by a semantic module: call the SemanticBackbone "
                "wrapper with (images, semantic), not the backbone directly"
            )
        return semantic  # a checkpointed stage recomputed in backward: the map of its own call

    def _after_stage(self, stage: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return self.semantic_module(output, self._current_semantic(inputs[0] if inputs else None))

    def _before_stage(self, stage: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.semantic_module(inputs[0], self._current_semantic(inputs[0])),) + tuple(inputs[1:])

    def forward(self, images: torch.Tensor, semantic: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the backbone on ``images`` (B, 3, H, W) with ``semantic`` (B, K, h, w) applied at the stage."""
        if not isinstance(semantic, torch.Tensor):
            # (None would reach the stage's hook as "no map": an error about calling the backbone directly.)
            raise TypeError(f"semantic must be a tensor (B, K, h, w), got {type(semantic).__name__}")
        # Eager, the map is kept per thread; the one attribute always too, for compiled hooks (the
        # whole model compiled, or a stage compiled on its own inside this eager call), which
        # cannot look up the thread.
        thread = None if torch.compiler.is_compiling() else threading.get_ident()
        if thread is not None:
            self._semantic_of_thread[thread] = semantic
        self._semantic = semantic
        try:
            if isinstance(self.backbone, SemanticBackbone):
                # A wrapper of a wrapper (semantic modules at two stages): the inner one needs the map too.
                return self.backbone(images, semantic, *args, **kwargs)
            return getattr(self.backbone, self.method)(images, *args, **kwargs)
        finally:
            if thread is not None:
                del self._semantic_of_thread[thread]
            self._semantic = None


def _forget_entry(owner: SemanticBackbone, key: int) -> Callable[[weakref.ref], None]:
    """Weak-reference callback: drop ``owner``'s map entry ``key`` when its stage input dies.

    Holds the owner weakly (no cycle), and removes the entry only if it is still the one this
    reference was made for (a newer tensor may have taken the same id).
    """
    owner_ref = weakref.ref(owner)

    def forget(dead: weakref.ref) -> None:
        module = owner_ref()
        if module is None:
            return
        entry = module._semantic_of_input.get(key)
        if entry is not None and entry[0] is dead:
            del module._semantic_of_input[key]

    return forget


def wrap_backbone(
    backbone: nn.Module, layer_name: str, attention: nn.Module, *, position: str = "after", method: str = "forward"
) -> SemanticBackbone:
    """Insert a semantic module after (or before) a named stage of a CNN; the map is passed at call time.

    Works with any ``nn.Module`` whose stage is reachable by a dotted name: torchvision ResNets
    (``"layer1"`` .. ``"layer4"``), timm models (``"stages.2"``, ``"layer3"``), or your own. A forward
    hook on the stage replaces its output ``x`` by ``attention(x, semantic)``, so the backbone's own
    code is untouched and pretrained weights load as usual.

    Args:
        backbone: the CNN; it is wrapped, not copied (the hook is registered on its stage). For
            modules at two stages, wrap the wrapper: ``wrap_backbone(model, "backbone.layer4", ...)``
            (the stage's name inside it), then call the outer one; a second wrapper on the same
            CNN is refused (each would meet the other's hook without a map).
        layer_name: dotted name of the stage, as in ``backbone.named_modules()``.
        attention: a module with ``forward(x, semantic)``: :class:`SemanticChannelAttention`,
            :class:`SemanticFusion`, or your own. It must return a tensor the next stage accepts.
        position: ``"after"`` (transform the stage's output) or ``"before"`` (transform its first
            input; e.g. ``"conv1"`` with ``SemanticFusion(mode="input_concat")`` and a widened conv1).
        method: the backbone method to call, e.g. ``"forward_features"`` for timm models.

    Returns:
        A :class:`SemanticBackbone`; call it as ``model(images, semantic)``.

    Activation checkpointing: checkpointing the wrapped stage itself (``use_reentrant=False``)
    works, its recomputation uses its own call's map. A checkpointed region that *contains* the
    stage (timm's ``checkpoint_seq`` over a stage's blocks with a block wrapped, or any
    ``use_reentrant=True`` checkpoint, which detaches its inputs) recomputes the stage on tensors
    the call never saw: its backward raises a ``RuntimeError`` that says so. Wrap the checkpointed
    unit (the stage, not a block inside it) instead.

    Example (not run: needs torchvision)::

        import torchvision
        from torchfg.layers import SemanticChannelAttention, SemanticFusion, widen_first_conv, wrap_backbone

        resnet = torchvision.models.resnet50(weights="IMAGENET1K_V2")
        resnet.fc = torch.nn.Linear(2048, num_attributes)          # multi-label logits
        # layer3 of ResNet-50 outputs (B, 1024, H/16, W/16); K = 20 human-parsing channels
        model = wrap_backbone(resnet, "layer3", SemanticChannelAttention(1024, 20))
        logits = model(images, parsing)                             # (B, 3, 224, 224), (B, 20, h, w)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())

        # baseline: the parsing map as 20 extra input channels, on a fresh backbone (the one
        # above keeps its layer3 hook, which only its own wrapper may call)
        baseline = torchvision.models.resnet50(weights="IMAGENET1K_V2")
        baseline.fc = torch.nn.Linear(2048, num_attributes)
        baseline.conv1 = widen_first_conv(baseline.conv1, 20)
        model = wrap_backbone(baseline, "conv1", SemanticFusion(3, 20, mode="input_concat"), position="before")
    """
    if not isinstance(attention, nn.Module):
        raise TypeError(f"attention must be an nn.Module with forward(x, semantic), got {type(attention).__name__}")
    return SemanticBackbone(backbone, layer_name, attention, position=position, method=method)


def _check_stage(backbone: object, layer_name: object, position: object, method: object) -> None:
    """The checks of a wrapping (for :func:`wrap_backbone` and :class:`SemanticBackbone` alike)."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if not isinstance(layer_name, str) or not layer_name:
        raise TypeError(f"layer_name must be a non-empty str, got {layer_name!r}")
    names = dict(backbone.named_modules())
    if layer_name not in names:
        stages = [name for name, _ in backbone.named_children()]
        raise ValueError(f"layer_name {layer_name!r} is not a submodule of backbone; its children are {stages}")
    check_choice(position, "position", ("after", "before"))
    if isinstance(backbone, SemanticBackbone) and method != "forward":
        # A wrapper of a wrapper calls the inner one's forward, with the map: another method would be ignored.
        raise ValueError(f"method must be 'forward' to wrap a SemanticBackbone (it takes (images, semantic)), got {method!r}")
    if not isinstance(method, str) or not callable(getattr(backbone, method, None)):
        raise ValueError(f"method {method!r} is not a method of {type(backbone).__name__}")
    inside = {id(m) for m in backbone.modules()}
    for wrapper, stage in _semantic_wrappers_hooked_in(backbone):
        if id(wrapper) not in inside:
            # The other wrapper's hook would raise in this wrapper's calls (it has no map), and
            # this one's in the other's.
            raise ValueError(
                f"backbone already has a semantic module at stage {stage!r}, applied by another SemanticBackbone; "
                f"for modules at two stages, wrap that wrapper: wrap_backbone(wrapper, 'backbone.{layer_name}', ...)"
            )


def _semantic_wrappers_hooked_in(backbone: nn.Module) -> list[tuple[SemanticBackbone, str]]:
    """(wrapper, stage name) for each SemanticBackbone whose hook is on a submodule of ``backbone``."""
    found = []
    for name, module in backbone.named_modules():
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, SemanticBackbone):
                found.append((owner, name))
    return found
