"""``tmem`` command line.

Subcommands live in the module of the layer they drive and are imported only when
invoked, so ``tmem --help`` stays fast and plain zcache never imports the
cluster code.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from tmem import __version__

# command name -> "module:attribute"; each attribute is a click.Command.
_LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "bench": ("tmem.bench_cli", "bench", "Replay real pages through zcache vs a naive dict."),
    "stats": ("tmem.stats_cli", "stats", "Print zcache/zbud counters (table or --json)."),
    "serve": ("tmem.nbd.cli", "serve", "Serve a compressed RAM block device over NBD."),
    "cluster": ("tmem.ramster.cli", "cluster", "Manage a RAMster cluster of tmem nodes."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            module_name, attr, _help = _LAZY_COMMANDS[cmd_name]
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                return None
            command: Any = getattr(module, attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Describe lazy commands without importing them.
        rows = [(name, spec[2]) for name, spec in sorted(_LAZY_COMMANDS.items())]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tmem")
def main() -> None:
    """tmem: transcendent memory, a compressed in-RAM page store.

    zcache (compression + the zbud allocator) behind the tmem put/get/flush API,
    cleancache and frontswap front ends, an NBD block device, and RAMster
    clusters that lend each other RAM.
    """
