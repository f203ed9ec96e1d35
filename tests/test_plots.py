"""Looking instead of reading: a run ends with curves.png drawn from its metrics.jsonl, and --wandb logs the
same records to Weights & Biases (offline here: WANDB_MODE=offline, nothing leaves the machine)."""
import json
import pathlib
import struct
import zlib

import pytest

import finetune
import plots
from test_predict import toy_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_model(tmp_path_factory.getbasetemp())


def png_chunks(path) -> dict[bytes, list[bytes]]:
    """The chunks of a PNG file by type (IHDR, tEXt, ...), after checking the 8-byte signature."""
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    chunks, i = {}, 8
    while i < len(data):
        (n,), kind = struct.unpack(">I", data[i:i + 4]), data[i + 4:i + 8]
        body = data[i + 8:i + 8 + n]
        assert struct.unpack(">I", data[i + 8 + n:i + 12 + n])[0] == zlib.crc32(kind + body)
        chunks.setdefault(kind, []).append(body)
        i += 12 + n
    return chunks


def png_series(path) -> list[str]:
    """The series a curves.png says it draws (plots.plot_metrics writes them into its tEXt Description)."""
    text = dict(c.split(b"\x00", 1) for c in png_chunks(path)[b"tEXt"])
    return text[b"Description"].decode().removeprefix("series: ").split(", ")


def test_finetune_ends_with_a_png_of_the_training_loss_and_the_dev_metrics(toy):
    run = pathlib.Path(toy["dir"])                       # written by finetune.run with a --dev set
    chunks = png_chunks(run / plots.PNG_NAME)
    width, height = struct.unpack(">II", chunks[b"IHDR"][0][:8])
    assert (width, height) == (1100, 400)               # two panels: training loss | evaluation
    series = png_series(run / plots.PNG_NAME)
    expected = plots.read_series(run / "metrics.jsonl")
    assert series == sorted(expected) and {"loss", "eval/accuracy", "eval/loss"} <= set(series)
    steps, losses = expected["loss"]
    assert steps[-1] == 80 and losses[-1] < losses[0]   # the toy trains 80 steps and learns


def test_without_matplotlib_the_run_says_so_in_one_line(toy, tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert plots.plot_metrics(tmp_path) is None
    assert capsys.readouterr().out == "no curves: matplotlib is not installed (pip install matplotlib)\n"
    assert not (tmp_path / plots.PNG_NAME).exists()


def test_wandb_logs_the_metrics_offline(toy, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = pathlib.Path(toy["dir"])
    out = tmp_path / "run"
    finetune.run(["--task", "binary", "--init", str(base), "--train", toy["dev"], "--out", str(out),
                  "--max-steps", "4", "--log-every", "2", "--device", "cpu", "--no-progress", "--save-every", "0",
                  "--wandb", "plainbert-test"])
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1                              # one offline run, to `wandb sync` later
    # its history records hold each logged value as JSON text (protobuf strings): both of ours are there
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]
    record_bytes = files[0].read_bytes()
    for r in logged:
        assert json.dumps(r["loss"]).encode() in record_bytes and json.dumps(r["grad_norm"]).encode() in record_bytes
