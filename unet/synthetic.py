"""Procedural clothing figures with the 24 DeepFashion-MultiModal labels (numpy only).

A figure is laid out in *figure units* (head top at y=0, soles near y=1, x=0 on the body's
axis) and mapped onto the unit canvas by a random offset and scale, so one random draw renders
the same scene at any pixel size. Shapes are rasterised with vectorised tests on pixel centres
inside each shape's bounding box, and painted in z-order: body, garments, accessories, head.
Every painted shape carries a label and a *material*; the image is rendered from the materials
only (random colour, pattern and shading per garment, drawn from palettes shared by all garment
types), so colour never gives away the label and the network has to use shape and context:
dress vs top+skirt differ by a waist seam, rompers vs dresses by a small gap between the legs,
leggings vs pants by tightness.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from unet.checks import check_int
from unet.labels import LABEL_INDEX

_L = LABEL_INDEX
_PATTERNS = ("plain", "stripes", "checks", "dots", "noise", "denim")


@dataclass
class Material:
    """How one painted region looks: colours, a pattern in canvas units and smooth shading."""

    colour: np.ndarray
    second: np.ndarray
    pattern: str = "plain"
    period: float = 0.05
    angle: float = 0.0
    shading: np.ndarray = field(default_factory=lambda: np.zeros((4, 4)))


def _hsv_colour(rng, sat=(0.0, 0.9), val=(0.12, 0.97)):
    hue = rng.uniform(0, 6)
    s, v = rng.uniform(*sat), rng.uniform(*val)
    ramp = np.clip(np.abs((hue + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    return v * (1 - s + s * ramp)


def garment_material(rng, patterns=_PATTERNS, scale=1.0):
    """Any colour and any pattern: the same palette serves every garment type and backgrounds."""
    colour = _hsv_colour(rng)
    second = _hsv_colour(rng) if rng.random() < 0.6 else np.clip(colour * rng.uniform(0.4, 1.6), 0, 1)
    return Material(
        colour=colour,
        second=second,
        pattern=patterns[rng.integers(len(patterns))],
        period=scale * rng.uniform(0.015, 0.08),
        angle=rng.uniform(0, np.pi),
        shading=rng.uniform(-0.12, 0.12, (4, 4)),
    )


def _plain(rng, colour, jitter=0.05):
    colour = np.clip(np.asarray(colour, dtype=float) * rng.uniform(1 - jitter, 1 + jitter, 3), 0, 1)
    return Material(colour=colour, second=colour, shading=rng.uniform(-0.06, 0.06, (4, 4)))


def skin_material(rng):
    # From deep to light skin tones, all equally likely.
    t = rng.random()
    return _plain(rng, (1 - t) * np.array([0.27, 0.17, 0.12]) + t * np.array([0.98, 0.85, 0.75]))


def hair_material(rng):
    # Black, brown, light brown, blond, grey, red.
    tones = ([0.05, 0.04, 0.03], [0.25, 0.15, 0.08], [0.55, 0.35, 0.18],
             [0.85, 0.72, 0.45], [0.6, 0.6, 0.6], [0.55, 0.2, 0.1])
    hair = _plain(rng, tones[rng.integers(len(tones))], jitter=0.15)
    hair.pattern, hair.period, hair.angle = "stripes", 0.006, rng.uniform(1.2, 1.9)
    hair.second = hair.colour * 0.75
    return hair


def metal_material(rng):
    tones = ([0.83, 0.69, 0.22], [0.78, 0.78, 0.8], [0.72, 0.45, 0.2], _hsv_colour(rng))
    return _plain(rng, tones[rng.integers(len(tones))], jitter=0.1)


def _value_noise(grid, x, y):
    """Bilinear interpolation of a small random grid at canvas coordinates in [0, 1]."""
    n = grid.shape[0] - 1
    gx, gy = np.clip(x * n, 0, n - 1e-6), np.clip(y * n, 0, n - 1e-6)
    ix, iy = gx.astype(int), gy.astype(int)
    fx, fy = gx - ix, gy - iy
    top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
    bottom = grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _pattern_weight(material, x, y, detail):
    """Blend weight of the second colour (0..1) at canvas points x, y."""
    u = x * np.cos(material.angle) + y * np.sin(material.angle)
    v = -x * np.sin(material.angle) + y * np.cos(material.angle)
    k = 2 * np.pi / material.period
    if material.pattern == "stripes":
        return (np.sin(k * u) > 0.3).astype(float)
    if material.pattern == "checks":
        return 0.5 * ((np.sin(k * u) > 0).astype(float) + (np.sin(k * v) > 0))
    if material.pattern == "dots":
        du = (u / material.period) % 1 - 0.5
        dv = (v / material.period) % 1 - 0.5
        return (du * du + dv * dv < 0.09).astype(float)
    if material.pattern == "noise":
        return _value_noise(detail, x, y)
    if material.pattern == "denim":
        return 0.5 + 0.5 * np.sin(k * 6 * (u + v)) * _value_noise(detail, x, y)
    return np.zeros_like(x)


class Canvas:
    """A label map plus a material map, painted in figure units through an affine placement."""

    def __init__(self, size: int):
        self.size = size
        self.labels = np.zeros((size, size), dtype=np.int64)
        self.material = np.zeros((size, size), dtype=np.int32)
        self.materials: list[Material] = []
        self.centres = (np.arange(size) + 0.5) / size
        self.origin, self.scale = np.zeros(2), 1.0

    def add(self, material: Material) -> int:
        self.materials.append(material)
        return len(self.materials) - 1

    def _to_canvas(self, points):
        return self.origin + self.scale * np.asarray(points, dtype=float).reshape(-1, 2)

    def _window(self, points, margin):
        """Pixel-centre grids (x row, y column) covering the points' bounding box plus margin."""
        (x0, y0), (x1, y1) = (points.min(axis=0) - margin) * self.size, (points.max(axis=0) + margin) * self.size
        x0, y0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
        x1, y1 = min(math.ceil(x1) + 1, self.size), min(math.ceil(y1) + 1, self.size)
        if x1 <= x0 or y1 <= y0:
            return None
        rows, cols = slice(y0, y1), slice(x0, x1)
        return rows, cols, self.centres[cols][None, :], self.centres[rows][:, None]

    def _paint(self, window, mask, label, material):
        rows, cols = window[:2]
        self.labels[rows, cols][mask] = label
        self.material[rows, cols][mask] = material

    def ellipse(self, centre, rx, ry, label, material, angle=0.0):
        c = self._to_canvas(centre)[0]
        rx, ry = rx * self.scale, ry * self.scale
        window = self._window(c[None], max(rx, ry))
        if window is None:
            return
        dx, dy = window[2] - c[0], window[3] - c[1]
        cos, sin = np.cos(angle), np.sin(angle)
        u, v = (dx * cos + dy * sin) / rx, (-dx * sin + dy * cos) / ry
        self._paint(window, u * u + v * v <= 1, label, material)

    def capsule(self, p0, p1, r0, r1, label, material):
        """A segment thickened by a radius that tapers linearly from r0 at p0 to r1 at p1."""
        p = self._to_canvas([p0, p1])
        r0, r1 = r0 * self.scale, r1 * self.scale
        window = self._window(p, max(r0, r1))
        if window is None:
            return
        d = p[1] - p[0]
        dx, dy = window[2] - p[0, 0], window[3] - p[0, 1]
        t = np.clip((dx * d[0] + dy * d[1]) / max(d @ d, 1e-12), 0, 1)
        ex, ey = dx - t * d[0], dy - t * d[1]
        radius = r0 + (r1 - r0) * t
        self._paint(window, ex * ex + ey * ey <= radius * radius, label, material)

    def polyline(self, points, radius, label, material):
        for p0, p1 in zip(points[:-1], points[1:]):
            self.capsule(p0, p1, radius, radius, label, material)

    def polygon(self, points, label, material):
        """Even-odd fill, one vectorised crossing test per edge."""
        p = self._to_canvas(points)
        window = self._window(p, 0.0)
        if window is None:
            return
        x, y = window[2], window[3]
        inside = np.zeros((y.shape[0], x.shape[1]), dtype=bool)
        for (x0, y0), (x1, y1) in zip(p, np.roll(p, -1, axis=0)):
            if y0 == y1:
                continue
            crosses = (y0 > y) != (y1 > y)
            inside ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
        self._paint(window, inside, label, material)

    def render(self, rng) -> np.ndarray:
        """Colour every pixel from its material, then seams, soft focus and sensor noise."""
        # Group pixels by material once, so each material shades a contiguous run of pixels.
        flat = self.material.ravel()
        order = np.argsort(flat, kind="stable")
        ends = np.cumsum(np.bincount(flat, minlength=len(self.materials)))
        rows, cols = np.divmod(order, self.size)
        centres = self.centres.astype(np.float32)
        x, y = centres[cols], centres[rows]
        detail = rng.random((33, 33))
        colours = np.empty((flat.size, 3), dtype=np.float32)
        for m, start, end in zip(self.materials, np.concatenate([[0], ends[:-1]]), ends):
            if end > start:
                px, py = x[start:end], y[start:end]
                w = _pattern_weight(m, px, py, detail)[:, None]
                light = 1 + _value_noise(m.shading, px, py)[:, None]
                colours[start:end] = ((1 - w) * m.colour + w * m.second) * light
        image = np.empty((flat.size, 3), dtype=np.float32)
        image[order] = colours
        image = image.reshape(self.size, self.size, 3)
        seams = np.zeros((self.size, self.size), dtype=bool)
        seams[1:] |= self.material[1:] != self.material[:-1]
        seams[:, 1:] |= self.material[:, 1:] != self.material[:, :-1]
        image[seams] *= 0.75
        image = _soften(image)
        image += 0.015 * rng.standard_normal(image.shape, dtype=np.float32)
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _soften(image):
    """A [1, 2, 1] blur in each direction, as a slightly out-of-focus camera would give."""
    padded = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
    image = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    padded = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return 0.25 * padded[:, :-2] + 0.5 * padded[:, 1:-1] + 0.25 * padded[:, 2:]


