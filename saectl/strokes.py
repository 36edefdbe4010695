"""What an image SAE's decoder directions look like, as numbers: the figures that tell the three
kinds of feature in Ayonrinde, Pearce and Sharkey's MNIST experiment apart — whole-digit
*templates*, *strokes* (line segments) and small *fragments* (README, "MDL on MNIST").

Each figure is a function of one direction d (a decoder row, reshaped to h × w):

- template-ness: the largest Pearson correlation of d with any of a set of reference images
  (the caller passes training images and class means). Signed: the decoder adds +a·d, a > 0.
- extent: the fewest pixels holding half of d's squared mass (Σ d² over them ≥ ½ Σ d²).
- stroke-ness: the share of the positive lobe d⁺ = max(d, 0)'s squared mass that the best
  non-negative combination of one or two line segments explains, 1 − ‖d⁺ − Σ c_j S_j‖² / ‖d⁺‖²
  with c_j ≥ 0. A segment S is a pen stroke of width w in `WIDTHS` along a line segment of
  length ≥ `MIN_LENGTH` between two points of a lattice of spacing `STEP` (ink 1 within w/2 of
  the segment, falling linearly to 0 over the next pixel), so a stroke is longer than it is
  wide and a round blob is not one. The second segment
  is chosen greedily, given the first.
- components: the 8-connected components of the positive lobe's pixels above `LOBE` × its
  maximum.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

STEP = 2  # lattice spacing of segment end points, pixels
MIN_LENGTH = 5.0  # shortest segment, pixels: longer than the widest stroke
WIDTHS = (1.5, 2.5, 3.5)  # stroke widths, pixels (MNIST pen strokes are 2-4 pixels wide)
LOBE = 0.25  # a pixel is in the positive lobe when it is above this share of its maximum
FIGURES = ("template", "extent", "stroke", "components")


@dataclass(frozen=True)
class Segments:
    """Every segment mask of an image shape, as unit-norm rows (n_segments, h·w)."""

    masks: np.ndarray
    ends: np.ndarray
    """(n_segments, 5): y0, x0, y1, x1, width."""


@lru_cache(maxsize=4)
def segments(h: int, w: int) -> Segments:
    """All segments of `WIDTHS` between lattice points at least `MIN_LENGTH` apart."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pix = np.stack([yy.ravel(), xx.ravel()], 1)
    pts = [(y, x) for y in range(1, h, STEP) for x in range(1, w, STEP)]
    rows, ends = [], []
    for (y0, x0), (y1, x1) in itertools.combinations(pts, 2):
        length = math.hypot(y1 - y0, x1 - x0)
        if length < MIN_LENGTH:
            continue
        a, ab = np.array([y0, x0], np.float32), np.array([y1 - y0, x1 - x0], np.float32)
        t = np.clip(((pix - a) @ ab) / (length * length), 0, 1)
        dist = np.linalg.norm(pix - (a + t[:, None] * ab), axis=1)
        for width in WIDTHS:
            rows.append(_pen(dist, width))
            ends.append((y0, x0, y1, x1, width))
    masks = np.asarray(rows, np.float32)
    masks /= np.linalg.norm(masks, axis=1, keepdims=True)
    return Segments(masks, np.asarray(ends, np.float32))


def template(dirs: np.ndarray, refs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per direction, the largest Pearson correlation with any row of `refs`."""
    d = _standard(dirs)
    best = np.full(len(d), -1.0, np.float32)
    for lo in range(0, len(refs), chunk):
        r = _standard(refs[lo:lo + chunk])
        best = np.maximum(best, (d @ r.T).max(1))
    return best


def _standard(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def extent(dirs: np.ndarray) -> np.ndarray:
    """Per direction, the fewest pixels holding half its squared mass."""
    sq = np.sort(np.asarray(dirs, np.float64) ** 2, axis=1)[:, ::-1]
    cum = np.cumsum(sq, axis=1)
    return (cum < 0.5 * cum[:, -1:]).sum(1) + 1


def strokeness(dirs: np.ndarray, hw: tuple[int, int], two: bool = True) -> np.ndarray:
    """Per direction, the share of its positive lobe's squared mass that one (or, with `two`,
    up to two) non-negative line segments explain."""
    seg = segments(*hw)
    pos = np.maximum(np.asarray(dirs, np.float32), 0)
    norm2 = (pos ** 2).sum(1)
    out = np.zeros(len(pos), np.float32)
    for lo in range(0, len(pos), 256):
        p = pos[lo:lo + 256]
        a = p @ seg.masks.T  # <d⁺, S> for unit-norm S: one segment explains a²
        first = a.argmax(1)
        a1 = a[np.arange(len(p)), first][:, None]
        best = a1[:, 0] ** 2
        if two:
            best = np.maximum(best, _second(a, a1, seg.masks[first] @ seg.masks.T))
        out[lo:lo + len(p)] = best
    return np.where(norm2 > 0, out / np.maximum(norm2, 1e-30), 0.0)


def _second(a: np.ndarray, a1: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Per row, the squared norm of d⁺'s projection on the cone {c1 S_first + c2 S_j : c ≥ 0},
    maximised over j; a: <d⁺, S_j>, a1: <d⁺, S_first>, g: <S_first, S_j> (unit-norm S)."""
    det = 1 - g * g
    ok = det > 1e-6
    safe = np.where(ok, det, 1.0)
    both = ok & (a1 - g * a >= 0) & (a - g * a1 >= 0)  # both coefficients non-negative
    return np.where(both, (a1 * a1 + a * a - 2 * g * a1 * a) / safe, 0.0).max(1)


def components(dirs: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Per direction, the 8-connected components of its positive lobe (above LOBE × max)."""
    from scipy import ndimage  # deferred: only the figures need it

    out = np.zeros(len(dirs), np.int64)
    eight = np.ones((3, 3), bool)
    for j, d in enumerate(np.asarray(dirs, np.float32)):
        top = d.max()
        if top <= 0:
            continue
        out[j] = ndimage.label((d > LOBE * top).reshape(hw), structure=eight)[1]
    return out


def figures(dirs: np.ndarray, hw: tuple[int, int], refs: np.ndarray) -> dict[str, np.ndarray]:
    """Every figure of FIGURES for each direction (rows of `dirs`)."""
    return {"template": template(dirs, refs), "extent": extent(dirs),
            "stroke": strokeness(dirs, hw), "components": components(dirs, hw)}


def segment_image(hw: tuple[int, int], y0: float, x0: float, y1: float, x1: float,
                  width: float) -> np.ndarray:
    """A line segment drawn like a pen stroke (soft edge), for tests and for reference."""
    yy, xx = np.mgrid[0:hw[0], 0:hw[1]].astype(np.float32)
    a, ab = np.array([y0, x0], np.float32), np.array([y1 - y0, x1 - x0], np.float32)
    pix = np.stack([yy.ravel(), xx.ravel()], 1)
    t = np.clip(((pix - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    dist = np.linalg.norm(pix - (a + t[:, None] * ab), axis=1)
    return _pen(dist, width).reshape(hw)


def _pen(dist: np.ndarray, width: float) -> np.ndarray:
    """Ink of a pen of `width` at pixels `dist` from its path: 1 inside, a one-pixel ramp at
    the edge (MNIST's strokes are anti-aliased)."""
    return np.clip(width / 2 + 0.5 - dist, 0, 1).astype(np.float32)
