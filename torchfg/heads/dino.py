"""DINO projection head (MLP -> L2-normalised bottleneck -> weight-normalised prototypes) and the
loader for checkpoints of the original implementation (facebookresearch/dino)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from torchfg._validation import check_bool, check_choice
from torchfg._validation import check_int as _check_int

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

__all__ = ["DINOHead", "load_dino_checkpoint"]

# torch.nn.utils.weight_norm (used by the original code) names the magnitude and the direction
# weight_g / weight_v; the parametrization API stores the same tensors, same shapes, as original0/1.
_LEGACY_WEIGHT_NORM = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}


if TYPE_CHECKING:
    # What weight_norm(nn.Linear(...)) is, for type checkers: torch types weight_norm's result as
    # Any, and nn.Module's __getattr__ types the parametrizations it adds as Tensor | Module. At
    # run time the layer is torch's generated ParametrizedLinear, a subclass of nn.Linear.

    class _WeightNorm(parametrize.ParametrizationList):
        original0: nn.Parameter  # g, (out_dim, 1)
        original1: nn.Parameter  # V, (out_dim, bottleneck_dim)

    class _WeightNormParametrizations(nn.ModuleDict):
        weight: _WeightNorm

    class _WeightNormLinear(nn.Linear):
        parametrizations: _WeightNormParametrizations


def _dino_trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Truncated normal on [-2, 2] by inverse CDF, the recipe of the original code (``utils.trunc_normal_``).

    torch's ``nn.init.trunc_normal_`` draws the same distribution with another algorithm in recent
    versions; this one consumes the random stream exactly as the original does, so a head built
    under a given seed equals the original head built under that seed.
    """

    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    with torch.no_grad():
        low, high = norm_cdf(-2.0 / std), norm_cdf(2.0 / std)
        tensor.uniform_(2 * low - 1, 2 * high - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        return tensor.clamp_(min=-2.0, max=2.0)


def _rename_legacy_weight_norm(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any
) -> None:
    """load_state_dict pre-hook: accept ``last_layer.weight_g`` / ``weight_v`` (old weight_norm)."""
    for old, new in _LEGACY_WEIGHT_NORM.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class DINOHead(nn.Module):
    """Projection head of DINO: an MLP, an L2-normalised bottleneck, a weight-normalised last layer.

    ``n_layers`` linear layers map ``in_dim -> hidden_dim -> ... -> bottleneck_dim`` (GELU between
    them, BatchNorm1d before each GELU when ``use_bn``; a single layer maps straight to the
    bottleneck). The bottleneck is L2-normalised and fed to a bias-free linear layer with weight
    normalisation, ``W = g * V / ||V||`` per output row, whose magnitude ``g`` starts at 1. With
    ``norm_last_layer=True`` ``g`` stays fixed at 1 (no gradient), so the logits are cosine
    similarities to ``out_dim`` learned prototypes, which stabilises training. (``g`` is frozen
    by ``requires_grad=False``, as in the original: a model-wide ``requires_grad_(True)``, say
    after freezing the whole student, makes it trainable again; call
    ``head.last_layer.parametrizations.weight.original0.requires_grad_(False)`` after it.)

    Initialisation as in the original code, draw for draw: the MLP's weights from a truncated
    normal (std 0.02), its biases at 0; the last layer's directions ``V`` keep PyTorch's default
    ``nn.Linear`` init (kaiming-uniform, entries in ``±1/sqrt(bottleneck_dim)``). Under the same seed
    the head's parameters equal those of facebookresearch/dino's ``DINOHead``. The size of ``V``
    matters although ``W`` has unit rows: the gradient reaching ``V`` scales as ``1 / ||V||``.

    The parameter names are those of the original head (``mlp.*``, ``last_layer.*``), with the
    weight norm in the current parametrization API (``last_layer.parametrizations.weight.original0``
    is ``g``, ``original1`` is ``V``); ``load_state_dict`` also accepts the original code's
    ``last_layer.weight_g`` / ``last_layer.weight_v``. Whole checkpoints of the original training
    script load with :func:`load_dino_checkpoint` or :meth:`from_dino_checkpoint`. The head
    pickles (``torch.save`` of a whole model, ``torch.multiprocessing.spawn`` or Lightning's
    ``ddp_spawn`` with the model as an argument) and deep-copies (an EMA teacher), although
    PyTorch refuses to pickle a parametrized module: the last layer travels as its two parameters
    and is rebuilt, so hooks registered on ``last_layer`` itself do not come along.

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
        use_bn = check_bool(use_bn, "use_bn")
        self.norm_last_layer = check_bool(norm_last_layer, "norm_last_layer")
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
                _dino_trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # The directions keep nn.Linear's default init, as in the original (see the class docstring).
        self.last_layer: _WeightNormLinear = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        if self.norm_last_layer:
            magnitude.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_rename_legacy_weight_norm)

    def extra_repr(self) -> str:
        return f"norm_last_layer={self.norm_last_layer}"

    def __getstate__(self) -> dict[str, Any]:
        # PyTorch refuses to pickle a parametrized module (the weight normalisation): the last
        # layer travels as its two parameters and is rebuilt when unpickled, so that a head can be
        # pickled to start processes (torch.multiprocessing.spawn, Lightning's ddp_spawn) and
        # saved whole with torch.save. copy.deepcopy takes the same path.
        state = self.__dict__.copy()
        modules = dict(state["_modules"])
        last = modules["last_layer"]
        if not parametrize.is_parametrized(last, "weight"):
            return state  # folded (remove_parametrizations): a plain Linear pickles as it is
        modules["last_layer"] = None  # keeps its place among the submodules
        state["_modules"] = modules
        weight = last.parametrizations.weight
        state["_last_layer_pickle"] = (weight.original0, weight.original1, last.training)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        pickled_layer = state.pop("_last_layer_pickle", None)
        super().__setstate__(state)
        if pickled_layer is None:
            return
        magnitude, direction, training = pickled_layer
        out_dim, bottleneck_dim = direction.shape
        with torch.device("meta"):  # no init draws from the global RNG; the parameters follow
            layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        layer.parametrizations.weight.original0 = magnitude
        layer.parametrizations.weight.original1 = direction
        self._modules["last_layer"] = layer.train(training)

    def reset_parameters(self) -> None:
        """Initialise every parameter as the constructor does (fresh draws), and BatchNorm's statistics.

        For a head built on the meta device: ``head.to_empty(device=...)``, then
        ``head.reset_parameters()`` (or ``load_state_dict``). Call it on the head, after any loop
        over the submodules' own ``reset_parameters``: those use PyTorch's defaults (kaiming for
        the MLP), and the weight-normalised last layer's resets its computed weight, not ``g``
        and ``V``.
        """
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                _dino_trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()
        weight = self.last_layer.parametrizations.weight
        nn.init.kaiming_uniform_(weight.original1, a=math.sqrt(5))  # nn.Linear's default
        with torch.no_grad():
            weight.original0.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) embeddings -> (N, out_dim) logits."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)

    @classmethod
    def from_dino_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Any],
        *,
        which: str = "teacher",
        norm_last_layer: bool = True,
    ) -> Self:
        """A head sized from a facebookresearch/dino checkpoint, with its weights loaded.

        ``in_dim``, ``out_dim``, ``hidden_dim``, ``bottleneck_dim``, ``n_layers`` and ``use_bn`` are
        read from the shapes of the checkpoint's head; the forms accepted are those of
        :func:`load_dino_checkpoint`.

        Args:
            checkpoint: a path to a ``.pth`` file or an already loaded dict.
            which: ``"teacher"`` (the network DINO evaluates) or ``"student"``.
            norm_last_layer: freeze the magnitude of the last layer (not stored in the checkpoint;
                the original teacher is built with ``True``, its student with ``--norm_last_layer``).

        Returns:
            The head, in training mode, with the checkpoint's parameters and buffers.
        """
        parts = _dino_parts(checkpoint, which)
        head_state = parts.head
        if not head_state:
            raise ValueError(f"the checkpoint holds no {which} head (no 'head.*', 'mlp.*' or 'last_layer.*' keys)")
        direction = head_state.get(_LEGACY_WEIGHT_NORM["last_layer.weight_v"])
        if direction is None or direction.dim() != 2:
            raise ValueError(
                f"checkpoint[{which!r}] has no 2-D 'last_layer.weight_v' (or "
                "'last_layer.parametrizations.weight.original1'): not a DINO head"
            )
        if "mlp.weight" in head_state:
            linear = [head_state["mlp.weight"]]
        else:
            indexed = [
                (int(match.group(1)), value)
                for key, value in head_state.items()
                if (match := re.fullmatch(r"mlp\.(\d+)\.weight", key)) and value.dim() == 2
            ]
            linear = [value for _, value in sorted(indexed, key=lambda item: item[0])]
        if not linear:
            raise ValueError(f"checkpoint[{which!r}] has no MLP weights ('mlp.weight' or 'mlp.<i>.weight')")
        head = cls(
            linear[0].shape[1],
            direction.shape[0],
            use_bn=any(re.fullmatch(r"mlp\.\d+\.running_mean", key) for key in head_state),
            norm_last_layer=norm_last_layer,
            n_layers=len(linear),
            hidden_dim=linear[0].shape[0] if len(linear) > 1 else 1,
            bottleneck_dim=direction.shape[1],
        )
        problem = _mismatch(head, head_state, parts.head_names, "head")
        if problem:
            raise ValueError(problem)
        head.load_state_dict(head_state)
        return head


class _DINOParts(NamedTuple):
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]  # torchfg names (weight norm as parametrizations)
    center: torch.Tensor | None
    backbone_names: dict[str, str]  # torchfg key -> the key as spelled in the checkpoint
    head_names: dict[str, str]


def _read_checkpoint(checkpoint: object) -> Mapping[str, Any]:
    if isinstance(checkpoint, (str, os.PathLike)):
        path = checkpoint
        # The original checkpoints pickle the argparse.Namespace of the run next to the tensors;
        # allowing that one class keeps torch.load's safe weights_only mode.
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError, OSError, ... here
            raise ValueError(
                f"could not read checkpoint {os.fspath(path)!r} with torch.load(weights_only=True): "
                f"{error}. If you trust the file, load it with torch.load(path, weights_only=False) and "
                "pass the dict"
            ) from error
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a dict (state dict), got {type(checkpoint).__name__}")
    return checkpoint


def _strip(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _dino_parts(checkpoint: object, which: str) -> _DINOParts:
    """Split a checkpoint of any accepted form into backbone / head state dicts and the centre."""
    which = check_choice(which, "which", ("teacher", "student"))
    checkpoint = _read_checkpoint(checkpoint)
    center = None
    loss_state = checkpoint.get("dino_loss")
    if isinstance(loss_state, Mapping) and "center" in loss_state:
        center = loss_state["center"]
    if "teacher" in checkpoint or "student" in checkpoint:
        if which not in checkpoint:
            raise ValueError(f"checkpoint has no {which!r} entry (its keys: {sorted(map(str, checkpoint))})")
        model, origin = checkpoint[which], f"{which}:"
    elif set(checkpoint) == {"center"}:  # a DINOLoss state dict on its own
        model, origin, center = {}, "", checkpoint["center"]
    else:
        model, origin = checkpoint, ""
    if not isinstance(model, Mapping):
        raise TypeError(f"checkpoint[{which!r}] must be a state dict, got {type(model).__name__}")
    # DistributedDataParallel saves every key under 'module.'.
    if model and all(key.startswith("module.") for key in model):
        model, origin = _strip("module.", model), origin + "module."
    if any(key.startswith(("head.", "backbone.")) for key in model):  # MultiCropWrapper's layout
        backbone, head = _strip("backbone.", model), _strip("head.", model)
        backbone_origin, head_origin = origin + "backbone.", origin + "head."
    else:  # a head on its own
        backbone, head = {}, dict(model)
        backbone_origin, head_origin = origin, origin
    renamed, head_names = {}, {}
    for key, value in head.items():
        new_key = _LEGACY_WEIGHT_NORM.get(key, key)
        renamed[new_key] = value
        head_names[new_key] = head_origin + key
    backbone_names = {key: backbone_origin + key for key in backbone}
    return _DINOParts(backbone, renamed, center, backbone_names, head_names)


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor], names: Mapping[str, str], what: str) -> str | None:
    """Why ``state`` does not load strictly into ``module``, naming the checkpoint's keys; None if it does."""
    expected = module.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    if missing:
        problems.append(f"{type(module).__name__}'s {missing} missing from the checkpoint")
    unexpected = sorted(names.get(key, key) for key in set(state) - set(expected))
    if unexpected:
        problems.append(f"checkpoint keys {unexpected} not in {type(module).__name__}")
    for key in sorted(set(state) & set(expected)):
        if state[key].shape != expected[key].shape:
            problems.append(
                f"{names.get(key, key)!r} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{type(module).__name__}'s {key!r} has shape {tuple(expected[key].shape)}"
            )
    if not problems:
        return None
    hint = " (DINOHead.from_dino_checkpoint builds a head of the checkpoint's sizes)" if what == "head" else ""
    return f"the checkpoint's {what} does not fit: " + "; ".join(problems) + hint


def load_dino_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    head: nn.Module | None = None,
    loss: nn.Module | None = None,
    backbone: nn.Module | None = None,
    which: str = "teacher",
) -> None:
    """Load a facebookresearch/dino checkpoint into torchfg's DINO modules, in place.

    Accepted forms of ``checkpoint`` (a path, read with ``torch.load(weights_only=True)``, or a dict):

    * the training checkpoint of the original ``main_dino.py``:
      ``{"student": ..., "teacher": ..., "dino_loss": {"center": (1, K)}, "args": ..., ...}``,
      where the networks are ``MultiCropWrapper(backbone, DINOHead)`` state dicts, the student's
      (and a teacher with BatchNorm's) under DDP's ``module.`` prefix;
    * one such network's state dict (``[module.]backbone.*``, ``[module.]head.*``);
    * a head's state dict (``mlp.*``, ``last_layer.*``), or a ``DINOLoss`` state dict (``center``).

    The translations: ``last_layer.weight_g`` / ``weight_v`` (``torch.nn.utils.weight_norm``) become
    ``last_layer.parametrizations.weight.original0`` / ``original1``; the centre (1, K) becomes (K,);
    the ``module.``, ``backbone.`` and ``head.`` prefixes are dropped. Every requested part must fit
    exactly (same keys, same shapes), else a ``ValueError`` names the checkpoint's keys and both
    shapes, and nothing is loaded into any module.

    Args:
        checkpoint: a path to a ``.pth`` file or an already loaded dict.
        head: a :class:`DINOHead` receiving the head's weights.
        loss: a :class:`torchfg.losses.DINOLoss` receiving the centre (``dino_loss.center``).
        backbone: a module receiving the ``backbone.*`` weights, e.g. a ViT with the original
            parameter names.
        which: ``"teacher"`` (the network DINO evaluates, and the default) or ``"student"``.

    Example:
        >>> official = {"teacher": {"head.mlp.weight": torch.randn(16, 32), "head.mlp.bias": torch.zeros(16),
        ...                         "head.last_layer.weight_g": torch.ones(64, 1),
        ...                         "head.last_layer.weight_v": torch.randn(64, 16)}}
        >>> head = DINOHead(32, out_dim=64, n_layers=1, bottleneck_dim=16)
        >>> load_dino_checkpoint(official, head=head)
        >>> torch.equal(head.last_layer.parametrizations.weight.original1, official["teacher"]["head.last_layer.weight_v"])
        True
    """
    if head is None and loss is None and backbone is None:
        raise ValueError("nothing to load into: pass head=, loss= and/or backbone=")
    for name, module in (("head", head), ("loss", loss), ("backbone", backbone)):
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"{name} must be an nn.Module, got {type(module).__name__}")
    parts = _dino_parts(checkpoint, which)
    # Every part is checked before any is loaded, so that a failure leaves all modules untouched.
    problems: list[str | None] = []  # None: a part that fits
    if head is not None:
        if not parts.head:
            problems.append(f"the checkpoint holds no {which} head (no 'head.*', 'mlp.*' or 'last_layer.*' keys)")
        else:
            problems.append(_mismatch(head, parts.head, parts.head_names, "head"))
    if backbone is not None:
        if not parts.backbone:
            problems.append(f"the checkpoint holds no {which} backbone (no 'backbone.*' keys)")
        else:
            problems.append(_mismatch(backbone, parts.backbone, parts.backbone_names, "backbone"))
    center = None
    if loss is not None:
        current = getattr(loss, "center", None)
        if not isinstance(current, torch.Tensor):
            raise TypeError(f"loss must have a 'center' buffer (a DINOLoss), got {type(loss).__name__}")
        if parts.center is None:
            problems.append("the checkpoint has no DINO loss centre ('dino_loss': {'center': ...})")
        else:
            center = parts.center
            if center.dim() == 2 and center.shape[0] == 1:  # the original keeps it as (1, K)
                center = center[0]
            if center.shape != current.shape:
                problems.append(
                    f"'dino_loss.center' has shape {tuple(parts.center.shape)} in the checkpoint but the "
                    f"loss's centre has shape {tuple(current.shape)}"
                )
    found = [problem for problem in problems if problem]
    if found:
        raise ValueError("; ".join(found))
    if head is not None:
        head.load_state_dict(parts.head)
    if backbone is not None:
        backbone.load_state_dict(parts.backbone)
    if loss is not None:
        loss.load_state_dict({**loss.state_dict(), "center": center})
