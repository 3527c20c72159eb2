"""attn_patch.training.RetrievalMix (the LongLoRA recipe's --retrieval-mix): the windows keep their
length and text, every question's answer is a fact stated earlier in the window, the answer mask
marks exactly the value tokens (with the space the tokenizer splits off before them), and the draw
is reproducible per micro-batch."""
import re

import pytest
import torch

from attn_patch.training import RETRIEVAL_TEMPLATES, RetrievalMix
from tiny_models import smollm2_tokenizer

BOOK = "It was a cold day. The sea was grey! Was it? The ship sailed on, and the crew sang. " * 200


def _pattern(template: str) -> str:
    return re.escape(template).replace(r"\{name\}", "[a-z]+").replace(r"\{value\}", r"\d+")


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def windows(tokenizer):
    ids = tokenizer(BOOK, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:3 * 700]).view(3, 700)


def test_facts_are_stated_before_they_are_asked(tokenizer, windows):
    mix = RetrievalMix(tokenizer, 1.0, facts=5, seed=3)
    for micro in range(4):
        out, answers = mix(windows, micro)
        assert out.shape == windows.shape and answers.shape == windows.shape
        for row, mask, original in zip(out, answers, windows):
            text = tokenizer.decode(row)
            values = tokenizer.decode(row[mask]).split()
            assert tokenizer.decode(row[mask]) == "".join(" " + v for v in values)  # nothing else is marked
            assert len(values) == 5 and len(set(values)) >= 4
            body, _, tail = text.rpartition("\n")
            asked = re.findall(r"(What is [^?]+\?) ([^?]*?) (\d+)\.", tail)
            assert [v for _, _, v in asked] == values  # the mask marks exactly the answers
            for _, answer, value in asked:
                assert f"{answer} {value}." in body  # ... each stated earlier in the window
            template = [t for t in RETRIEVAL_TEMPLATES if all(re.fullmatch(_pattern(t[1]), q) for q, _, _ in asked)]
            assert len(template) == 1  # one wording per window
            # the rest is the original text, in order, at sentence boundaries, cut at the end
            plain = re.sub(" " + _pattern(template[0][0]), "", body)
            assert tokenizer.decode(original).startswith(plain)
            assert len(plain) > len(tokenizer.decode(original)) // 2


def test_share_and_reproducibility(tokenizer, windows):
    none, mask = RetrievalMix(tokenizer, 0.0, seed=1)(windows, 0)
    assert torch.equal(none, windows) and not mask.any()
    mix = RetrievalMix(tokenizer, 0.5, facts=3, seed=1)
    draws = [mix(windows, micro) for micro in range(40)]
    touched = [bool(m[b].any()) for _, m in draws for b in range(3)]
    assert 0.3 < sum(touched) / len(touched) < 0.7
    for micro in (0, 7):  # the same micro-batch number gives the same windows (resumes are exact)
        again = RetrievalMix(tokenizer, 0.5, facts=3, seed=1)(windows, micro)
        assert torch.equal(again[0], draws[micro][0]) and torch.equal(again[1], draws[micro][1])
    other = RetrievalMix(tokenizer, 0.5, facts=3, seed=2)
    assert any(not torch.equal(other(windows, m)[0], draws[m][0]) for m in range(5))


def test_bad_settings_name_the_fix(tokenizer, windows):
    with pytest.raises(SystemExit, match="--retrieval-mix"):
        RetrievalMix(tokenizer, 1.5)
    with pytest.raises(SystemExit, match="--retrieval-facts"):
        RetrievalMix(tokenizer, 0.5, facts=0)
    with pytest.raises(SystemExit, match="longer --seq-len"):
        RetrievalMix(tokenizer, 1.0, facts=30)(windows[:, :300], 0)
