"""The `erc` command: a small dispatcher over erc's subcommands (`erc <command> --help` for each)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name -> (module with main(argv), one line of help)
    "predict": ("erc.predict", "a trained model on a new conversation: emotions, probabilities, gates"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<12} {help}" for name, (_, help) in COMMANDS.items()]
        print("usage: erc <command> [options]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr if argv else sys.stdout)
        sys.exit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    module, _ = COMMANDS[argv[0]]
    importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    main()
