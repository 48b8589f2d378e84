"""The quiet console: --verbose, Ray Data's console handler, Ray's token notice, the demo's prompts.

In-process and without Ray; what a whole job prints is checked by tests/test_fast_noop.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.core.cli import build_parser, parse_config
from pipeline.core.config import RayConfig
from pipeline.core.ray_runtime import _DropMessages, _quiet_token_auth_notice, configure_data_context

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "models" / "amg-memorizing"


@pytest.mark.parametrize("main, extra", [("ingest", ("ray",)), ("demo", ("ray", "download", "audit"))])
def test_verbose_is_a_flag_of_every_job_that_uses_ray(main: str, extra: tuple[str, ...]):
    required = {"ingest": ["--shards", "s", "--out", "o"], "demo": []}[main]
    parse = lambda *flags: parse_config(build_parser("t", main=main, extra=extra), [*required, *flags])  # noqa: E731
    assert parse().ray.verbose is False and parse().ray.progress_bars is False  # quiet by default
    assert parse("--verbose").ray.verbose is True
    assert parse("--ray-verbose").ray.verbose is True
    assert parse("--verbose", "--no-verbose").ray.verbose is False


def _ray_data_console() -> logging.Handler:
    import ray.data  # noqa: F401 (configures the "ray.data" logger)

    (handler,) = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    return handler


def _passes(handler: logging.Handler, level: int, message: str) -> bool:
    record = logging.LogRecord("ray.data.x", level, __file__, 1, message, None, None)
    return record.levelno >= handler.level and bool(handler.filter(record))


def test_ray_data_console_shows_warnings_only_unless_verbose():
    import ray.data

    console = _ray_data_console()
    try:
        configure_data_context(RayConfig())
        assert ray.data.DataContext.get_current().enable_progress_bars is False
        assert not _passes(console, logging.INFO, "Dataset x execution finished in 0.35 seconds")
        assert _passes(console, logging.WARNING, "an operator is backpressured")
        # The advice to turn progress bars on contradicts the job's choice: dropped (one filter, however
        # often a job configures the context).
        assert not _passes(console, logging.WARNING, "Progress bars disabled. To enable, set ...")
        configure_data_context(RayConfig())
        assert sum(isinstance(f, _DropMessages) for f in console.filters) == 1

        configure_data_context(RayConfig(verbose=True))
        assert ray.data.DataContext.get_current().enable_progress_bars is True
        assert _passes(console, logging.INFO, "Dataset x execution finished in 0.35 seconds")
    finally:
        configure_data_context(RayConfig(progress_bars=False))  # as tests/conftest.py leaves it


def test_only_the_token_notice_is_dropped_while_a_local_ray_starts():
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        with _quiet_token_auth_notice():
            logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=...")
            logger.warning("Token authentication is disabled for this Ray cluster. Anyone with ...")
        logger.warning("Token authentication is enabled for this Ray cluster. (after the start)")
    finally:
        logger.removeHandler(handler)
    assert seen == [
        "Token authentication is disabled for this Ray cluster. Anyone with ...",
        "Token authentication is enabled for this Ray cluster. (after the start)",
    ]


def test_demo_prompts_fit_the_demo_model_so_nothing_is_cut_silently():
    """Every prompt the demo audits reaches the model whole: the tokenizer would cut at 32 tokens."""
    from transformers import CLIPTokenizer

    from demo.memorizing.fashion_mnist import CLASS_NAMES
    from demo.memorizing.fashion_set import PLANTED, generic_caption
    from demo.memorizing.layout import TEXT2IMG_DIR

    tokenizer = CLIPTokenizer.from_pretrained(DEMO_MODEL / TEXT2IMG_DIR / "tokenizer")
    limit = tokenizer.model_max_length
    prompts = [caption for _, caption, _ in PLANTED] + [generic_caption(c) for c in range(len(CLASS_NAMES))]
    for prompt in prompts:
        assert len(tokenizer(prompt, truncation=True, max_length=limit + 1)["input_ids"]) <= limit, prompt
