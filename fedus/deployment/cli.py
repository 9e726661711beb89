"""Deployment commands: `fedus server`, `fedus client start`, `fedus certs init`, `fedus site keygen|register`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)
client_app = typer.Typer(no_args_is_help=True, help="This hospital's side of a deployment.")
certs_app = typer.Typer(no_args_is_help=True, help="Consortium TLS certificates (run once, on the server side).")
site_app = typer.Typer(no_args_is_help=True, help="Site keys: generate at the site, register at the server.")


def server_config(config: Optional[Path], sets: Optional[list[str]], rounds: Optional[int], min_sites: Optional[int]):
    """The run config a deployment runs: a RunConfig TOML (or a scenario's [run]) + overrides; data stay at the sites."""
    from fedus.config import RunConfig, read_toml

    raw = read_toml(config) if config else {}
    cfg = RunConfig.from_dict(raw.get("run", raw))
    overrides = list(sets or []) + ['data.source="manifest"', 'data.manifest=""', 'scenario="deployment"']
    if rounds is not None:
        overrides.append(f"rounds={rounds}")
    if min_sites is not None:
        overrides.append(f"federation.min-sites={min_sites}")
    return cfg.with_overrides(overrides)


def server(
    state: Path = typer.Option(Path("fedus-server"), help="server state: SuperLink database, logs, run record"),
    certs: Optional[Path] = typer.Option(None, help="folder from `fedus certs init` (ca.crt, server.pem, server.key)"),
    insecure: bool = typer.Option(False, "--insecure", help="plaintext, no site authentication (testing only)"),
    host: str = typer.Option("0.0.0.0", help="address the SuperLink listens on"),
    port: int = typer.Option(9092, min=1, max=65535, help="the SuperLink's single HTTP(S) port"),
    register: Optional[Path] = typer.Option(None, help="register every NAME.pub in this folder before the run"),
    config: Optional[Path] = typer.Option(None, help="run config TOML (fedus RunConfig, or a scenario file)"),
    rounds: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --state from its last completed round"),
    min_sites: Optional[int] = typer.Option(None, help="sites a round needs (quorum)"),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="config override KEY=VALUE (repeatable)"),
) -> None:
    """Start the consortium's SuperLink (TLS + site authentication by default) and run fedus on the sites."""
    from fedus.config import ConfigError
    from fedus.deployment.server import ServerSettings, serve
    from fedus.reports import write_report

    if certs is None and not insecure:
        raise ConfigError("no --certs given: run `fedus certs init --out certs` first, or pass --insecure (testing only)")
    if resume:
        from fedus.config import RunConfig, read_toml

        saved = state / "run" / "run-config.toml"
        if not saved.is_file():
            raise ConfigError(f"nothing to resume: {saved} not found")
        cfg = RunConfig.from_dict(read_toml(saved)).with_overrides({"resume": True, **({"rounds": rounds} if rounds else {})})
    else:
        cfg = server_config(config, sets, rounds, min_sites)
    settings = ServerSettings(state=state, certs=None if insecure else certs, host=host, port=port, register=register)
    console.print(f"fedus server on {host}:{port} ({'INSECURE' if insecure else 'TLS + site auth'}), "
                  f"{cfg.rounds} rounds, quorum {cfg.federation.min_sites} sites")
    run_dir = serve(cfg, settings)
    paths = write_report(run_dir)
    console.print(f"report: {paths['report_html']}")


