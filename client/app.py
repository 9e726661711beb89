"""fedus ClientApp: a site distils (train) and evaluates (evaluate) the global student.

Which site this node is comes from Flower's node_config: `partition-id` in
simulation (index into the sorted site list), or `site-name` + `data-path`
(the site's own manifest) in deployment.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.replies import build_reply, site_facts
from fedus.config import RunConfig
from fedus.privacy import PrivacyLedger
from fedus.site import Site, get_site
from fedus.transfer import TRANSFER_KEY, decode, encode, nbytes

app = ClientApp()


def site_for(context: Context) -> Site:
    cfg = RunConfig.from_flat(context.run_config)
    node = context.node_config
    if "data-path" in node:
        path = Path(str(node["data-path"])).expanduser()
        manifest = path / "manifest.csv" if path.is_dir() else path
        name = str(node.get("site-name", "")) or f"node-{context.node_id}"
        return get_site(cfg, name, manifest, own_manifest=True)
    return get_site(cfg, int(node["partition-id"]))


def site_privacy(site: Site, context: Context) -> tuple[PrivacyLedger | None, float | None]:
    """The site's own ledger file and epsilon budget, from its node config (`privacy-ledger`,
    `epsilon-budget`): the server cannot raise a site's budget. In simulation, unset values fall
    back to the run config (a per-site ledger under the run dir); a deployed site without a
    budget refuses every DP round."""
    if not site.cfg.privacy.enabled:
        return None, None
    node = context.node_config
    ledger = None
    if "privacy-ledger" in node:
        ledger = PrivacyLedger(Path(str(node["privacy-ledger"])).expanduser(), site.cfg.privacy.accountant)
    elif "data-path" in node:
        path = Path(str(node["data-path"])).expanduser()
        ledger = PrivacyLedger((path if path.is_dir() else path.parent) / "privacy-ledger.json", site.cfg.privacy.accountant)
    budget = float(node["epsilon-budget"]) if "epsilon-budget" in node else None
    return ledger, budget


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = site_for(context)
    config = msg.content["config"]
    dtype = str(config.get(TRANSFER_KEY, "fp32"))  # the wire dtype, both ways (fedus.transfer)
    sent = decode(msg.content["arrays"].to_torch_state_dict(), dtype)
    rounds = int(config["rounds"]) if "rounds" in config else None  # the server's clock (server/app.py sends it)
    ledger, budget = site_privacy(site, context)
    state, metrics = site.train(sent, int(config["server-round"]), rounds, ledger, budget)
    expected = {k: v.shape for k, v in sent.items()}
    state = encode(state, dtype) if state is not None else None
    metrics = metrics | {"bytes_sent": nbytes(state) if state is not None else 0}
    return build_reply(msg, metrics, site_facts(site.name, site.describe()), state, expected)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context)
    state = decode(msg.content["arrays"].to_torch_state_dict(), str(msg.content["config"].get(TRANSFER_KEY, "fp32")))
    scores = site.evaluate(state, int(msg.content["config"]["server-round"]))
    common = {k: scores.pop(k) for k in ("cos", "mse", "num-examples")}
    return build_reply(msg, common, site_facts(site.name, site.describe()), site_scores=scores)
