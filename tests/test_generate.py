"""generate.py + model.KVCache as a specification: cached decoding is uncached decoding, a left-padded batch
is each prompt alone, the logit processing is Hugging Face's, the seed fixes the samples, and the command
line reads prompts from arguments, a file or stdin and refuses bad input in one line."""
import io
import json

import pytest
import torch

import generate
from conftest import minilm_dir
from model import EncoderConfig, KVCache, LanguageModel, save_hf_bert

PROMPTS = [[2, 17, 9, 33, 5, 12, 40], [2, 8], [2, 61, 61, 30, 4]]      # three lengths: left padding in a batch


def causal_lm(norm="post", attention="sdpa", vocab=64, seed=0):
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, max_position=64,
                        dropout=0.0, attention_dropout=0.0, norm=norm, attention=attention, causal=True)
    model = LanguageModel(cfg).eval()
    with torch.no_grad():                          # larger weights than BERT's init: peaked, varied logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("norm,attention", [("post", "sdpa"), ("pre", "math")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_decoding_equals_uncached(norm, attention, temperature):
    model = causal_lm(norm, attention)
    runs = [generate.generate(model, PROMPTS, 12, temperature=temperature, generator=torch.Generator().manual_seed(3),
                              use_cache=cache, return_logits=True) for cache in (True, False)]
    (tokens_c, logits_c), (tokens_u, logits_u) = runs
    assert tokens_c == tokens_u
    assert logits_c.shape == (3, 12, 64)
    torch.testing.assert_close(logits_c, logits_u, rtol=0, atol=1e-5)
    assert len({t for row in tokens_c for t in row}) > 3                # not one token repeated: a real check


def test_left_padded_batch_equals_each_prompt_alone():
    model = causal_lm()
    batch_tokens, batch_logits = generate.generate(model, PROMPTS, 10, temperature=0, return_logits=True)
    for i, prompt in enumerate(PROMPTS):
        tokens, logits = generate.generate(model, [prompt], 10, temperature=0, return_logits=True)
        assert tokens[0] == batch_tokens[i]
        torch.testing.assert_close(logits[0], batch_logits[i], rtol=0, atol=1e-5)


def test_cached_step_equals_full_forward_at_every_position():
    """The cache fed one token at a time gives, at each step, the full causal forward's logits there."""
    model = causal_lm()
    ids = torch.tensor([PROMPTS[0]])
    full = model(ids)                                                      # (1, T, V)
    cache = KVCache(model.config)
    steps = [model(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    assert cache.layers[0].k.shape == (1, 4, ids.shape[1], 8)            # (B, nh, S, hs)


def test_kv_cache_refuses_a_bidirectional_model():
    with pytest.raises(ValueError, match="causal"):
        KVCache(EncoderConfig(vocab_size=10, hidden_size=8, num_heads=2, causal=False))


def test_logit_processing_equals_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 200, generator=g) * 3
    ids = torch.randint(0, 200, (6, 30), generator=g)
    seen = torch.zeros(6, 200).scatter_(1, ids, 1.0) > 0
    for temperature, top_k, top_p, penalty in [(0.7, 0, 0.9, 1.3), (1.3, 20, 1.0, 1.0), (1.0, 50, 0.5, 0.8),
                                               (0.5, 5, 0.95, 2.0)]:
        ours = generate.process_logits(logits, seen, temperature, top_k, top_p, penalty)
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        theirs = TemperatureLogitsWarper(temperature)(ids, theirs)
        if top_k:
            theirs = TopKLogitsWarper(top_k)(ids, theirs)
        if top_p < 1:
            theirs = TopPLogitsWarper(top_p)(ids, theirs)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert (~torch.isinf(ours)).sum(-1).min() >= 1
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_nucleus_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: (~torch.isinf(generate.process_logits(logits, None, top_p=p))).int().tolist()[0]
    assert kept(0.5) == [1, 0, 0, 0]
    assert kept(0.6) == [1, 1, 0, 0]
    assert kept(0.9) == [1, 1, 1, 0]
    assert kept(0.99) == [1, 1, 1, 1]


def test_top_k_one_samples_the_greedy_tokens():
    model = causal_lm()
    greedy = generate.generate(model, PROMPTS, 8, temperature=0)
    sampled = generate.generate(model, PROMPTS, 8, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(9))
    assert sampled == greedy


def test_the_seed_fixes_the_samples():
    model = causal_lm()
    run = lambda seed: generate.generate(model, PROMPTS, 10, generator=torch.Generator().manual_seed(seed))
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_repetition_penalty_lowers_repeats():
    model = causal_lm()
    count_repeats = lambda rows: sum(len(r) - len(set(r)) for r in rows)
    plain = generate.generate(model, PROMPTS, 30, temperature=0)
    penalised = generate.generate(model, PROMPTS, 30, temperature=0, repetition_penalty=5.0)
    assert count_repeats(penalised) < count_repeats(plain)


def test_generation_stops_at_the_stop_token():
    model = causal_lm()
    free = generate.generate(model, PROMPTS, 20, temperature=0)
    stop = free[0][3]                                                    # a token the first row does produce
    cut = generate.generate(model, PROMPTS, 20, temperature=0, stop_id=stop)
    assert cut[0] == free[0][:free[0].index(stop)]
    for full, row in zip(free, cut):
        assert row == (full[:full.index(stop)] if stop in full else full)


# -----------------------------------------------------------------------------------------------------
# the command line, on a CLM folder as pretrain.py writes it (a WordPiece vocabulary, random weights)


@pytest.fixture(scope="module")
def clm_folder(tmp_path_factory):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(minilm_dir() / "vocab.txt")
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2, max_position=64,
                        causal=True, pad_id=tok.pad_id)
    out = tmp_path_factory.mktemp("clm")
    save_hf_bert(LanguageModel(cfg), str(out / "clm"), tok)
    save_hf_bert(LanguageModel(EncoderConfig(**{**cfg.to_dict(), "causal": False})), str(out / "mlm"), tok)
    return out


