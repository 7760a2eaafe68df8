"""Synthetic CT-lesion phantoms written in exactly the DeepLesion layout (DL_info.csv + 16-bit Images_png/).

Why: every stage (data, search, training, evaluation) must run end to end in tests and in the demo without
the 220 GB dataset, through the *same* parsing and conversion code as the real data. Each key slice is a
body ellipse (subcutaneous fat, muscle wall) with the organs of one body region (chest, abdomen, pelvis)
at realistic HU, 1-3 lesions whose location and contrast depend on their coarse type (liver lesions in
the liver, lung nodules in the lungs, lytic/sclerotic bone lesions in the spine, ...), drawn as ellipsoids
so that they appear, fainter and smaller, on the neighbouring slices of the series. Annotations follow
DeepLesion: RECIST axes, box = RECIST extent padded by a few pixels, types only on val/test, a few rows
flagged Possibly_noisy (whose annotation is indeed off).

Deterministic (one seeded ``numpy.random.Generator``) and idempotent: a manifest records the parameters;
the same parameters reuse what is on disk, different ones regenerate (atomically, via a temp folder).
"""
import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from fsd_d2.errors import ConfigError, DataError
from fsd_d2.data.ct import HU_OFFSET
from fsd_d2.data.deeplesion import COLUMNS, CSV_NAME, IMAGES_DIR

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the drawing or the CSV changes, so cached sets regenerate (2: 1-based coordinates)
CSV_ORIGIN = 1  # DL_info.csv's pixel coordinates start from 1 (the reference loaders subtract 1)
MANIFEST = "synthetic_manifest.json"


@dataclass(frozen=True)
class SyntheticParams:
    num_key_slices: int = 300  # annotated key slices (DeepLesion: 32,120)
    image_size: int = 128  # square slices (DeepLesion: 512)
    slices_per_series: int = 5  # consecutive slices stored per series (key slice + neighbours)
    seed: int = 0
    noise_hu: float = 10.0  # Gaussian image noise, HU
    box_pad_px: int = 2  # RECIST extent -> box padding (DeepLesion: ~5 px at 512 px)

    def check(self) -> None:
        problems = []
        if self.num_key_slices < 3:
            problems.append(f"num_key_slices={self.num_key_slices} (need >= 3: one per split at least)")
        if self.image_size < 32:
            problems.append(f"image_size={self.image_size} (need >= 32)")
        if self.slices_per_series < 1:
            problems.append(f"slices_per_series={self.slices_per_series} (need >= 1)")
        if self.noise_hu < 0 or self.box_pad_px < 0:
            problems.append("noise_hu and box_pad_px must be >= 0")
        if problems:
            raise ConfigError(f"bad dataset.synthetic parameters: {'; '.join(problems)}")


