"""`fedus` command line: demo, simulate, report, export, benchmarks, data intake, and deployment (server, client, certs, site).

User mistakes (bad paths, unknown model names, bad config values) end in one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fedus.config import ConfigError
from fedus.intake.cli import data_app
from fedus.deployment.cli import certs_app, client_app, doctor, server, site_app
from fedus.processes import FlowerProcessError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__.splitlines()[0])
app.add_typer(data_app, name="data", help="Site data intake: scan an archive into a manifest; the shareable data card.")
app.command(help="Start the consortium server (SuperLink, TLS + site auth) and run fedus on the sites.")(server)
app.command(help="Pre-flight checks at a site: server, TLS chain, key, data, one site-step batch.")(doctor)
app.add_typer(client_app, name="client")
app.add_typer(certs_app, name="certs")
app.add_typer(site_app, name="site")
bench_app = typer.Typer(no_args_is_help=True)
app.add_typer(bench_app, name="bench", help="Deployment figures: CPU latency, parameters and GFLOPs of teacher and student.")
console = Console(stderr=True)

Sets = typer.Option(None, "--set", help="config override KEY=VALUE, e.g. train.lr=3e-4 (repeatable)")


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _overrides(rounds, teacher, teacher_weights, student, image_size, sets) -> list[str]:
    out = list(sets or [])
    for key, value in [("rounds", rounds), ("teacher.arch", teacher), ("teacher.weights", teacher_weights),
                       ("student.arch", student), ("data.image-size", image_size)]:
        if value is not None:
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if teacher_weights:
        out.append('teacher.source="weights file given by the user: ' + Path(teacher_weights).name + '"')
    return out


def run_scenario(name: str, overrides: list[str], run_dir: Optional[Path], fit_steps: Optional[int] = None) -> Path:
    """Validate everything locally first (cheap, clear errors), then hand over to Flower."""
    from fedus.data.manifest import read_manifest
    from fedus.data.sites import list_sites, resolve_manifest
    from fedus.models import create_student, create_teacher
    from fedus.reports import write_report
    from fedus.runs import default_run_dir
    from fedus.scenarios import load_scenario
    from fedus.simulate import simulate
    from fedus.teacher_fit import fit_teacher

    scenario = load_scenario(name, overrides)
    cfg = scenario.config
    run_dir = (run_dir or default_run_dir(scenario.name)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher = create_teacher(cfg.teacher, cfg.data.image_size)  # fails fast on bad arch/weights (before data)
    create_student(cfg.student, teacher.dim, teacher.grid, cfg.data.image_size, cfg.seed)
    manifest = resolve_manifest(cfg.data, cfg.seed)
    cfg = cfg.with_overrides({"data.manifest": str(manifest)})
    sites = list_sites(read_manifest(manifest), cfg.data.site_column, cfg.data.held_out_sites)
    console.print(f"[bold]{scenario.name}[/bold]: {len(sites)} sites, {cfg.rounds} rounds -> {run_dir}")
    if not cfg.teacher.weights:
        steps = fit_steps if fit_steps is not None else scenario.fit_teacher_steps
        cfg = fit_teacher(cfg, run_dir / "teacher.safetensors", steps=steps, lr=scenario.fit_teacher_lr,
                          data_label=f"'{scenario.name}'")
    simulate(cfg, len(sites), run_dir)
    paths = write_report(run_dir)
    _print_summary(run_dir)
    console.print(f"report: {paths['report_html']}")
    return run_dir


def resume_simulation(run_dir: Path, rounds: Optional[int]) -> None:
    """The same run config as the interrupted run (teacher included), continued after its last completed round."""
    from fedus.config import RunConfig, read_toml
    from fedus.data.manifest import read_manifest
    from fedus.data.sites import list_sites
    from fedus.reports import write_report
    from fedus.simulate import simulate

    saved = run_dir / "run-config.toml"
    if not saved.is_file():
        fail(f"no run-config.toml in {run_dir}: not a fedus simulation run")
    cfg = RunConfig.from_dict(read_toml(saved)).with_overrides({"resume": True, **({"rounds": rounds} if rounds else {})})
    sites = list_sites(read_manifest(Path(cfg.data.manifest)), cfg.data.site_column, cfg.data.held_out_sites)
    console.print(f"resuming {run_dir} ({len(sites)} sites, {cfg.rounds} rounds)")
    simulate(cfg, len(sites), run_dir.resolve())
    console.print(f"report: {write_report(run_dir)['report_html']}")


def _print_summary(run_dir: Path) -> None:
    import pandas as pd

    df = pd.read_csv(run_dir / "report" / "sites.csv")
    # two-line headers, no column rules: eight columns fit an 80-column terminal without "teac…"
    shown = {"site": "site", "cos_round0": "cos\nr0", "cos_final": "cos\nfinal", "teacher_cls_f1": "F1\nteacher",
             "random_init_cls_f1": "F1\nrandom", "student_cls_f1": "F1\nstudent",
             "random_init_seg_dice": "Dice\nrandom", "student_seg_dice": "Dice\nstudent"}
    table = Table(title=f"per-site results ({run_dir.name}): cosine to teacher, linear-probe F1, seg-probe Dice",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    cols = [c for c in shown if c in df.columns]
    for c in cols:
        table.add_column(shown[c], no_wrap=c == "site", min_width=max(map(len, shown[c].split())))
    for _, row in df.iterrows():
        table.add_row(*[f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols])
    console.print(table)


@app.command()
def demo(
    run_dir: Optional[Path] = typer.Option(None, help="where checkpoints, summary and report go"),
    sets: Optional[list[str]] = Sets,
) -> None:
    """Synthetic multi-centre demo: fit a stand-in teacher, distil federatedly, report per site."""
    run_scenario("synthetic-devices", list(sets or []), run_dir)


@app.command("simulate")
def simulate_cmd(
    scenario: Optional[str] = typer.Option(None, help="name in simulations/ or a TOML path"),
    resume: Optional[Path] = typer.Option(None, help="continue an interrupted run (its run dir) from its last completed round"),
    rounds: Optional[int] = typer.Option(None),
    teacher: Optional[str] = typer.Option(None, help="timm model name of the teacher"),
    teacher_weights: Optional[str] = typer.Option(None, help="local weights file (.safetensors/.pth)"),
    student: Optional[str] = typer.Option(None, help="timm model name of the student"),
    image_size: Optional[int] = typer.Option(None),
    fit_teacher_steps: Optional[int] = typer.Option(None, help="steps to fit a stand-in teacher when no weights"),
    run_dir: Optional[Path] = typer.Option(None),
    sets: Optional[list[str]] = Sets,
) -> None:
    """Replay a scenario on Flower's simulation runtime, one SuperNode per site, then report."""
    if resume is not None:
        resume_simulation(resume, rounds)
        return
    if scenario is None:
        fail("give --scenario NAME (or --resume RUN_DIR)")
    run_scenario(scenario, _overrides(rounds, teacher, teacher_weights, student, image_size, sets), run_dir, fit_teacher_steps)


