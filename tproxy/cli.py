"""The command line: ``tproxy run | rules show|apply|remove|check | check | demo``.

Thin by design: each command loads the config (flags override the file) and hands over to the module that does the
work. Exit status: 0 success, 2 usage or configuration error, 1 runtime failure. Errors are one line on stderr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from tproxy import __version__
from tproxy.config import Config
from tproxy.errors import TproxyError

app = typer.Typer(
    help="Transparent TCP proxy: the application sees the client's real IP address.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
rules_app = typer.Typer(help="Show, apply or remove the interception rules and policy routing.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file; TPROXY_<SECTION>_<KEY> variables override it, flags override both. "
        "Optional when the environment sets the required keys.",
        dir_okay=False,
        show_default=False,
    ),
]
ModeOpt = Annotated[
    str | None, typer.Option("--mode", help="Override the config's mode: tproxy | nat.", show_default=False)
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help="Override the config's backend: nftables | iptables.", show_default=False),
]


def _fail(err: TproxyError) -> NoReturn:
    print(f"tproxy: {err}", file=sys.stderr)
    raise typer.Exit(err.exit_code)


def _load(path: Path | None, mode: str | None = None, backend: str | None = None) -> Config:
    try:
        return Config.load(path, os.environ, mode=mode, backend=backend)
    except TproxyError as e:
        _fail(e)


def _version(value: bool) -> None:
    if value:
        print(f"tproxy {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Transparent TCP proxy: the application sees the client's real IP address."""


@app.command()
def run(
    config: ConfigOpt = None,
    mode: ModeOpt = None,
    backend: BackendOpt = None,
    no_rules: Annotated[
        bool,
        typer.Option(
            "--no-rules",
            help="Do not install or remove rules and routes (they were applied by a privileged step).",
        ),
    ] = False,
) -> None:
    """Serve: install rules and routes (unless --no-rules), proxy until SIGTERM/SIGINT, then remove them."""
    cfg = _load(config, mode, backend)
    from tproxy.runner import run as run_proxy

    try:
        code = run_proxy(cfg, manage_rules=not no_rules, mode=mode, backend=backend)
    except TproxyError as e:
        _fail(e)
    raise typer.Exit(code)


@rules_app.command("show")
def rules_show(config: ConfigOpt = None, mode: ModeOpt = None, backend: BackendOpt = None) -> None:
    """Print exactly what would be installed (rule file, then routing as ip commands), touching nothing."""
    cfg = _load(config, mode, backend)
    from tproxy import rules

    env = cfg.from_environment()
    if env:  # (comment lines: the output stays a file nft -f / iptables-restore accept)
        sys.stdout.write("# from the environment: " + ", ".join(f"{k} ({v})" for k, v in env.items()) + "\n")
    sys.stdout.write(rules.show(cfg))


@rules_app.command("apply")
def rules_apply(config: ConfigOpt = None, mode: ModeOpt = None, backend: BackendOpt = None) -> None:
    """Install the rules and routes atomically (idempotent: applying twice changes nothing)."""
    cfg = _load(config, mode, backend)
    from tproxy import rules

    try:
        print(rules.install(cfg))
    except TproxyError as e:
        _fail(e)


@rules_app.command("remove")
def rules_remove(config: ConfigOpt = None, mode: ModeOpt = None, backend: BackendOpt = None) -> None:
    """Remove every rule and route tproxy installed, and nothing else; watchers leave them out until the next apply."""
    cfg = _load(config, mode, backend)
    from tproxy import rules

    try:
        print(rules.uninstall(cfg, by_operator=True))
    except TproxyError as e:
        _fail(e)


REMOVED_BY_OPERATOR = 3


@rules_app.command("check")
def rules_check(
    config: ConfigOpt = None,
    mode: ModeOpt = None,
    backend: BackendOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only what is missing.")] = False,
) -> None:
    """Exit 0 when every rule, route and sysctl is in place; 1 with a line per missing piece; 3 when `tproxy rules
    remove` took them out (then `rules apply` alone puts them back). Changes nothing."""
    cfg = _load(config, mode, backend)
    from tproxy import rules

    try:
        if rules.removed_by_operator():
            print("tproxy rules: removed by the operator (tproxy rules remove); tproxy rules apply puts them back")
            raise typer.Exit(REMOVED_BY_OPERATOR)
        missing = rules.missing(cfg)
    except TproxyError as e:
        _fail(e)
    for line in missing:
        print(f"tproxy rules: missing: {line}")
    if missing:
        raise typer.Exit(1)
    if not quiet:
        print(f"tproxy rules: in place ({cfg.mode} mode, {cfg.backend})")


@app.command()
def check(config: ConfigOpt = None, mode: ModeOpt = None, backend: BackendOpt = None) -> None:
    """Preflight: validate the config and check the host. A line per check; exit 0 only when all pass."""
    from tproxy.check import run_checks

    raise typer.Exit(run_checks(config, mode=mode, backend=backend, environ=os.environ))


@app.command()
def demo(
    backend: Annotated[
        str, typer.Option("--backend", help="Rule backend for the demo: nftables | iptables.")
    ] = "nftables",
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the lab up afterwards and print how to enter it.")
    ] = False,
) -> None:
    """Build two network namespaces, proxy in tproxy then nat mode, and show what the application saw."""
    from tproxy.demo import demo as run_demo

    try:
        code = run_demo(backend=backend, keep=keep)
    except TproxyError as e:
        _fail(e)
    raise typer.Exit(code)


def main() -> None:
    app(prog_name="tproxy")
