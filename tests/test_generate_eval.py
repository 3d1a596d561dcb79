"""Sampling (temperature, top-k, top-p) against hand-computed distributions, option checks of `megalite generate`
and `megalite eval`, and the unigram baseline against a direct count. No trained model needed: the checks on
trained checkpoints (eval against plain cross-entropy, greedy generation against transformers) are in
tests/test_export.py, which trains them."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megalite.errors import ConfigError, DataError
from megalite.generate import check_sampling_options, sample_next, sampling_probabilities

# Five tokens with distinct probabilities, the most likely not first, so an index mix-up shows.
P = np.array([0.05, 0.5, 0.1, 0.2, 0.15])


def _normalised(weights: dict[int, float]) -> np.ndarray:
    out = np.zeros(len(P))
    total = sum(weights.values())
    for token, w in weights.items():
        out[token] = w / total
    return out


# (temperature, top_k, top_p) -> the distribution worked out by hand from P.
CASES = [
    ((1.0, None, None), P),
    ((1.0, 2, None), _normalised({1: 0.5, 3: 0.2})),
    # Sorted 0.5, 0.2, 0.15, 0.1: the mass before each is 0, 0.5, 0.7, 0.85; keep while it is below 0.75.
    ((1.0, None, 0.75), _normalised({1: 0.5, 3: 0.2, 4: 0.15})),
    ((1.0, None, 0.0), _normalised({1: 1.0})),  # the most likely token always stays
    ((1.0, 0, 1.0), P),  # top_k 0 and top_p 1: no limit
    ((2.0, None, None), _normalised({i: math.sqrt(p) for i, p in enumerate(P)})),
    # Temperature 0.5 squares P (0.0025, 0.25, 0.01, 0.04, 0.0225); top-4 drops token 0; renormalised
    # (0.7752, 0.0310, 0.1240, 0.0698) the mass before tokens 1, 3, 4, 2 is 0, 0.7752, 0.8992, 0.9690: top-p 0.9
    # keeps 1, 3, 4, as 0.25, 0.04, 0.0225 over 0.3125.
    ((0.5, 4, 0.9), np.array([0.0, 0.8, 0.0, 0.128, 0.072])),
]


@pytest.mark.parametrize(("options", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_sampling_matches_hand_computed_distributions(options, expected):
    temperature, top_k, top_p = options
    logits = torch.from_numpy(np.log(P)).float()[None] + 3.0  # a shift changes nothing
    probs = sampling_probabilities(logits, temperature, top_k, top_p)[0].double().numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    # Draws with a fixed seed follow it: never a dropped token, frequencies within 5 standard errors.
    n = 20_000
    draws = sample_next(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(0))
    freq = np.bincount(draws.numpy(), minlength=len(P)) / n
    assert set(np.flatnonzero(freq)) == set(np.flatnonzero(expected)), (freq, expected)
    np.testing.assert_allclose(freq, expected, atol=5 * math.sqrt(0.25 / n))
    again = sample_next(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again), "the same seed must give the same draws"


def test_temperature_zero_is_greedy_per_row():
    logits = torch.from_numpy(np.log(np.stack([P, P[::-1].copy(), np.roll(P, 2)]))).float()
    expected = [1, 3, 3]
    for top_k, top_p in ((None, None), (3, 0.5)):
        assert sample_next(logits, 0.0, top_k, top_p, torch.Generator().manual_seed(1)).tolist() == expected
    # A tiny positive temperature is greedy too, with no overflow into NaN.
    probs = sampling_probabilities(logits, 1e-30, None, None)
    assert torch.equal(probs.argmax(-1), torch.tensor(expected)) and torch.equal(probs.max(-1).values, torch.ones(3))


@pytest.mark.parametrize(("option", "value"), [
    ("max_new_tokens", -5), ("max_new_tokens", 2.5), ("temperature", -0.5), ("temperature", float("nan")),
    ("temperature", float("inf")), ("top_k", -3), ("top_p", -1.0), ("top_p", 1.5), ("top_p", float("nan")),
])
def test_bad_sampling_options_are_config_errors(option, value):
    options = {"max_new_tokens": 4, "temperature": 1.0, "top_k": None, "top_p": None, option: value}
    with pytest.raises(ConfigError, match=f"{option} {value!r}"):
        check_sampling_options(**options)
    if option != "max_new_tokens":
        with pytest.raises(ConfigError, match=option):
            sample_next(torch.zeros(1, 5), options["temperature"], options["top_k"], options["top_p"], None)


def test_bad_eval_options_are_config_errors():
    from megalite.evaluate import check_eval_options, evaluate_model

    for batch_size, max_samples, named in ((0, None, "batch_size 0"), (8, 0, "max_samples 0"),
                                           (-1, -2, "batch_size -1")):
        with pytest.raises(ConfigError, match=named):
            evaluate_model(torch.nn.Identity(), [], batch_size, max_samples)
    check_eval_options(1, None)
    check_eval_options(3, 1)


@pytest.mark.parametrize(("argv", "named"), [
    (["generate", "--prompt", "x", "--top-p", "-1"], "--top-p -1.0"),
    (["generate", "--prompt", "x", "--top-p", "0.5", "--temperature", "nan"], "--temperature nan"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0"),
    (["generate", "--prompt", "x", "--top-k", "-3"], "--top-k -3"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-5"], "--max-new-tokens -5"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0: must be an integer >= 1"),
    (["eval", "--batch-size", "0"], "--batch-size 0"),
    (["eval", "--max-samples", "0"], "--max-samples 0"),
    (["eval", "--limit", "3"], "--limit: only with --tasks"),  # silently ignored otherwise
    (["eval", "--tasks", "x", "--unigram"], "--unigram: not with --tasks"),
    (["eval", "--tasks", "x", "--limit", "0"], "--limit 0: must be > 0"),
    (["eval", "--tasks", "x", "--num-fewshot", "-1"], "--num-fewshot -1: must be >= 0"),
])
def test_cli_bad_options_exit_2_naming_the_option(argv, named, tmp_path, capsys):
    """Checked before any checkpoint is read: the checkpoint here does not even exist."""
    from megalite.cli import main

    code = main([argv[0], "--checkpoint", str(tmp_path / "nowhere"), *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err


def _write_prefix(prefix: Path, docs: list[list[int]], vocab_size: int | None) -> None:
    from megalite.data import IndexedDatasetWriter

    writer = IndexedDatasetWriter(str(prefix), dtype=np.uint16)
    for doc in docs:
        writer.add_document(np.array(doc, dtype=np.uint16))
    writer.finalize()
    manifest = {"eod_token_id": 0, "num_documents": len(docs)}
    if vocab_size is not None:
        manifest["vocab_size"] = vocab_size
    Path(f"{prefix}.json").write_text(json.dumps(manifest))


def test_unigram_perplexity_against_a_direct_count(tmp_path):
    from megalite.evaluate import unigram_perplexity

    rng = np.random.default_rng(5)
    vocab = 30  # ids 17..29 never occur in training, 23..29 nowhere: smoothing gives every id of the vocabulary mass
    docs = [list(rng.integers(1, 17, int(rng.integers(3, 12)))) + [0] for _ in range(10)]
    docs[8] += [19, 19, 22]  # validation tokens unseen in training
    # split "60,30,10" of 10 documents: train 0-5, valid 6-8, test 9.
    train, valid, test = docs[:6], docs[6:9], docs[9:]
    counts = Counter(t for d in train for t in d)
    n_train = sum(len(d) for d in train)

    def direct(measured: list[list[int]], v: int) -> float:
        tokens = [t for d in measured for t in d]
        return math.exp(-sum(math.log((counts[t] + 1) / (n_train + v)) for t in tokens) / len(tokens))

    _write_prefix(tmp_path / "a", docs, vocab)
    for which, measured in (("train", train), ("valid", valid), ("test", test)):
        assert unigram_perplexity(str(tmp_path / "a"), "60,30,10", which) == pytest.approx(direct(measured, vocab),
                                                                                          rel=1e-12)
    assert unigram_perplexity(str(tmp_path / "a"), "60,30,10", "valid", 40) == pytest.approx(direct(valid, 40),
                                                                                            rel=1e-12)
    _write_prefix(tmp_path / "b", docs, None)  # no vocabulary size known: the largest id seen + 1
    assert unigram_perplexity(str(tmp_path / "b"), "60,30,10", "valid") == pytest.approx(direct(valid, 23), rel=1e-12)
    with pytest.raises(DataError, match="outside the vocabulary of 20"):
        unigram_perplexity(str(tmp_path / "a"), "60,30,10", "valid", 20)
    with pytest.raises(DataError, match="leaves the test set empty"):
        unigram_perplexity(str(tmp_path / "a"), "60,40,0", "test")
