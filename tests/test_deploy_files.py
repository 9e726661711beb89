"""deploy/: the container, compose and Kubernetes files parse, and every fedus command they run exists."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
import pytest
import typer
import yaml

from fedus.cli import app

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def parse_cli(args: list[str]) -> click.Context:
    """Parse `fedus ARGS` as the CLI would, without running anything; raises on unknown commands/options."""
    cmd: click.Command = typer.main.get_command(app)
    ctx = cmd.make_context("fedus", list(args), resilient_parsing=False)
    while isinstance(cmd, click.Group):
        rest = [*ctx.protected_args, *ctx.args] if hasattr(ctx, "protected_args") else list(ctx.args)
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


def _commands() -> list[list[str]]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    found = [svc["command"] for svc in compose["services"].values()]
    for manifest in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(manifest.read_text()):
            if doc and doc.get("kind") == "Deployment":
                found += [c["args"] for c in doc["spec"]["template"]["spec"]["containers"]]
    return found


def test_every_deployed_command_parses_with_the_cli():
    commands = _commands()
    assert {c[0] for c in commands} == {"server", "client"}
    for args in commands:
        ctx = parse_cli(args)
        assert ctx.command.name in ("server", "start"), args


def test_parser_rejects_what_does_not_exist():
    with pytest.raises(click.UsageError):
        parse_cli(["client", "start", "--site", "a", "--no-such-option", "1"])
    with pytest.raises(click.UsageError):
        parse_cli(["serve"])


def test_k8s_server_keeps_state_on_a_volume_and_exposes_the_superlink_port():
    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "k8s" / "server.yaml").read_text())}
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
    assert claims[mounts["/state"]] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    port = docs["Service"]["spec"]["ports"][0]["targetPort"]
    args = spec["containers"][0]["args"]
    assert str(port) == args[args.index("--port") + 1]


def test_dockerfile_installs_fedus_and_runs_its_cli():
    text = (DEPLOY / "Dockerfile").read_text()
    # editable: `fedus server` builds the Flower app from the source tree (fedus.processes.flower_app)
    assert 'ENTRYPOINT ["fedus"]' in text and "pip install -e ." in text
    copied = {src for line in text.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]}
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["fab-include"]
    assert {p.strip("/").split("/")[0] for p in include} <= copied  # Flower refuses a pattern that matches nothing
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text


def test_a_wheel_install_without_the_source_tree_is_a_clear_error(monkeypatch, tmp_path):
    """`flwr run` needs the app's pyproject.toml; site-packages has none: say how to install, start nothing."""
    import fedus.processes as processes
    from fedus.config import ConfigError

    assert (processes.flower_app() / "pyproject.toml").is_file()  # this checkout
    monkeypatch.setattr(processes, "APP_ROOT", tmp_path / "site-packages")
    with pytest.raises(ConfigError, match=r"not one .*pip install -e"):
        processes.flower_app()