@dataclass
class Body:
    """Joint positions (figure units) of a front-facing figure in a random pose."""

    width: float
    shoulder: dict
    elbow: dict
    wrist: dict
    hand: dict
    hip: dict
    knee: dict
    ankle: dict

    # Heights of the shoulders, chest, waist, hips and crotch, and the torso's half-width there.
    PROFILE_Y = np.array([0.165, 0.25, 0.355, 0.46, 0.53])
    PROFILE_HALF_WIDTH = np.array([0.085, 0.072, 0.056, 0.08, 0.077])

    def half_width(self, y, ease=0.0, flare=0.0):
        """Half-width of a garment at height y: the body, plus ease, plus flare below the hips."""
        widths = self.width * self.PROFILE_HALF_WIDTH
        return np.interp(y, self.PROFILE_Y, widths) + ease + flare * np.maximum(np.asarray(y) - 0.46, 0)

    def arm_radii(self):
        return self.width * np.array([0.021, 0.016, 0.012])

    def leg_radii(self):
        return self.width * np.array([0.045, 0.03, 0.018])


def _step(start, angle, length, side):
    """Walk `length` from `start` at `angle` from straight down, outward on `side` (+1 right)."""
    return np.asarray(start) + length * np.array([side * np.sin(angle), np.cos(angle)])


