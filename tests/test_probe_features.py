"""scripts/probe_features.py: frozen sentence features and the logistic-regression probe on them."""
import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("sklearn")
spec = importlib.util.spec_from_file_location(
    "probe_features", pathlib.Path(__file__).parent.parent / "scripts" / "probe_features.py")
probe_features = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_features)


def test_features_are_one_vector_per_sentence_and_random_weights_change_them(tiny_init):
    texts = ["a fine film", "dull and long", "fine"]
    pre = probe_features.sentence_features(str(tiny_init), texts, random_weights=False)
    rnd = probe_features.sentence_features(str(tiny_init), texts, random_weights=True)
    for kind in ("embeddings", "mean", "cls"):
        assert pre[kind].shape == (3, 32) and np.isfinite(pre[kind]).all()
        assert not np.allclose(pre[kind], rnd[kind])


def test_the_probe_separates_separable_features_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    signal = np.c_[y * 2.0 - 1 + 0.1 * rng.normal(size=400), rng.normal(size=(400, 5))]
    assert probe_features.probe(signal[:300], y[:300], signal[300:], y[300:]) == 1.0
    noise = rng.normal(size=(400, 6))
    assert probe_features.probe(noise[:300], y[:300], noise[300:], y[300:]) < 0.7


def test_the_command_prints_a_row_per_feature(tiny_init, tmp_path, capsys):
    from data.tasks import write_sample_binary
    train, dev = write_sample_binary(tmp_path, n_train=60, n_dev=20)
    probe_features.main(["--train", str(train), "--dev", str(dev), "--folders", f"tiny={tiny_init}",
                         "--random-copy", str(tiny_init), "--sizes", "20", "60"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("linear-probe dev accuracy %, N = 20 / 60") and len(lines) == 7
    assert [line.split()[0] for line in lines[1:]] == ["random"] * 3 + ["tiny"] * 3
