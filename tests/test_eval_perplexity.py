"""The perplexity evaluation on tiny random models with a character-level stub tokenizer (CPU, fast)."""
import json
import math
import random

import pytest
import torch

from attn_patch import patch_state
from attn_patch.errors import ConfigError
from attn_patch.evals import perplexity as ppl_mod
from attn_patch.evals.common import parse_methods
from attn_patch.evals.perplexity import (build_streams, evaluate_perplexity, format_table, make_windows,
                                         select_windows, to_markdown)
from attn_patch.evals.text import Document, load_texts
from tiny_models import FAMILIES, VOCAB, build

EOS = VOCAB - 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's
    spinning makes each forward a hundred times slower; restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CharTokenizer:
    """One token per character, ids 1..VOCAB-2 (0 is padding, VOCAB-1 is EOS)."""

    eos_token_id = EOS
    pad_token_id = 0

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True, verbose=True, **kwargs):
        self.calls.append(dict(add_special_tokens=add_special_tokens, verbose=verbose))
        return {"input_ids": [1 + ord(c) % (VOCAB - 2) for c in text]}


def _documents(sizes=(300, 170, 40), seed=0):
    rng = random.Random(seed)
    words = ["river", "mill", "lantern", "harbour", "geese", "ledger", "orchard", "the", "a", "of", "and"]
    docs = []
    for i, n in enumerate(sizes):
        text = ""
        while len(text) < n:
            text += rng.choice(words) + rng.choice([" ", " ", ", ", ". "])
        docs.append(Document(f"doc{i}", text[:n]))
    return docs


def _model(family="llama"):
    torch.manual_seed(0)
    return build(family)


def _token_lists(docs):
    tok = CharTokenizer()
    return [tok(d.text)["input_ids"] for d in docs]


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_model_loss(family):
    """Non-overlapping windows: exp(token-weighted mean of the model's own loss over the same windows)."""
    model, docs, tok = _model(family), _documents(), CharTokenizer()
    result = evaluate_perplexity(model, tok, docs, [32, 64], ["sdpa"], show_progress=False)
    assert all(c == dict(add_special_tokens=False, verbose=False) for c in tok.calls)
    for n in (32, 64):
        total, count, windows = 0.0, 0, 0
        for ids in _token_lists(docs):
            for start in range(0, len(ids) - n + 1, n):
                window = torch.tensor(ids[start:start + n])[None]
                with torch.no_grad():
                    loss = model(window, labels=window).loss.item()
                total += loss * (n - 1)
                count += n - 1
                windows += 1
        got = result["results"]["sdpa"][str(n)]
        assert got["windows"] == windows == result["windows"][str(n)]["available"]
        assert got["tokens"] == count
        assert got["nll"] == pytest.approx(total, rel=1e-5)
        assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    json.dumps(result)  # JSON-able


def test_batched_equals_unbatched():
    model, docs = _model(), _documents()
    one = evaluate_perplexity(model, CharTokenizer(), docs, [32], ["sdpa"], show_progress=False)
    three = evaluate_perplexity(model, CharTokenizer(), docs, [32], ["sdpa"], batch_size=3, show_progress=False)
    assert three["results"]["sdpa"]["32"]["nll"] == pytest.approx(one["results"]["sdpa"]["32"]["nll"], rel=1e-5)
    assert three["results"]["sdpa"]["32"]["tokens"] == one["results"]["sdpa"]["32"]["tokens"]


@pytest.mark.parametrize("length,stride", [(16, 5), (16, 1), (16, 15), (7, 3)])
def test_stride_windows_score_each_token_once(length, stride):
    lengths = [100, 37, 64, 65, 15, 16, 17]
    windows = make_windows(lengths, length, stride)
    for s, n in enumerate(lengths):
        mine = [w for w in windows if w.stream == s]
        if n < length:
            assert not mine
            continue
        assert all(w.end - w.start == length and w.start + 1 <= w.first_target < w.end for w in mine)
        assert mine[0].start == 0 and mine[0].first_target == 1  # the first window scores all its tokens
        assert all(w.n_predicted == stride for w in mine[1:])
        end = mine[-1].end
        assert n - end < stride  # only a tail shorter than the stride is dropped
        scored = [p for w in mine for p in range(w.first_target, w.end)]
        assert sorted(scored) == list(range(1, end))  # positions 1..end-1, each exactly once


