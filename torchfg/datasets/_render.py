"""Batched, vectorised rasteriser behind :class:`torchfg.datasets.SyntheticProducts`.

Everything here works on a batch of objects or scenes at once with plain tensor ops, so that
rendering costs a fixed number of kernel launches per batch rather than per pixel or per object.
Shapes are unions of trapezoids described by signed distances (positive inside), which gives
one-pixel anti-aliased edges from a single clamp and exact 0 / 1 values away from edges.

Coordinates: image ``x`` (right) and ``y`` (down) span ``[-1, 1]`` at pixel centres; each object has
local coordinates ``u`` (right) and ``v`` (down) in which the garment spans roughly ``[-1, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

SHAPE_NAMES = ("shirt", "coat", "dress", "skirt", "trousers")
PATTERN_NAMES = ("plain", "striped", "checked", "dotted")
TRIM_NAMES = ("collar", "hem", "belt")

# Each shape is the union of up to three trapezoids (mirror, centre_u, v_top, v_bottom,
# half_width_top, half_width_bottom); mirror=1 evaluates the primitive at |u| so one row draws a
# symmetric pair (sleeves, trouser legs). A negative half width is an unused slot.
_UNUSED = (0.0, 0.0, 0.0, 0.0, -4.0, -4.0)
_SHAPE_PRIMITIVES = (
    # shirt: torso and short sleeves
    ((0, 0.0, -0.70, 0.90, 0.45, 0.45), (0, 0.0, -0.70, -0.22, 0.90, 0.84), _UNUSED),
    # coat: long torso, shoulders, long sleeves separated from the torso by a gap
    ((0, 0.0, -0.80, 0.95, 0.40, 0.40), (0, 0.0, -0.80, -0.52, 0.86, 0.86), (1, 0.69, -0.80, 0.55, 0.17, 0.14)),
    # dress: narrow bodice flaring into a long skirt
    ((0, 0.0, -0.85, 0.90, 0.24, 0.74), (0, 0.0, -0.85, -0.40, 0.30, 0.30), _UNUSED),
    # skirt: short and wide
    ((0, 0.0, -0.45, 0.60, 0.42, 0.86), _UNUSED, _UNUSED),
    # trousers: waist and two legs with a gap between them
    ((0, 0.0, -0.90, -0.50, 0.50, 0.50), (1, 0.27, -0.55, 0.90, 0.22, 0.20), _UNUSED),
)
# Neckline cut-out (centre_v, radius); a negative radius cuts nothing.
_SHAPE_NECK = ((-0.78, 0.20), (-0.86, 0.17), (-0.92, 0.16), (0.0, -4.0), (0.0, -4.0))
# Vertical extent and belt line of each shape, which place the trim bands.
_SHAPE_TOP = (-0.70, -0.80, -0.85, -0.45, -0.90)
_SHAPE_BOTTOM = (0.90, 0.95, 0.90, 0.60, 0.90)
_SHAPE_BELT = (0.30, 0.15, -0.30, 0.08, 0.10)

_DOT_RADIUS = 0.27  # in pattern periods
_PATTERN_SHADE = 0.45  # pattern ink is the body colour darkened by this factor


@dataclass
class ObjectParams:
    """A batch of N garments: attribute ids, appearance and pose, each a tensor with N rows."""

    shape: torch.Tensor  # (N,) int64 index into SHAPE_NAMES
    pattern: torch.Tensor  # (N,) int64 index into PATTERN_NAMES
    trim: torch.Tensor  # (N,) int64 index into TRIM_NAMES
    body_rgb: torch.Tensor  # (N, 3)
    trim_rgb: torch.Tensor  # (N, 3)
    width: torch.Tensor  # (N,) horizontal stretch of the silhouette
    period: torch.Tensor  # (N,) pattern period in local units
    phase: torch.Tensor  # (N, 2) pattern phase (u, v) in periods
    trim_thickness: torch.Tensor  # (N,) trim band thickness in local units
    centre: torch.Tensor  # (N, 2) (x, y) in image coordinates
    scale: torch.Tensor  # (N,) image units per local unit
    angle: torch.Tensor  # (N,) rotation in radians

    def to(self, device: torch.device) -> "ObjectParams":
        return ObjectParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: torch.Tensor) -> "ObjectParams":
        """The objects at ``index`` (a 1-D int64 tensor), in that order."""
        return ObjectParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass
class SceneParams:
    """A batch of B scenes: one product, up to M distractors, background and lighting."""

    product: ObjectParams  # B objects
    distractors: ObjectParams  # B * M objects, scene-major
    distractor_active: torch.Tensor  # (B, M) bool
    wall_rgb: torch.Tensor  # (B, 3)
    floor_rgb: torch.Tensor  # (B, 3)
    horizon: torch.Tensor  # (B,) y of the wall / floor boundary
    coarse_texture: torch.Tensor  # (B, 3, r, r) low-frequency background variation
    fine_texture: torch.Tensor  # (B, 1, r2, r2) grain
    gain: torch.Tensor  # (B, 3) per-channel light colour times brightness
    gradient: torch.Tensor  # (B, 2) linear light fall-off along x and y
    pixel_noise: torch.Tensor  # (B, 3, H, W) sensor noise, already scaled

    def to(self, device: torch.device) -> "SceneParams":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return SceneParams(**{k: v.to(device) for k, v in values.items()})


def _pixel_grid(size: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0


_TABLE_CACHE: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def _shape_tables(device: torch.device) -> tuple[torch.Tensor, ...]:
    if device not in _TABLE_CACHE:
        _TABLE_CACHE[device] = tuple(
            torch.tensor(t, dtype=torch.float32, device=device)
            for t in (_SHAPE_PRIMITIVES, _SHAPE_NECK, _SHAPE_TOP, _SHAPE_BOTTOM, _SHAPE_BELT)
        )
    return _TABLE_CACHE[device]


class _AffineField:
    """Evaluates per-object affine functions ``kx * x + ky * y + k0`` of the pixel grid.

    Every quantity that is affine in the image coordinates (local u and v, trapezoid half widths,
    pattern phases, band offsets) costs one full-size tensor op this way: the coefficients are
    combined on (N,)-sized tensors first.
    """

    def __init__(self, grid: torch.Tensor, n: int) -> None:
        self.x = grid.view(1, 1, -1)
        self.y = grid.view(1, -1, 1)
        self.n = n
        self.size = grid.shape[0]

    def __call__(self, kx: torch.Tensor, ky: torch.Tensor, k0: torch.Tensor) -> torch.Tensor:
        n = self.n
        return (ky.view(n, 1, 1) * self.y + k0.view(n, 1, 1)) + kx.view(n, 1, 1) * self.x


def render_objects(obj: ObjectParams, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rasterise N garments on their own, each on a transparent canvas.

    Returns ``(colour, alpha, trim_alpha)``: colour ``(N, 3, size, size)`` (meaningful where alpha > 0),
    alpha ``(N, size, size)`` coverage of the whole garment and trim_alpha ``(N, size, size)`` coverage of
    its trim band (always <= alpha).
    """
    device = obj.body_rgb.device
    n = obj.shape.shape[0]
    field = _AffineField(_pixel_grid(size, device), n)
    # local = R(-angle) (p - centre) / scale, written as affine coefficients of (x, y).
    cos, sin, inv_scale = torch.cos(obj.angle), torch.sin(obj.angle), 1.0 / obj.scale
    cx, cy = obj.centre[:, 0], obj.centre[:, 1]
    ux, uy, u0 = cos * inv_scale, sin * inv_scale, -(cos * cx + sin * cy) * inv_scale
    vx, vy, v0_ = -sin * inv_scale, cos * inv_scale, (sin * cx - cos * cy) * inv_scale

    def affine_of_v(slope: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """slope * v + offset as a field, per object."""
        return field(slope * vx, slope * vy, slope * v0_ + offset)

    u = field(ux, uy, u0)
    u_abs = u.abs()
    # One output pixel measured in local units: the width of the anti-aliasing ramp.
    inv_edge = (obj.scale * (size / 2.0)).view(n, 1, 1)

    prims, neck, top, bottom, belt = _shape_tables(device)
    p = prims[obj.shape]  # (N, 3, 6)
    width = obj.width
    sd_shape: torch.Tensor | None = None
    for slot in range(p.shape[1]):
        mirror, cu, v0, v1, hw0, hw1 = p[:, slot].unbind(1)
        if not bool((hw0 > 0).any()):
            continue  # no object in this batch uses this primitive
        slope = (hw1 - hw0) / (v1 - v0).clamp_min(1e-6)
        # The half width is extrapolated linearly outside [v0, v1]; the vertical term cuts it off.
        half_width = affine_of_v(slope * width, (hw0 - slope * v0) * width)
        uu = torch.where((mirror > 0.5).view(n, 1, 1), u_abs, u)
        sd = half_width.sub_(uu.sub_((cu * width).view(n, 1, 1)).abs_())
        sd_vertical = affine_of_v(torch.ones_like(v0), -0.5 * (v0 + v1)).abs_().neg_()
        sd_vertical = sd_vertical.add_((0.5 * (v1 - v0)).view(n, 1, 1))
        sd = torch.minimum(sd, sd_vertical)
        sd_shape = sd if sd_shape is None else torch.maximum(sd_shape, sd)
    assert sd_shape is not None  # slot 0 is used by every shape
    neck_r = neck[obj.shape, 1]
    if bool((neck_r > 0).any()):
        dv = affine_of_v(torch.ones_like(neck_r), -neck[obj.shape, 0])
        sd_neck = (u * u).add_(dv.mul_(dv)).sqrt_().sub_(neck_r.view(n, 1, 1))
        sd_shape = torch.minimum(sd_shape, sd_neck)
    alpha = torch.addcmul(torch.full((), 0.5, device=device), sd_shape, inv_edge).clamp_(0.0, 1.0)

    thickness = obj.trim_thickness
    band_centres = torch.stack(
        (top[obj.shape] + 0.5 * thickness, bottom[obj.shape] - 0.5 * thickness, belt[obj.shape]), dim=1
    )  # (N, 3): collar, hem, belt
    band_centre = band_centres.gather(1, obj.trim.view(n, 1)).view(n)
    sd_band = affine_of_v(torch.ones_like(band_centre), -band_centre).abs_().neg_()
    sd_band = sd_band.add_((0.5 * thickness).view(n, 1, 1))
    band_alpha = sd_band.mul_(inv_edge).add_(0.5).clamp_(0.0, 1.0)
    trim_alpha = torch.minimum(alpha, band_alpha)

    # Pattern ink is the body colour darkened: colour = body * (1 - (1 - _PATTERN_SHADE) * ink).
    ink = _pattern_alpha(obj, field, (ux, uy, u0), (vx, vy, v0_), inv_edge)
    darkening = ink.mul_(_PATTERN_SHADE - 1.0).add_(1.0)
    colour = obj.body_rgb.view(n, 3, 1, 1) * darkening.unsqueeze(1)
    colour = torch.lerp(colour, obj.trim_rgb.view(n, 3, 1, 1).expand_as(colour), band_alpha.unsqueeze(1))
    return colour, alpha, trim_alpha


def _pattern_alpha(
    obj: ObjectParams,
    field: _AffineField,
    u_coef: tuple[torch.Tensor, ...],
    v_coef: tuple[torch.Tensor, ...],
    inv_edge: torch.Tensor,
) -> torch.Tensor:
    """Coverage of the pattern ink, (N, H, W); only the patterns present in the batch are computed."""
    n = obj.shape.shape[0]
    inv_period = 1.0 / obj.period
    # Pattern coordinates in periods: a runs down the garment, b across it.
    a = lambda: field(  # noqa: E731
        v_coef[0] * inv_period, v_coef[1] * inv_period, v_coef[2] * inv_period + obj.phase[:, 1]
    )
    b = lambda: field(  # noqa: E731
        u_coef[0] * inv_period, u_coef[1] * inv_period, u_coef[2] * inv_period + obj.phase[:, 0]
    )
    # Near its zeros sin(2 pi a) ~ 2 pi * distance / period: this scale turns it into pixels.
    sin_to_pixels = (obj.period / (2.0 * math.pi)).view(n, 1, 1) * inv_edge
    ink = torch.zeros(n, field.size, field.size, device=obj.period.device)
    present = set(obj.pattern.unique().tolist())
    if 1 in present:  # horizontal stripes
        stripes = torch.sin(a().mul_(2.0 * math.pi)).mul_(sin_to_pixels).add_(0.5).clamp_(0.0, 1.0)
        ink = torch.where((obj.pattern == 1).view(n, 1, 1), stripes, ink)
    if 2 in present:  # checks: sign of the product of two stripe fields
        checks = torch.sin(a().mul_(2.0 * math.pi)).mul_(torch.sin(b().mul_(2.0 * math.pi)))
        checks = checks.mul_(sin_to_pixels).add_(0.5).clamp_(0.0, 1.0)
        ink = torch.where((obj.pattern == 2).view(n, 1, 1), checks, ink)
    if 3 in present:  # dots on a square lattice
        fa, fb = a(), b()
        fa = fa.sub_(torch.floor(fa)).sub_(0.5)
        fb = fb.sub_(torch.floor(fb)).sub_(0.5)
        dist = fa.mul_(fa).add_(fb.mul_(fb)).sqrt_()  # in periods
        dots = dist.neg_().add_(_DOT_RADIUS).mul_((obj.period.view(n, 1, 1) * inv_edge)).add_(0.5).clamp_(0.0, 1.0)
        ink = torch.where((obj.pattern == 3).view(n, 1, 1), dots, ink)
    return ink


def render_scenes(
    scene: SceneParams,
    size: int,
    *,
    include_product: bool = True,
    include_distractors: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose B scenes: background, distractors (behind), product, then lighting and noise.

    Returns ``(images, semantic_maps)``: images ``(B, 3, size, size)`` in ``[0, 1]`` and semantic maps
    ``(B, 3, size, size)`` with channels (background, body, trim) that sum to 1 at every pixel. The
    semantic map describes the product only; distractors count as background. ``include_product=False``
    or ``include_distractors=False`` leave those layers out of the image (same background, lighting and
    noise), e.g. to see what the product or the clutter contributes.
    """
    device = scene.wall_rgb.device
    b = scene.wall_rgb.shape[0]
    grid = _pixel_grid(size, device)
    y = grid.view(1, 1, size, 1)
    x = grid.view(1, 1, 1, size)

    # Soft wall / floor boundary over about two pixels.
    floor_weight = ((y - scene.horizon.view(b, 1, 1, 1)) * (size / 4.0) + 0.5).clamp(0.0, 1.0)
    image = scene.wall_rgb.view(b, 3, 1, 1) + (scene.floor_rgb - scene.wall_rgb).view(b, 3, 1, 1) * floor_weight
    image = image + F.interpolate(scene.coarse_texture, size=(size, size), mode="bilinear", align_corners=False)
    image = image + F.interpolate(scene.fine_texture, size=(size, size), mode="bilinear", align_corners=False)

    m = scene.distractor_active.shape[1]
    active = scene.distractor_active.reshape(-1).nonzero().squeeze(1)  # flat index scene * m + slot
    if include_distractors and active.numel() > 0:
        # Only active distractors are rasterised; slots are composited in order, back to front.
        colour, alpha, _ = render_objects(scene.distractors.select(active), size)
        slot = active % m
        for k in range(m):
            rows = (slot == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            scenes = active[rows] // m
            image[scenes] = torch.lerp(image[scenes], colour[rows], alpha[rows].unsqueeze(1))

    colour, alpha, trim_alpha = render_objects(scene.product, size)
    if include_product:
        image = torch.lerp(image, colour, alpha.unsqueeze(1))

    light = scene.gain.view(b, 3, 1, 1) * (
        1.0 + scene.gradient[:, 0].view(b, 1, 1, 1) * x + scene.gradient[:, 1].view(b, 1, 1, 1) * y
    )
    image = (image * light + scene.pixel_noise).clamp(0.0, 1.0)
    semantic = torch.stack((1.0 - alpha, alpha - trim_alpha, trim_alpha), dim=1)
    return image, semantic
