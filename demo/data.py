"""The demo dataset: a small LAION-like URL list of real photographs with planted relationships.

The pictures are scikit-image's bundled sample images (they ship inside the package, so nothing is
downloaded), whole or as separate regions of the large ones. Every row's planted relationship is
recorded, so later stages can be scored against it:

* ``unique``: a distinct picture with its own descriptive caption;
* ``near_duplicate``: a photograph plus copies re-encoded at low JPEG quality, shrunk and enlarged,
  cropped to ~90% and brightened or darkened. Per photograph the copies' captions are either all
  different, all the exact same caption, or variants of it (case, punctuation, a stock-site suffix);
* ``verbatim``: byte-identical image and identical caption under several URLs (what diffusion
  models memorise); these pictures are chosen to look unlike each other and the rest;
* ``template``: different pictures sharing one boilerplate caption;
* ``hard_negative``: different photos of one scene (a stereo pair) or different textures, whose
  captions differ in one meaningful word;
* ``broken``: URLs whose file is missing (HTTP 404) and HTML pages saved under ``.jpg``.

Layout of a demo folder (``DemoConfig.out``)::

    images/NNNN.jpg          files to serve over HTTP; URLs are names relative to this folder
    urls_relative.parquet    url (relative), caption, demo_kind, demo_group
    truth.parquet            the same rows plus source, variant, caption_relation, expect_ok, sha256
    urls.parquet             written by download_demo: the URL list with the server's absolute URLs
    shards/                  written by download_demo: img2dataset webdataset shards

The same config gives byte-identical files. Re-making a dataset with other settings leaves any
``shards/`` from the old one in place (img2dataset resumes by shard number): use a fresh folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from demo.http_server import LocalHTTPServer
from pipeline.core.config import DemoConfig, DownloadConfig, result_options
from pipeline.core.stage import FunctionStage, run_stage, seconds_since
from pipeline.core.storage import atomic_write_table, sha256_file
from pipeline.core.versions import installed_version
from pipeline.download.downloader import run_download

IMAGES_DIR = "images"
URLS_RELATIVE = "urls_relative.parquet"
URLS = "urls.parquet"
TRUTH = "truth.parquet"
#: The dataset step's done marker, under the demo folder.
DONE_DIR = ".done"
#: Bumped when the code that plants the rows changes what it writes.
DEMO_DATA_VERSION = 1
SHARDS_DIR = "shards"

KIND_UNIQUE = "unique"
KIND_NEAR_DUPLICATE = "near_duplicate"
KIND_VERBATIM = "verbatim"
KIND_TEMPLATE = "template"
KIND_HARD_NEGATIVE = "hard_negative"
KIND_BROKEN = "broken"

TEMPLATE_CAPTION = "Wallpaper HD 1080p free download"
STOCK_SUFFIXES = (" - Stock Photo", " | Stock Image", " - stock photo, royalty free")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Photo:
    """A picture cut from one of scikit-image's sample images, with captions that describe it.

    ``box`` is (top, left, side) in the source's pixels; None takes the centred largest square.
    ``part`` picks one array when the loader returns several (the stereo pair).
    """

    loader: str
    captions: tuple[str, ...]
    box: tuple[int, int, int] | None = None
    part: int | None = None
    label: str = ""

    @property
    def source(self) -> str:
        return f"skimage.data.{self.loader}" + (f"[{self.label}]" if self.label else "")


def _photo(
    loader: str,
    *captions: str,
    box: tuple[int, int, int] | None = None,
    part: int | None = None,
    label: str = "",
) -> Photo:
    return Photo(loader, captions, box, part, label)


# Chosen for looks that differ from each other and from every other picture (a tiny diffusion
# model trained later should be able to tell them apart).
VERBATIM_PHOTOS = (
    _photo(
        "astronaut",
        "Official portrait of an astronaut in an orange launch suit, with the US flag and a "
        "space shuttle model",
    ),
    _photo("chelsea", "A tabby cat with green eyes looking straight into the camera"),
    _photo("colorwheel", "A rainbow colour wheel fading to white in the centre, on a black background"),
    _photo("camera", "Black-and-white photo of a cameraman with a film camera on a tripod in a park"),
    _photo("logo", "Green and orange snake logo inside a circle"),
    _photo("checkerboard", "Black and white checkerboard pattern"),
)
# Five captions each: the photograph's own, then one per copy when copies get their own caption.
NEAR_DUPLICATE_PHOTOS = (
    _photo(
        "coffee",
        "A cup of espresso on a red saucer, on a wooden table, with a spoon",
        "Espresso in a red porcelain cup seen from above",
        "Morning coffee served on a wooden cafe table",
        "Small red coffee cup with crema and a silver spoon",
        "Top view of a coffee cup and saucer on dark wood",
    ),
    _photo(
        "rocket",
        "A rocket on its launch pad at dusk, between two lightning towers",
        "Launch pad lit up at night before a rocket launch",
        "Space rocket standing upright under a deep blue evening sky",
        "Floodlights around a rocket waiting for lift-off",
        "Spaceport at twilight with a rocket and tall towers",
    ),
    _photo(
        "coins",
        "Old silver coins in neat rows, on a black background",
        "Collection of ancient Greek coins photographed in black and white",
        "Twenty-four worn coins laid out in a grid",
        "Numismatic display of antique silver coins",
        "Rows of old coins on a dark cloth",
    ),
    _photo(
        "moon",
        "Grayscale close-up of the moon's surface, with craters and dark plains",
        "Lunar surface seen through a telescope",
        "Craters and shadows on the surface of the moon",
        "Black and white photo of the lunar terrain",
        "Detail of the moon with a bright crater near the top",
    ),
    _photo(
        "clock",
        "A wall clock blurred by camera motion, on a gray background",
        "Motion-blurred photo of a round clock",
        "Blurry clock face on a plain wall",
        "Shaky picture of a white wall clock",
        "Out-of-focus clock hanging on a gray wall",
    ),
    _photo(
        "cell",
        "Microscope image of a single round cell, on a gray background",
        "A lone cell under a light microscope",
        "Bright round cell floating in a gray medium",
        "Phase-contrast micrograph of one cell",
        "Single cell imaged in grayscale at high magnification",
    ),
    _photo(
        "horse",
        "Black silhouette of a standing horse, on a white background",
        "Horse silhouette in profile",
        "Simple black shape of a standing horse",
        "Clip art of a horse silhouette facing right",
        "Solid black horse outline on white",
    ),
    _photo(
        "shepp_logan_phantom",
        "The Shepp-Logan phantom, a simulated head cross-section, on black",
        "Standard test image for computed tomography reconstruction",
        "Gray ellipses forming a synthetic brain scan",
        "CT phantom with a white skull outline and dark ventricles",
        "Simulated tomography slice used to test reconstruction algorithms",
    ),
)
# Hubble deep field tiles (250 px, 3 rows x 4 columns): the template caption goes on a seeded pick.
_HUBBLE_CAPTIONS = (
    "Deep field photo: faint galaxies scattered over black space",
    "A bright orange galaxy next to a blue spiral among hundreds of distant galaxies",
    "Dense patch of tiny red and blue galaxies in deep space",
    "Sparse field of faint galaxies with a single bright white one",
    "Face-on spiral galaxy at the centre of a dark star field",
    "Cluster of bluish galaxies in the upper left of a telescope image",
    "Elongated orange galaxy on the left and a bright yellow galaxy in the lower right",
    "Hundreds of pinpoint galaxies in red, white and blue",
    "Quiet corner of the deep field with small pink and white galaxies",
    "A glowing yellow elliptical galaxy surrounded by tiny specks of light",
    "A small group of white and orange galaxies in the middle of the dark sky",
    "Bright foreground star with diffraction spikes beside distant galaxies",
)
TEMPLATE_PHOTOS = tuple(
    _photo("hubble_deep_field", caption, box=(250 * (i // 4), 250 * (i % 4), 250), label=f"r{i // 4}c{i % 4}")
    for i, caption in enumerate(_HUBBLE_CAPTIONS)
)
# Immunohistochemistry tiles (170 px, 3 x 3): different tissue structures of one slide.
_IHC_CAPTIONS = (
    "Immunohistochemistry slide: a dense fan of brown-stained epithelial cells",
    "Two stained glands meeting along a thin pale line",
    "Brown-stained gland beside loose tissue with blue nuclei on the right",
    "Stained glandular epithelium bordering a white empty space",
    "Connective tissue with scattered blue nuclei between brown glands",
    "Brown stained cells at upper left and pale stroma with blue nuclei",
    "Column of brown-outlined cells next to a blank white area",
    "Rosette of brown-stained cells surrounded by blue-stained nuclei",
    "Pale tissue with a round empty hole and a strip of stained cells on the left",
)
IHC_PHOTOS = tuple(
    _photo(
        "immunohistochemistry", caption, box=(170 * (i // 3), 170 * (i % 3), 170), label=f"r{i // 3}c{i % 3}"
    )
    for i, caption in enumerate(_IHC_CAPTIONS)
)
UNIQUE_PHOTOS = (
    _photo(
        "retina",
        "Retina photograph detail with large blood vessels crossing",
        box=(255, 255, 300),
        label="r0c0",
    ),
    _photo(
        "retina",
        "A dark red vessel crossing the retina from left to right",
        box=(255, 555, 300),
        label="r0c1",
    ),
    _photo(
        "retina",
        "A thick red retinal vein curving across an orange background",
        box=(255, 855, 300),
        label="r0c2",
    ),
    _photo(
        "retina",
        "Optic disc at the edge of an orange retina, where the vessels enter",
        box=(555, 255, 300),
        label="r1c0",
    ),
    _photo(
        "retina",
        "The dark fovea in the centre of the macula on a retina scan",
        box=(555, 555, 300),
        label="r1c1",
    ),
    _photo(
        "retina", "Branching blood vessels on the lower part of the retina", box=(855, 255, 300), label="r2c0"
    ),
    *IHC_PHOTOS,
    _photo("page", "Printed tutorial page headed Region-based segmentation", box=(0, 0, 191), label="left"),
    _photo(
        "page",
        "Paragraph about picking markers at the extremes of the grey-value histogram",
        box=(0, 193, 191),
        label="right",
    ),
    _photo(
        "text", "Handwritten maths on lined paper, photographed at an angle", box=(0, 0, 172), label="left"
    ),
    _photo(
        "text",
        "Close-up of pencil-written equations with arrows on a notebook page",
        box=(0, 276, 172),
        label="right",
    ),
    _photo("microaneurysms", "Grayscale retinal angiogram showing thin vessels and tiny microaneurysms"),
)
# Groups of different pictures whose captions differ in one meaningful word.
HARD_NEGATIVE_GROUPS = (
    (
        "motorcycle",
        (
            _photo(
                "stereo_motorcycle",
                "A red motorcycle parked in a garage, photographed from the left",
                part=0,
                label="left",
            ),
            _photo(
                "stereo_motorcycle",
                "A red motorcycle parked in a garage, photographed from the right",
                part=1,
                label="right",
            ),
        ),
    ),
    (
        "texture",
        (
            _photo("grass", "A close-up photo of grass"),
            _photo("gravel", "A close-up photo of gravel"),
            _photo("brick", "A close-up photo of bricks"),
        ),
    ),
)
# Rows that cannot become samples: (caption, body of the served file, or None for a missing file).
BROKEN_ROWS = (
    ("Vintage travel poster of a harbour city at night", None),
    ("Product photo of brown leather boots", None),
    (
        "Sunset over the mountains",
        (
            b"<!DOCTYPE html>\n<html><head><title>Image not available</title></head>"
            b"<body><h1>Sorry, this image is no longer available.</h1></body></html>\n"
        ),
    ),
    (
        "Cute puppy playing in the snow",
        b"<html><body><p>Access denied. Please enable cookies and reload the page.</p></body></html>\n",
    ),
)
NEAR_DUPLICATE_CAPTION_MODES = ("own", "exact", "variant")
TRUTH_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("demo_kind", pa.string()),
        ("demo_group", pa.string()),
        ("source", pa.string()),
        ("variant", pa.string()),
        ("caption_relation", pa.string()),
        ("expect_ok", pa.bool_()),
        ("sha256", pa.string()),
    ]
)


@dataclass(frozen=True)
class _Row:
    data: bytes | None  # None: the URL's file is missing
    caption: str
    kind: str
    group: str
    source: str
    variant: str
    caption_relation: str


def to_rgb(pixels: np.ndarray) -> Image.Image:
    """Any scikit-image sample (bool, float, gray, RGBA) as an 8-bit RGB picture."""
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype != np.uint8:
        pixels = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    if pixels.ndim == 2:
        return Image.fromarray(pixels, "L").convert("RGB")
    if pixels.shape[-1] == 4:
        rgba = Image.fromarray(pixels, "RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return Image.fromarray(pixels[..., :3], "RGB")


class _PhotoLoader:
    """Loads each scikit-image sample once per build and cuts square pictures from it."""

    def __init__(self, size: int):
        from skimage import data  # imported here: only building the demo dataset needs scikit-image

        self.data = data
        self.size = size
        self.cache: dict[str, Any] = {}

    def picture(self, photo: Photo) -> Image.Image:
        if photo.loader not in self.cache:
            self.cache[photo.loader] = getattr(self.data, photo.loader)()
        pixels = self.cache[photo.loader]
        if photo.part is not None:
            pixels = pixels[photo.part]
        image = to_rgb(np.asarray(pixels))
        if photo.box is None:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
        else:
            top, left, side = photo.box
        return image.crop((left, top, left + side, top + side)).resize(
            (self.size, self.size), Image.Resampling.LANCZOS
        )


def _jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def _near_duplicate_copies(image: Image.Image, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Four edited copies of ``image``: low JPEG quality, shrunk and enlarged, ~90% crop, brightness."""
    size = image.width
    quality = int(rng.integers(8, 16))
    shrink = float(rng.uniform(0.25, 0.4))
    crop = float(rng.uniform(0.88, 0.92))
    side = round(size * crop)
    left, top = (
        int(v) + (size - side) // 2 for v in rng.integers(-3, 4, size=2)
    )  # about centred, as thumbnails
    brightness = float(rng.choice([rng.uniform(0.7, 0.8), rng.uniform(1.2, 1.3)]))
    small = round(size * shrink)
    shrunk = image.resize((small, small), Image.Resampling.BILINEAR).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    cropped = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return [
        (f"jpeg_q{quality}", _jpeg(image, quality)),
        (f"down_up_{shrink:.2f}", _jpeg(shrunk)),
        (f"crop_{crop:.2f}", _jpeg(cropped)),
        (f"brightness_{brightness:.2f}", _jpeg(ImageEnhance.Brightness(image).enhance(brightness))),
    ]


