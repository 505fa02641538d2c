"""GPT datasets: samples and their order checked against an independent, loop-by-loop reading of
Megatron-Core's index rules; splits, caching, blends, mock data, samplers and the bundled example data."""
import math
import os
import time
import types

import numpy as np
import pytest

from mindtron.data import helpers
from mindtron.data.blended import BlendedDataset
from mindtron.data.builders import build_gpt_datasets
from mindtron.data.gpt_batch import DataLoader, make_gpt_batch
from mindtron.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from mindtron.data.indexed_dataset import IndexedDataset, make_dataset
from mindtron.data.samplers import MegatronPretrainingRandomSampler, MegatronPretrainingSampler
from mindtron.data.utils import Split, get_blend_from_list, parse_and_normalize_split

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXAMPLE = os.path.join(ROOT, "examples", "gpt", "data")


def make_args(**overrides):
    """A Megatron-style argument namespace with the data flags."""
    args = dict(data_path=None, train_data_path=None, valid_data_path=None, test_data_path=None, split=None,
                seq_length=16, seed=1234, data_cache_path=None, mock_data=False, reset_position_ids=False,
                reset_attention_mask=False, eod_mask_loss=False, tokenizer_type="NullTokenizer", vocab_file=None,
                merge_file=None, tokenizer_model=None, vocab_size=500, make_vocab_size_divisible_by=128,
                tensor_model_parallel_size=1)
    args.update(overrides)
    return types.SimpleNamespace(**args)


def random_documents(n_docs, seed, low=1, high=40, vocab=400):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(low, high))).tolist() for _ in range(n_docs)]


@pytest.fixture()
def corpus(tmp_path):
    docs = random_documents(60, 0)
    prefix = str(tmp_path / "corpus_text_document")
    make_dataset(prefix, docs, dtype=np.uint16)
    return prefix, docs


# --------------------------------------------------------------------------------------------------------
# Independent reference: Megatron's rules written out as plain loops over tokens.
# --------------------------------------------------------------------------------------------------------
def reference_epochs(tokens_per_epoch, num_samples, seq):
    epochs = 1
    while num_samples is not None and epochs * tokens_per_epoch < num_samples * seq + 1:
        epochs += 1
    return epochs


def reference_samples(docs, split_docs, num_samples, seq, seed):
    """All samples of a GPTDataset in serving order, as lists of token ids."""
    tokens_per_epoch = sum(len(docs[d]) for d in split_docs)
    epochs = reference_epochs(tokens_per_epoch, num_samples, seq)
    separate, before_final = False, None
    if epochs > 1:
        before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq
        per_epoch = (tokens_per_epoch - 1) // seq
        separate = (num_samples - before_final) < int(0.8 * per_epoch)
    rs = np.random.RandomState(seed)

    def shuffled(n_epochs):
        order = np.array(list(split_docs) * n_epochs, dtype=np.int32)
        rs.shuffle(order)
        return [int(d) for d in order]

    order = shuffled(epochs - 1) + shuffled(1) if separate else shuffled(epochs)
    stream = []
    for d in order:
        for token in docs[d]:
            stream.append(token)
    count = (len(stream) - 1) // seq
    windows = [stream[k * seq:k * seq + seq + 1] for k in range(count)]
    if separate:
        head = np.arange(before_final, dtype=np.uint32)
        rs.shuffle(head)
        tail = np.arange(before_final, count, dtype=np.uint32)
        rs.shuffle(tail)
        serve = list(head) + list(tail)
    else:
        serve = np.arange(count, dtype=np.uint32)
        rs.shuffle(serve)
    return [windows[int(i)] for i in serve], epochs, separate


