"""Packing, splits, blending and the exactly-once sampler (single process; the 2-rank checks are in
test_data_errors.py)."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megalite.data import BlendedDataset, GPTDataset, IndexedDataset, ResumableSampler, build_datasets
from megalite.data.dataset import blend_counts, make_sample, parse_split, split_ranges
from megalite.data.prepare import prepare
from megalite.errors import DataError
from tests.test_data_prepare import make_docs, tokenizer_file  # noqa: F401 - a shared fixture


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory: pytest.TempPathFactory, tokenizer_file: str) -> list[str]:  # noqa: F811
    """Two prepared prefixes of 80 and 40 documents sharing one tokenizer."""
    root = tmp_path_factory.mktemp("ds")
    out = []
    for name, n, seed in (("a", 80, 5), ("b", 40, 6)):
        (root / f"{name}.txt").write_text("\n\n".join(d.replace("\n", " ") for d in make_docs(n, seed)))
        prepare([str(root / f"{name}.txt")], str(root / name), tokenizer=tokenizer_file, blank_line_docs=True)
        out.append(str(root / name))
    return out


def test_split_parsing() -> None:
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert split_ranges(parse_split("8,1,1"), 100) == [(0, 80), (80, 90), (90, 100)]
    assert split_ranges(parse_split("949,50,1"), 10) == [(0, 10), (10, 10), (10, 10)]  # as Megatron rounds
    for bad in ("a,b", "1,2,3,4", "-1,2", "0,0,0"):
        with pytest.raises(DataError):
            parse_split(bad)
    assert blend_counts([0.3, 0.7], 1001) == [300, 701] and sum(blend_counts([1, 1, 1], 10)) == 10


def test_packing_matches_the_token_stream(prefixes: list[str], tmp_path: Path) -> None:
    seq = 16
    train, valid, test = build_datasets(prefixes[:1], None, "8,1,1", seq, seed=3, cache_dir=str(tmp_path))
    ds = IndexedDataset(prefixes[0])
    assert isinstance(train, GPTDataset) and len(train) == (int(ds.sequence_lengths[:64].sum()) - 1) // seq
    # One epoch, unshuffled: the split's documents in doc_idx order, end to end.
    stream = np.concatenate([ds[int(d)] for d in train.doc_idx[: 64]]).astype(np.int64)
    assert sorted(int(d) for d in train.doc_idx) == list(range(64))
    assert sorted(int(s) for s in train.shuffle_idx) == list(range(len(train)))
    for i in range(len(train)):
        j = int(train.shuffle_idx[i])
        sample = train[i]
        assert sample["input_ids"].tolist() == stream[j * seq : j * seq + seq].tolist()
        assert sample["labels"].tolist() == stream[j * seq + 1 : j * seq + seq + 1].tolist()
        assert sample["position_ids"].tolist() == list(range(seq))
        assert sample["loss_mask"].dtype.is_floating_point and bool((sample["loss_mask"] == 1).all())
    assert set(int(d) for d in valid.doc_idx) == set(range(64, 72))
    assert set(int(d) for d in test.doc_idx) == set(range(72, 80))
    # Same seed: same order, read back from the cache; another seed: another order.
    again, _, _ = build_datasets(prefixes[:1], None, "8,1,1", seq, seed=3, cache_dir=str(tmp_path))
    assert np.array_equal(again.shuffle_idx, train.shuffle_idx) and isinstance(again.shuffle_idx, np.memmap)
    other, _, _ = build_datasets(prefixes[:1], None, "8,1,1", seq, seed=4, cache_dir=str(tmp_path))
    assert not np.array_equal(other.shuffle_idx, train.shuffle_idx)
    # Pickled for DataLoader workers as file names, not copies of the mapped arrays.
    blob = pickle.dumps(train)
    assert len(blob) < 4096 and pickle.loads(blob)[5]["labels"].tolist() == train[5]["labels"].tolist()
    # More samples than one epoch: several shuffled epochs, every sample still seq_length long.
    big, _, _ = build_datasets(prefixes[:1], None, "8,1,1", seq, seed=3, num_samples=(3 * len(train), 0, 0),
                               cache_dir=str(tmp_path))
    assert big.num_epochs == 3 and len(big) == 3 * len(train)
    assert all(big[i]["input_ids"].shape == (seq,) for i in range(0, len(big), 7))


def test_reset_position_ids_and_eod_mask() -> None:
    eod = 0
    tokens = np.array([5, 6, 0, 7, 8, 9, 0, 0, 4, 3], dtype=np.int64)
    s = make_sample(tokens, eod, reset_position_ids=True, eod_mask_loss=True)
    assert s["input_ids"].tolist() == [5, 6, 0, 7, 8, 9, 0, 0, 4]
    assert s["labels"].tolist() == [6, 0, 7, 8, 9, 0, 0, 4, 3]
    assert s["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0]
    assert s["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 0, 1]
    plain = make_sample(tokens, eod, reset_position_ids=False, eod_mask_loss=False)
    assert plain["position_ids"].tolist() == list(range(9)) and plain["loss_mask"].sum() == 9


def test_blending(prefixes: list[str], tmp_path: Path) -> None:
    seq = 16
    train, _, _ = build_datasets(prefixes, [0.25, 0.75], "1", seq, seed=1, num_samples=(400, 0, 0),
                                 cache_dir=str(tmp_path))
    assert isinstance(train, BlendedDataset) and len(train) == 400 and train.counts == [100, 300]
    assert Counter(train.dataset_index.tolist()) == {0: 100, 1: 300}
    # Evenly mixed: every window of 40 samples holds 10 of the first dataset.
    assert all(np.sum(train.dataset_index[k : k + 40] == 0) == 10 for k in range(0, 400, 40))
    for d in (0, 1):
        assert sorted(train.dataset_sample_index[train.dataset_index == d].tolist()) == list(range(train.counts[d]))
    first = train.datasets[1]
    k = int(np.nonzero(train.dataset_index == 1)[0][5])
    assert train[k]["input_ids"].tolist() == first[int(train.dataset_sample_index[k])]["input_ids"].tolist()
    # The order is cached like the components' (built once, memory-mapped by every rank and worker) and the
    # cached order is the one computed in memory.
    assert isinstance(train.dataset_index, np.memmap) and isinstance(train.dataset_sample_index, np.memmap)
    assert len(list(tmp_path.glob("blend.*.done.json"))) == 1
    again, _, _ = build_datasets(prefixes, [0.25, 0.75], "1", seq, seed=1, num_samples=(400, 0, 0),
                                 cache_dir=str(tmp_path))
    memory = BlendedDataset(train.datasets, train.counts)
    assert not isinstance(memory.dataset_index, np.memmap)
    for got in (again, memory, pickle.loads(pickle.dumps(train))):
        assert np.array_equal(got.dataset_index, train.dataset_index)
        assert np.array_equal(got.dataset_sample_index, train.dataset_sample_index)
    assert len(pickle.dumps(train)) < train.dataset_sample_index.nbytes  # file names travel, not the arrays
    # Without weights or sample counts: one epoch of each prefix.
    natural, _, _ = build_datasets(prefixes, None, "1", seq, seed=1, cache_dir=str(tmp_path))
    assert natural.counts == [d.samples_per_epoch for d in natural.datasets]


def _run_epoch_with_resumes(num_samples: int, mbs: int, dp_plan: list[tuple[int, int | None]], seed: int) -> Counter:
    """Consume samples in legs of (dp_size, micro-batch steps or None = to the epoch end), restoring in between."""
    seen: Counter = Counter()
    state = None
    for dp_size, steps in dp_plan:
        samplers = [ResumableSampler(num_samples, r, dp_size, mbs, seed) for r in range(dp_size)]
        if state is not None:
            for s in samplers:
                s.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
        iters = [iter(s) for s in samplers]
        n_steps = len(samplers[0]) if steps is None else steps
        for _ in range(n_steps):
            for it in iters:
                seen.update(next(it))
        states = [s.state_dict() for s in samplers]
        assert all(st == states[0] for st in states)
        state = states[0]
    return seen


def test_sampler_exactly_once_across_resumes() -> None:
    n, mbs, seed = 1000, 4, 7
    # Resume twice within the epoch at the same DP size: 240 + 320 + 440 samples, each exactly once.
    assert _run_epoch_with_resumes(n, mbs, [(2, 30), (2, 40), (2, None)], seed) == Counter(range(n))
    # ... and at different DP sizes (2 -> 4 -> 3 ranks): 240 + 320, then 37 steps of 12 = 444: the last
    # micro-batch step crosses the epoch end and takes the next epoch's first 4 samples.
    seen = _run_epoch_with_resumes(n, mbs, [(2, 30), (4, 20), (3, None)], seed)
    head = ResumableSampler(n, 0, 1, 4, seed).indices_at(n, 4)
    assert seen == Counter(range(n)) + Counter(head)
    # Two whole epochs through resumes at dp 1 (mbs 7) and dp 3 (mbs 1): every sample exactly twice.
    s = ResumableSampler(n, 0, 1, 7, seed)
    two: Counter = Counter()
    for _ in range(200):  # 1400 samples
        two.update(next(iter(s)))
    rest = [ResumableSampler(n, r, 3, 1, seed) for r in range(3)]
    for r in rest:
        r.load_state_dict(s.state_dict())
    for _ in range(200):  # 600 more: 2000 in all
        for r in rest:
            two.update(next(iter(r)))
    assert two == Counter({i: 2 for i in range(n)}) and rest[0].state_dict()["epoch"] == 2
    # Epoch orders differ; a state for another dataset size is refused.
    a = ResumableSampler(n, 0, 1, n, seed)
    e0, e1 = next(iter(a)), next(iter(a))
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1 and a.state_dict()["epoch"] == 2
    with pytest.raises(DataError):
        ResumableSampler(n + 1, 0, 1, 1, seed).load_state_dict(a.state_dict())
    assert len(ResumableSampler(10, 0, 2, 2, seed)) == 3
    assert list(ResumableSampler(10, 1, 2, 2, seed, shuffle=False)) == [[2, 3], [6, 7], [0, 1]]