# Organ: (name, cx, cy, ax, ay, angle_deg, HU, marrow HU or None), in units of the body's semi-axes
# (x: patient right on the image left, y: posterior down). Drawn in this order.
_ORGANS = {
    "chest": [
        ("lung_r", -0.47, -0.05, 0.38, 0.62, 8, -830, None),
        ("lung_l", 0.47, -0.05, 0.36, 0.6, -8, -830, None),
        ("mediastinum", 0.0, -0.15, 0.2, 0.55, 0, -90, None),  # fat around the heart and great vessels
        ("heart", 0.08, -0.08, 0.17, 0.3, -25, 40, None),
        ("aorta", 0.06, 0.42, 0.06, 0.08, 0, 150, None),  # contrast-enhanced
        ("spine", 0.0, 0.72, 0.11, 0.15, 0, 700, 250),
        ("sternum", 0.0, -0.86, 0.06, 0.05, 0, 600, 250)],
    "abdomen": [
        ("visceral_fat", 0.05, -0.05, 0.8, 0.75, 0, -90, None),
        ("liver", -0.42, -0.12, 0.48, 0.55, 20, 60, None),
        ("spleen", 0.58, 0.15, 0.18, 0.3, -20, 50, None),
        ("kidney_r", -0.33, 0.45, 0.13, 0.2, 15, 30, None),
        ("kidney_l", 0.33, 0.45, 0.13, 0.2, -15, 30, None),
        ("aorta", 0.07, 0.45, 0.06, 0.07, 0, 150, None),
        ("muscle_r", -0.2, 0.8, 0.12, 0.13, 0, 55, None),  # paraspinal muscles
        ("muscle_l", 0.2, 0.8, 0.12, 0.13, 0, 55, None),
        ("spine", 0.0, 0.7, 0.12, 0.16, 0, 700, 250)],
    "pelvis": [
        ("pelvic_fat", 0.0, 0.0, 0.8, 0.75, 0, -90, None),
        ("gluteal_r", -0.55, 0.5, 0.32, 0.32, 0, 50, None),
        ("gluteal_l", 0.55, 0.5, 0.32, 0.32, 0, 50, None),
        ("iliac_r", -0.62, 0.12, 0.14, 0.38, 20, 700, 250),
        ("iliac_l", 0.62, 0.12, 0.14, 0.38, -20, 700, 250),
        ("sacrum", 0.0, 0.62, 0.22, 0.13, 0, 600, 250),
        ("bladder", 0.0, -0.3, 0.28, 0.26, 0, 10, None)],
}
_BOWEL = {"abdomen": (4, 7), "pelvis": (1, 3)}  # random bowel loops (25 HU) in the fat, per region
_REGION_WEIGHTS = {"chest": 0.4, "abdomen": 0.4, "pelvis": 0.2}
_REGION_Z = {"chest": (0.2, 0.45), "abdomen": (0.45, 0.7), "pelvis": (0.7, 0.92)}  # normalised body height
# Coarse type code -> (frequency, regions, host organs ("wall" = body wall), HU ranges, long diameter mm)
_TYPES = {
    1: (0.05, ("chest", "abdomen", "pelvis"), ("spine", "iliac_r", "iliac_l", "sacrum"),
        ((80, 250), (1000, 1400)), (5, 35)),  # lytic or sclerotic
    2: (0.19, ("abdomen",), ("visceral_fat",), ((25, 60),), (8, 60)),
    3: (0.17, ("chest",), ("mediastinum",), ((25, 60),), (8, 50)),
    4: (0.14, ("abdomen",), ("liver",), ((-10, 30),), (5, 70)),
    5: (0.21, ("chest",), ("lung_r", "lung_l"), ((-100, 60),), (4, 50)),
    6: (0.06, ("abdomen",), ("kidney_r", "kidney_l"), ((-5, 10), (70, 110)), (5, 50)),  # cyst or solid
    7: (0.09, ("chest", "abdomen", "pelvis"), ("wall",), ((20, 70),), (8, 60)),
    8: (0.09, ("pelvis",), ("pelvic_fat",), ((25, 60),), (8, 60)),
}
_DICOM_WINDOWS = {1: (-450, 1050), 5: (-1350, 150)}  # the radiologist's window: bone / lung, else soft tissue
_SOFT_WINDOW = (-175, 275)
_NEIGHBOUR_CONTRAST = 0.6  # lesions are fainter off the key slice (partial volume)


@dataclass
class _Ellipse:
    """An organ or lesion: a rotated ellipse in the key slice, an ellipsoid along z (pixels, HU, mm)."""
    cx: float
    cy: float
    a: float
    b: float
    theta: float  # radians
    hu: float
    inner_hu: Optional[float] = None
    zc: float = 0.0  # mm, relative to the key slice
    rz: float = math.inf  # mm half-extent along z

    def at(self, z: float) -> Optional[Tuple[float, float]]:
        """Semi-axes on the slice at height ``z`` mm (None: the ellipsoid does not reach it)."""
        t = (z - self.zc) / self.rz
        return None if abs(t) >= 1 else (self.a * math.sqrt(1 - t * t), self.b * math.sqrt(1 - t * t))


