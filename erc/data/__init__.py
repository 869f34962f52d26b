"""Dataset adapters: one per upstream format, each turning the public files into the canonical form."""

from __future__ import annotations

from erc.data import iemocap, meld, mosi

ADAPTERS = {"mosi": mosi.build, "meld": meld.build, "iemocap": iemocap.build}
