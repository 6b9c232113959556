"""``synthetic``: procedurally generated indoor scenes with consistent labels for all six tasks.

Each item is ray-cast (numpy, vectorised over pixels, one pass per primitive) from a pinhole camera
standing in a box-shaped room (floor, ceiling, left, right and back walls) with 1-3 boxes (random size
and yaw), 0-2 balls and 0-2 people resting on the floor. A person is 9 boxes and a sphere: head (sphere),
torso, two upper arms, two lower arms (with the hands), two upper legs, two lower legs (with the feet).

Every label comes from the same geometry, so the tasks agree with each other and with the image:

- depth: z-distance along the optical axis, metres (every pixel valid);
- normals: the hit surface's analytic normal in the camera frame (x right, y down, z forward), facing the
  camera: the exact derivative of the depth map's geometry;
- semseg: class of the surface hit, :data:`SYNTHETIC_CLASSES` (6 classes);
- parts: body part of a person hit, 0 elsewhere (7 classes, as PASCAL's human parts); a scene without a
  person is ignored entirely (255), as PASCAL-Context's reader does with images that have no part pixel;
- edge: boundaries between surfaces/objects (instance map; the room's planes are separate instances,
  a person is one instance) by :func:`mtlfast.data.base.label_boundaries`;
- sal: 1 on objects (boxes, balls, people), 0 on the room.

The image is rendered with textures that carry the classes (checker floor, striped walls, plain boxes,
two-tone balls, skin / shirt / trousers colours on people) and Lambertian shading from a random light with
ambient term and distance falloff, plus Gaussian noise; the camera has random height, pitch and field of
view, so depth has perspective cues (the floor's checker pattern). Deterministic from (seed, split, index);
any size; about 6 ms for a 64x64 sample (one core of the shared CI machine; 0.9 s at 448x576).
"""
from __future__ import annotations

import math

import numpy as np

from mtlfast.data.base import MultiTaskDataset, label_boundaries, to_sample
from mtlfast.data.tasks import IGNORE_INDEX

__all__ = ["SYNTHETIC_CLASSES", "PART_NAMES", "render_scene", "SyntheticDataset"]

SYNTHETIC_CLASSES = ("floor", "wall", "ceiling", "box", "ball", "person")
PART_NAMES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
_FLOOR, _WALL, _CEILING, _BOX, _BALL, _PERSON = range(6)
_SPLITS = {"train": 0, "val": 1, "test": 2}
_EPS = 1e-6


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


class _Prim:
    """A primitive: geometry + labels + appearance. ``kind`` in {"plane", "sphere", "box"}."""

    def __init__(self, kind, params, cls, inst, part=0, texture="plain", colors=((0.5, 0.5, 0.5),)):
        self.kind, self.params, self.cls, self.inst, self.part = kind, params, cls, inst, part
        self.texture, self.colors = texture, np.asarray(colors, dtype=np.float64)

    def intersect(self, d: np.ndarray):
        """Ray parameter t (inf = miss) and unit world normal facing the camera, rays from the origin."""
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.kind == "plane":
                n, c = self.params[:2]  # points p with n.p = c; n points into the room
                t = c / (d @ n)
                return np.where(t > _EPS, t, np.inf), np.broadcast_to(n, d.shape)
            if self.kind == "sphere":
                center, r = self.params[:2]
                b = d @ center
                a = np.einsum("ij,ij->i", d, d)
                disc = b * b - a * (center @ center - r * r)
                t = (b - np.sqrt(np.maximum(disc, 0.0))) / a
                t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
                return t, (t[:, None] * d - center) / r
            center, half, rot = self.params  # rot: local -> world; slab test in the box frame
            dl = d @ rot
            ol = -(center @ rot)
            near, far = [], []
            for a in range(3):
                t1, t2 = (-half[a] - ol[a]) / dl[:, a], (half[a] - ol[a]) / dl[:, a]
                near.append(np.fmin(t1, t2))
                far.append(np.fmax(t1, t2))
            t_in = np.fmax(np.fmax(near[0], near[1]), near[2])
            t_out = np.fmin(np.fmin(far[0], far[1]), far[2])
            t = np.where((t_in <= t_out) & (t_in > _EPS), t_in, np.inf)
            nl = np.zeros_like(dl)
            taken = np.zeros(len(dl), dtype=bool)
            for a in range(3):  # the entry face; one axis only where a ray meets an edge exactly
                face = (near[a] == t_in) & ~taken
                nl[:, a] = np.where(face, -np.sign(dl[:, a]), 0.0)
                taken |= face
            return t, nl @ rot.T

    def bounds(self) -> tuple[np.ndarray, float] | None:
        """Bounding sphere (world centre, radius); None for the unbounded planes."""
        if self.kind == "plane":
            return None
        if self.kind == "sphere":
            return self.params[0], self.params[1]
        return self.params[0], float(np.linalg.norm(self.params[1]))

    def albedo(self, p: np.ndarray, normal: np.ndarray) -> np.ndarray:
        """Surface colour (N, 3) in [0, 1] at hit points p with normals."""
        c = self.colors
        if self.texture == "checker":
            size = self.params[2]
            parity = (np.floor(p[:, 0] / size) + np.floor(p[:, 2] / size)) % 2
            return np.where(parity[:, None] > 0, c[0], c[1])
        if self.texture == "stripes":
            axis, period = self.params[2], self.params[3]
            w = 0.5 + 0.5 * np.sin(2 * math.pi * p[:, axis] / period)
            return c[0] * (0.85 + 0.15 * w[:, None])
        if self.texture == "two_tone":
            center = self.params[0]
            local = (p - center) @ self.params[2]
            return np.where((local[:, 1] > 0)[:, None] ^ (local[:, 0] > 0)[:, None], c[0], c[1])
        return np.broadcast_to(c[0], p.shape)


