"""The weft command line: exit codes and round trips, through main() as a user calls it."""

from pathlib import Path

import numpy as np
import pytest

from weft.sw.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_demo_runs_and_checks_against_numpy(capsys):
    assert main(["demo", "--config", "tiny", "--shape", "13", "11", "9"]) == EXIT_OK
    assert "PASS" in capsys.readouterr().out


def test_config_show_and_validate(tmp_path, capsys):
    assert main(["config", "show", "default"]) == EXIT_OK
    assert "hash:" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    default = (Path(__file__).resolve().parents[2] / "hw" / "configs" / "default.yaml").read_text()
    bad.write_text(default.replace("array: {rows: 16, cols: 16}", "array: {rows: 1, cols: 16}"))
    assert main(["config", "validate", str(bad)]) == EXIT_BAD_INPUT
    assert "array.rows: 1 is outside the allowed range" in capsys.readouterr().err


def test_gemm_bundle_runs_and_matches_numpy(tmp_path):
    bundle, a_file, out = tmp_path / "g.weft", tmp_path / "a.npy", tmp_path / "out"
    assert main(["gemm", "19", "7", "23", "--config", "tiny", "-o", str(bundle), "--write-input", str(a_file)]) == EXIT_OK
    assert main(["run", "--device", "golden", str(bundle), "--inputs", f"a={a_file}", "--outputs", str(out)]) == EXIT_OK
    a = np.load(a_file)
    rng = np.random.default_rng(0)  # `weft gemm` draws the weights first from this seed
    b = rng.integers(-128, 128, (23, 7), dtype=np.int8)
    np.testing.assert_array_equal(np.load(out / "c.npy"), a.astype(np.int64) @ b.astype(np.int64))


def test_run_refuses_bundle_for_other_configuration(tmp_path, capsys):
    bundle = tmp_path / "g.weft"
    assert main(["gemm", "4", "4", "4", "--config", "tiny", "-o", str(bundle)]) == EXIT_OK
    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.int8))
    assert main(["run", str(bundle), "--config", "default", "--inputs", f"a={tmp_path / 'a.npy'}"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "'tiny'" in err and "'default'" in err


def test_run_reports_corrupted_bundle(tmp_path, capsys):
    bundle = tmp_path / "g.weft"
    assert main(["gemm", "4", "4", "4", "--config", "tiny", "-o", str(bundle)]) == EXIT_OK
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bundle.write_bytes(bytes(data))
    assert main(["run", str(bundle)]) == EXIT_BAD_INPUT
    assert "checksum" in capsys.readouterr().err


def test_asm_disasm_round_trip(tmp_path):
    source = tmp_path / "p.s"
    source.write_text("load mem=sp local=0x0 dram=0x100 rows=4 cols=4 stride=0x4 signal=matmul\n"
                      "preload sp=0x0 k=4 n=4 wait=load\n"
                      "halt  # end\n")
    binary, text = tmp_path / "p.bin", tmp_path / "p.txt"
    assert main(["asm", str(source), "-o", str(binary)]) == EXIT_OK
    assert binary.stat().st_size == 3 * 16
    assert main(["disasm", str(binary), "-o", str(text)]) == EXIT_OK
    assert text.read_text().splitlines()[1] == "preload sp=0x0 k=4 n=4 transpose=0 wait=load"
    binary2 = tmp_path / "p2.bin"
    assert main(["asm", str(text), "-o", str(binary2)]) == EXIT_OK
    assert binary2.read_bytes() == binary.read_bytes()


def test_asm_error_names_line(tmp_path, capsys):
    source = tmp_path / "p.s"
    source.write_text("halt\nmatmul a=0 acc=0 m=1\n")  # k missing
    assert main(["asm", str(source), "-o", str(tmp_path / "p.bin")]) == EXIT_BAD_INPUT
    assert "line 2" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["config", "show", "--help"]])
def test_help(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0


@pytest.mark.rtl
@pytest.mark.verilator_only
def test_run_on_the_twin_matches_the_bit_exact_model(tmp_path, capsys):
    bundle, a_file, out = tmp_path / "g.weft", tmp_path / "a.npy", tmp_path / "out"
    assert main(["gemm", "9", "6", "13", "--config", "tiny", "--int8", "-o", str(bundle),
                 "--write-input", str(a_file)]) == EXIT_OK
    capsys.readouterr()
    assert main(["run", "--device", "sim", str(bundle), "--inputs", f"a={a_file}", "--outputs", str(out)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "identical to the bit-exact model" in text
    assert "projected latency" in text and "array utilization" in text and "stalls" in text
    assert main(["run", "--device", "golden", str(bundle), "--inputs", f"a={a_file}", "--outputs",
                 str(tmp_path / "gold")]) == EXIT_OK
    np.testing.assert_array_equal(np.load(out / "c.npy"), np.load(tmp_path / "gold" / "c.npy"))


def test_run_on_sim_exits_1_on_a_mismatch_or_device_error(tmp_path, capsys, monkeypatch):
    """The exit codes of `weft run --device sim`, with the twin replaced by fakes (no simulator)."""
    import weft.sw.hil as hil
    from weft.sw.driver import DeviceError, Status

    bundle, a_file = tmp_path / "g.weft", tmp_path / "a.npy"
    assert main(["gemm", "4", "4", "4", "--config", "tiny", "-o", str(bundle), "--write-input", str(a_file)]) == EXIT_OK

    class FakeSession:
        launch_s = 0.0

        def __init__(self, config, target=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    def mismatch(bundle, inputs, config, **kwargs):
        out = {"c": np.zeros((4, 4), np.int32)}
        return hil.Comparison(False, "output 'c': first at byte 0", out, out, {"cycles": 10},
                              hil.performance({"cycles": 10}, config))

    def watchdog(bundle, inputs, config, **kwargs):
        raise DeviceError("the device stopped on an error: WATCHDOG", Status.decode(0x404))

    monkeypatch.setattr(hil, "HilSession", FakeSession)
    monkeypatch.setattr(hil, "compare_with_golden", mismatch)
    capsys.readouterr()
    assert main(["run", "--device", "sim", str(bundle), "--inputs", f"a={a_file}"]) == 1
    assert "DIFFERS" in capsys.readouterr().out
    monkeypatch.setattr(hil, "compare_with_golden", watchdog)
    assert main(["run", "--device", "sim", str(bundle), "--inputs", f"a={a_file}"]) == 1
    assert "WATCHDOG" in capsys.readouterr().err