def sample_body(rng) -> Body:
    joints = {name: {} for name in ("shoulder", "elbow", "wrist", "hand", "hip", "knee", "ankle")}
    width = rng.uniform(0.85, 1.25)
    for side in (-1, 1):
        shoulder = np.array([side * (0.085 * width - 0.012), 0.18])
        upper = rng.uniform(1.2, 2.6) if rng.random() < 0.12 else rng.uniform(0.06, 0.7)
        fore = upper - rng.uniform(-0.3, 2.0)
        elbow = _step(shoulder, upper, 0.15, side)
        wrist = _step(elbow, fore, 0.13, side)
        hip = np.array([side * 0.042 * width, 0.49])
        thigh = rng.uniform(-0.03, 0.22)
        knee = _step(hip, thigh, 0.24, side)
        parts = (shoulder, elbow, wrist, _step(wrist, fore + rng.uniform(-0.3, 0.3), 0.06, side),
                 hip, knee, _step(knee, thigh + rng.uniform(-0.15, 0.08), 0.23, side))
        for name, point in zip(joints, parts):
            joints[name][side] = point
    return Body(width=width, **joints)


def _panel_side(body, top, hem, ease, flare, steps=6):
    """Right-hand outline of a torso garment from the shoulder line down to its hem."""
    ys = np.linspace(top, hem, steps)
    return np.stack([body.half_width(ys, ease, flare), ys], axis=1)