def walk_sample_index(sizes, doc_order, seq, epochs, tokens_per_epoch, drop_last=True, extra=1):
    """Megatron's helpers.cpp build_sample_idx, read as a walk over documents."""
    if drop_last:
        n = (epochs * tokens_per_epoch - extra) // seq
    else:
        n = math.ceil((epochs * tokens_per_epoch - extra) / seq)
    rows = [(0, 0)]
    pos, offset = 0, 0
    while len(rows) <= n:
        need = seq + extra
        while need != 0:
            available = sizes[doc_order[pos]] - offset
            need -= available
            if need <= 0:
                offset += need + available - extra
                need = 0
            else:
                if pos == len(doc_order) - 1:
                    offset = sizes[doc_order[pos]] - extra
                    break
                pos += 1
                offset = 0
        rows.append((pos, offset))
    return rows


@pytest.mark.parametrize("extra", [1, 0])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sample_index_matches_the_walk(extra, drop_last):
    rng = np.random.default_rng(5)
    sizes = rng.integers(0, 12, size=40).astype(np.int32)  # includes empty documents
    sizes[0] = 5
    order = rng.permutation(np.tile(np.arange(40), 2)).astype(np.int32)
    tokens_per_epoch = int(sizes.sum())
    for seq in (1, 3, 7, 16):
        got = helpers.build_sample_index(sizes, order, seq, 2, tokens_per_epoch, drop_last, bool(extra))
        want = walk_sample_index(sizes.tolist(), order.tolist(), seq, 2, tokens_per_epoch, drop_last, extra)
        assert [tuple(r) for r in got.tolist()] == want, seq
        assert got.dtype == np.int32


