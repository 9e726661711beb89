"""fedus ServerApp: initial student from config + seed, FedAvg over sites, a run record every round."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedus.config import ConfigError, RunConfig
from fedus.runs import RunRecorder, default_run_dir, describe_data, provenance
from fedus.site import initial_student
from server.quorum import QuorumGrid
from server.secure_aggregation import run_secure
from server.strategy import FedusFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(context.run_config)
    run_dir = cfg.run_dir or str(default_run_dir(cfg.scenario))
    student = initial_student(cfg)
    n_params = sum(p.numel() for p in student.parameters())
    done = 0
    if cfg.resume:  # continue after the last completed round, as if never interrupted
        recorder, done, state = RunRecorder.resume(run_dir, cfg)
        arrays = ArrayRecord(state)  # exactly what the interrupted run held after that round
    else:
        recorder = RunRecorder(run_dir, cfg, provenance(cfg, describe_data(cfg), n_params))
        recorder.checkpoint(0, student.state_dict())
        arrays = ArrayRecord(student.state_dict())

    fed = cfg.federation
    grid = QuorumGrid(grid, fed.quorum or fed.min_sites, fed.straggler_wait)
    strategy = FedusFedAvg(
        cfg, recorder, round_offset=done,
        fraction_train=fed.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=fed.min_sites, min_evaluate_nodes=fed.min_sites, min_available_nodes=fed.min_sites,
    )
    try:
        strategy.evaluate_pending(grid, arrays, timeout=fed.round_timeout)
        clock = ConfigRecord({"rounds": cfg.rounds})
        if cfg.rounds > done and cfg.secure_aggregation.enabled:
            run_secure(strategy, grid, context, arrays, cfg.rounds - done, fed.round_timeout, clock, clock)
        elif cfg.rounds > done:
            strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.rounds - done, timeout=fed.round_timeout,
                           train_config=clock, evaluate_config=clock)
    except ConfigError as err:  # e.g. central DP calibrated for another number of sites: say why in the record
        recorder.summary["error"] = str(err)
        recorder.finish("failed")
        raise
    except BaseException:
        recorder.finish("failed")
        raise
    recorder.finish("completed")
