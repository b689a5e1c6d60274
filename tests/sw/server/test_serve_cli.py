"""`weft serve` start-up checks (no server is left running)."""

import pytest

import weft.sw.server as server_mod
from weft.sw.cli import EXIT_BAD_INPUT, EXIT_OK, main


@pytest.mark.parametrize("extra", [[], ["--ray"]])
def test_serve_refuses_an_unknown_device_before_starting(extra, capsys):
    assert main(["serve", "--devices", "fpga:emu,tpu", *extra]) == EXIT_BAD_INPUT
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_serve_refuses_an_unknown_fpga_mode(capsys):
    assert main(["serve", "--devices", "fpga:warp"]) == EXIT_BAD_INPUT
    assert "fpga:emu, fpga:golden or fpga:sim" in capsys.readouterr().err


def test_serve_builds_the_app_with_agent_routes(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda app, host, port: seen.update(app=app, port=port))
    assert main(["serve", "--devices", "null", "--models", "smollm2", "--tiny", "--port", "9"]) == EXIT_OK
    paths = {r.path for r in seen["app"].routes}
    assert {"/v1/agents/runs", "/v1/agents/runs/{run_id}", "/v1/agents/runs/{run_id}/events",
            "/v1/agents/runs/{run_id}/cancel", "/v1/chat/completions"} <= paths
    assert seen["port"] == 9 and "in this process" in capsys.readouterr().out
