"""The `paged-jax` console script: `paged-jax serve [MODEL] [flags]` (as `vllm serve`)."""

from __future__ import annotations

import sys

COMMANDS = {"serve": "run the OpenAI-compatible server (paged-jax serve --help)"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:8} {text}" for name, text in COMMANDS.items())
        print(f"usage: paged-jax COMMAND [args]\n\ncommands:\n{usage}", file=sys.stderr if argv else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from paged_jax.server import serve

    return serve.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