def _fill(img: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float, hu: float, weight: float = 1.0):
    """Blend ``hu`` into ``img`` inside a rotated ellipse; only the ellipse's bounding box is touched."""
    h, w = img.shape
    r = max(a, b) + 1
    x0, x1, y0, y1 = max(0, int(cx - r)), min(w, int(cx + r) + 2), max(0, int(cy - r)), min(h, int(cy + r) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    dy, dx = np.arange(y0, y1)[:, None] - cy, np.arange(x0, x1)[None, :] - cx
    c, s = math.cos(theta), math.sin(theta)
    inside = ((dx * c + dy * s) / a) ** 2 + ((dy * c - dx * s) / b) ** 2 <= 1.0
    region = img[y0:y1, x0:x1]
    region[inside] = region[inside] * (1 - weight) + hu * weight


def _sample_in(rng: np.random.Generator, host: _Ellipse, margin: float) -> Tuple[float, float]:
    """A uniform point of ``host`` at least ~``margin`` px inside its border."""
    r, phi = math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
    u, v = r * max(host.a - margin, 0) * math.cos(phi), r * max(host.b - margin, 0) * math.sin(phi)
    c, s = math.cos(host.theta), math.sin(host.theta)
    return host.cx + u * c - v * s, host.cy + u * s + v * c


def _fmt(values) -> str:
    return ", ".join(f"{float(v):.6g}" for v in values)


class _Series:
    """One series: the anatomy of one body region and its lesions in 3D, rendered slice by slice."""

    def __init__(self, rng: np.random.Generator, p: SyntheticParams, types: Tuple[int, ...], region: str):
        S = p.image_size
        self.rng, self.p = rng, p
        self.spacing = (rng.uniform(330, 420) / S,) * 2 + (float(rng.choice([1.25, 2.5, 5.0], p=[0.3, 0.3, 0.4])),)
        A, B = rng.uniform(0.4, 0.46) * S, rng.uniform(0.3, 0.36) * S * (1.1 if region == "pelvis" else 1.0)
        bcx, bcy = S / 2 + rng.uniform(-0.03, 0.03) * S, S / 2 + rng.uniform(0.0, 0.05) * S
        self.body = (bcx, bcy, A, B)
        self.fat_px, self.wall_px = rng.uniform(0.05, 0.12) * A, rng.uniform(0.05, 0.08) * A  # band thicknesses

        def vary(x: float, by: float = 0.04) -> float:  # anatomy differs a little between patients
            return x + rng.uniform(-by, by)

        self.organs: Dict[str, _Ellipse] = {}
        for name, cx, cy, ax, ay, ang, hu, inner in _ORGANS[region]:
            fixed = name in ("spine", "sacrum", "sternum")  # bones run through the whole series
            self.organs[name] = _Ellipse(bcx + vary(cx) * A, bcy + vary(cy) * B, vary(ax, 0.02) * A,
                                         vary(ay, 0.02) * B, math.radians(ang + rng.uniform(-8, 8)),
                                         hu + rng.uniform(-8, 8), inner, zc=0.0 if fixed else rng.uniform(-30, 30),
                                         rz=math.inf if fixed else rng.uniform(60, 150))
        self.bowel = []
        fat = self.organs.get("visceral_fat") or self.organs.get("pelvic_fat")
        for _ in range(int(rng.integers(*_BOWEL[region], endpoint=True)) if fat else 0):
            cx, cy = _sample_in(rng, fat, 0.15 * A)
            r = rng.uniform(0.06, 0.12) * A
            lumen = float(rng.choice([-800.0, 10.0, 250.0]))  # gas, fluid or oral contrast
            self.bowel.append(_Ellipse(cx, cy, r, r, 0.0, 25 + rng.uniform(-5, 5), lumen, zc=rng.uniform(-10, 10),
                                       rz=rng.uniform(15, 40)))
        # What is visible where on the key slice (later shapes cover earlier ones): lesions go where their
        # host organ is actually seen, not where another organ covers it.
        order = []  # drawing order: bowel loops lie in the fat, under the solid organs
        for name, e in self.organs.items():
            order.append((name, e))
            if e is fat:
                order += [("bowel", b) for b in self.bowel]
        self.shapes = [e for _, e in order]
        self.label_of = {name: float(k) for k, (name, _) in enumerate(order, start=1) if name != "bowel"}
        self.labels = np.zeros((S, S), dtype=np.float32)
        for k, e in enumerate(self.shapes, start=1):
            if e.at(0.0):
                _fill(self.labels, e.cx, e.cy, *e.at(0.0), e.theta, float(k))
        self.lesions: List[Tuple[int, _Ellipse, Tuple[float, float]]] = []  # (type, ellipsoid, drift px/mm)
        for t in types:
            self._add_lesion(t)
        if not self.lesions:
            raise ConfigError(f"synthetic generator could not place a type-{types[0]} lesion; try another seed")
        self.z_rel = rng.uniform(*_REGION_Z[region])

    def _visible(self, label: float, points) -> bool:
        S = self.p.image_size
        return all(self.labels[min(S - 1, max(0, int(round(y)))), min(S - 1, max(0, int(round(x))))] == label
                   for x, y in points)

    def _place(self, t: int, a: float) -> Optional[Tuple[float, float, float]]:
        """Centre of a type-``t`` lesion of semi-axis ``a`` where a host organ is visible, and ``a`` capped to
        fit; None if this try landed where another organ covers the host."""
        hosts = [h for h in _TYPES[t][2] if h in self.organs] or ["wall"]
        name = hosts[int(self.rng.integers(len(hosts)))]
        if name == "wall":  # soft tissue: somewhere in the subcutaneous fat / muscle band
            bcx, bcy, A, B = self.body
            band = self.fat_px + self.wall_px
            phi, depth = self.rng.uniform(0, 2 * math.pi), self.rng.uniform(0.3, 1.0) * band
            cx, cy = bcx + (A - depth) * math.cos(phi), bcy + (B - depth) * math.sin(phi)
            return (cx, cy, min(a, band)) if self._visible(0.0, [(cx, cy)]) else None
        host = self.organs[name]
        a = min(a, 0.6 * min(host.a, host.b))
        cx, cy = _sample_in(self.rng, host, a)
        d = 0.7 * a
        inside = self._visible(self.label_of[name], [(cx, cy), (cx - d, cy), (cx + d, cy), (cx, cy - d), (cx, cy + d)])
        return (cx, cy, a) if inside else None

    def _add_lesion(self, t: int) -> None:
        rng, sx = self.rng, self.spacing[0]
        _, _, _, hu_ranges, (dmin, dmax) = _TYPES[t]
        for _ in range(50):  # a few tries to find the host visible and no earlier lesion overlapped
            placed = self._place(t, math.exp(rng.uniform(math.log(dmin), math.log(dmax))) / 2 / sx)
            if placed is None:
                continue
            cx, cy, a = placed
            a = max(1.5, a)
            b = a * rng.uniform(0.6, 1.0)
            if all(math.hypot(cx - o.cx, cy - o.cy) > a + o.a + 2 for _, o, _ in self.lesions):
                lo, hi = hu_ranges[int(rng.integers(len(hu_ranges)))]
                rz = max(a * sx, 1.5 * self.spacing[2])  # reaches the neighbour slices, smaller there
                self.lesions.append((t, _Ellipse(cx, cy, a, b, rng.uniform(0, math.pi), rng.uniform(lo, hi), rz=rz),
                                     (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))))
                return

    def render(self, z: float) -> np.ndarray:
        """HU image of the slice ``z`` mm from the key slice."""
        S, (bcx, bcy, A, B) = self.p.image_size, self.body
        img = np.full((S, S), -1000.0, dtype=np.float32)
        _fill(img, bcx, bcy, A, B, 0.0, -100.0)  # subcutaneous fat
        _fill(img, bcx, bcy, A - self.fat_px, B - self.fat_px, 0.0, 50.0)  # muscle wall
        band = self.fat_px + self.wall_px
        _fill(img, bcx, bcy, A - band, B - band, 0.0, 35.0)  # body cavity
        for e in self.shapes:
            axes = e.at(z)
            if axes:
                _fill(img, e.cx, e.cy, *axes, e.theta, e.hu)
                if e.inner_hu is not None:
                    _fill(img, e.cx, e.cy, axes[0] * 0.7, axes[1] * 0.7, e.theta, e.inner_hu)
        for _, e, (ddx, ddy) in self.lesions:
            axes = e.at(z)
            if axes:
                _fill(img, e.cx + ddx * z, e.cy + ddy * z, *axes, e.theta, e.hu, 1.0 if z == 0 else _NEIGHBOUR_CONTRAST)
        img = cv2.GaussianBlur(img, (0, 0), 0.6)
        img += self.rng.standard_normal(img.shape, dtype=np.float32) * self.p.noise_hu
        return np.clip(np.rint(img) + HU_OFFSET, 0, 65535).astype(np.uint16)

    def annotations(self) -> List[Dict]:
        """Per lesion: RECIST axes (long x1,y1,x2,y2, short x1,y1,x2,y2), padded box, diameters, location."""
        bcx, bcy, A, B = self.body
        out = []
        for t, e, _ in self.lesions:
            c, s = math.cos(e.theta), math.sin(e.theta)
            recist = [e.cx - e.a * c, e.cy - e.a * s, e.cx + e.a * c, e.cy + e.a * s,
                      e.cx + e.b * s, e.cy - e.b * c, e.cx - e.b * s, e.cy + e.b * c]
            loc = ((e.cx - bcx + A) / (2 * A), (e.cy - bcy + B) / (2 * B), self.z_rel)
            out.append({"type": t, "recist": recist, "diameters": (2 * e.a, 2 * e.b),
                        "location": tuple(float(np.clip(v, 0, 1)) for v in loc)})
        return out