def _room(rng) -> tuple[list[_Prim], dict]:
    cam_h = rng.uniform(1.1, 1.7)
    room_h = rng.uniform(2.6, 3.2)
    left, right = rng.uniform(1.8, 4.0), rng.uniform(1.8, 4.0)
    back = rng.uniform(5.0, 9.0)
    ex, ey, ez = np.eye(3)
    floor_colors = rng.uniform(0.25, 0.75, size=(2, 3)) * np.array([1.0, 0.85, 0.6])
    wall = rng.uniform(0.55, 0.95, size=3)
    prims = [
        _Prim("plane", (-ey, -cam_h, rng.uniform(0.3, 0.7)), _FLOOR, 0, texture="checker", colors=floor_colors),
        _Prim("plane", (ey, cam_h - room_h), _CEILING, 1, colors=[rng.uniform(0.8, 0.95, size=3)]),
        _Prim("plane", (ex, -left, 2, rng.uniform(0.4, 1.2)), _WALL, 2, texture="stripes", colors=[wall]),
        _Prim("plane", (-ex, -right, 2, rng.uniform(0.4, 1.2)), _WALL, 3, texture="stripes", colors=[wall]),
        _Prim("plane", (-ez, -back, 0, rng.uniform(0.4, 1.2)), _WALL, 4, texture="stripes", colors=[wall * 0.9]),
    ]  # no wall behind the camera: a ray pointing backwards also points up or down and meets the ceiling/floor
    return prims, {"cam_h": cam_h, "left": left, "right": right, "back": back}


def _person(rng, root: np.ndarray, yaw: float, height: float, inst: int) -> list[_Prim]:
    rot = _rot_y(yaw)
    skin = rng.uniform([0.55, 0.35, 0.25], [0.95, 0.75, 0.6])
    shirt, trousers = rng.uniform(0.05, 0.95, size=3), rng.uniform(0.05, 0.5, size=3)
    h = height
    # (part id, colour, x offset, bottom, top, half width, half depth), heights as fractions of the height
    boxes = [(2, shirt, 0.0, 0.52, 0.82, 0.11, 0.065)]
    for side in (-1.0, 1.0):
        boxes += [(3, shirt, side * 0.15, 0.62, 0.82, 0.035, 0.04), (4, skin, side * 0.15, 0.43, 0.62, 0.03, 0.035),
                  (5, trousers, side * 0.055, 0.28, 0.52, 0.05, 0.055),
                  (6, trousers, side * 0.055, 0.0, 0.28, 0.045, 0.05)]
    prims = []
    for part, color, x, bottom, top, hw, hd in boxes:
        center = root + rot @ np.array([x * h, 0.0, 0.0]) - np.array([0.0, (bottom + top) / 2 * h, 0.0])
        half = np.array([hw * h, (top - bottom) / 2 * h, hd * h])
        prims.append(_Prim("box", (center, half, rot), _PERSON, inst, part=part, colors=[color]))
    head = root - np.array([0.0, 0.91 * h, 0.0])
    prims.append(_Prim("sphere", (head, 0.075 * h), _PERSON, inst, part=1, colors=[skin]))
    return prims


