"""Needle-in-a-haystack and passkey evaluations: prompt construction (exact length, needle at the
requested depth, identical needle tokens), scoring with an oracle model stub that really reads the
prompt, result files, and configuration errors. No model weights are loaded; the real SmolLM2
tokenizer is used where it is installed, besides two small word-level tokenizers."""
import json
import re

import pytest
import torch

from attn_patch.errors import ConfigError
from attn_patch.evals import common, needle, passkey
from attn_patch.evals.common import MethodSpec, parse_methods
from attn_patch.evals.text import load_texts
from tiny_models import smollm2_tokenizer


class WordTokenizer:
    """A word-level tokenizer (ids assigned on first sight) with a BOS token and, optionally, a chat
    template: enough of the transformers tokenizer interface for the evaluations."""

    _PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+$")

    def __init__(self, chat: bool = False):
        self.specials = {0: "<pad>", 1: "<s>", 2: "</s>"}
        self.vocab: dict[str, int] = {}
        self.pieces: dict[int, str] = {}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.chat_template = "<|user|> ... <|assistant|>" if chat else None

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.vocab) + 3
            self.pieces[self.vocab[piece]] = piece
        return self.vocab[piece]

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [self._id(p) for p in self._PIECE.findall(text)]
        return type("Encoding", (), {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids})

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.pieces[i] if i in self.pieces else ("" if skip_special_tokens else self.specials[i])
                       for i in ids)

    def batch_decode(self, batch):
        return [self.decode(ids) for ids in batch]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize and add_generation_prompt
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


@pytest.fixture(scope="module", params=["words", "words-chat", "smollm2"])
def tokenizer(request):
    if request.param != "smollm2":
        return WordTokenizer(chat=request.param == "words-chat")
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def haystack_ids(tokenizer):
    return needle.tokenize_haystack(tokenizer, None, min_tokens=2048)[0]


