"""Synthetic traffic-camera frames for the fleet demo and the tests.

Task (shared with the real-camera labeller): the number of *moving* vehicles in view, clipped to the
classes 0, 1, 2, 3+. Frames are 32x32 grayscale float32 in [0, 1], shape (1, 32, 32), as the trainer takes
them; `capture` gives them as a camera hands them to the frame buffer, uint8 0..255.

Each camera looks at one road from its own viewpoint and has its own conditions, so data is non-IID across
cameras in the ways real deployments differ:

* viewpoint: the road's angle and position in the frame, its width, lane count;
* lighting: scene brightness, sensor gain, and a day/night style (at night vehicles are dark shapes
  with bright headlights on a dark road);
* traffic density: a per-camera Poisson mean, so label distributions are skewed (a quiet street sees
  mostly 0, a highway mostly 3+);
* sensor noise level;
* a static background (buildings, trees and cars parked off the road) that is the same in every frame of a
  camera. Parked cars are not counted: background subtraction on a real camera never sees them move.

The label is the true number of vehicles fully on the visible road, which is what a background-subtraction
pseudo-labeller approximates on a real camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.framebuffer import CAMERA_FRAME_SHAPE

# The frames drawn are the ones the cameras deliver (one grayscale channel); the drawing below is square.
FRAME_SHAPE = CAMERA_FRAME_SHAPE
SIZE = FRAME_SHAPE[-1]
NUM_CLASSES = 4
CLASS_NAMES = ("0 vehicles", "1 vehicle", "2 vehicles", "3 or more vehicles")
_MAX_VEHICLES = 6

_yy, _xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_yy += 0.5
_xx += 0.5


@dataclass(frozen=True)
class CameraStyle:
    """What makes one camera's frames different from another's."""

    angle: float  # road direction, radians from the image x axis
    offset: float  # road centre line's distance from the image centre, pixels
    road_width: float
    lanes: int
    brightness: float  # background level
    gain: float  # contrast of everything against the background
    night: bool
    noise: float  # sensor noise standard deviation
    density: float  # Poisson mean of vehicles per frame


def _soft_band(d: np.ndarray, half: float) -> np.ndarray:
    """1 inside |d| < half, 0 outside, with a one-pixel linear edge (cheap anti-aliasing)."""
    return np.clip(half + 0.5 - np.abs(d), 0.0, 1.0)


class SyntheticCamera:
    """One synthetic traffic camera. ``camera_index`` alone fixes the camera (its style and static
    background: camera 3 is the same camera in every process and round); ``seed`` selects the stream of
    frames, so the same (camera_index, seed) always gives the same frames."""

    def __init__(self, camera_index: int, seed: int = 0):
        if camera_index < 0:
            raise ValueError(f"camera_index must be >= 0, got {camera_index}")
        self.camera_index = camera_index
        style_rng = np.random.default_rng([camera_index, 1])
        self.style = CameraStyle(
            angle=float(style_rng.uniform(-0.6, 0.6) + (np.pi / 2 if style_rng.random() < 0.3 else 0.0)),
            offset=float(style_rng.uniform(-5.0, 5.0)),
            road_width=float(style_rng.uniform(10.0, 15.0)),
            lanes=int(style_rng.integers(1, 3)),
            brightness=float(style_rng.uniform(0.35, 0.75)),
            gain=float(style_rng.uniform(0.7, 1.3)),
            night=bool(style_rng.random() < 0.25),
            noise=float(style_rng.uniform(0.01, 0.06)),
            density=float(np.exp(style_rng.uniform(np.log(0.4), np.log(4.0)))),
        )
        self._rng = np.random.default_rng([seed, camera_index, 2])
        s = self.style
        cos, sin = np.cos(s.angle), np.sin(s.angle)
        cx, cy = SIZE / 2, SIZE / 2
        self._u = ((_xx - cx) * cos + (_yy - cy) * sin).astype(np.float32)  # along the road
        self._v = (-(_xx - cx) * sin + (_yy - cy) * cos - s.offset).astype(np.float32)  # across it
        self._road = _soft_band(self._v, s.road_width / 2)
        on_road = self._road > 0.99
        # vehicles are placed only where they are fully in view
        self._u_range = (float(self._u[on_road].min()) + 4.0, float(self._u[on_road].max()) - 4.0)
        self._background = self._make_background(np.random.default_rng([camera_index, 3]))

    def _make_background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.style
        base = s.brightness * (0.35 if s.night else 1.0)
        img = np.full((SIZE, SIZE), base, dtype=np.float32)
        img += 0.08 * s.gain * (_yy / SIZE - 0.5)  # sky/ground gradient
        off_road = 1.0 - self._road
        for _ in range(int(rng.integers(2, 6))):  # buildings and trees: soft blobs off the road
            bx, by = rng.uniform(0, SIZE, 2)
            r = rng.uniform(2.0, 6.0)
            blob = np.clip(r + 0.5 - np.hypot(_xx - bx, _yy - by), 0.0, 1.0)
            img += rng.uniform(-0.15, 0.15) * s.gain * blob * off_road
        road_level = base - 0.15 * s.gain
        img = img * off_road + road_level * self._road
        for _ in range(int(rng.integers(0, 3))):  # parked cars just beside the road: static, not counted
            side = 1.0 if rng.random() < 0.5 else -1.0
            v0 = side * (s.road_width / 2 + 2.5)
            u0 = rng.uniform(-10.0, 10.0)
            car = _soft_band(self._u - u0, 2.5) * _soft_band(self._v - v0, 1.5)
            img += rng.uniform(0.2, 0.4) * s.gain * (1.0 if rng.random() < 0.5 else -1.0) * car
        return img

    def _lane_centres(self) -> list[float]:
        w, n = self.style.road_width, self.style.lanes
        return [(-w / 2 + (i + 0.5) * w / n) for i in range(n)]

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` frames and labels: x float32 (n, 1, 32, 32) in [0, 1], y int64 (n,) in 0..3."""
        x, y, _ = self.sample_with_boxes(n)
        return x, y

    def sample_with_boxes(self, n: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """``n`` frames, their count labels, and each frame's true vehicle boxes: a float32 (k, 4) array of
        (x0, y0, x1, y1) in pixels (pixel i spans [i, i+1)), the axis-aligned box of each vehicle's body on the
        road. Parked cars are background, not boxes. The same stream as `sample`: same frames, same labels."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        s, rng = self.style, self._rng
        x = np.empty((n, *FRAME_SHAPE), dtype=np.float32)
        y = np.empty(n, dtype=np.int64)
        boxes = []
        lanes = self._lane_centres()
        lane_dash = _soft_band(self._v, 0.4)  # centre line (the lane divider when there are two lanes)
        for i in range(n):
            frame = self._background.copy()
            # lane markings, moving dash phase
            phase = rng.uniform(0, 8)
            dashes = (np.mod(self._u + phase, 8.0) < 3.5).astype(np.float32) * lane_dash * self._road
            frame += 0.12 * s.gain * dashes
            count = min(int(rng.poisson(s.density)), _MAX_VEHICLES)
            placed = self._place(count, lanes, rng)
            for u0, v0, length, width, contrast in placed:
                body = _soft_band(self._u - u0, length / 2) * _soft_band(self._v - v0, width / 2)
                if s.night:  # dark body, bright headlights at the front
                    frame -= 0.1 * body
                    front = _soft_band(self._u - (u0 + length / 2 - 1.0), 1.0) * _soft_band(self._v - v0, width / 2)
                    frame += 0.5 * s.gain * front
                else:
                    frame += contrast * s.gain * body
            y[i] = min(len(placed), NUM_CLASSES - 1)
            boxes.append(self._boxes(placed))
            # per-frame lighting jitter and sensor noise
            frame = frame * rng.uniform(0.92, 1.08) + rng.uniform(-0.04, 0.04)
            frame += rng.normal(0.0, s.noise, frame.shape).astype(np.float32)
            np.clip(frame, 0.0, 1.0, out=x[i, 0])
        return x, y, boxes

    def _boxes(self, placed: list[tuple[float, float, float, float, float]]) -> np.ndarray:
        """Image-axis boxes (x0, y0, x1, y1) of vehicle bodies given in road coordinates (u0, v0, length, width):
        the body is a rectangle rotated by the road's angle; its edges are where the soft band is one half."""
        s = self.style
        cos, sin = abs(np.cos(s.angle)), abs(np.sin(s.angle))
        out = np.empty((len(placed), 4), dtype=np.float32)
        for k, (u0, v0, length, width, _) in enumerate(placed):
            cx = SIZE / 2 + u0 * np.cos(s.angle) - (v0 + s.offset) * np.sin(s.angle)
            cy = SIZE / 2 + u0 * np.sin(s.angle) + (v0 + s.offset) * np.cos(s.angle)
            hx = cos * length / 2 + sin * width / 2
            hy = sin * length / 2 + cos * width / 2
            out[k] = (cx - hx, cy - hy, cx + hx, cy + hy)
        return np.clip(out, 0.0, SIZE)

    def capture(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` frames as a camera hands them to the frame buffer: x uint8 (n, 1, 32, 32) in 0..255 (8-bit
        luma, what `appliance.framebuffer` stores), y int64 (n,) in 0..3."""
        x, y = self.sample(n)
        return np.rint(x * 255).astype(np.uint8), y

    def _place(
        self, count: int, lanes: list[float], rng: np.random.Generator
    ) -> list[tuple[float, float, float, float, float]]:
        """Vehicle boxes (u, v, length, width, contrast) that do not overlap; may place fewer than asked."""
        placed: list[tuple[float, float, float, float, float]] = []
        lo, hi = self._u_range
        for _ in range(count):
            for _attempt in range(10):
                lane = lanes[int(rng.integers(len(lanes)))]
                u0 = float(rng.uniform(lo, hi))
                if all(abs(u0 - p[0]) > 7.5 or abs(lane - p[1]) > 2.5 for p in placed):
                    length = float(rng.uniform(4.0, 6.0))
                    width = float(min(rng.uniform(2.5, 3.5), self.style.road_width / len(lanes) - 0.5))
                    sign = -1.0 if rng.random() < 0.3 else 1.0
                    placed.append((u0, lane, length, width, sign * float(rng.uniform(0.3, 0.5))))
                    break
        return placed

    def label_histogram(self, n: int = 2000) -> np.ndarray:
        """Fraction of each class this camera produces (for showing the non-IID skew)."""
        probe = SyntheticCamera.__new__(SyntheticCamera)
        probe.__dict__.update(self.__dict__)
        probe._rng = np.random.default_rng([self.camera_index, 99, 99])
        _, y = probe.sample(n)
        return np.bincount(y, minlength=NUM_CLASSES) / max(n, 1)


def evaluation_set(
    n: int, cameras: range | list[int] = range(8), sample_seed: int = 12345
) -> tuple[np.ndarray, np.ndarray]:
    """A held-out set of ``n`` frames mixing the styles of ``cameras``, balanced by camera, drawn from a
    separate sample stream (training seeds index a different stream family, so frames never coincide)."""
    x, y, _ = evaluation_set_with_boxes(n, cameras, sample_seed)
    return x, y


def evaluation_set_with_boxes(
    n: int, cameras: range | list[int] = range(8), sample_seed: int = 12345
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """`evaluation_set` with each frame's true vehicle boxes (the same frames and labels)."""
    cams = list(cameras)
    if not cams:
        raise ValueError("evaluation_set needs at least one camera")
    xs, ys, boxes = [], [], []
    per = [n // len(cams) + (1 if i < n % len(cams) else 0) for i in range(len(cams))]
    for cam_index, k in zip(cams, per, strict=True):
        cam = SyntheticCamera(cam_index)
        cam._rng = np.random.default_rng([cam_index, sample_seed, 7])
        x, y, b = cam.sample_with_boxes(k)
        xs.append(x)
        ys.append(y)
        boxes += b
    return np.concatenate(xs), np.concatenate(ys), boxes