def cli(capsys, argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = 0
    try:
        generate.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_continues_prompts_from_arguments_file_and_stdin(clm_folder, capsys, monkeypatch, tmp_path):
    model = str(clm_folder / "clm")
    flags = ["--max-new-tokens", "6", "--seed", "4", "--format", "jsonl", "--no-stop", "--top-k", "20"]
    code, out, err = cli(capsys, [model, "a gripping film", "dull", *flags])
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["a gripping film", "dull"]
    assert all(r["new_tokens"] == 6 and r["continuation"].strip() for r in rows)
    (tmp_path / "p.txt").write_text("a gripping film\n\n   \ndull\n")
    assert cli(capsys, [model, "--file", str(tmp_path / "p.txt"), *flags])[1] == out     # blank lines skipped
    assert cli(capsys, [model, *flags], stdin="a gripping film\ndull\n", monkeypatch=monkeypatch)[1] == out
    # batching does not change greedy output; the cache does not change it either
    greedy = [model, "--greedy", "--max-new-tokens", "6", "--no-stop", "a gripping film", "dull"]   # prompts last
    text = cli(capsys, greedy)[1]
    assert cli(capsys, greedy + ["--batch-size", "1"])[1] == text
    assert cli(capsys, greedy + ["--no-cache"])[1] == text
    assert text.startswith("a gripping film")


@pytest.mark.parametrize("argv,stdin,expected", [
    (["{mlm}", "hello"], None, "not a causal LM"),
    (["{missing}", "hello"], None, "not a folder"),
    (["{clm}", "hello", ""], None, "prompt 2 is empty"),
    (["{clm}"], "\n  \n", "stdin: no prompts"),
    (["{clm}", "--file", "{missing}"], None, "--file"),
    (["{clm}", "hello", "--top-p", "0"], None, "--top-p 0.0: expected a probability mass"),
    (["{clm}", "hello", "--top-p", "1.5"], None, "--top-p"),
    (["{clm}", "hello", "--temperature", "-1"], None, "--temperature"),
    (["{clm}", "hello", "--top-k", "-2"], None, "--top-k"),
    (["{clm}", "hello", "--repetition-penalty", "0"], None, "--repetition-penalty"),
    (["{clm}", "hello", "--max-new-tokens", "0"], None, "--max-new-tokens"),
    (["{clm}", "hello", "--max-new-tokens", "100"], None, "exceeds the model's 64 positions"),
])
def test_cli_bad_input_is_one_line(clm_folder, capsys, monkeypatch, argv, stdin, expected):
    argv = [a.format(clm=clm_folder / "clm", mlm=clm_folder / "mlm", missing=clm_folder / "nope") for a in argv]
    code, out, err = cli(capsys, argv, stdin=stdin if stdin is not None else "", monkeypatch=monkeypatch)
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