def test_sample_index_is_fast_for_millions_of_tokens():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2000, size=4000).astype(np.int32)  # ~4M tokens
    order = rng.permutation(4000).astype(np.int32)
    start = time.time()
    index = helpers.build_sample_index(sizes, order, 128, 1, int(sizes.sum()))
    assert time.time() - start < 1.0
    assert index.shape == ((int(sizes.sum()) - 1) // 128 + 1, 2)


@pytest.mark.parametrize("num_samples,seq", [(None, 16), (10, 16), (150, 16), (44, 32), (60, 8)])
def test_samples_and_order_match_megatron_rules(corpus, tmp_path, num_samples, seq):
    prefix, docs = corpus
    config = GPTDatasetConfig(random_seed=99, sequence_length=seq, blend=([prefix], None), split="1",
                              path_to_cache=str(tmp_path / "cache"))
    split_docs = list(range(len(docs)))
    ds = GPTDataset(IndexedDataset(prefix), prefix, np.arange(len(docs)), num_samples, Split.train, config)
    want, epochs, _ = reference_samples(docs, split_docs, num_samples, seq, 99)
    assert len(ds) == len(want)
    assert num_samples is None or len(ds) >= num_samples
    for i in range(len(ds)):
        item = ds[i]["text"]
        assert item.dtype == np.int64 and item.tolist() == want[i]


def test_separate_final_epoch_rule_both_ways(corpus, tmp_path):
    prefix, docs = corpus
    tokens = sum(len(d) for d in docs)
    seq = 16
    per_epoch = (tokens - 1) // seq
    seen = set()
    for num_samples in (per_epoch + 2, 2 * per_epoch - 1, 2 * per_epoch + 3, 3 * per_epoch - 2):
        want, epochs, separate = reference_samples(docs, list(range(len(docs))), num_samples, seq, 7)
        seen.add((epochs > 1, separate))
        config = GPTDatasetConfig(random_seed=7, sequence_length=seq, blend=([prefix], None), split="1")
        ds = GPTDataset(IndexedDataset(prefix), prefix, np.arange(len(docs)), num_samples, Split.train, config)
        assert [ds[i]["text"].tolist() for i in range(len(ds))] == want
    assert (True, True) in seen and (True, False) in seen


def test_indices_are_cached_and_reused(corpus, tmp_path):
    prefix, docs = corpus
    cache = str(tmp_path / "cache")
    config = GPTDatasetConfig(random_seed=3, sequence_length=16, blend=([prefix], None), split="1",
                              path_to_cache=cache)
    first = GPTDataset(IndexedDataset(prefix), prefix, np.arange(len(docs)), 20, Split.train, config)
    assert first.built_anew_on_cache_miss and len(os.listdir(cache)) == 4
    second = GPTDataset(IndexedDataset(prefix), prefix, np.arange(len(docs)), 20, Split.train, config)
    assert not second.built_anew_on_cache_miss
    assert all(np.array_equal(first[i]["text"], second[i]["text"]) for i in range(len(first)))
    other = GPTDataset(IndexedDataset(prefix), prefix, np.arange(len(docs)), 21, Split.train, config)
    assert other.built_anew_on_cache_miss  # a different request is a different cache entry
    # without --data-cache-path the indices go next to the data, where Megatron puts them
    default = GPTDatasetConfig(random_seed=3, sequence_length=16, blend=([prefix], None), split="1")
    GPTDataset(IndexedDataset(prefix), prefix, np.arange(len(docs)), 20, Split.train, default)
    assert len(os.listdir(os.path.join(prefix, "cache", "GPTDataset_indices"))) == 4


def test_split_string_and_document_ranges(corpus, tmp_path):
    prefix, docs = corpus
    assert parse_and_normalize_split("969, 30, 1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_and_normalize_split("99,1") == pytest.approx([0.99, 0.01, 0.0])
    args = make_args(data_path=[prefix], split="80,15,5", data_cache_path=str(tmp_path / "c"))
    train, valid, test = build_gpt_datasets(args, [30, 5, 2])
    bounds = [0, round(0.8 * 60), round(0.95 * 60), 60]
    for ds, (lo, hi) in zip((train, valid, test), zip(bounds[:-1], bounds[1:])):
        assert ds.indices.tolist() == list(range(lo, hi))
        assert set(int(d) for d in ds.document_index) == set(range(lo, hi))
    want, _, _ = reference_samples(docs, list(range(bounds[1], bounds[2])), 5, 16, 1234)
    assert [valid[i]["text"].tolist() for i in range(len(valid))] == want
    _, none_valid, _ = build_gpt_datasets(make_args(data_path=[prefix], split="90,0,10"), [10, 0, 2])
    assert none_valid is None  # a zero-width split gives no dataset


def test_split_that_leaves_a_dataset_empty_is_a_clear_error(corpus):
    prefix, _ = corpus
    with pytest.raises(ValueError, match=r"test split .* is empty: --split '969,30,1' gives it 0 of 60"):
        build_gpt_datasets(make_args(data_path=[prefix], split="969,30,1"), [10, 2, 2])
    _, _, test = build_gpt_datasets(make_args(data_path=[prefix], split="969,30,1"), [10, 2, 0])
    assert len(test) == 0  # fine when nothing is asked of it
    for bad in ("0,0,0", "a,b", "1,2,3,4"):
        with pytest.raises(ValueError, match="--split"):
            build_gpt_datasets(make_args(data_path=[prefix], split=bad), [10, 2, 2])


def test_data_path_weights_must_be_positive():
    with pytest.raises(ValueError, match="do not sum to a positive value"):
        get_blend_from_list(["0", "A", "0", "B"])
    with pytest.raises(ValueError, match="non-negative"):
        get_blend_from_list(["-1", "A", "2", "B"])
    with pytest.raises(ValueError, match="weight 0"):
        get_blend_from_list(["0", "A", "1", "B"])
    with pytest.raises(ValueError, match="without the suffix"):
        get_blend_from_list(["data/a.bin"])
    assert get_blend_from_list(["0.3", "A", "0.7", "B"]) == (["A", "B"], [0.3, 0.7])
    assert get_blend_from_list(["A", "B"]) == (["A", "B"], None)


def reference_blend(weights, size):
    """Megatron's greedy blend, as a plain loop picking the first largest shortfall."""
    total = sum(weights)
    w = [x / total for x in weights]
    w = [x / sum(w) for x in w]
    counts = [0] * len(w)
    picks = []
    for s in range(size):
        shortfall = [w[i] * max(s, 1) - counts[i] for i in range(len(w))]
        i = shortfall.index(max(shortfall))
        picks.append((i, counts[i]))
        counts[i] += 1
    return picks


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 1, 2], [5, 1, 1, 3]])
def test_blending_indices_match_the_greedy_rule(weights):
    dataset_index, sample_index = helpers.build_blending_indices(
        [x / sum(weights) for x in weights], 500)
    assert list(zip(dataset_index.tolist(), sample_index.tolist())) == reference_blend(weights, 500)
    d, s = helpers.build_exhaustive_blending_indices([3, 5, 2])
    assert np.bincount(d).tolist() == [3, 5, 2]
    for k in range(3):
        assert s[d == k].tolist() == list(range([3, 5, 2][k]))