def caption_variants(caption: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(relation, text) variants of a caption as re-hosting sites produce them."""
    return [
        ("variant_lowercase", caption.lower()),
        ("variant_uppercase", caption.upper()),
        ("variant_punctuation", re.sub(r"[^\w\s]", "", caption) + "!"),
        ("variant_stock_suffix", caption + STOCK_SUFFIXES[int(rng.integers(len(STOCK_SUFFIXES)))]),
    ]


def _check(cfg: DemoConfig) -> None:
    limits = {
        "verbatim_images": (1, len(VERBATIM_PHOTOS)),
        "verbatim_copies": (2, 1000),
        "near_duplicate_bases": (1, len(NEAR_DUPLICATE_PHOTOS)),
        "template_images": (2, len(TEMPLATE_PHOTOS)),
        "image_size": (32, 4096),
    }
    for name, (low, high) in limits.items():
        value = getattr(cfg, name)
        if not low <= value <= high:
            raise ValueError(f"demo.{name} must be between {low} and {high}; got {value}")


def _plant_rows(cfg: DemoConfig) -> list[_Row]:
    """Every row of the dataset, grouped by kind; the caller shuffles them."""
    _check(cfg)
    rng = np.random.default_rng(cfg.seed)
    photos = _PhotoLoader(cfg.image_size)
    rows: list[_Row] = []

    for photo in VERBATIM_PHOTOS[: cfg.verbatim_images]:
        data = _jpeg(photos.picture(photo))
        rows += [
            _Row(
                data,
                photo.captions[0],
                KIND_VERBATIM,
                f"verbatim:{photo.source}",
                photo.source,
                f"copy_{copy:02d}",
                "exact_duplicate",
            )
            for copy in range(cfg.verbatim_copies)
        ]

    caption_relation_of_original = {"own": "unique", "exact": "exact_duplicate", "variant": "variant_source"}
    for i, photo in enumerate(NEAR_DUPLICATE_PHOTOS[: cfg.near_duplicate_bases]):
        group = f"near_duplicate:{photo.source}"
        image = photos.picture(photo)
        mode = NEAR_DUPLICATE_CAPTION_MODES[i % len(NEAR_DUPLICATE_CAPTION_MODES)]
        rows.append(
            _Row(
                _jpeg(image),
                photo.captions[0],
                KIND_NEAR_DUPLICATE,
                group,
                photo.source,
                "original",
                caption_relation_of_original[mode],
            )
        )
        variants = caption_variants(photo.captions[0], rng)
        for j, (variant, data) in enumerate(_near_duplicate_copies(image, rng)):
            if mode == "own":
                relation, caption = "unique", photo.captions[1 + j]
            elif mode == "exact":
                relation, caption = "exact_duplicate", photo.captions[0]
            else:
                relation, caption = variants[j]
            rows.append(_Row(data, caption, KIND_NEAR_DUPLICATE, group, photo.source, variant, relation))

    template_picks = set(rng.choice(len(TEMPLATE_PHOTOS), size=cfg.template_images, replace=False).tolist())
    unique = [*VERBATIM_PHOTOS[cfg.verbatim_images :], *NEAR_DUPLICATE_PHOTOS[cfg.near_duplicate_bases :]]
    for i, photo in enumerate(TEMPLATE_PHOTOS):
        if i in template_picks:
            rows.append(
                _Row(
                    _jpeg(photos.picture(photo)),
                    TEMPLATE_CAPTION,
                    KIND_TEMPLATE,
                    "template",
                    photo.source,
                    "original",
                    "template",
                )
            )
        else:
            unique.append(photo)
    for photo in [*unique, *UNIQUE_PHOTOS]:
        rows.append(
            _Row(
                _jpeg(photos.picture(photo)),
                photo.captions[0],
                KIND_UNIQUE,
                f"unique:{photo.source}",
                photo.source,
                "original",
                "unique",
            )
        )

    for name, group_photos in HARD_NEGATIVE_GROUPS:
        rows += [
            _Row(
                _jpeg(photos.picture(photo)),
                photo.captions[0],
                KIND_HARD_NEGATIVE,
                f"hard_negative:{name}",
                photo.source,
                "original",
                "one_word_apart",
            )
            for photo in group_photos
        ]

    for caption, body in BROKEN_ROWS:
        variant = "missing_file" if body is None else "html_page"
        rows.append(_Row(body, caption, KIND_BROKEN, f"broken:{variant}", "", variant, "unique"))
    return rows


def make_demo_data(cfg: DemoConfig) -> dict[str, Any]:
    """Write the demo dataset into ``cfg.out`` (see the module docstring) and summarise it.

    A stage (:func:`~pipeline.core.stage.run_stage`): the same options, scikit-image's sample photos
    and Pillow's JPEG encoder give the same bytes, so a dataset made under them is kept (``skipped``).
    """
    out = Path(cfg.out)
    inputs = {
        "options": result_options(cfg),
        "libraries": [installed_version("scikit-image"), installed_version("pillow")],
        "version": DEMO_DATA_VERSION,
    }
    outputs = [out / IMAGES_DIR, out / TRUTH, out / URLS_RELATIVE]
    stage = FunctionStage("demo_data", inputs, outputs, lambda: _write_demo_data(cfg))
    return run_stage(stage, out / DONE_DIR)


def _write_demo_data(cfg: DemoConfig) -> dict[str, Any]:
    """The demo dataset's files; ``images/`` is replaced as a whole, so no earlier file lingers there."""
    started = time.monotonic()
    out = Path(cfg.out)
    rows = _plant_rows(cfg)
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(rows))
    staging = out / f".{IMAGES_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    records = []
    for position, index in enumerate(order):
        row = rows[int(index)]
        name = f"{position:04d}.jpg"
        if row.data is not None:
            (staging / name).write_bytes(row.data)
        records.append(
            {
                "url": name,
                "caption": row.caption,
                "demo_kind": row.kind,
                "demo_group": row.group,
                "source": row.source,
                "variant": row.variant,
                "caption_relation": row.caption_relation,
                "expect_ok": row.kind != KIND_BROKEN,
                "sha256": hashlib.sha256(row.data).hexdigest() if row.data is not None else None,
            }
        )
    shutil.rmtree(out / IMAGES_DIR, ignore_errors=True)
    staging.rename(out / IMAGES_DIR)
    truth = pa.Table.from_pylist(records, schema=TRUTH_SCHEMA)
    atomic_write_table(out / TRUTH, truth)
    atomic_write_table(out / URLS_RELATIVE, truth.select(["url", "caption", "demo_kind", "demo_group"]))
    return {
        "job": "make_demo_data",
        "out": str(out),
        "rows": truth.num_rows,
        "image_files": sum(r.data is not None for r in rows),
        "distinct_images": len({r.data for r in rows if r.data is not None and r.kind != KIND_BROKEN}),
        "expect_ok": sum(r["expect_ok"] for r in records),
        "kinds": dict(sorted(Counter(r.kind for r in rows).items())),
        "caption_relations": dict(sorted(Counter(r.caption_relation for r in rows).items())),
        "seconds": seconds_since(started),
    }


