"""Training data: tokenisation and prompt masks, the public sft_datums helper, data order, the data file."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import tinkex
from tinkex._backends.tiny import ByteTokenizer
from tinkex._dataset import Renderer, batch_indices, eval_split, load_pairs, tokenize_pairs
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


# --------------------------------------------------------------------------- chat format


def chat_tokenizer():
    """A real Hugging Face tokenizer with a ChatML-style chat template, built offline:
    a word-level vocabulary (whitespace-split words) and five special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    words += ["what", "is", "2", "+", "4", "?", "reverse", "abc", "cba"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=template,
    )


# ids of chat_tokenizer()'s words
START, END, USER, ASSISTANT = 3, 4, 5, 6
WHAT, IS, TWO, PLUS, FOUR, QMARK = 7, 8, 9, 10, 11, 12


def test_chat_format_renders_the_chat_template_and_masks_the_prompt():
    tokenizer = chat_tokenizer()
    renderer = Renderer(tokenizer, format="chat", template="Q: {prompt}\nA: ")
    assert renderer.chat is True
    assert renderer.end_text == "<|im_end|>"  # what follows an assistant message, "\n" dropped
    assert renderer.prompt_text("what is 2 + 2 ?") == (
        "<|im_start|>user\nwhat is 2 + 2 ?<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = [START, USER, WHAT, IS, TWO, PLUS, TWO, QMARK, END, START, ASSISTANT]
    assert renderer.prompt_ids("what is 2 + 2 ?") == prompt
    assert renderer.response_ids("4") == [FOUR, END]  # the end-of-turn token, not EOS
    assert renderer.stop_ids() == [tokenizer.eos_token_id, END]

    model_input, targets, weights = renderer.encode("what is 2 + 2 ?", "4", max_length=64)
    tokens = [*prompt, FOUR, END]
    assert model_input == tokens[:-1]
    assert targets == tokens[1:]
    # targets 0..9 are prompt tokens; the last two (4, <|im_end|>) are the response
    assert weights == [0.0] * 10 + [1.0, 1.0]

    # through the loop's tokenizer: the [data] format of a config
    from tinkex._config import config_from_dict
    from tinkex._loop import prepare_data

    cfg = config_from_dict({"data": {"format": "chat", "max_length": 64}})
    prep = prepare_data(cfg, tokenizer, [("what is 2 + 2 ?", "4"), ("reverse abc", "cba")])
    assert prep.train[0] == (model_input, targets, weights)
    assert prep.train[1][1][-2:] == [15, END] and prep.train[1][2][-2:] == [1.0, 1.0]
    assert prep.train_prompts == ["what is 2 + 2 ?", "reverse abc"]


def test_chat_format_truncation_keeps_the_mask_and_drops_what_has_no_response():
    renderer = Renderer(chat_tokenizer(), format="chat")
    model_input, targets, weights = renderer.encode("what is 2 + 2 ?", "4", max_length=11)
    assert len(model_input) == 11 and targets[-1] == FOUR and weights[-1] == 1.0
    assert sum(weights) == 1.0  # the end-of-turn token was cut
    assert renderer.encode("what is 2 + 2 ?", "4", max_length=10) is None


def test_plain_format_is_the_template_and_eos():
    renderer = Renderer(ByteTokenizer(), format="plain", template="Q: {prompt}\nA: ")
    assert renderer.chat is False and renderer.end_text == ""
    assert renderer.prompt_ids("ab") == [BOS, *b"Q: ab\nA: "]
    assert renderer.encode("ab", "c", 64) == tinkex_encode("Q: ab\nA: ", "c")
    assert renderer.stop_ids() == [EOS]


def tinkex_encode(prompt, response):
    from tinkex._dataset import encode_pair

    return encode_pair(ByteTokenizer(), prompt, response, 64)


def test_chat_format_without_a_chat_template_keeps_the_plain_template_and_warns():
    with pytest.warns(
        UserWarning, match=r"data.format = 'chat' but the tokenizer \(ByteTokenizer\)"
    ):
        renderer = Renderer(ByteTokenizer(), format="chat", template="Q: {prompt}\nA: ")
    assert renderer.chat is False
    assert renderer.encode("ab", "c", 64) == tinkex_encode("Q: ab\nA: ", "c")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Renderer(ByteTokenizer(), format="chat", warn=False)  # a dry run's stand-in: silent


# --------------------------------------------------------------------------- held-out split


def test_eval_split_is_disjoint_complete_and_a_function_of_the_seed():
    train, held = eval_split(24, 0.25, seed=0)
    assert len(held) == 6 and len(train) == 18
    assert sorted(train + held) == list(range(24)) and not set(train) & set(held)
    assert held == sorted(held) and train == sorted(train)
    assert eval_split(24, 0.25, seed=0) == (train, held)
    assert eval_split(24, 0.25, seed=1)[1] != held
    assert len(eval_split(24, 0.01, seed=0)[1]) == 1  # at least one
    assert len(eval_split(10, 0.25, seed=0)[1]) == 3  # floor(2.5 + 0.5)
    with pytest.raises(tinkex.ConfigError) as info:
        eval_split(2, 0.75, seed=0)
    assert str(info.value) == (
        "eval.fraction = 0.75 of 2 example(s) holds out 2, leaving none to train on; "
        "lower eval.fraction or add examples"
    )


def test_prepare_data_holds_out_exactly_the_split_and_keeps_prompts_with_examples():
    from tinkex._config import config_from_dict
    from tinkex._loop import prepare_data

    pairs = [(f"p{i}", f"r{i}") for i in range(10)] + [("x" * 40, "too long")]
    cfg = config_from_dict({"data": {"max_length": 16}, "eval": {"fraction": 0.3}})
    prep = prepare_data(cfg, ByteTokenizer(), pairs)
    assert prep.dropped == 1  # the long prompt leaves no response token
    train_idx, held_idx = eval_split(10, 0.3, cfg.training.seed)
    assert (prep.train_indices, prep.held_out_indices) == (train_idx, held_idx)
    assert prep.held_out_prompts == [f"p{i}" for i in held_idx]
    assert prep.train_prompts == [f"p{i}" for i in train_idx]
    plain = Renderer(ByteTokenizer(), template=cfg.data.template)
    assert prep.held_out == [plain.encode(f"p{i}", f"r{i}", 16) for i in held_idx]
    assert prep.sample_prompts(cfg) == prep.held_out_prompts[:3]
    # a file of its own: its examples, the training data untouched
    path_cfg = config_from_dict({"data": {"max_length": 16}, "eval": {"path": "dev.jsonl"}})
    prep = prepare_data(path_cfg, ByteTokenizer(), pairs[:4], [("q", "a"), ("x" * 40, "no")])
    assert len(prep.train) == 4 and prep.held_out == [plain.encode("q", "a", 16)]
    assert prep.held_out_prompts == ["q"]
    with pytest.raises(tinkex.ConfigError, match=r"^eval.path: no example fits data.max_length"):
        prepare_data(path_cfg, ByteTokenizer(), pairs[:4], [("x" * 40, "no")])
    # samples: the prompts given, else the first training prompts when nothing is held out
    none = config_from_dict({"samples": {"prompts": []}})
    assert prepare_data(none, ByteTokenizer(), pairs[:5]).sample_prompts(none) == []
    plain_cfg = config_from_dict({})
    assert prepare_data(plain_cfg, ByteTokenizer(), pairs[:5]).sample_prompts(plain_cfg) == [
        "p0",
        "p1",
        "p2",
    ]
