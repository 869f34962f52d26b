"""The `erc` command: a dispatcher over subcommands, each a module with `main(argv) -> int`.

    erc check-data meld              # what prepare would write for a dataset, and every problem, writing nothing
    erc predict talk.csv --model erc-iemocap-mister_e@best   # a registered model on a new conversation
    erc serve erc-iemocap-mister_e@best --replicas 2          # ... answering HTTP requests on 127.0.0.1:8000

A new subcommand is one line in COMMANDS.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name -> (module with main(argv), one line of help)
    "check-data": ("erc.data.check", "show what a dataset's adapter would produce, and every problem, writing nothing"),
    "predict": ("erc.serving.predict", "a trained model on a new conversation (text, features, audio or video): each "
                                       "utterance's emotion, probabilities, gates"),
    "serve": ("erc.serving.serve", "a trained model answering conversations over HTTP (Ray Serve, batched, replicas)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in sorted(COMMANDS.items())]
    return "usage: erc <command> [args]  (erc <command> --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"erc: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