def write_url_list(demo_dir: str | Path, base_url: str) -> Path:
    """Write ``urls.parquet``: the relative URL list with ``base_url`` (e.g. the local server's) prefixed."""
    demo_dir = Path(demo_dir)
    relative = pq.read_table(demo_dir / URLS_RELATIVE)
    absolute = [f"{base_url.rstrip('/')}/{name}" for name in relative.column("url").to_pylist()]
    table = relative.set_column(
        relative.schema.get_field_index("url"), "url", pa.array(absolute, pa.string())
    )
    path = demo_dir / URLS
    atomic_write_table(path, table)
    return path


def download_demo(demo_dir: str | Path, download: DownloadConfig, samples_per_shard: int) -> dict[str, Any]:
    """Serve ``demo_dir/images`` on 127.0.0.1, write ``urls.parquet``, download it into ``demo_dir/shards``.

    ``download`` supplies the img2dataset settings (timeout, threads, resize, distributor...); its URL
    list, output folder, format and columns are set here. Returns
    :func:`pipeline.download.downloader.run_download`'s summary. A re-run resumes: finished shards are
    kept and the server is not asked for them again.
    """
    demo_dir = Path(demo_dir)
    if not (demo_dir / URLS_RELATIVE).is_file():
        raise FileNotFoundError(f"{demo_dir} has no {URLS_RELATIVE}; make the demo dataset first")
    with LocalHTTPServer(demo_dir / IMAGES_DIR) as server:
        cfg = dataclasses.replace(
            download,
            url_list=str(write_url_list(demo_dir, server.base_url)),
            out=str(demo_dir / SHARDS_DIR),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            number_sample_per_shard=samples_per_shard,
        )
        # The list is written anew for each server port: the download depends on the relative one.
        return run_download(cfg, source=sha256_file(demo_dir / URLS_RELATIVE))
