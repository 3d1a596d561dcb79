"""Bad input fails fast with a DataError naming the file on every rank; 2 ranks share one cache.

One 2-rank launch runs all checks: launches cost seconds on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from megalite.data.prepare import prepare
from tests.helpers.distributed import run_ranks
from tests.test_data_prepare import make_docs, tokenizer_file  # noqa: F401 - a shared fixture

FAST_S = 10.0  # "within seconds": generous for a loaded 2-core machine


def _expect_error(fn, *words: str) -> tuple[str, float]:
    from megalite.errors import DataError

    t0 = time.monotonic()
    try:
        fn()
    except DataError as e:
        elapsed = time.monotonic() - t0
        msg = str(e)
        for w in words:
            if w not in msg:
                raise AssertionError(f"error message {msg!r} does not name {w!r}") from e
        return msg, elapsed
    raise AssertionError(f"no DataError raised (expected one naming {words})")


def _rank_checks(root: str, tok_file: str) -> dict:
    import numpy as np
    import torch.distributed as dist

    from megalite.data import ResumableSampler, build_datasets
    from megalite.data.dataset import cached_arrays

    rank = dist.get_rank()
    r = Path(root)
    out: dict = {}

    def bd(prefix: str, **kw):
        args = dict(prefixes=[prefix], weights=None, split="8,1,1", seq_length=16, seed=1, cache_dir=str(r / "cache"))
        args.update(kw)
        return lambda: build_datasets(**args)

    # prepare: missing input, empty file, empty directory, nothing left after cleaning, bad tokenizer file.
    o = str(r / f"out{rank}" / "p")
    out["missing_input"] = _expect_error(lambda: prepare([str(r / "nope.jsonl")], o, tokenizer=tok_file), "nope.jsonl")
    out["empty_file"] = _expect_error(lambda: prepare([str(r / "empty.txt")], o, tokenizer=tok_file), "empty.txt")
    out["empty_dir"] = _expect_error(lambda: prepare([str(r / "emptydir")], o, tokenizer=tok_file), "emptydir")
    out["zero_after_cleaning"] = _expect_error(
        lambda: prepare([str(r / "blank.jsonl")], o, tokenizer=tok_file), "blank.jsonl", "zero documents"
    )
    out["zero_after_cleaning_training"] = _expect_error(
        lambda: prepare([str(r / "blank.jsonl")], o, vocab_size=300), "blank.jsonl", "zero documents"
    )
    out["bad_tokenizer"] = _expect_error(
        lambda: prepare([str(r / "good.txt")], o, tokenizer=str(r / "blank.jsonl")), "blank.jsonl"
    )
    assert not os.path.exists(o + ".bin") and not os.path.exists(o + ".json")
    # build_datasets: damaged index/data, vocabulary, splits.
    out["bad_magic"] = _expect_error(bd(str(r / "magic")), "magic.idx", "magic")
    out["bad_version"] = _expect_error(bd(str(r / "version")), "version.idx", "version 7")
    out["short_bin"] = _expect_error(bd(str(r / "short")), "short.bin", "shorter")
    out["missing_bin"] = _expect_error(bd(str(r / "nobin")), "nobin.bin")
    out["vocab"] = _expect_error(bd(str(r / "good"), vocab_size=100), "good.json", "vocabulary of 100")
    out["split_empty"] = _expect_error(bd(str(r / "good"), split="99,1,0"), "good", "valid set empty")
    out["split_no_share"] = _expect_error(bd(str(r / "good"), split="1,0,0", num_samples=(10, 5, 0)), "valid")
    out["too_short_for_a_sample"] = _expect_error(bd(str(r / "good"), seq_length=100_000), "good", "seq_length")
    # Rank 0 fails while building the shared cache: rank 1, waiting for it, hears at once.
    def failing_build():
        raise OSError("disk full (simulated)")

    ok = lambda: {"a": np.arange(3)}
    build = failing_build if rank == 0 else ok
    key_dir = str(r / "cache_fail")
    out["rank0_build_fails"] = _expect_error(lambda: cached_arrays(key_dir, "k", ("a",), build), "simulated")
    # A cache rank 0 never writes: the wait ends after its timeout, naming the file.
    if rank == 1:
        out["wait_timeout"] = _expect_error(
            lambda: cached_arrays(str(r / "cache_never"), "k", ("a",), ok, wait_timeout_s=1.0), "k.done.json"
        )
    dist.barrier()

    # The good case: rank 0 builds the order (late on purpose), rank 1 waits and maps the same files.
    if rank == 0:
        time.sleep(0.5)
    train, valid, test = build_datasets([str(r / "good")], None, "8,1,1", 16, seed=1, cache_dir=str(r / "cache"))
    assert isinstance(train.shuffle_idx, np.memmap)
    # Exactly once across 2 DP ranks, with a resume at dp 1 half-way through: gathered and counted on rank 0.
    sampler = ResumableSampler(len(train), rank, 2, 3, seed=5)
    mine = []
    it = iter(sampler)
    for _ in range(len(sampler) // 2):
        mine += next(it)
    state = sampler.state_dict()
    first_tokens = train[0]["input_ids"].tolist()
    gathered: list = [None, None]
    dist.all_gather_object(gathered, (mine, state, first_tokens))
    if rank == 0:
        assert gathered[0][1] == gathered[1][1] and gathered[0][2] == gathered[1][2]
        single = ResumableSampler(len(train), 0, 1, 4, seed=5)
        single.load_state_dict(json.loads(json.dumps(state)))
        rest = [i for batch in single for i in batch]
        seen = gathered[0][0] + gathered[1][0] + rest
        n = len(train)
        # The last micro-batch crosses the epoch end: its tail is the head of the next epoch's order.
        out["exactly_once"] = (sorted(seen[:n]) == list(range(n)), seen[n:] == single.indices_at(n, len(seen) - n))
    return out


@pytest.fixture
def bad_inputs(tmp_path: Path, tokenizer_file: str) -> Path:  # noqa: F811 - the fixture above
    """A good prefix, damaged copies of it, and bad raw inputs."""
    (tmp_path / "good.txt").write_text("\n\n".join(d.replace("\n", " ") for d in make_docs(40, seed=3)))
    prepare([str(tmp_path / "good.txt")], str(tmp_path / "good"), tokenizer=tokenizer_file, blank_line_docs=True)
    for name in ("magic", "version", "short", "nobin"):
        for ext in (".idx", ".bin", ".json"):
            shutil.copyfile(tmp_path / f"good{ext}", tmp_path / f"{name}{ext}")
    with open(tmp_path / "magic.idx", "r+b") as f:
        f.write(b"NOTMMIDX\x00")
    with open(tmp_path / "version.idx", "r+b") as f:
        f.seek(9)
        f.write(struct.pack("<Q", 7))
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "short.bin") - 10)
    os.unlink(tmp_path / "nobin.bin")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": "\\n\\n"}\n')
    return tmp_path


def test_bad_inputs_fail_fast_on_both_ranks(bad_inputs: Path, tokenizer_file: str) -> None:  # noqa: F811
    results = run_ranks(_rank_checks, 2, str(bad_inputs), tokenizer_file, timeout_s=120, collective_timeout_s=60)
    expected = {"missing_input", "empty_file", "empty_dir", "zero_after_cleaning", "zero_after_cleaning_training",
                "bad_tokenizer", "bad_magic", "bad_version", "short_bin", "missing_bin", "vocab", "split_empty",
                "split_no_share", "too_short_for_a_sample", "rank0_build_fails"}
    for rank, res in enumerate(results):
        assert expected <= set(res), f"rank {rank} missed {expected - set(res)}"
        for case in expected:
            msg, seconds = res[case]
            assert seconds < FAST_S, f"rank {rank}: {case} took {seconds:.1f}s"
    msg, seconds = results[1]["wait_timeout"]
    assert 1.0 <= seconds < FAST_S and "not written by rank 0" in msg
    assert results[0]["exactly_once"] == (True, True)
