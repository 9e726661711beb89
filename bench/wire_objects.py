"""Why fedus packs a student into one flat array per dtype (fedus.transfer): Flower alone, the same
bytes as N arrays, round-trip time on a real deployment.

Flower 1.41 moves every array of a message as its own content-addressed object, one HTTP request per
object per hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back), and a ClientApp starts
while its SuperNode is still pulling the message, retrying unavailable objects with exponential
back-off from 1 s. This benchmark has no fedus and no torch in the loop: a ServerApp sends
`total` fp16 values split into N arrays to one SuperNode (plaintext loopback, subprocess isolation),
its ClientApp adds 1 and sends them back, `rounds` times per N, each N its own `flwr run` against
the same SuperLink and SuperNode, all settings side by side in one run.

    python bench/wire_objects.py                       # N = 1, 2, 10, 150, 300; 24 MB; ~5 min on 2 cores
    python bench/wire_objects.py --arrays 1 300 --total 32000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine, write_result  # noqa: E402
from fedus.processes import (flower_bin, flower_env, free_port, kill_flower_home, kill_group, start,  # noqa: E402
                             wait_healthy)

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "wireobjects"
version = "1.0.0"
dependencies = []
[tool.hatch.build.targets.wheel]
packages = ["."]
[tool.flwr.app]
publisher = "fedus-bench"
[tool.flwr.app.components]
serverapp = "wireobjects.server:app"
clientapp = "wireobjects.client:app"
[tool.flwr.app.config]
n-arrays = 1
total = 12000000
rounds = 3
out = ""
"""

CLIENT = '''import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    back = {k: Array((v.numpy() + np.float16(1)).astype(np.float16)) for k, v in msg.content["arrays"].items()}
    return Message(RecordDict({"arrays": ArrayRecord(back), "metrics": MetricRecord({"num-examples": 1})}),
                   reply_to=msg)
'''

SERVER = '''import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    n, total = int(context.run_config["n-arrays"]), int(context.run_config["total"])
    arrays = {f"t{i:04d}": np.random.default_rng(i).standard_normal(total // n).astype(np.float16) for i in range(n)}
    while not list(grid.get_node_ids()):
        time.sleep(0.2)
    node = list(grid.get_node_ids())[0]
    times = []
    for r in range(int(context.run_config["rounds"])):
        t = time.monotonic()
        msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                  "config": ConfigRecord({"round": r})}), dst_node_id=node, message_type="train")
        reply = next(iter(grid.send_and_receive([msg])))
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
        times.append(round(time.monotonic() - t, 3))
    with open(str(context.run_config["out"]), "w") as f:
        json.dump({"n_arrays": n, "values": total // n * n, "round_trip_s": times}, f)
'''


def write_app(root: Path) -> Path:
    app = root / "app"
    (app / "wireobjects").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "wireobjects" / "__init__.py").write_text("")
    (app / "wireobjects" / "client.py").write_text(CLIENT)
    (app / "wireobjects" / "server.py").write_text(SERVER)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrays", type=int, nargs="+", default=[1, 2, 10, 150, 300])
    ap.add_argument("--total", type=int, default=12_000_000, help="fp16 values per message (2 bytes each)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedus-wire-") as tmp:
        root = Path(tmp)
        app, home = write_app(root), root / "flwr-home"
        home.mkdir()
        env = flower_env(home)
        port = free_port()
        (home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {"default": "bench", "bench": {"address": f"127.0.0.1:{port}", "insecure": True}}}))
        link = start([flower_bin("flower-superlink"), "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
                      "--port", str(port), "--database", str(root / "superlink.db")], env, root / "superlink.log")
        node = None
        runs = []
        try:
            wait_healthy(link, port, root / "superlink.log")
            node = start([flower_bin("flower-supernode"), "--insecure", "--isolation", "subprocess", "--superlink",
                          f"127.0.0.1:{port}", "--port", str(free_port())], env, root / "supernode.log")
            for n in args.arrays:
                out = root / f"n{n}.json"
                config = f"n-arrays={n} total={args.total} rounds={args.rounds} out='{out}'"
                t = time.monotonic()
                subprocess.run([flower_bin("flwr"), "run", str(app), "bench", "--stream", "--run-config", config],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=1800, check=False)
                run = json.loads(out.read_text()) if out.is_file() else {"n_arrays": n, "failed": True}
                run["run_wall_s"] = round(time.monotonic() - t, 1)
                runs.append(run)
                print(json.dumps(run), flush=True)
        finally:
            for proc in (node, link):
                if proc is not None:
                    kill_group(proc)
            kill_flower_home(home)
    ok = [r for r in runs if "round_trip_s" in r]
    median = {r["n_arrays"]: sorted(r["round_trip_s"])[len(r["round_trip_s"]) // 2] for r in ok}
    result = {
        "benchmark": "wire_objects",
        "machine": machine(),
        "deployment": "loopback, plaintext; one flower-superlink, one flower-supernode (subprocess isolation: a "
                      "fresh flwr-clientapp per message); no fedus, no torch in the apps",
        "settings": {"arrays": args.arrays, "fp16_values_per_message": args.total, "bytes_per_message": 2 * args.total,
                     "rounds": args.rounds, "round_trip": "ServerApp send -> ClientApp adds 1 -> reply in, each way "
                     "the same bytes"},
        "provenance": {"data": "numpy random fp16, seed = array index", "teacher": "none (transport only)"},
        "runs": runs,
        "figures": {str(n): {"median_round_trip_s": m, "vs_one_array": round(m / median[1], 2) if 1 in median else None}
                    for n, m in median.items()},
    }
    write_result(result, "wire_objects", "cpu", args.out)


if __name__ == "__main__":
    main()