def _mirror(points):
    return points[::-1] * np.array([-1, 1])


def _neckline(rng, top):
    opening, depth = rng.uniform(0.022, 0.045), rng.uniform(0.005, 0.08)
    return np.array([[-opening, top - 0.004], [0, top + depth], [opening, top - 0.004]])


def torso_garment(canvas, body, rng, hem, label, material, ease, flare=0.0, top=0.165, gap=None):
    """A panel from the shoulders to `hem`; with `gap`, two panels with an open front (outer)."""
    side = _panel_side(body, top, hem, ease, flare)
    if gap is None:
        canvas.polygon(np.concatenate([_neckline(rng, top), side, _mirror(side)]), label, material)
        return
    lapel = np.array([[gap + 0.02, top - 0.004]])
    right = np.concatenate([lapel, side, [[gap, hem], [gap, top + rng.uniform(0.05, 0.15)]]])
    canvas.polygon(right, label, material)
    canvas.polygon(_mirror(right), label, material)


def romper_panel(canvas, body, rng, hem, material, ease, flare):
    """A dress-like panel with a small notch between the legs (the only thing telling it apart)."""
    side = _panel_side(body, 0.165, hem, ease, flare)
    gap = rng.uniform(0.006, 0.03)
    notch = np.array([[gap, hem], [0, rng.uniform(0.53, 0.56)], [-gap, hem]])
    canvas.polygon(np.concatenate([_neckline(rng, 0.165), side, notch, _mirror(side)]), _L["rompers"], material)


def _along(points, fraction):
    """The point `fraction` of the way along a chain of joints, by segment count."""
    index = min(int(fraction), len(points) - 2)
    return points[index] + (fraction - index) * (points[index + 1] - points[index])


def limb_cover(canvas, joints, radii, length, ease, label, material, start=0.0):
    """Cover a limb (joint chain with radii at the joints) from `start` to `length` segments."""
    marks = [start] + [k for k in range(1, len(joints)) if start < k < length] + [length]
    for a, b in zip(marks[:-1], marks[1:]):
        ra, rb = (np.interp(t, np.arange(len(radii)), radii) + ease for t in (a, b))
        canvas.capsule(_along(joints, a), _along(joints, b), ra, rb, label, material)


def arm(body, side):
    return np.array([body.shoulder[side], body.elbow[side], body.wrist[side]])


def leg(body, side):
    return np.array([body.hip[side], body.knee[side], body.ankle[side]])


def draw_body(canvas, body, skin):
    s = _L["skin"]
    canvas.capsule((0, 0.09), (0, 0.18), 0.018 * body.width, 0.02 * body.width, s, skin)
    side = _panel_side(body, 0.165, 0.53, 0.0, 0.0)
    canvas.polygon(np.concatenate([side, _mirror(side)]), s, skin)
    for k in (-1, 1):
        limb_cover(canvas, leg(body, k), body.leg_radii(), 2.0, 0.0, s, skin)
        canvas.ellipse(body.ankle[k] + [k * 0.008, 0.02], 0.022, 0.014, s, skin)
        limb_cover(canvas, arm(body, k), body.arm_radii(), 2.0, 0.0, s, skin)
        canvas.capsule(body.wrist[k], body.hand[k], 0.012, 0.014, s, skin)


def draw_sleeves(canvas, body, label, material, length, ease):
    # Starting a little before the shoulder joint caps the shoulder.
    if length > 0:
        for k in (-1, 1):
            limb_cover(canvas, arm(body, k), body.arm_radii(), length, ease, label, material, start=-0.15)


def draw_legwear(canvas, body, rng, label, material, length, ease, flare=0.0):
    """Pants, leggings or a jumpsuit's legs: a pelvis panel plus one tube per leg."""
    waist = rng.uniform(0.34, 0.42)
    side = _panel_side(body, waist, 0.54, ease, 0.0, steps=3)
    canvas.polygon(np.concatenate([side, _mirror(side)]), label, material)
    radii = body.leg_radii() + np.array([0, 0, flare])
    for k in (-1, 1):
        limb_cover(canvas, leg(body, k), radii, length, ease, label, material)