def _objects(rng, room: dict, tan_half_fov: float) -> list[_Prim]:
    floor_y = room["cam_h"]
    placed: list[tuple[float, float, float]] = []  # (x, z, footprint radius)

    def place(radius: float):
        for _ in range(20):
            z = rng.uniform(1.8, room["back"] - radius - 0.2)
            half_span = min(z * tan_half_fov * 0.9, max(room["left"], room["right"]))
            x = rng.uniform(max(-half_span, -room["left"] + radius), min(half_span, room["right"] - radius))
            if all(math.hypot(x - px, z - pz) > radius + pr for px, pz, pr in placed):
                placed.append((x, z, radius))
                return x, z
        return None

    prims: list[_Prim] = []
    inst = 5
    for _ in range(rng.integers(1, 4)):
        half = rng.uniform(0.15, 0.5, size=3)
        spot = place(float(np.hypot(half[0], half[2])))
        if spot is not None:
            center = np.array([spot[0], floor_y - half[1], spot[1]])
            prims.append(_Prim("box", (center, half, _rot_y(rng.uniform(0, math.pi / 2))), _BOX, inst,
                               colors=[rng.uniform(0.1, 1.0, size=3)]))
            inst += 1
    for _ in range(rng.integers(0, 3)):
        r = rng.uniform(0.12, 0.4)
        spot = place(r)
        if spot is not None:
            center = np.array([spot[0], floor_y - r, spot[1]])
            prims.append(_Prim("sphere", (center, r, _rot_y(rng.uniform(0, math.pi))), _BALL, inst,
                               texture="two_tone", colors=rng.uniform(0.1, 1.0, size=(2, 3))))
            inst += 1
    for _ in range(rng.integers(0, 3)):
        spot = place(0.3)
        if spot is not None:
            height = 1.7 * rng.uniform(0.8, 1.1)
            prims += _person(rng, np.array([spot[0], floor_y, spot[1]]), rng.uniform(-math.pi, math.pi), height, inst)
            inst += 1
    return prims


def _screen_pixels(bounds, cam: np.ndarray, f: float, height: int, width: int) -> np.ndarray:
    """Flat indices of the pixels whose rays can hit a bounding sphere: the image rectangle spanned by the
    projected corners of the sphere's bounding cube (all pixels when the cube reaches behind the camera)."""
    if bounds is None:
        return np.arange(height * width)
    center, r = bounds
    c = center @ cam  # camera frame
    if c[2] - r < 1e-3:
        return np.arange(height * width)
    corners = c + r * np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    cols = f * corners[:, 0] / corners[:, 2] + width / 2 - 0.5
    rows = f * corners[:, 1] / corners[:, 2] + height / 2 - 0.5
    c0, c1 = max(0, math.floor(cols.min())), min(width - 1, math.ceil(cols.max()))
    r0, r1 = max(0, math.floor(rows.min())), min(height - 1, math.ceil(rows.max()))
    if c0 > c1 or r0 > r1:
        return np.zeros(0, dtype=np.int64)
    return (np.arange(r0, r1 + 1)[:, None] * width + np.arange(c0, c1 + 1)[None, :]).ravel()


