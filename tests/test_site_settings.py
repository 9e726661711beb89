"""What `fedus client start` hands Flower's SuperNode as --node-config reaches the ClientApp unchanged."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args

from fedus.config import ConfigError
from fedus.deployment.site import SiteSettings, node_config


@pytest.mark.parametrize("folder", ["St Mary's Hospital", r"C:\sites\breast", "a, b = c", "Hôpital Necker", "plain"])
def test_node_config_survives_flowers_parser(tmp_path, folder):
    """A folder name with an apostrophe once reached the site cut short at it (`/data/St Mary`)."""
    data = tmp_path / folder / "manifest.csv"
    s = SiteSettings(name="st-marys", data=data, server="localhost:9092", state=tmp_path / "state",
                     epsilon_budget=8.0, extra_node_config={"device": "cpu", "workers": 2})
    parsed = parse_config_args([node_config(s)])
    assert parsed == {"site-name": "st-marys", "data-path": str(data.resolve()),
                      "privacy-ledger": str((tmp_path / "state" / "privacy-ledger.json").resolve()),
                      "epsilon-budget": 8.0, "device": "cpu", "workers": 2}


def test_a_value_flower_cannot_carry_is_a_clear_error(tmp_path):
    s = SiteSettings(name="x", data=tmp_path / "it's \"odd\"" / "m.csv", server="localhost:9092", state=tmp_path)
    with pytest.raises(ConfigError, match="cannot be passed to Flower's --node-config"):
        node_config(s)


@pytest.mark.parametrize("args", [("certs", "init", "--out", "{blocker}/certs"),
                                  ("site", "keygen", "a", "--out", "{blocker}/keys")])
def test_a_folder_that_cannot_be_made_is_a_one_line_error_naming_it(tmp_path, fedus_cli, args):
    """A mistyped or unwritable output folder is a user mistake: one line with the path, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, stderr = fedus_cli(*(a.format(blocker=blocker) for a in args))
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [f"error: Not a directory: {blocker}/{args[-1].split('/')[-1]}"], stderr