class OracleModel:
    """Reads the decoded prompt like a perfect model: answers the magic number stated for the word the
    question asks about (or the pass key), and "unknown" when the prompt does not hold it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prompts = []

    def generate(self, *, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == 1 and not do_sample
        text = self.tokenizer.decode(input_ids[0])
        self.prompts.append(input_ids[0].clone())
        asked = re.search(r"special magic number for (\S+) mentioned in the provided text\?", text)
        found = asked and re.search(rf"magic numbers for {re.escape(asked.group(1))} is: (\d{{7}})\.", text)
        found = found or re.search(r"The pass key is (\d+)\. Remember it\.", text)
        answer = f" {found.group(1)}." if found else " unknown."
        new = self.tokenizer(answer, add_special_tokens=False).input_ids[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)


class NoCallModel:
    def generate(self, **kwargs):
        raise AssertionError("generate was called before the prompts were checked")


TWO = [MethodSpec("first"), MethodSpec("second")]  # two labels, both the unpatched stub


# ---------------------------------------------------------------- needle prompts

@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 0.9, 1.0])
def test_needle_prompt_length_and_depth(tokenizer, haystack_ids, length, depth):
    p = needle.build_needle_prompt(tokenizer, haystack_ids, length, depth, 4718203, "amber-tulip", offset=777)
    ids = p["input_ids"]
    assert ids.dtype == torch.long and ids.shape == (length,)
    start, end = p["needle_start"], p["needle_end"]
    assert tokenizer.decode(ids[start:end]).strip() == "One of the special magic numbers for amber-tulip is: 4718203."
    n_hay = p["context_end"] - p["context_start"] - (end - start)
    target = p["context_start"] + depth * n_hay
    assert target - needle.SNAP_TOKENS - 0.5 <= start <= target + 0.5  # only ever moved back, by one sentence at most
    assert abs(p["depth"] - (start - p["context_start"]) / n_hay) < 1e-9
    if depth == 0.0:
        assert start == p["context_start"]
    elif depth == 1.0:
        assert end == p["context_end"]
    else:  # snapped to a sentence boundary
        assert tokenizer.decode(ids[start - 1:start]).rstrip().endswith(".")
    assert tokenizer.decode(ids[p["context_end"]:]).count("amber-tulip") == 2  # question + answer prefix


def test_needle_tokens_identical_wherever_it_lands(tokenizer, haystack_ids):
    pieces = set()
    for depth in (0.0, 0.3, 0.6, 1.0):
        for offset in (0, 101, 5003):
            p = needle.build_needle_prompt(tokenizer, haystack_ids, 400, depth, 1000001, "tidy-igloo", offset=offset)
            pieces.add(tuple(p["input_ids"][p["needle_start"]:p["needle_end"]].tolist()))
    assert len(pieces) == 1


def test_needle_prompt_formats(tokenizer, haystack_ids):
    plain = needle.build_needle_prompt(tokenizer, haystack_ids, 300, 0.5, 2222222, "wild-oyster", chat=False)
    text = tokenizer.decode(plain["input_ids"])
    assert text.rstrip().endswith("Answer: The special magic number for wild-oyster mentioned in the provided text is")
    assert needle.INSTRUCTION in text
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and tokenizer("a").input_ids[0] == bos:
        assert plain["input_ids"][0].item() == bos
    if tokenizer.chat_template:
        chat = needle.build_needle_prompt(tokenizer, haystack_ids, 300, 0.5, 2222222, "wild-oyster")
        assert chat["chat"]
        text = tokenizer.decode(chat["input_ids"])
        header = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                               add_generation_prompt=True)
        assert text.startswith(header.split("x")[0])
        assert text.endswith(header.split("x")[1] + "The special magic number for wild-oyster mentioned in the "
                                                     "provided text is")
    else:
        with pytest.raises(ConfigError, match="chat template"):
            needle.build_needle_prompt(tokenizer, haystack_ids, 300, 0.5, 2222222, "wild-oyster", chat=True)


def test_needle_prompt_too_short(tokenizer, haystack_ids):
    with pytest.raises(ConfigError, match="too short"):
        needle.build_needle_prompt(tokenizer, haystack_ids, 40, 0.5, 1234567, "olive-rocket")
    with pytest.raises(ConfigError, match="depth"):
        needle.build_needle_prompt(tokenizer, haystack_ids, 400, 50, 1234567, "olive-rocket")


# ---------------------------------------------------------------- needle evaluation

def test_oracle_scores_full_marks_and_zero_without_needle(tokenizer):
    oracle = OracleModel(tokenizer)
    lengths, depths = [256, 512], [0, 50, 100]
    result = needle.evaluate_needle(oracle, tokenizer, TWO, lengths, depths, 2, seed=3, show_progress=False)
    json.dumps(result)  # JSON-able
    assert len(oracle.prompts) == 2 * len(lengths) * len(depths) * 2
    assert [len(p) for p in oracle.prompts[:12]] == [256] * 6 + [512] * 6
    first, second = result["methods"]["first"], result["methods"]["second"]
    assert first["accuracy"] == [[1.0, 1.0]] * 3 and first["mean"] == 1.0
    assert all(r["correct"] and r["predicted"] == str(r["key"]) for r in first["records"])
    assert [r["key"] for r in first["records"]] == [r["key"] for r in second["records"]]
    assert second["same_generation_as_first"] == 1.0
    # the same prompts without the needle: the oracle finds nothing to answer
    control = needle.evaluate_needle(OracleModel(tokenizer), tokenizer, TWO[:1], lengths, depths, 2, seed=3,
                                     show_progress=False, insert_needle=False)
    assert control["methods"]["first"]["mean"] == 0.0
    assert all(r["needle_start"] is None for r in control["methods"]["first"]["records"])


def test_trials_are_independent_and_reproducible(tokenizer):
    run = lambda seed: needle.evaluate_needle(OracleModel(tokenizer), tokenizer, TWO[:1], [300], [50], 4, seed=seed,
                                              show_progress=False)["methods"]["first"]["records"]
    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert len({r["key"] for r in a}) == 4 and len({r["offset"] for r in a}) == 4
    assert all(1_000_000 <= r["key"] <= 9_999_999 for r in a)
    assert [r["key"] for r in a] != [r["key"] for r in c]


def test_haystack_from_files(tokenizer, tmp_path):
    book = tmp_path / "books"
    book.mkdir()
    (book / "a.txt").write_text(" ".join(f"Chapter {i} was printed in 1887 and sold 4100000 copies."
                                         for i in range(80)))
    (book / "b.md").write_text("The second file. It has some more words in it, and a number: 2718281. " * 40)
    docs = load_texts([str(book)])
    result = needle.evaluate_needle(OracleModel(tokenizer), tokenizer, TWO[:1], [400], [25, 75], 2, haystack=docs,
                                    show_progress=False)
    assert result["methods"]["first"]["mean"] == 1.0
    assert "a.txt" in result["settings"]["haystack"]


def test_evaluate_checks_before_generating(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="too short"):
        needle.evaluate_needle(NoCallModel(), tokenizer, TWO, [1024, 30], [50], 1, show_progress=False)
    with pytest.raises(ConfigError, match="depths"):
        needle.evaluate_needle(NoCallModel(), tokenizer, TWO, [512], [50, 150], 1, show_progress=False)
    with pytest.raises(ConfigError, match="no text files"):
        load_texts([str(tmp_path)])  # an empty directory


def test_extract_key():
    assert needle.extract_key(" 1234567.") == "1234567"
    assert needle.extract_key("is 12 and then 7654321, not 1234567") == "7654321"
    assert needle.extract_key("12345678") is None and needle.extract_key("none") is None
    assert passkey.extract_int(" 4711. Remember it") == 4711 and passkey.extract_int("no") is None


# ---------------------------------------------------------------- passkey

@pytest.mark.parametrize("length", [200, 777])
@pytest.mark.parametrize("depth", [0.0, 0.4, 0.85, 1.0])
def test_passkey_prompt(tokenizer, length, depth):
    p = passkey.build_passkey_prompt(tokenizer, length, 31337, depth)
    ids = p["input_ids"]
    assert ids.shape == (length,)
    start, end = p["key_start"], p["key_end"]
    assert tokenizer.decode(ids[start:end]).strip() == "The pass key is 31337. Remember it. 31337 is the pass key."
    n_fill = p["context_end"] - p["context_start"] - (end - start)
    target = p["context_start"] + depth * n_fill
    assert target - needle.SNAP_TOKENS - 0.5 <= start <= target + 0.5
    if depth == 0.0:
        assert start == p["context_start"]
    if depth == 1.0:
        assert end == p["context_end"]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith(passkey.INSTRUCTION) and text.endswith("What is the pass key? The pass key is")
    assert "The grass is green. The sky is blue." in text
    with pytest.raises(ConfigError, match="too short"):
        passkey.build_passkey_prompt(tokenizer, 30, 31337, depth)


def test_passkey_oracle(tokenizer):
    oracle = OracleModel(tokenizer)
    result = passkey.evaluate_passkey(oracle, tokenizer, TWO, [200, 400], trials=5, seed=7, show_progress=False)
    json.dumps(result)
    assert [len(p) for p in oracle.prompts] == ([200] * 5 + [400] * 5) * 2
    for label in ("first", "second"):
        assert result["methods"][label]["accuracy"] == [1.0, 1.0]
    records = result["methods"]["first"]["records"]
    assert all(1 <= r["key"] <= passkey.MAX_KEY and 0 <= r["depth"] <= 1 for r in records)
    assert len({r["key"] for r in records}) == 10
    assert "1.00" in passkey.format_table(result) and "| 200 |" in passkey.format_markdown(result)


# ---------------------------------------------------------------- command line and files

@pytest.fixture
def stub_setup(monkeypatch, tokenizer):
    """run() without loading a model: the oracle stub stands in for it."""
    def setup(args):
        return OracleModel(tokenizer), tokenizer, parse_methods(args.method, args.default_methods), "cpu", torch.float32
    monkeypatch.setattr(common, "setup_from_args", setup)
    monkeypatch.setattr(common, "describe_run", lambda model, device, dtype: {"model": "oracle stub"})


def test_needle_run_writes_files(stub_setup, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "res"
    assert needle.main(["--lengths", "256", "384", "--depths", "0", "100", "--trials", "1", "--method", "sdpa",
                        "--method", "original", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "depth \\ length" in printed and "1.00" in printed
    data = json.loads((out / "needle.json").read_text())
    assert data["methods"]["sdpa"]["accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and data["run"]["model"] == "oracle stub"
    assert "| 0% | 1.00 | 1.00 |" in (out / "needle.md").read_text()
    assert (out / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap(tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    result = needle.evaluate_needle(OracleModel(tokenizer), tokenizer, TWO, [256], [0, 50, 100], 1,
                                    show_progress=False)
    path = needle.plot_heatmap(result, tmp_path / "sub" / "heat.png")
    assert path == tmp_path / "sub" / "heat.png" and path.stat().st_size > 1000


def test_passkey_run_writes_files(stub_setup, tmp_path):
    assert passkey.main(["--lengths", "256", "--trials", "3", "--method", "sdpa", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "passkey.json").read_text())["methods"]["sdpa"]["accuracy"] == [1.0]
    assert (tmp_path / "passkey.md").read_text().startswith("## Passkey retrieval")


def test_passkey_progress_in_a_log_is_one_line_per_prompt(stub_setup, capsys):
    """`attn-patch eval passkey ... > log 2>&1`: stderr is no terminal, so progress is one plain line
    per prompt (6 here), each once, naming the prompt it reports; the table is printed once."""
    assert passkey.main(["--lengths", "256", "--trials", "3", "--method", "sdpa", "--method", "original"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert "\r" not in captured.err and len(lines) == 6 and len(set(lines)) == 6
    for step, line in enumerate(lines, 1):
        label = "sdpa" if step <= 3 else "original"
        assert line.startswith(f"passkey {step}/6 ") and line.endswith(f": {label} 256 tok: ok"), line
    assert captured.out.count("passkey retrieval: accuracy") == 1


def test_cli_config_errors(stub_setup, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert needle.main(["--haystack", str(empty), "--lengths", "256"]) == 2
    assert "no text files" in capsys.readouterr().err
    assert needle.main(["--lengths", "20", "--method", "sdpa", "--trials", "1"]) == 2
    assert "too short" in capsys.readouterr().err
    assert passkey.main(["--method", "nope"]) == 2
    with pytest.raises(ConfigError):
        parse_methods(["nope"])
