"""Dataset adapters: one per upstream format, each turning the public files into the canonical form."""

from __future__ import annotations

from erc.data import folder_labels, iemocap, meld, mosi

ADAPTERS = {"mosi": mosi.build, "meld": meld.build, "iemocap": iemocap.build,
            "folder_labels": folder_labels.build}
