"""Caption normalisation for duplicate detection: what two captions must share to count as equal.

The rules, applied in this order (all vectorised with Arrow compute kernels over a whole column,
except HTML unescaping, which runs in Python on the captions that contain ``&`` only):

1. **HTML**: entities are decoded (``&amp;`` ``&quot;`` ``&#39;`` ``&nbsp;``..., twice, so the
   double-escaped ``&amp;amp;`` common in scraped alt-text decodes too), then tags such as
   ``<a href='...'>`` or ``<b>`` become a space.
2. **Unicode NFKC**: compatibility forms fold to their plain equivalents (full-width ``Ａ`` -> ``A``,
   ligature ``ﬁ`` -> ``fi``, no-break space -> space, ``①`` -> ``1``).
3. **Case**: lower-cased (Unicode-aware).
4. **Deleted characters**: apostrophes (``'`` ``’`` ``‘`` ``ʼ`` ````` ``´``), so ``children's`` ==
   ``childrens`` == ``children’s``; and invisible characters: format characters (zero-width space,
   soft hyphen, BOM...), private-use characters, and control characters other than whitespace.
5. **Separators**: every run of whitespace, Unicode separators (category Z), punctuation (category
   P: ``.,;:!?-"()[]{}…–—/\\``, and also ``% # & @ *``, which Unicode counts as punctuation) and
   the symbols ``| ~ ^ ` • ¦ < > =`` becomes one space. Other symbols (category S: ``$ € + © ♥``,
   emoji) and all letters and digits are kept: they carry meaning.
6. Leading and trailing spaces are trimmed.
7. **Stock-site suffixes** (:data:`STOCK_SUFFIXES`, normalised by rules 1-6 themselves) are cut
   from the end, repeatedly, so ``"Red car - Royalty Free Stock Photo | Shutterstock"`` ->
   ``"red car"``. A suffix is only cut when a word precedes it: a caption that is nothing but a
   suffix (``"Stock Photo"``) is kept as it is rather than emptied.

Null stays null; a caption may normalise to the empty string (``"!!!"``). The dedup stage treats
both as empty and never groups empty captions with each other.
"""

from __future__ import annotations

import functools
import html
import re

import pyarrow as pa
import pyarrow.compute as pc

# Appended to alt-text by stock-photo sites, shops and wallpaper/vector sites. Matched after
# normalisation, at the end of a caption only, any number of times in a row.
STOCK_SUFFIXES: tuple[str, ...] = (
    "- Stock Photo",
    "stock photo",
    "stock photos",
    "stock photography",
    "stock image",
    "stock images",
    "stock picture",
    "stock pictures",
    "stock illustration",
    "stock illustrations",
    "- stock vector",
    "stock vectors",
    "stock footage",
    "stock video",
    "royalty free",
    "royalty-free",
    "| Shutterstock",
    "- Alamy",
    "alamy stock photo",
    "- Getty Images",
    "iStock",
    "iStockphoto",
    "Download Image Now",
    "Dreamstime",
    "Dreamstime.com",
    "123RF",
    "Depositphotos",
    "Adobe Stock",
    "free download",
    "Premium Vector",
    "Free Vector",
    "Premium Photo",
    "Free Photo",
    "Premium PSD",
    "Free PSD",
)

_TAG = r"<[^<>]{0,500}>"
# Removed outright: apostrophes, and invisible characters (format, private-use, and control
# characters other than the whitespace ones, which the next pattern turns into spaces).
_DELETE = "(?:['\u2019\u2018\u02bc`\u00b4]|[\\p{Cf}\\p{Co}]|[\\x00-\\x08\\x0e-\\x1f\\x7f-\\x9f])+"
# Runs of whitespace, separators and punctuation become one space.
_SEPARATE = r"[\s\p{Z}\p{P}|~^`\x{2022}\x{00a6}<>=]+"


def _unescape_html(texts: pa.Array) -> pa.Array:
    has_amp = pc.fill_null(pc.match_substring(texts, "&"), False)
    if not pc.any(has_amp).as_py():
        return texts
    subset = pc.filter(texts, has_amp).to_pylist()
    fixed = pa.array([html.unescape(html.unescape(t)) for t in subset], type=texts.type)
    return pc.replace_with_mask(texts, has_amp, fixed)


def _basic(texts: pa.Array) -> pa.Array:
    """Rules 1-6."""
    texts = _unescape_html(texts)
    if pc.any(pc.fill_null(pc.match_substring(texts, "<"), False)).as_py():
        texts = pc.replace_substring_regex(texts, _TAG, " ")
    texts = pc.utf8_normalize(texts, "NFKC")
    texts = pc.utf8_lower(texts)
    texts = pc.replace_substring_regex(texts, _DELETE, "")
    texts = pc.replace_substring_regex(texts, _SEPARATE, " ")
    return pc.utf8_trim(texts, " ")


@functools.lru_cache(maxsize=1)
def _suffix_pattern() -> str:
    forms = {s for s in _basic(pa.array(list(STOCK_SUFFIXES), pa.string())).to_pylist() if s}
    alternatives = "|".join(re.escape(s) for s in sorted(forms, key=lambda s: (-len(s), s)))
    return f"(?: (?:{alternatives}))+$"


def normalize_captions(texts: pa.Array | pa.ChunkedArray | list[str | None]) -> pa.Array:
    """Normalise a column of captions (rules in the module docstring); returns a string array."""
    if isinstance(texts, list):
        texts = pa.array(texts, type=pa.string())
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        texts = texts.cast(pa.string())
    if len(texts) == 0:
        return texts
    texts = _basic(texts)
    return pc.replace_substring_regex(texts, _suffix_pattern(), "")


def normalize_caption(text: str | None) -> str | None:
    """One caption through exactly the same rules as :func:`normalize_captions`."""
    return normalize_captions([text])[0].as_py()