def test_non_overlapping_windows():
    windows = make_windows([100, 31, 32], 32)
    assert [(w.stream, w.start, w.end, w.first_target) for w in windows] == [
        (0, 0, 32, 1), (0, 32, 64, 33), (0, 64, 96, 65), (2, 0, 32, 1)]
    # a stride >= the length means non-overlapping windows
    assert make_windows([100, 31, 32], 32, stride=40) == windows


def test_stride_matches_hand_computation():
    model, docs = _model(), _documents()
    n, stride = 48, 16
    result = evaluate_perplexity(model, CharTokenizer(), docs, [n], ["sdpa"], stride=stride, batch_size=2,
                                 show_progress=False)
    total, count = 0.0, 0
    for ids in _token_lists(docs):
        ids = torch.tensor(ids)
        for start in range(0, len(ids) - n + 1, stride):
            window = ids[start:start + n][None]
            with torch.no_grad():
                logp = torch.log_softmax(model(window).logits[0].float(), -1)
            scored = range(1, n) if start == 0 else range(n - stride, n)
            total -= sum(logp[p - 1, window[0, p]].item() for p in scored)
            count += len(scored)
    got = result["results"]["sdpa"][str(n)]
    assert got["tokens"] == count and result["windows"][str(n)]["stride"] == stride
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_concat_joins_documents_with_eos():
    docs = _documents()
    lists = _token_lists(docs)
    (stream,) = build_streams(lists, concat=True, eos_token_id=EOS)
    assert stream.tolist() == lists[0] + [EOS] + lists[1] + [EOS] + lists[2]
    model = _model()
    result = evaluate_perplexity(model, CharTokenizer(), docs, [64], ["sdpa"], concat=True, show_progress=False)
    assert result["results"]["sdpa"]["64"]["windows"] == len(stream) // 64
    # the 40-token document alone has no 64-token window, but joined it counts
    assert result["settings"]["concat"] is True
    with pytest.raises(ConfigError, match="eos"):
        build_streams(lists, concat=True, eos_token_id=None)


def test_max_windows_evenly_spread_and_deterministic():
    items = list(range(10))
    assert select_windows(items, 3) == [1, 5, 8]
    assert select_windows(items, 10) == items and select_windows(items, None) == items
    assert select_windows(items, 1) == [5]
    model, docs = _model(), _documents()
    a = evaluate_perplexity(model, CharTokenizer(), docs, [16], ["sdpa"], max_windows=4, show_progress=False)
    b = evaluate_perplexity(model, CharTokenizer(), docs, [16], ["sdpa"], max_windows=4, show_progress=False)
    assert a["results"]["sdpa"]["16"]["windows"] == 4 and a["windows"]["16"]["available"] > 4
    assert a["results"]["sdpa"]["16"]["nll"] == b["results"]["sdpa"]["16"]["nll"]


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_flash_matches_sdpa(family):
    model, docs = _model(family), _documents()
    methods = parse_methods(["sdpa", "flash:backend=reference"])
    result = evaluate_perplexity(model, CharTokenizer(), docs, [32, 96], methods, stride=None, show_progress=False)
    assert patch_state(model) is None  # unpatched afterwards
    for n in ("32", "96"):
        base, flash = result["results"]["sdpa"][n], result["results"]["flash:backend=reference"][n]
        assert flash["tokens"] == base["tokens"] and flash["windows"] == base["windows"]
        assert flash["ppl"] == pytest.approx(base["ppl"], rel=1e-5)
    table = format_table(result)
    assert "flash:backend=reference" in table and "(x1.000)" in table


