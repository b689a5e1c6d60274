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


def test_serve_reads_a_yaml_file_and_the_command_line_wins(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda app, host, port: seen.update(host=host, port=port))
    f = tmp_path / "serve.yaml"
    f.write_text("devices: ['null']\nmodels: smollm2\ntiny: true\nport: 9100\nhost: 127.0.0.2\nmax-queue: 3\n")
    assert main(["serve", "--file", str(f), "--port", "9200"]) == EXIT_OK
    out = capsys.readouterr().out
    assert seen == {"host": "127.0.0.2", "port": 9200}
    assert "devices null" in out and "models smollm2 (tiny random)" in out
    assert "loading models smollm2" in out and "models loaded in" in out


@pytest.mark.parametrize("text, words", [
    ("devices: 'null'\ncolour: blue\n", "unknown key 'colour'"),
    ("port: '80'\n", "port must be int"),
    ("tiny: 1\n", "tiny must be bool"),
    ("- cpu\n", "expected a mapping"),
    ("policy: fastest\n", "policy must be"),
])
def test_serve_refuses_a_bad_yaml_file(tmp_path, capsys, text, words):
    f = tmp_path / "serve.yaml"
    f.write_text(text)
    assert main(["serve", "--file", str(f)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert words in err