@client_app.command("start")
def client_start(
    site: str = typer.Option(..., help="this site's name (as registered)"),
    data: Path = typer.Option(..., help="the site's manifest CSV (from `fedus data scan`) or a folder holding manifest.csv"),
    server: str = typer.Option(..., help="SuperLink address host:port"),
    root_cert: Optional[Path] = typer.Option(None, help="the consortium's ca.crt"),
    key: Optional[Path] = typer.Option(None, help="this site's private key (from `fedus site keygen`)"),
    insecure: bool = typer.Option(False, "--insecure", help="plaintext (testing only)"),
    state: Optional[Path] = typer.Option(None, help="site state folder (logs, privacy ledger); default fedus-site-NAME"),
    epsilon_budget: Optional[float] = typer.Option(None, help="this site's DP budget: rounds beyond it are refused"),
    max_wait: Optional[float] = typer.Option(None, help="stop retrying the server after this many seconds"),
    task_processes: str = typer.Option("warm", help="warm: each message's ClientApp process forks from one that "
                                       "already imported torch and fedus; fresh: Flower's own, a new interpreter per message"),
) -> None:
    """Start this hospital's SuperNode; it reconnects with back-off while the server is away."""
    from fedus.config import ConfigError
    from fedus.deployment.site import SiteSettings, run_site

    if not insecure and (root_cert is None or key is None):
        raise ConfigError("--root-cert and --key are required (TLS and site authentication); --insecure for testing only")
    if insecure:
        console.print("[yellow]WARNING[/yellow]: --insecure: plaintext traffic; for testing only")
    settings = SiteSettings(name=site, data=data, server=server, state=state or Path(f"fedus-site-{site}"),
                            root_cert=None if insecure else root_cert, private_key=None if insecure else key,
                            epsilon_budget=epsilon_budget, max_wait=max_wait, task_processes=task_processes)
    run_site(settings)


@certs_app.command("init")
def certs_init(
    out: Path = typer.Option(Path("certs"), help="where ca.crt/ca.key/server.pem/server.key are written"),
    host: Optional[list[str]] = typer.Option(None, "--host", help="server DNS name or IP the sites dial (repeatable)"),
) -> None:
    """Create the consortium CA and the server certificate (never overwrites)."""
    from fedus.deployment.certs import init_certs

    files = init_certs(out, list(host or []))
    console.print(f"CA and server certificate in {out}; give sites only {files['ca_cert'].name}, keep ca.key offline")


@site_app.command("keygen")
def site_keygen(name: str = typer.Argument(..., help="site name"),
                out: Path = typer.Option(Path("keys"), help="folder for NAME and NAME.pub")) -> None:
    """Create this site's key pair; send only NAME.pub to the consortium."""
    from fedus.deployment.certs import site_keygen as keygen

    files = keygen(name, out)
    console.print(f"private key {files['private_key']} (stays here); send {files['public_key']} to the consortium")


@site_app.command("register")
def site_register(public_key: Path = typer.Argument(..., help="a site's NAME.pub"),
                  name: str = typer.Option(..., help="site name"),
                  state: Path = typer.Option(Path("fedus-server"), help="the running server's state folder")) -> None:
    """Register a site's public key with the running server (Flower SuperNode registration)."""
    from fedus.config import ConfigError
    from fedus.deployment.server import register_site
    from fedus.processes import flower_env

    home = state.resolve() / "flwr-home"
    if not (home / "config.toml").is_file():
        raise ConfigError(f"no running fedus server found under {state} (start `fedus server --state {state}` first)")
    register_site(public_key, name, flower_env(home))
    console.print(f"registered {name}")


def doctor(
    site: str = typer.Option(..., help="this site's name"),
    data: Path = typer.Option(..., help="the site's manifest CSV or a folder holding manifest.csv"),
    server: str = typer.Option(..., help="SuperLink address host:port"),
    root_cert: Optional[Path] = typer.Option(None, help="the consortium's ca.crt"),
    key: Optional[Path] = typer.Option(None, help="this site's private key"),
    config: Optional[Path] = typer.Option(None, help="the consortium's run config TOML (teacher, student, sizes)"),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="config override KEY=VALUE (repeatable)"),
) -> None:
    """Pre-flight checks at a site: server, TLS chain, key, data, one real site-step batch."""
    from rich.table import Table

    from fedus.deployment.doctor import run_checks

    cfg = server_config(config, sets, None, None)
    checks = run_checks(cfg, site, data, server, root_cert, key)
    table = Table(title=f"fedus doctor: {site}")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, "[green]pass[/green]" if c.ok else "[red]FAIL[/red]", c.detail)
    Console().print(table)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
