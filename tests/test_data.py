"""Training data: tokenisation and prompt masks, the public sft_datums helper, data order, the data file."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import tinkex
from tinkex._backends.tiny import ByteTokenizer
from tinkex._dataset import batch_indices, load_pairs, tokenize_pairs
from tinkex._loop import make_base_loss

BOS, EOS = ByteTokenizer.bos_token_id, ByteTokenizer.eos_token_id


def test_tokenize_masks_the_prompt_and_keeps_eos():
    (example,), dropped = tokenize_pairs([("ab", "c")], ByteTokenizer(), max_length=16)
    model_input, targets, weights = example
    a, b, c = ord("a"), ord("b"), ord("c")
    assert dropped == 0
    assert model_input == [BOS, a, b, c]  # tokens[:-1]
    assert targets == [a, b, c, EOS]  # tokens[1:]
    assert weights == [0.0, 0.0, 1.0, 1.0]  # the response token and EOS count


def test_tokenize_truncates_and_drops():
    pairs = [("ab", "cdef"), ("abcdefgh", "x")]
    examples, dropped = tokenize_pairs(pairs, ByteTokenizer(), max_length=4)
    assert dropped == 1  # the second prompt fills all 4 inputs: no response target left
    ((model_input, targets, weights),) = examples
    assert len(model_input) == len(targets) == len(weights) == 4
    assert targets == [ord(x) for x in "abcd"] and weights == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(tinkex.ConfigError, match=r"max_length = 2"):
        tokenize_pairs([("abcdefgh", "x")], ByteTokenizer(), max_length=2)
    with pytest.raises(tinkex.ConfigError, match="no tokenizer"):
        tokenize_pairs(pairs, None, max_length=4)


def test_batch_indices_cover_every_example_once_per_epoch_and_are_reproducible():
    n, bs = 10, 4
    first_epoch_and_half = [i for step in range(1, 6) for i in batch_indices(step, bs, n, seed=3)]
    assert Counter(first_epoch_and_half[:10]) == Counter(range(10))  # epoch 0: a permutation
    assert batch_indices(4, bs, n, seed=3) == batch_indices(4, bs, n, seed=3)
    assert batch_indices(1, bs, n, seed=3) != batch_indices(1, bs, n, seed=4)
    # the order depends only on (seed, step): a resumed run continues the same stream
    assert first_epoch_and_half[12:16] == batch_indices(4, bs, n, seed=3)


def test_base_loss_worked_values():
    data = [
        tinkex.Datum(
            model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [0, 1, 1]}
        ),
        tinkex.Datum(
            model_input=[5, 6], loss_fn_inputs={"target_tokens": [6, 7], "weights": [1, 0]}
        ),
    ]
    lps = [
        torch.tensor([-1.0, -2.0, -3.0], requires_grad=True),
        torch.tensor([-4.0, -5.0], requires_grad=True),
    ]
    loss, metrics = make_base_loss("tokens")(data, lps)
    # counted: -2, -3, -4 -> nll 9 over 3 tokens
    assert float(loss.detach()) == pytest.approx(3.0)
    assert metrics == {"response_tokens": 3.0, "nll_per_token": 3.0}
    loss.backward()
    assert lps[0].grad.tolist() == pytest.approx([0.0, -1 / 3, -1 / 3])
    assert lps[1].grad.tolist() == pytest.approx([-1 / 3, 0.0])
    total, _ = make_base_loss("sum")(data, [lp.detach() for lp in lps])
    assert float(total) == pytest.approx(9.0)


def test_sft_datums_is_the_public_helper_with_masked_prompts():
    (datum,) = tinkex.sft_datums([("ab", "c")], ByteTokenizer(), max_length=16)
    a, b, c = ord("a"), ord("b"), ord("c")
    assert datum.tokens() == [BOS, a, b, c]
    assert datum.loss_fn_inputs["target_tokens"].tolist() == [a, b, c, EOS]
    assert datum.loss_fn_inputs["weights"].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(tinkex.SpecError, match="max_length must be an int >= 2"):
        tinkex.sft_datums([("ab", "c")], ByteTokenizer(), max_length=1)


def test_a_max_length_beyond_the_models_context_is_refused():
    with pytest.raises(tinkex.ConfigError, match=r"longer than the model's context of 1024"):
        tokenize_pairs([("a", "b")], ByteTokenizer(), max_length=3000, context_length=1024)
    with pytest.raises(tinkex.SpecError, match="data.max_length <= 8"):
        tinkex.sft_datums([("a", "b")], ByteTokenizer(), max_length=16, context_length=8)


def test_a_data_file_that_is_not_utf8_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(tinkex.ConfigError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xff"):
        load_pairs(path)
    path.write_text('{"prompt": "a", "response": "b"}\n[1]\n', encoding="utf-8")
    with pytest.raises(tinkex.ConfigError, match=r"data.jsonl:2: each line must be a JSON object"):
        load_pairs(path)
    assert load_pairs(path, limit=1, template="Q: {prompt}") == [("Q: a", "b")]


def test_unicode_line_separators_inside_json_strings_are_text_not_newlines(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "a\u2028b", "response": "c\x85d"}, {"prompt": "e", "response": "f"}]
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8"
    )
    assert load_pairs(path) == [("a\u2028b", "c\x85d"), ("e", "f")]
