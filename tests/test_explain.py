"""explain.py: integrated gradients (completeness), words from pieces, attention maps ≡ Hugging Face's, and
predict.py --explain end to end."""
import json

import pytest
import torch

import predict
from explain import ExplainError, explain, integrated_gradients, output_of, words_of
from finetuned import load_finetuned, save_finetuned
from model import EncoderConfig, SequenceClassifier
from tokenizer import WordPieceTokenizer

WORDS = ["the", "film", "was", "fun", "dull", "##y", "not", "a", "moving", "story", ",", "."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A fine-tuned folder of a random 2-layer binary classifier with a WordPiece vocabulary."""
    d = tmp_path_factory.mktemp("explain")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    torch.manual_seed(0)
    model = SequenceClassifier(EncoderConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_layers=2, num_heads=4,
                                             max_position=64, dropout=0.0, attention_dropout=0.0), num_labels=1)
    with torch.no_grad():                     # BERT's init (std 0.02) gives a near-constant output: widen it
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    info = {"task": "binary", "labels": ["0", "1"], "num_outputs": 1, "max_length": 32, "method": "full", "peft": None}
    save_finetuned(d, model, WordPieceTokenizer(d / "vocab.txt"), info)
    return d


def test_integrated_gradients_are_complete_within_a_gap_that_shrinks_as_steps_grow(folder):
    """sum_t IG_t = f(x) - f(x') exactly for the integral; the trapezoidal rule's error falls like 1/steps^2."""
    model, tok, info = load_finetuned(folder)
    model = model.double()
    enc = tok(["the film was not fun , dully moving ."])
    ids, types = enc["input_ids"], enc["token_type_ids"]
    base = torch.where(torch.isin(ids, torch.tensor([tok.cls_id, tok.sep_id])), ids, torch.full_like(ids, tok.pad_id))
    f = lambda out: output_of("binary", out, 1)
    gaps = []
    for steps in (2, 8, 32, 128):
        scores, f_x, f_b = integrated_gradients(model, ids, types, base, f, steps=steps)
        assert f_x == pytest.approx(float(model(ids, torch.ones_like(ids), types)[0, 0].detach()), abs=1e-12)
        gaps.append(abs(float(scores.sum()) - (f_x - f_b)))
    assert abs(f_x - f_b) > 1e-3                         # there is something to attribute
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3]
    assert gaps[3] < 1e-4 * abs(f_x - f_b)
    assert scores[0] == 0 and scores[-1] == 0            # [CLS] and [SEP] are the same in x and x'


def test_word_scores_are_the_sums_of_their_pieces(folder):
    model, tok, info = load_finetuned(folder)
    words, of = words_of(tok, tok(["dully moving"])["input_ids"][0].tolist())
    assert words == ["dully", "moving"] and of == [None, 0, 0, 1, None]
    e = explain(model, tok, info, "the film was dully moving", steps=16, baseline="mask")
    assert e.words == ["the", "film", "was", "dully", "moving"]
    assert e.word_scores[3] == pytest.approx(e.token_scores[4] + e.token_scores[5])
    assert sum(e.word_scores) == pytest.approx(e.f_input - e.f_baseline + e.completeness_gap)
    assert e.f_input > 0                                 # the predicted class: z > 0 for "1", -z > 0 for "0"
    other = explain(model, tok, info, "the film was dully moving", target="0" if e.label == "1" else "1", steps=16)
    assert other.f_input == pytest.approx(-e.f_input)    # binary: class 0's output is -z


def test_attention_map_equals_hugging_face_output_attentions(folder):
    transformers = pytest.importorskip("transformers")
    model, tok, info = load_finetuned(folder)
    hf = transformers.BertForSequenceClassification.from_pretrained(str(folder), attn_implementation="eager").eval()
    text = "the film was not a moving story ."
    enc = tok([text])
    with torch.no_grad():
        theirs = hf(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"], output_attentions=True).attentions
    for layer, head in ((0, 0), (1, 3), (-1, 2)):
        e = explain(model, tok, info, text, steps=2, layer=layer, head=head)
        ours = torch.tensor(e.attention)
        assert torch.allclose(ours, theirs[layer][0, head], atol=1e-5)
        assert torch.allclose(ours.sum(-1), torch.ones(len(e.tokens)), atol=1e-6)


def test_bad_layer_head_and_steps_are_one_line_errors(folder):
    model, tok, info = load_finetuned(folder)
    for kw, flag in (({"layer": 2}, "--layer 2"), ({"head": 4}, "--head 4"), ({"steps": 0}, "--ig-steps"),
                     ({"target": "maybe"}, "--target")):
        with pytest.raises(ExplainError, match=flag):
            explain(model, tok, info, "the film", **kw)


def test_predict_explain_writes_json_lines_and_an_html_view(folder, tmp_path, capsys):
    page = tmp_path / "why.html"
    predict.main([str(folder), "the film was fun", "a dull story .", "--explain", "--ig-steps", "8",
                  "--baseline", "mask", "--layer", "1", "--head", "2", "--explain-html", str(page)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["the film was fun", "a dull story ."]
    assert rows[0]["words"] == ["the", "film", "was", "fun"] and len(rows[0]["word_scores"]) == 4
    assert rows[1]["layer"] == 1 and rows[1]["head"] == 2 and len(rows[1]["attention"]) == len(rows[1]["tokens"])
    text = page.read_text()
    assert text.count("<span class='w'") == 4 + 4 and "layer 1 head 2" in text
    with pytest.raises(SystemExit):
        predict.main([str(folder), "the film", "--explain", "--head", "9"])
    assert "--head 9" in capsys.readouterr().err