def new_garment(canvas, rng) -> int:
    return canvas.add(garment_material(rng))


def draw_bottom(canvas, body, rng, style, hem, flare):
    """Pants, leggings or a skirt; returns its material."""
    look = new_garment(canvas, rng)
    if style == "pants":
        length = rng.uniform(0.3, 0.7) if rng.random() < 0.3 else rng.uniform(1.6, 2.1)
        draw_legwear(canvas, body, rng, _L["pants"], look, length, rng.uniform(0.006, 0.025), rng.uniform(0, 0.03))
    elif style == "leggings":
        draw_legwear(canvas, body, rng, _L["leggings"], look, rng.uniform(1.5, 2.1), 0.002)
    else:
        side = _panel_side(body, rng.uniform(0.33, 0.42), hem, rng.uniform(0.004, 0.015), flare)
        canvas.polygon(np.concatenate([side, _mirror(side)]), _L["skirt"], look)
    return look


def draw_one_piece(canvas, body, rng, style, hem, flare, sleeve, ease):
    """A dress, a romper (dress-like, with a notch between the legs) or a long jumpsuit (rompers)."""
    look, label = new_garment(canvas, rng), _L["dress" if style == "dress" else "rompers"]
    if style == "dress":
        torso_garment(canvas, body, rng, hem, label, look, ease, flare)
    elif style == "rompers":
        romper_panel(canvas, body, rng, rng.uniform(0.56, 0.68), look, ease, flare)
    else:
        torso_garment(canvas, body, rng, 0.5, label, look, ease)
        draw_legwear(canvas, body, rng, label, look, rng.uniform(1.6, 2.1), rng.uniform(0.006, 0.02))
    draw_sleeves(canvas, body, label, look, sleeve, ease)


OUTFITS = ("pants", "leggings", "skirt", "dress", "rompers", "jumpsuit")
OUTFIT_ODDS = (0.22, 0.1, 0.2, 0.26, 0.12, 0.1)


def draw_outfit(canvas, body, rng):
    """Garments, inner layers first; a quarter of separates are co-ord sets that share one look."""
    # Sleeve length in arm segments: none, short, or three-quarter to long.
    sleeve, ease = rng.choice([0.0, rng.uniform(0.3, 0.8), rng.uniform(1.4, 2.05)]), rng.uniform(0.002, 0.02)
    style = rng.choice(OUTFITS, p=OUTFIT_ODDS)
    hem, flare = rng.uniform(0.56, 0.95), rng.uniform(0.0, 0.6)
    if style in ("skirt", "dress") and rng.random() < 0.25:
        draw_legwear(canvas, body, rng, _L["leggings"], new_garment(canvas, rng), rng.uniform(1.5, 2.1), 0.002)
    if style in ("dress", "rompers", "jumpsuit"):
        draw_one_piece(canvas, body, rng, style, hem, flare, sleeve, ease)
    else:
        bottom = draw_bottom(canvas, body, rng, style, hem, flare)
        # A copy, not the same index: the seam where the two garments meet stays visible.
        top = canvas.add(canvas.materials[bottom]) if rng.random() < 0.25 else new_garment(canvas, rng)
        torso_garment(canvas, body, rng, rng.uniform(0.33, 0.56), _L["top"], top, ease, rng.uniform(0, 0.15))
        draw_sleeves(canvas, body, _L["top"], top, sleeve, ease)
    if rng.random() < 0.3:
        outer = new_garment(canvas, rng)
        torso_garment(canvas, body, rng, rng.uniform(0.48, 0.9), _L["outer"], outer,
                      ease + rng.uniform(0.008, 0.02), rng.uniform(0, 0.2), gap=rng.uniform(0.005, 0.04))
        draw_sleeves(canvas, body, _L["outer"], outer, rng.uniform(1.5, 2.05), ease + 0.008)


def draw_socks(canvas, body, rng):
    if rng.random() < 0.2:
        socks, start = new_garment(canvas, rng), rng.uniform(1.55, 1.85)
        for k in (-1, 1):
            limb_cover(canvas, leg(body, k), body.leg_radii(), 2.0, 0.003, _L["socks"], socks, start=start)


