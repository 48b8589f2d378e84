"""Synthetic LAION-style captions with planted duplicates and hard negatives, plus pair scoring.

Used by the caption-dedup tests and benchmark to measure precision and recall against a known
truth. A *family* is one base caption and its planted variants; two rows are true duplicates
exactly when they share a family.

* Base captions fill slot templates (colours, objects, places, styles, numbers, brands...), so
  unrelated captions still share words and structure the way alt-text does.
* Variants (true duplicates) change only the surface: case, punctuation, whitespace, HTML
  entities, Unicode compatibility forms (full-width letters, curly quotes, no-break spaces),
  stock-site suffixes such as " - Stock Photo", and at most one small typo (a letter substituted,
  dropped, doubled or two letters swapped) inside a word of four letters or more.
* Hard negatives are separate families: the same template and words as another base with exactly
  one meaningful slot changed ("a red car parked on the street" vs "a blue car parked on the
  street"), and they get variants of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORDS: dict[str, tuple[str, ...]] = {
    "color": (
        "red",
        "blue",
        "green",
        "yellow",
        "black",
        "white",
        "orange",
        "purple",
        "pink",
        "brown",
        "grey",
        "golden",
        "silver",
        "navy",
        "beige",
        "turquoise",
        "maroon",
        "teal",
        "olive",
        "ivory",
    ),
    "thing": (
        "car",
        "bicycle",
        "sofa",
        "armchair",
        "lamp",
        "vase",
        "teapot",
        "backpack",
        "umbrella",
        "guitar",
        "piano",
        "sailboat",
        "tractor",
        "motorcycle",
        "kettle",
        "bookshelf",
        "mug",
        "sneaker",
        "handbag",
        "wristwatch",
        "laptop",
        "camera",
        "bench",
        "kite",
        "scooter",
        "truck",
        "dress",
        "jacket",
        "scarf",
        "hat",
        "candle",
        "clock",
        "mirror",
        "rug",
        "pillow",
        "blanket",
    ),
    "animal": (
        "cat",
        "dog",
        "horse",
        "fox",
        "owl",
        "rabbit",
        "deer",
        "eagle",
        "parrot",
        "tiger",
        "lion",
        "wolf",
        "bear",
        "squirrel",
        "duck",
        "swan",
        "goat",
        "sheep",
        "cow",
        "dolphin",
        "turtle",
        "hedgehog",
        "penguin",
        "zebra",
        "giraffe",
        "elephant",
        "butterfly",
        "ladybug",
        "frog",
    ),
    "place": (
        "street",
        "beach",
        "meadow",
        "forest",
        "harbor",
        "rooftop",
        "desert",
        "garden",
        "kitchen",
        "library",
        "market",
        "bridge",
        "river bank",
        "mountain trail",
        "city park",
        "parking lot",
        "train station",
        "snowy field",
        "vineyard",
        "lighthouse",
        "waterfall",
        "living room",
        "old town square",
        "country road",
        "wooden pier",
        "hotel lobby",
        "farmyard",
        "backyard",
    ),
    "action": (
        "parked on the",
        "standing in the",
        "resting in the",
        "left near the",
        "displayed in the",
        "abandoned in the",
        "reflected in a puddle on the",
        "photographed in the",
        "waiting at the",
    ),
    "animal_action": (
        "sleeping in the",
        "running across the",
        "sitting in the",
        "playing in the",
        "hiding in the",
        "walking along the",
        "looking out over the",
        "drinking water in the",
    ),
    "adj": (
        "vintage",
        "modern",
        "rustic",
        "elegant",
        "tiny",
        "huge",
        "cozy",
        "minimalist",
        "antique",
        "colorful",
        "wooden",
        "handmade",
        "luxury",
        "retro",
        "classic",
        "shiny",
        "broken",
        "dusty",
        "futuristic",
        "ornate",
        "simple",
        "weathered",
        "folding",
        "portable",
        "inflatable",
    ),
    "style": (
        "watercolor painting",
        "oil painting",
        "pencil sketch",
        "flat vector illustration",
        "3d render",
        "cartoon drawing",
        "black and white photo",
        "pixel art",
        "ink drawing",
        "digital art",
        "poster",
        "linocut print",
        "embroidery pattern",
        "mosaic",
        "charcoal drawing",
    ),
    "time": (
        "at sunset",
        "at dawn",
        "at night",
        "in winter",
        "in autumn",
        "in spring",
        "in summer",
        "on a rainy day",
        "in the fog",
        "under a full moon",
        "at golden hour",
        "in heavy snow",
    ),
    "number": ("two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve", "twenty"),
    "brand": (
        "Acme",
        "Northwind",
        "Contoso",
        "Globex",
        "Initech",
        "Umbrella",
        "Stark",
        "Wayne",
        "Hooli",
        "Vandelay",
        "Soylent",
        "Tyrell",
        "Cyberdyne",
        "Wonka",
        "Oscorp",
        "Aperture",
        "Gringotts",
    ),
    "product": (
        "running shoes",
        "coffee maker",
        "office chair",
        "phone case",
        "water bottle",
        "desk lamp",
        "bluetooth speaker",
        "yoga mat",
        "travel mug",
        "garden hose",
        "rain jacket",
        "wall clock",
        "hiking boots",
        "kitchen knife set",
        "gaming mouse",
        "duvet cover",
        "throw pillow",
    ),
    "size": ("small", "medium", "large", "extra large", "12 inch", "16 oz", "2 pack", "queen size"),
    "person": (
        "woman",
        "man",
        "girl",
        "boy",
        "old man",
        "young woman",
        "chef",
        "farmer",
        "dancer",
        "musician",
        "surfer",
        "nurse",
        "student",
        "cyclist",
        "painter",
        "fisherman",
    ),
    "garment": ("coat", "sweater", "dress", "shirt", "hat", "scarf", "raincoat", "hoodie", "suit"),
    "city": (
        "Paris",
        "Lisbon",
        "Kyoto",
        "Prague",
        "Seattle",
        "Cape Town",
        "Vienna",
        "Havana",
        "Oslo",
        "Marrakesh",
        "Istanbul",
        "Melbourne",
        "Quebec",
        "Edinburgh",
        "Florence",
        "Santiago",
    ),
    "year": tuple(str(y) for y in range(1990, 2026)),
}

TEMPLATES: tuple[str, ...] = (
    "a {color} {thing} {action} {place}",
    "{adj} {color} {thing} {action} {place} {time}",
    "a {animal} {animal_action} {place}",
    "cute {color} {animal} {animal_action} {place} {time}",
    "{style} of a {adj} {animal} {animal_action} {place}",
    "{style} of a {color} {thing} {time}",
    "{number} {adj} {thing}s {action} {place}",
    "{brand} {product}, {size}, {color}",
    "{brand} {adj} {product} in {color} ({size})",
    "portrait of a {person} wearing a {color} {garment}",
    "{person} in a {color} {garment} {time} in {city}",
    "view of the {place} in {city} {time}",
    "{city} {place} {time}, {year}",
    "{adj} {thing} icon",
    "{color} {animal}",
    "{number} {animal}s",
    "{year} {brand} {thing} for sale in {city}",
    "{adj} {style} of {city} {time}",
    "close-up of a {color} {thing} on a {adj} table",
    "the {adj} {thing} that my grandmother kept in the {place}, photographed {time} with an old film camera",
)

# Suffixes appended by stock sites and shops; the normaliser must strip them.
PLANTED_SUFFIXES: tuple[str, ...] = (
    " - Stock Photo",
    " stock photo",
    " Stock Image",
    " - stock vector",
    " royalty free",
    " | Shutterstock",
    " - Alamy",
    " - Getty Images",
    " free download",
    " Premium Vector",
    " Royalty Free Stock Photo",
    " - Stock Illustration",
)

_HTML = {"&": "&amp;", "'": "&#39;", '"': "&quot;", " ": "&nbsp;"}
_FULLWIDTH_OFFSET = 0xFEE0  # 'A' (0x41) -> 'Ａ' (0xFF21)


@dataclass
class PlantedCaptions:
    captions: list[str]
    family: np.ndarray  # int64 family id per caption; same family = true duplicate
    kind: list[str]  # "base", "variant", "typo" (variant with a typo) or "negative" (hard negative base)


def _fill(template: str, values: dict[str, str]) -> str:
    return template.format(**values)


def _slots(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _typo(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not candidates:
        return text
    i = candidates[rng.integers(len(candidates))]
    w = words[i]
    op = rng.integers(4)
    p = int(rng.integers(1, len(w) - 1))  # keep the first letter
    if op == 0:  # substitute
        letters = "abcdefghijklmnopqrstuvwxyz".replace(w[p].lower(), "")
        w = w[:p] + letters[rng.integers(len(letters))] + w[p + 1 :]
    elif op == 1:  # drop
        w = w[:p] + w[p + 1 :]
    elif op == 2:  # double
        w = w[:p] + w[p] + w[p:]
    else:  # swap two neighbours
        w = w[: p - 1] + w[p] + w[p - 1] + w[p + 1 :]
    words[i] = w
    return " ".join(words)


def _surface(text: str, rng: np.random.Generator) -> str:
    """One to three surface-only changes that normalisation undoes."""
    ops = rng.choice(7, size=int(rng.integers(1, 4)), replace=False)
    for op in ops:
        if op == 0:  # case
            style = rng.integers(3)
            text = text.upper() if style == 0 else text.title() if style == 1 else text.capitalize()
        elif op == 1:  # punctuation
            text = text.rstrip(".!") + (".", "!", "...", " !!")[rng.integers(4)]
            if rng.random() < 0.5:
                text = '"' + text + '"'
        elif op == 2:  # whitespace
            text = "  " + text.replace(" ", ("  ", " \t", "\u00a0")[rng.integers(3)], 2) + " \n"
        elif op == 3:  # HTML entities
            text = "".join(_HTML.get(ch, ch) if rng.random() < 0.5 else ch for ch in text)
            text = text.replace(" ", "&nbsp;", 1) if "&" not in text else text
        elif op == 4:  # stock-site suffix
            text = text + PLANTED_SUFFIXES[rng.integers(len(PLANTED_SUFFIXES))]
        elif op == 5:  # Unicode compatibility forms: full-width letters, curly quotes
            chars = list(text)
            for j in rng.choice(len(chars), size=min(len(chars), 4), replace=False):
                if "!" <= chars[j] <= "~":
                    chars[j] = chr(ord(chars[j]) + _FULLWIDTH_OFFSET)
            text = "".join(chars).replace("'", "\u2019")
        else:  # punctuation between words
            words = text.split(" ")
            if len(words) > 2:
                j = int(rng.integers(1, len(words) - 1))
                words[j] = words[j] + (",", " -", ";", ":")[rng.integers(4)]
            text = " ".join(words)
    return text


def generate(
    n: int,
    seed: int = 0,
    family_size: tuple[int, int] = (1, 4),
    duplicated_fraction: float = 0.3,
    typo_fraction: float = 0.35,
    negative_fraction: float = 0.3,
) -> PlantedCaptions:
    """About ``n`` captions (exactly ``n``): families of a base plus planted variants, shuffled.

    ``duplicated_fraction`` of the families get ``family_size`` extra variants (inclusive range),
    each a typo variant with probability ``typo_fraction``; ``negative_fraction`` of the families
    get a hard-negative sibling family (one slot changed), itself possibly duplicated.
    """
    rng = np.random.default_rng(seed)
    captions: list[str] = []
    family: list[int] = []
    kind: list[str] = []
    seen: set[str] = set()
    fam = 0

    def add_family(text: str, base_kind: str) -> None:
        nonlocal fam
        captions.append(text)
        family.append(fam)
        kind.append(base_kind)
        if rng.random() < duplicated_fraction:
            for _ in range(int(rng.integers(family_size[0], family_size[1] + 1))):
                typo = rng.random() < typo_fraction
                variant = _typo(text, rng) if typo else text
                variant = _surface(variant, rng) if (not typo or rng.random() < 0.5) else variant
                captions.append(variant)
                family.append(fam)
                kind.append("typo" if typo else "variant")
        fam += 1

    while len(captions) < n:
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        values = {s: WORDS[s][rng.integers(len(WORDS[s]))] for s in _slots(template)}
        text = _fill(template, values)
        if text in seen:
            continue
        seen.add(text)
        add_family(text, "base")
        if rng.random() < negative_fraction:
            slot = _slots(template)[rng.integers(len(_slots(template)))]
            options = [w for w in WORDS[slot] if w != values[slot]]
            sibling = _fill(template, {**values, slot: options[rng.integers(len(options))]})
            if sibling not in seen:
                seen.add(sibling)
                add_family(sibling, "negative")
    order = rng.permutation(len(captions))[:n]
    return PlantedCaptions(
        captions=[captions[i] for i in order],
        family=np.asarray(family, dtype=np.int64)[order],
        kind=[kind[i] for i in order],
    )


def _pairs_within(labels: np.ndarray) -> int:
    """Unordered pairs of rows that share a label: sum of size * (size - 1) / 2 over labels."""
    _, sizes = np.unique(np.asarray(labels), return_counts=True, axis=0)
    sizes = sizes.astype(np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def pair_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float | int]:
    """Pairwise precision and recall of ``predicted`` group labels against ``truth`` labels.

    Counted, not enumerated (a runaway group of 100k rows has 5e9 pairs): correct pairs are the
    pairs within each (truth, predicted) cell of the contingency table.
    """
    truth = np.asarray(truth, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    true_pairs = _pairs_within(truth)
    pred_pairs = _pairs_within(predicted)
    hits = _pairs_within(np.stack([truth, predicted], axis=1))
    return {
        "true_pairs": true_pairs,
        "predicted_pairs": pred_pairs,
        "correct_pairs": hits,
        "precision": hits / pred_pairs if pred_pairs else 1.0,
        "recall": hits / true_pairs if true_pairs else 1.0,
    }
