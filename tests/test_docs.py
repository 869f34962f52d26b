"""docs/models.md is generated from the model files' docstrings: it must be current."""

from pathlib import Path

from erc.models import MODELS, models_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_models_doc_is_generated_and_current():
    doc = (ROOT / "docs/models.md").read_text()
    assert doc == models_markdown(), "docs/models.md is stale: run `python -m erc.models > docs/models.md`"
    for name in MODELS:
        assert f"## `{name}`" in doc