def test_softcapping_applied():
    model, docs = _model(), _documents(sizes=(64,))
    model.config.final_logit_softcapping = 2.0
    result = evaluate_perplexity(model, CharTokenizer(), docs, [64], ["sdpa"], show_progress=False)
    window = torch.tensor(_token_lists(docs)[0])[None]
    with torch.no_grad():
        logits = model(window).logits[0, :-1].float()
    capped = torch.tanh(logits / 2.0) * 2.0
    expected = torch.nn.functional.cross_entropy(capped, window[0, 1:], reduction="sum").item()
    assert result["results"]["sdpa"]["64"]["nll"] == pytest.approx(expected, rel=1e-5)
    model.config.logits_scaling = 4.0
    with pytest.raises(ConfigError, match="logits_scaling"):
        evaluate_perplexity(model, CharTokenizer(), docs, [64], ["sdpa"], show_progress=False)


def test_errors(tmp_path):
    model, docs = _model(), _documents()
    with pytest.raises(ConfigError, match=r"context length 301 is longer than every document \(longest: 300 tokens\)"):
        evaluate_perplexity(model, CharTokenizer(), docs, [32, 300, 301], ["sdpa"], show_progress=False)
    with pytest.raises(ConfigError, match="context lengths 301, 400 are longer"):
        evaluate_perplexity(model, CharTokenizer(), docs, [301, 400], ["sdpa"], show_progress=False)
    with pytest.raises(ConfigError, match=r"context length 513 is longer than the joined text \(512 tokens\)"):
        evaluate_perplexity(model, CharTokenizer(), docs, [513], ["sdpa"], concat=True, allow_beyond_context=True,
                            show_progress=False)
    with pytest.raises(ConfigError, match="at least 2"):
        evaluate_perplexity(model, CharTokenizer(), docs, [1], ["sdpa"], show_progress=False)
    with pytest.raises(ConfigError, match="--rope-scaling"):
        evaluate_perplexity(model, CharTokenizer(), docs, [600], ["sdpa"], show_progress=False)
    long_docs = _documents(sizes=(600,))
    result = evaluate_perplexity(model, CharTokenizer(), long_docs, [520], ["sdpa"], allow_beyond_context=True,
                                 show_progress=False)
    assert result["results"]["sdpa"]["520"]["windows"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no text files"):
        load_texts([str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        parse_methods(["nope"])


def test_run_writes_outputs(tmp_path, monkeypatch, capsys):
    import argparse

    data = tmp_path / "book.txt"
    data.write_text(_documents(sizes=(400,))[0].text)
    model = _model()

    def fake_setup(args):
        return model, CharTokenizer(), parse_methods(args.method, args.default_methods), "cpu", torch.float32

    monkeypatch.setattr(ppl_mod, "setup_from_args", fake_setup)
    parser = argparse.ArgumentParser()
    ppl_mod.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--data", str(data), "--lengths", "32", "64", "--max-windows", "3", "--method", "sdpa",
                              "--method", "flash:backend=reference", "--out", str(out)])
    assert ppl_mod.run(args) == 0
    printed = capsys.readouterr().out
    assert "length" in printed and "(x" in printed
    saved = json.loads((out / "perplexity.json").read_text())
    assert set(saved["results"]) == {"sdpa", "flash:backend=reference"}
    assert saved["results"]["sdpa"]["64"]["windows"] == 3 and saved["run"]["model_type"] == "llama"
    md = (out / "perplexity.md").read_text()
    assert md == to_markdown(saved)
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table_lines) == 4 and table_lines[0].count("|") == 6  # header, rule, two lengths; five columns
    # the CLI turns a configuration error into a message and exit status 2
    assert ppl_mod.main(["--data", str(tmp_path / "missing*.txt"), "--method", "sdpa"]) == 2
    assert "no text files" in capsys.readouterr().err