def render_scene(seed: int, index: int, size=(64, 64), split: str = "train") -> dict[str, np.ndarray]:
    """One scene as numpy arrays: image uint8 (H,W,3); semseg, parts, instances, surfaces (index of the
    primitive hit) int64 (H,W); depth float32
    (H,W); normals float32 (H,W,3); edge, sal float32 (H,W); focal: the focal length in pixels (principal
    point at the image centre, pixel (i, j) looks along ((j + 0.5 - W/2) / f, (i + 0.5 - H/2) / f, 1))."""
    height, width = size
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    hfov = math.radians(rng.uniform(55.0, 75.0))
    f = width / 2 / math.tan(hfov / 2)
    pitch = math.radians(rng.uniform(-5.0, 20.0))  # > 0 looks down
    cam = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(pitch), math.sin(pitch)],
                    [0.0, -math.sin(pitch), math.cos(pitch)]])  # camera -> world, world y down
    u = (np.arange(width) + 0.5 - width / 2) / f
    v = (np.arange(height) + 0.5 - height / 2) / f
    d_cam = np.stack(np.broadcast_arrays(u[None, :], v[:, None], 1.0), -1).reshape(-1, 3)
    d = d_cam @ cam.T

    room_prims, room = _room(rng)
    prims = room_prims + _objects(rng, room, math.tan(hfov / 2))

    n_pix = d.shape[0]
    t_best = np.full(n_pix, np.inf)
    owner = np.zeros(n_pix, dtype=np.int64)
    normal = np.zeros((n_pix, 3))
    for i, prim in enumerate(prims):
        pix = _screen_pixels(prim.bounds(), cam, f, height, width)
        t, n = prim.intersect(d[pix])
        closer = t < t_best[pix]
        hit = pix[closer]
        t_best[hit], owner[hit], normal[hit] = t[closer], i, n[closer]
    points = t_best[:, None] * d
    albedo = np.empty((n_pix, 3))
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[order], np.arange(len(prims) + 1))
    for i, prim in enumerate(prims):
        pix = order[starts[i]:starts[i + 1]]
        if len(pix):
            albedo[pix] = prim.albedo(points[pix], normal[pix])
    light = np.array([rng.uniform(-0.6, 0.6), -1.0, rng.uniform(-0.9, 0.3)])
    light /= np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.clip(normal @ light, 0.0, None)
    color = albedo * shade[:, None] / (1.0 + 0.04 * t_best[:, None]) * 255.0
    color += rng.normal(0.0, 3.0, size=color.shape)

    table = np.array([[p.cls, p.part, p.inst] for p in prims], dtype=np.int64)[owner]
    semseg, parts, instances = (table[:, k].reshape(height, width) for k in range(3))
    return {
        "image": np.clip(color, 0, 255).round().astype(np.uint8).reshape(height, width, 3),
        "semseg": semseg,
        "parts": parts,
        "instances": instances,
        "surfaces": owner.reshape(height, width),
        "depth": t_best.reshape(height, width).astype(np.float32),
        "normals": (normal @ cam).reshape(height, width, 3).astype(np.float32),
        "edge": label_boundaries(instances),
        "sal": (semseg >= _BOX).astype(np.float32),
        "focal": np.float64(f),
    }


class SyntheticDataset(MultiTaskDataset):
    """``length`` scenes of ``size`` (H, W) for ``split``; item i is :func:`render_scene` (seed, split, i)."""

    name = "synthetic"

    def __init__(self, split: str = "train", tasks=None, size=(64, 64), length: int | None = None, seed: int = 0,
                 transform=None):
        super().__init__(tasks, transform)
        if split not in _SPLITS:
            raise ValueError(f"split: unknown split {split!r} for synthetic; valid: {', '.join(_SPLITS)}")
        if isinstance(size, int):
            size = (size, size)
        if len(size) != 2 or min(size) < 2:
            raise ValueError(f"size: expected (height, width) >= 2, got {size!r}")
        self.split, self.size, self.seed = split, (int(size[0]), int(size[1])), int(seed)
        self.length = int(length) if length is not None else (1000 if split == "train" else 200)

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> dict:
        scene = render_scene(self.seed, index, self.size, self.split)
        if "parts" in self.tasks and not scene["parts"].any():  # scored as PASCAL's human parts: no person, no score
            scene["parts"] = np.full_like(scene["parts"], IGNORE_INDEX)
        meta = {"dataset": "synthetic", "name": f"{self.split}_{index:06d}", "index": index, "size": self.size}
        return to_sample(scene["image"], {t: scene[t] for t in self.tasks}, meta)