def _box(recist: List[float], pad: float, size: int) -> List[float]:
    xs, ys = recist[0::2], recist[1::2]
    lim = size - 1
    return [max(0.0, min(xs) - pad), max(0.0, min(ys) - pad), min(lim, max(xs) + pad), min(lim, max(ys) + pad)]


def _pick_types(rng: np.random.Generator) -> Tuple[str, Tuple[int, ...]]:
    codes = list(_TYPES)
    freq = np.array([_TYPES[c][0] for c in codes])
    first = int(rng.choice(codes, p=freq / freq.sum()))
    regions = _TYPES[first][1]
    w = np.array([_REGION_WEIGHTS[r] for r in regions])
    region = str(rng.choice(regions, p=w / w.sum()))
    fits = [c for c in codes if region in _TYPES[c][1]]
    fw = np.array([_TYPES[c][0] for c in fits])
    more = rng.choice(fits, size=int(rng.choice([0, 1, 2], p=[0.6, 0.3, 0.1])), p=fw / fw.sum())
    return region, (first, *(int(c) for c in more))


def _write(root: Path, p: SyntheticParams) -> int:
    """Draw the whole set into ``root``; returns the number of CSV rows."""
    rng = np.random.default_rng(p.seed)
    n = p.num_key_slices
    num_patients = max(3, round(n / 1.3))
    per_patient = 1 + np.bincount(rng.integers(num_patients, size=n - num_patients), minlength=num_patients)
    order = rng.permutation(num_patients)  # official-style random patient split, every split non-empty
    n_held = max(1, round(0.15 * num_patients))
    split_of = {int(pat): 2 if i < n_held else 3 if i < 2 * n_held else 1 for i, pat in enumerate(order)}
    rows = []
    for pat in range(num_patients):
        gender, age = str(rng.choice(["M", "F"])), int(rng.integers(18, 90))
        for study in range(1, per_patient[pat] + 1):
            region, types = _pick_types(rng)
            series = _Series(rng, p, types, region)
            sid = int(rng.integers(1, 5))
            first = int(rng.integers(1, 300))
            last = first + p.slices_per_series - 1
            key = int(rng.integers(first, last + 1))
            folder = f"{pat + 1:06d}_{study:02d}_{sid:02d}"
            (root / IMAGES_DIR / folder).mkdir(parents=True)
            for idx in range(first, last + 1):
                cv2.imwrite(str(root / IMAGES_DIR / folder / f"{idx:03d}.png"),
                            series.render((idx - key) * series.spacing[2]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
            split = split_of[pat]
            window = _DICOM_WINDOWS.get(types[0], _SOFT_WINDOW)
            for ann in series.annotations():
                rows.append({"File_name": f"{folder}_{key:03d}.png", "Patient_index": pat + 1, "Study_index": study,
                             "Series_ID": sid, "Key_slice_index": key, "_ann": ann, "_n": len(series.lesions),
                             "Coarse_lesion_type": ann["type"] if split != 1 else -1, "Possibly_noisy": 0,
                             "Slice_range": _fmt((first, last)), "Spacing_mm_px_": _fmt(series.spacing),
                             "Image_size": _fmt((p.image_size,) * 2), "DICOM_windows": _fmt(window),
                             "Patient_gender": gender, "Patient_age": age, "Train_Val_Test": split})
    # A few "possibly noisy" rows whose annotation is really off; taken from multi-lesion slices when possible,
    # so dropping them never empties an image.
    pool = [i for i, r in enumerate(rows) if r["_n"] > 1] or list(range(len(rows)))
    for i in rng.choice(pool, size=min(len(pool), max(1, round(0.01 * len(rows)))), replace=False):
        ann = rows[i]["_ann"]
        shift, phi = rng.uniform(0.5, 1.0) * ann["diameters"][0] / 2, rng.uniform(0, 2 * math.pi)
        moved = np.add(ann["recist"], [shift * math.cos(phi), shift * math.sin(phi)] * 4)
        ann["recist"] = np.clip(moved, 0, p.image_size - 1).tolist()
        rows[i]["Possibly_noisy"] = 1
    with open(root / CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: r["File_name"]):
            ann = r["_ann"]
            box = _box(ann["recist"], p.box_pad_px, p.image_size)
            writer.writerow({**r, "Measurement_coordinates": _fmt(np.add(ann["recist"], CSV_ORIGIN)),
                             "Bounding_boxes": _fmt(np.add(box, CSV_ORIGIN)),
                             "Lesion_diameters_Pixel_": _fmt(ann["diameters"]),
                             "Normalized_lesion_location": _fmt(ann["location"])})
    return len(rows)


def _manifest(p: SyntheticParams) -> Dict:
    return {"generator": __name__, "version": GENERATOR_VERSION, "params": asdict(p)}


def _read_manifest(root: Path) -> Optional[Dict]:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _remove_abandoned_sets(path: Path) -> None:
    """Remove the half-written sets (``.<name>.tmp-<pid>``) of generations that were killed: their process is
    gone. A live process's folder is left alone; it is still writing."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            logger.info(f"removed {tmp}, left by a synthetic-set generation that was killed")


def process_alive(pid: int) -> bool:
    """Whether another process ``pid`` runs (this process's own folder is an earlier failed call's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return pid != os.getpid()


def generate_synthetic(root: str, **params) -> str:
    """Make (or reuse) the synthetic DeepLesion set in ``root``; returns ``root``.

    ``params`` are the fields of :class:`SyntheticParams`. A folder that holds other data (no manifest)
    is never overwritten.
    """
    known = [f.name for f in fields(SyntheticParams)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"unknown dataset.synthetic parameter(s) {unknown}; known: {known}")
    p = SyntheticParams(**params)
    p.check()
    path, want = Path(root), _manifest(p)
    if _read_manifest(path) == want and (path / CSV_NAME).is_file():
        logger.info(f"reusing the synthetic DeepLesion set in {path}")
        return str(path)
    if path.exists() and any(path.iterdir()) and _read_manifest(path) is None:
        raise DataError(f"{path} holds data not made by the synthetic generator (no {MANIFEST}); "
                        f"choose another dataset.root or empty that folder")
    start = time.perf_counter()
    _remove_abandoned_sets(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DataError(f"cannot write the synthetic set next to {path} ({e.strerror}); set dataset.root to a "
                        f"writable folder") from None
    num_rows = _write(tmp, p)
    (tmp / MANIFEST).write_text(json.dumps(want, indent=2, sort_keys=True))
    if _read_manifest(path) == want:  # another process finished the same set meanwhile
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(path, ignore_errors=True)  # an older synthetic set (and its now stale cache)
        os.replace(tmp, path)
    logger.info(f"generated {p.num_key_slices} synthetic key slices ({num_rows} lesions, {p.image_size} px) "
                f"in {path} in {time.perf_counter() - start:.1f}s")
    return str(path)