def test_weighted_data_path_blend(tmp_path):
    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    make_dataset(a, random_documents(40, 1), dtype=np.uint16)
    make_dataset(b, random_documents(50, 2, vocab=300), dtype=np.uint16)
    args = make_args(data_path=["0.3", a, "0.7", b], split="90,10,0", data_cache_path=str(tmp_path / "c"))
    train, valid, test = build_gpt_datasets(args, [101, 11, 0])
    assert test is None and isinstance(train, BlendedDataset)
    assert len(train) == math.ceil(101 * 0.3) + math.ceil(101 * 0.7)
    members = train.datasets
    assert [m.num_samples for m in members] == [math.ceil(math.ceil(101 * w) * 1.005) for w in (0.3, 0.7)]
    picks = reference_blend([0.3, 0.7], len(train))
    for s in range(len(train)):
        i, j = picks[s]
        item = train[s]
        assert item["dataset_id"] == i and np.array_equal(item["text"], members[i][j]["text"])
    assert abs(np.mean(train.dataset_index) - 0.7) < 0.01
    again = build_gpt_datasets(args, [101, 11, 0])[0]  # cached blend indices come back identical
    assert np.array_equal(again.dataset_index, train.dataset_index)


def test_unweighted_blend_and_per_split_paths(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_dataset(a, random_documents(30, 3), dtype=np.uint16)
    make_dataset(b, random_documents(60, 4), dtype=np.uint16)
    train, _, _ = build_gpt_datasets(make_args(data_path=[a, b], split="1,0,0"), [20, 0, 0])
    sizes = [len(m) for m in train.datasets]  # one epoch each, blended by size
    assert len(train) == 20 and train.weights == pytest.approx([x / sum(sizes) for x in sizes])
    args = make_args(train_data_path=[a], valid_data_path=["1", a, "3", b], test_data_path=None)
    train, valid, test = build_gpt_datasets(args, [25, 8, 4])
    assert isinstance(train, GPTDataset) and train.indices.tolist() == list(range(30)) and len(train) >= 25
    assert isinstance(valid, BlendedDataset) and len(valid) == 2 + 6 and test is None
    with pytest.raises(ValueError, match="--data-path cannot be combined|either"):
        build_gpt_datasets(make_args(data_path=[a], train_data_path=[b]), [1, 1, 1])


def test_mock_data_follows_megatron_mock_documents():
    args = make_args(mock_data=True, vocab_size=5000, seq_length=128)
    train, valid, test = build_gpt_datasets(args, [8, 2, 2])
    lengths = np.random.default_rng(0).integers(1, 4096, size=100000, dtype=np.int32)
    assert train.indices.tolist() == list(range(round(100000 / 3)))
    eod = 4999  # NullTokenizer(5000).eod, Megatron-Core 0.19
    for i in range(8):
        text = train[i]["text"]
        assert text.shape == (129,)
        body = text[text != eod]
        assert ((np.diff(text) == 1) | (text[1:] == eod) | (text[:-1] == eod)).all() and body.min() >= 1
    doc = int(train.document_index[0])
    first = train.dataset.get(doc)
    assert first.tolist() == list(range(1, int(lengths[doc]))) + [eod]
    small = build_gpt_datasets(make_args(mock_data=True, vocab_size=50, seq_length=128), [4, 1, 1])[0]
    assert all(0 < small[i]["text"].max() < 50 for i in range(4))  # ids stay inside a small vocabulary


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_data_parallel_slices_are_disjoint_and_cover_the_batch(corpus, dp):
    prefix, _ = corpus
    train = build_gpt_datasets(make_args(data_path=[prefix], split="1"), [48, 0, 0])[0]
    micro = 2
    loaders = [DataLoader(train, MegatronPretrainingSampler(48, 0, micro, r, dp)) for r in range(dp)]
    per_rank = [list(loader) for loader in loaders]
    samplers = [list(MegatronPretrainingSampler(48, 0, micro, r, dp)) for r in range(dp)]
    for step in range(48 // (micro * dp)):
        together = sorted(i for r in range(dp) for i in samplers[r][step])
        assert together == list(range(step * micro * dp, (step + 1) * micro * dp))
        for r in range(dp):
            expected = np.stack([train[i]["text"] for i in samplers[r][step]])
            assert np.array_equal(per_rank[r][step]["text"], expected)
    resumed = list(MegatronPretrainingSampler(48, 2 * micro * dp, micro, dp - 1, dp))
    assert resumed == samplers[dp - 1][2:]


@pytest.mark.parametrize("sharding", [True, False])
def test_random_sampler_is_disjoint_covering_and_resumable(sharding):
    dp, micro, total = 3, 2, 40  # 36 samples per epoch, 4 left out
    runs = [list(MegatronPretrainingRandomSampler(None, total, 0, micro, r, dp, sharding))[:6] for r in range(dp)]
    assert all(len(r) == 6 for r in runs)  # an epoch is total // (micro x dp) steps
    everything = sorted(i for r in runs for batch in r for i in batch)
    assert len(everything) == len(set(everything)) == 36 and max(everything) < total
    resumed = list(MegatronPretrainingRandomSampler(None, total, 2 * micro * dp, micro, 1, dp, sharding))[:4]
    assert resumed == runs[1][2:]
    next_epoch = list(MegatronPretrainingRandomSampler(None, total, 36, micro, 1, dp, sharding))
    assert next_epoch != runs[1]


def test_batches_from_gpt_samples_follow_the_eod_flags(corpus):
    prefix, _ = corpus
    args = make_args(data_path=[prefix], split="1", vocab_size=400)
    train = build_gpt_datasets(args, [8, 0, 0])[0]
    eod = 399  # NullTokenizer(400).eod, Megatron-Core 0.19
    text = np.stack([train[i]["text"] for i in range(4)])
    text[:, 5] = eod
    batch = make_gpt_batch(text, eod, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    assert batch["tokens"].shape == (4, 16) and np.array_equal(batch["labels"], text[:, 1:])
    assert (batch["loss_mask"][:, 5] == 0).all() and (batch["position_ids"][:, 6] == 0).all()
    assert batch["attention_mask"][0, 0, 6, 5] and not batch["attention_mask"][0, 0, 5, 4]


def test_bundled_example_data_trains_out_of_the_box(tmp_path):
    prefix = os.path.join(EXAMPLE, "corpus_text_document")
    args = make_args(data_path=[prefix], split="949,50,1", seq_length=64, tokenizer_type="GPT2BPETokenizer",
                     vocab_file=os.path.join(EXAMPLE, "vocab.json"), merge_file=os.path.join(EXAMPLE, "merges.txt"),
                     vocab_size=None, data_cache_path=str(tmp_path / "cache"))
    train, valid, test = build_gpt_datasets(args, [320, 48, 16])
    assert args.padded_vocab_size == 1024 and len(train) >= 320 and len(valid) >= 48 and len(test) >= 16
    from mindtron.data.tokenizers import get_tokenizer
    tok = get_tokenizer()
    assert tok.eod == 1023 and train[0]["text"].shape == (65,)
    assert all(train[i]["text"].max() < 1024 for i in range(20))
    assert "the" in tok.detokenize(train[0]["text"])
