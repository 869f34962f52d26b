"""`python -m erc.models` prints docs/models.md."""

from erc.models import models_markdown

print(models_markdown(), end="")