def draw_footwear(canvas, body, rng):
    if rng.random() < 0.85:
        shoes, boot_top = new_garment(canvas, rng), rng.uniform(1.3, 1.7) if rng.random() < 0.25 else None
        for k in (-1, 1):
            canvas.ellipse(body.ankle[k] + [k * 0.008, 0.022], 0.026, 0.018, _L["footwear"], shoes)
            if boot_top is not None:
                limb_cover(canvas, leg(body, k), body.leg_radii(), 2.0, 0.006, _L["footwear"], shoes, start=boot_top)


def draw_hands(canvas, body, rng):
    """Gloves, then per hand maybe a bracelet or watch and a ring: the few-pixel items."""
    gloves = new_garment(canvas, rng) if rng.random() < 0.08 else None
    for k in (-1, 1):
        if gloves is not None:
            limb_cover(canvas, arm(body, k), body.arm_radii(), 2.0, 0.003, _L["gloves"], gloves, start=1.75)
            canvas.capsule(body.wrist[k], body.hand[k], 0.014, 0.016, _L["gloves"], gloves)
        direction, band = body.hand[k] - body.wrist[k], 0.016 * body.width
        if rng.random() < 0.35:
            canvas.capsule(body.wrist[k] - 0.2 * direction, body.wrist[k] - 0.02 * direction, band, band,
                           _L["wrist wearing"], canvas.add(metal_material(rng)))
        if rng.random() < 0.35:
            finger = body.wrist[k] + rng.uniform(0.55, 0.8) * direction
            canvas.ellipse(finger, 0.007, 0.007, _L["ring"], canvas.add(metal_material(rng)))


def _rectangle(centre, half_width, half_height):
    return np.asarray(centre) + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [half_width, half_height]


def draw_belt(canvas, body, rng):
    y, half = rng.uniform(0.34, 0.44), rng.uniform(0.006, 0.014)
    side = _panel_side(body, y - half, y + half, 0.012, 0.0, steps=2)
    strap = canvas.add(garment_material(rng, ("plain", "noise")))
    canvas.polygon(np.concatenate([side, _mirror(side)]), _L["belt"], strap)
    canvas.polygon(_rectangle((0, y), 0.012, half + 0.003), _L["belt"], canvas.add(metal_material(rng)))


def draw_tie(canvas, body, rng):
    kite = [[-0.008, 0.17], [0.008, 0.17], [0.016, 0.33], [0, 0.36], [-0.016, 0.33]]
    canvas.polygon(kite, _L["tie"], new_garment(canvas, rng))


def draw_scarf(canvas, body, rng):
    scarf, k = new_garment(canvas, rng), rng.choice([-1, 1])
    canvas.capsule((-0.03, 0.165), (0.03, 0.165), 0.02, 0.02, _L["neckwear"], scarf)
    canvas.capsule((k * 0.02, 0.17), (k * 0.03, rng.uniform(0.26, 0.42)), 0.02, 0.016, _L["neckwear"], scarf)


def draw_necklace(canvas, body, rng):
    rx, ry = rng.uniform(0.03, 0.05), rng.uniform(0.03, 0.1)
    t = np.linspace(0, np.pi, 9)
    chain = np.stack([rx * np.cos(t), 0.155 + ry * np.sin(t)], axis=1)
    necklace = canvas.add(metal_material(rng))
    canvas.polyline(chain, 0.003, _L["necklace"], necklace)
    canvas.ellipse(chain[4] + [0, 0.006], 0.006, 0.008, _L["necklace"], necklace)


def draw_bag(canvas, body, rng):
    """A cross-body bag on a strap, or a handbag hanging from one hand."""
    bag, k = new_garment(canvas, rng), rng.choice([-1, 1])
    half_width, half_height = rng.uniform(0.025, 0.06), rng.uniform(0.022, 0.05)
    if rng.random() < 0.5:
        centre = np.array([k * body.half_width(0.46, 0.03), rng.uniform(0.42, 0.55)])
        canvas.polyline(np.array([[-k * 0.05, 0.17], centre]), 0.003, _L["bag"], bag)
    else:
        hand = body.hand[k]
        centre = hand + [0, half_height + 0.01]
        canvas.polyline(np.array([hand - [0.015, 0], centre, hand + [0.015, 0]]), 0.003, _L["bag"], bag)
    canvas.polygon(_rectangle(centre, half_width, half_height), _L["bag"], bag)