@app.command()
def loco(
    scenario: str = typer.Option(..., help="name in simulations/ or a TOML path"),
    centre: Optional[list[str]] = typer.Option(None, help="centre to hold out (repeatable; default: every centre)"),
    rounds: Optional[int] = typer.Option(None),
    fit_teacher_steps: Optional[int] = typer.Option(None, help="steps to fit each fold's stand-in teacher when no weights"),
    run_dir: Optional[Path] = typer.Option(None, help="one folder per fold goes in here, with loco.csv and loco.md"),
    sets: Optional[list[str]] = Sets,
) -> None:
    """Leave-one-centre-out: one federation per held-out centre, each scored on the centre it never saw."""
    import re

    from fedus.data.manifest import read_manifest
    from fedus.data.sites import list_sites, resolve_manifest
    from fedus.evaluation.run_eval import evaluate_run
    from fedus.reports import write_report
    from fedus.reports.loco import write_loco_report
    from fedus.runs import default_run_dir
    from fedus.scenarios import load_scenario

    overrides = _overrides(rounds, None, None, None, None, sets)
    loaded = load_scenario(scenario, overrides)
    cfg = loaded.config
    if cfg.data.held_out_sites:
        fail("leave data.held-out empty: `fedus loco` holds out one centre per fold itself")
    every = list_sites(read_manifest(resolve_manifest(cfg.data, cfg.seed)), cfg.data.site_column)
    centres = list(centre or every)
    unknown = [c for c in centres if c not in every]
    if unknown:
        fail(f"no centre '{unknown[0]}' in the scenario's data (centres: {', '.join(every)})")
    if len(every) < 2:
        fail("leave-one-centre-out needs at least 2 centres")
    run_dir = (run_dir or default_run_dir(f"{loaded.name}-loco")).resolve()
    folds = {}
    for c in centres:
        fold = run_dir / ("held-out-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", c))
        console.print(f"[bold]fold {len(folds) + 1}/{len(centres)}[/bold]: {c} held out")
        run_scenario(scenario, [*overrides, f"data.held-out={json.dumps(c)}"], fold, fit_teacher_steps)
        evaluate_run(fold, sites=[c], references=("central",))
        write_report(fold)
        folds[c] = fold
    data = f"scenario '{loaded.name}', {cfg.data.source} data, sites by '{cfg.data.site_column}'"
    paths = write_loco_report(run_dir, folds, cfg.seed, data)
    console.print(paths["loco_md"].read_text(), markup=False, highlight=False)
    console.print(f"leave-one-centre-out: {paths['loco_csv']}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory holding summary.json")) -> None:
    """Write the per-site CSV, Markdown/HTML page and per-round plot of a run."""
    from fedus.reports import write_report

    if not (run_dir / "summary.json").is_file():
        fail(f"no summary.json in {run_dir}")
    paths = write_report(run_dir)
    _print_summary(run_dir)
    console.print(f"report: {paths['report_html']}")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory holding summary.json and global checkpoints"),
    site: Optional[list[str]] = typer.Option(None, help="site name (repeatable; default: every site of the run)"),
    references: bool = typer.Option(True, help="also distil each site's local student and the pooled central one, "
                                               "and fill the cross-site matrix (needs every site's data here)"),
    sets: Optional[list[str]] = Sets,
) -> None:
    """Offline protocol per site: teacher, final global student, local and central references, random init; then re-write the report."""
    from fedus.evaluation.run_eval import evaluate_run
    from fedus.reports import write_report

    if not (run_dir / "summary.json").is_file():
        fail(f"no summary.json in {run_dir}")
    bad = [s for s in sets or [] if not s.replace(" ", "").startswith("eval.")]
    if bad:
        fail(f"only eval.* keys may be overridden offline, got '{bad[0]}'")
    done = evaluate_run(run_dir, site or None, overrides=sets or [], references=("local", "central") if references else ())
    console.print(f"evaluation: {done}")
    console.print(f"report: {write_report(run_dir)['report_html']}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a run directory holding summary.json and global checkpoints"),
    onnx: bool = typer.Option(False, "--onnx", help="write ONNX (the one format so far)"),
    out: Optional[Path] = typer.Option(None, help="where the .onnx goes (default: RUN_DIR/student-encoder-round-NNN.onnx)"),
) -> None:
    """Export the run's final global student encoder (feature map + embedding, dynamic batch) and check it with onnxruntime."""
    from fedus.export import ExportCheckError, export_run

    if not onnx:
        fail("give --onnx (the only export format so far)")
    try:
        done = export_run(run_dir, out)
    except ExportCheckError as err:
        fail(str(err))
    check = done["check"]
    console.print(f"{done['onnx']}: {done['student']} encoder, round {done['round']}, {done['params'] / 1e6:.2f} M params, "
                  f"input [batch, 3, {done['image_size']}, {done['image_size']}] in [0, 1]")
    console.print(f"onnxruntime vs PyTorch: max abs diff {check['max_abs_diff']:.2e} < {check['tolerance']:g} "
                  f"(random inputs, batch sizes {check['batch_sizes']}): OK")


