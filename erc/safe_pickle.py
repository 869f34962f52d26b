"""The only way erc reads pickles it did not write (COSMIC's published files).

Plain containers, numbers and strings load; anything that names a class or function is refused,
so a hostile pickle cannot run code.
"""

from __future__ import annotations

import io
import pickle

from erc.errors import ErcDataError

# Builtins that hold data and run nothing when constructed from pickled state.
_ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "__builtin__":  # Python 2 name, used by protocols 0-2 (super() maps it too)
            module = "builtins"
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only plain containers, numbers and strings")


def load_restricted(path):
    """Unpickle `path` allowing only data; raise ErcDataError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ErcDataError(path, f"cannot read: {e.strerror}") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            OverflowError, MemoryError) as e:  # the last two: absurd lengths in a corrupt file
        detail = " ".join(str(e).split()) or type(e).__name__  # one line, never empty
        raise ErcDataError(path, f"unsafe or corrupt pickle ({detail})") from None