# How often each item over the clothes is worn, drawn in this order.
TORSO_ITEMS = ((0.25, draw_belt), (0.07, draw_tie), (0.12, draw_scarf), (0.3, draw_necklace), (0.25, draw_bag))


def draw_torso_items(canvas, body, rng):
    for chance, draw in TORSO_ITEMS:
        if rng.random() < chance:
            draw(canvas, body, rng)


def draw_head(canvas, rng, skin, hair):
    """Face (with eyes and lips in the face label), hair over it, then hat, glasses, earrings."""
    face, long_hair = _L["face"], rng.random() < 0.55
    canvas.ellipse((0, 0.066), 0.042, 0.055, face, skin)
    eyes, lips = canvas.add(_plain(rng, [0.1, 0.08, 0.07])), canvas.add(_plain(rng, [0.6, 0.25, 0.25], 0.2))
    for k in (-1, 1):
        canvas.ellipse((k * 0.016, 0.064), 0.006, 0.0035, face, eyes)
    canvas.ellipse((0, 0.098), 0.011, 0.004, face, lips)
    if long_hair:
        for k in (-1, 1):
            tip = (k * rng.uniform(0.045, 0.065), rng.uniform(0.18, 0.36))
            canvas.capsule((k * 0.045, 0.05), tip, 0.014, rng.uniform(0.012, 0.024), _L["hair"], hair)
    canvas.ellipse((0, rng.uniform(0.035, 0.045)), 0.047, rng.uniform(0.03, 0.042), _L["hair"], hair)
    if rng.random() < 0.15:
        hat = new_garment(canvas, rng)
        canvas.ellipse((0, 0.02), 0.046, 0.03, _L["headwear"], hat)
        if rng.random() < 0.6:
            canvas.ellipse((0, 0.035), rng.uniform(0.06, 0.1), 0.008, _L["headwear"], hat)
    if rng.random() < 0.25:
        frame = canvas.add(_plain(rng, _hsv_colour(rng, val=(0.02, 0.5))))
        for k in (-1, 1):
            canvas.ellipse((k * 0.017, 0.064), 0.015, 0.011, _L["eyeglass"], frame)
        canvas.capsule((-0.006, 0.062), (0.006, 0.062), 0.002, 0.002, _L["eyeglass"], frame)
    if rng.random() < 0.3:
        earring, drop = canvas.add(metal_material(rng)), rng.uniform(0.005, 0.02)
        for k in (-1, 1):
            canvas.capsule((k * 0.043, 0.078), (k * 0.043, 0.078 + drop), 0.005, 0.005, _L["earrings"], earring)


def draw_hair_back(canvas, rng, hair):
    canvas.ellipse((0, 0.06), 0.05, rng.uniform(0.06, 0.09), _L["hair"], hair)


def background_material(rng):
    """Mostly a studio backdrop, as in DeepFashion; sometimes a gradient or patterned wall."""
    if rng.random() < 0.5:
        return _plain(rng, np.full(3, rng.uniform(0.8, 1.0)), jitter=0.03)
    look = garment_material(rng, ("plain", "noise", "stripes", "checks"), scale=3.0)
    look.shading = rng.uniform(-0.4, 0.4, (2, 2))
    return look


def render_figure(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One random clothed figure: an RGB image (size, size, 3) uint8 and its labels (size, size) int64."""
    canvas = Canvas(check_int("size", size))
    canvas.add(background_material(rng))
    close_up = rng.random() < 0.3
    canvas.scale = rng.uniform(1.2, 1.9) if close_up else rng.uniform(0.8, 0.98)
    canvas.origin = np.array([0.5 + rng.uniform(-0.15, 0.15), rng.uniform(0.01, 0.05)])
    body, skin = sample_body(rng), canvas.add(skin_material(rng))
    hair = canvas.add(hair_material(rng))
    draw_hair_back(canvas, rng, hair)
    draw_body(canvas, body, skin)
    draw_socks(canvas, body, rng)
    draw_outfit(canvas, body, rng)
    draw_footwear(canvas, body, rng)
    draw_hands(canvas, body, rng)
    draw_torso_items(canvas, body, rng)
    draw_head(canvas, rng, skin, hair)
    return canvas.render(rng), canvas.labels