@bench_app.command("latency")
def bench_latency(
    run_dir: Optional[Path] = typer.Argument(None, help="a run directory: its final student, its teacher's architecture and image size"),
    teacher: Optional[str] = typer.Option(None, help="timm model name of the teacher (without RUN_DIR)"),
    student: Optional[str] = typer.Option(None, help="timm model name of the student (without RUN_DIR)"),
    image_size: Optional[int] = typer.Option(None, help="input size without RUN_DIR (default 224)"),
    warmup: int = typer.Option(10, help="untimed runs first"),
    runs: int = typer.Option(50, help="timed runs (median and p90)"),
    threads: int = typer.Option(1, help="onnxruntime intra-op threads (0 = onnxruntime's default: all cores)"),
    out: Optional[Path] = typer.Option(None, help="JSON result (default: RUN_DIR/latency-cpu.json, or ./latency-cpu.json)"),
) -> None:
    """CPU latency (onnxruntime, batch 1), parameters and GFLOPs of teacher and student, with student/teacher ratios."""
    if run_dir is not None and (teacher, student, image_size) != (None, None, None):
        fail("give RUN_DIR or --teacher/--student/--image-size, not both (a run dir fixes all three)")
    if run_dir is None and (teacher is None or student is None):
        fail("give RUN_DIR, or --teacher ARCH --student ARCH [--image-size N]")
    from fedus.latency import compare_latency, latency_table, models_from_archs, models_from_run

    if run_dir is not None:
        t, s, image_size, provenance = models_from_run(run_dir)
    else:
        image_size = image_size or 224
        t, s, provenance = models_from_archs(teacher, student, image_size)
    result = compare_latency(t, s, image_size, provenance, warmup=warmup, runs=runs, threads=threads)
    out = out or (run_dir / "latency-cpu.json" if run_dir is not None else Path("latency-cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    Console().print(latency_table(result))
    console.print(f"wrote {out}")


def main() -> None:
    # SIGTERM (docker stop, kubectl, a supervisor) unwinds like Ctrl-C, so every Flower process we started is killed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        app()
    except (ConfigError, FlowerProcessError) as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as err:
        if err.filename is None:  # not a path the user gave (a socket, a bug): keep the traceback
            raise
        path = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        console.print(f"[red]error:[/red] {err.strerror or type(err).__name__}: {path}", highlight=False,
                      soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
