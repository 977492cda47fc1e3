"""Truncation policies and their counts, bucket shapes, padding sides, the iterator's exact
save/restore and multi-host slicing."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrlhf.data import (BatchIterator, LoadReport, SyntheticTask, bucket_length,
                          build_dataset, collate_for, fit_lengths, load_tokenizer,
                          tokenize_examples)

TOK = load_tokenizer("byte")
EOS, PAD = TOK.eos_id, TOK.pad_id


def enc(s):
    return list(s.encode())


# ------------------------------------------------------------------------------- truncation


def test_fit_lengths_policies():
    # prompt 20, responses 10 and 5, max_len 16, floors 4 / 3
    assert fit_lengths(20, [10, 5], 16, "left_prompt", 4, 3) == (6, [10, 5])
    assert fit_lengths(20, [10, 5], 16, "right_response", 4, 3) == (13, [3, 3])
    assert fit_lengths(20, [10, 5], 16, "drop", 4, 3) is None
    assert fit_lengths(20, [30], 16, "left_prompt", 4, 3) == (4, [12])
    assert fit_lengths(20, [30], 16, "left_prompt", 4, 13) is None  # 4 + 13 > 16
    assert fit_lengths(2, [30], 16, "right_response", 4, 3) == (2, [14])  # short prompt kept
    assert fit_lengths(3, [4], 16, "drop", 4, 3) == (3, [4])  # fits: untouched


@settings(max_examples=200, deadline=None)
@given(p=st.integers(1, 60), rs=st.lists(st.integers(1, 60), min_size=1, max_size=4),
       max_len=st.integers(2, 64), policy=st.sampled_from(["left_prompt", "right_response"]),
       min_p=st.integers(1, 10), min_r=st.integers(1, 10))
def test_fit_lengths_invariants(p, rs, max_len, policy, min_p, min_r):
    fit = fit_lengths(p, rs, max_len, policy, min_p, min_r)
    if fit is None:
        assert min(p, min_p) + max(min(r, min_r) for r in rs) > max_len or p + max(rs) > max_len
        return
    keep_p, keep_r = fit
    assert keep_p + max(keep_r) <= max_len
    assert min(p, min_p) <= keep_p <= p
    assert all(min(r, min_r) <= k <= r for k, r in zip(keep_r, rs))
    if p + max(rs) <= max_len:
        assert fit == (p, rs)


def _sft(prompt, response, **opts):
    report = LoadReport("test", on_bad_row="skip")
    rows = tokenize_examples([{"prompt": prompt, "response": response}], TOK, format="sft",
                             report=report, **opts)
    return rows, report


def test_sft_truncation_policies_and_counts():
    prompt, response = "P" * 30 + "END>", "abcdefghij"  # 34 + 11 (with EOS) = 45 > 32
    (row,), report = _sft(prompt, response, max_len=32, truncation="left_prompt")
    assert row["tokens"].tolist() == enc(prompt[-21:]) + enc(response) + [EOS]
    assert row["loss_mask"].tolist() == [0] * 21 + [1] * 11
    assert dict(report.truncation_counts) == {"prompt_truncated": 1}

    (row,), report = _sft(prompt, response, max_len=32, truncation="right_response",
                          min_response_tokens=4)
    assert row["tokens"].tolist() == enc(prompt[-28:]) + enc("abcd")  # cut response: no EOS
    assert dict(report.truncation_counts) == {"prompt_truncated": 1, "response_truncated": 1}

    rows, report = _sft(prompt, response, max_len=32, truncation="drop")
    assert rows == [] and dict(report.counts_by_reason) == {"too_long": 1}
    assert report.n_tokenized == 0

    (row,), report = _sft("hi>", "abc", max_len=32, truncation="drop")
    assert row["tokens"].tolist() == enc("hi>abc") + [EOS] and not report.truncation_counts


def test_ranking_truncation_cuts_the_shared_prompt_once_and_rejects_identical_pairs():
    report = LoadReport("test", on_bad_row="skip")
    ex = [{"prompt": "Q" * 40, "responses": ["x" * 10, "y" * 3, "z" * 20], "ranks": [0, 1, 2]},
          {"prompt": "p", "responses": ["s" * 40 + "1", "s" * 40 + "2"], "ranks": [0, 1]},
          {"prompt": "p", "responses": ["s" * 40 + "1", "s" * 40 + "2"], "ranks": [1, 1]}]
    rows = tokenize_examples(ex, TOK, format="ranking", max_len=32, report=report)
    assert [r["index"] for r in rows] == [0, 2]  # row 1: identical after truncation, ranked
    assert dict(report.counts_by_reason) == {"identical_after_truncation": 1}
    r0 = rows[0]
    assert r0["prompt_len"] == 32 - 21 and r0["length"] == 32
    assert [t.tolist() for t in r0["tokens"]] == [
        enc("Q" * 11) + enc("x" * 10) + [EOS], enc("Q" * 11) + enc("y" * 3) + [EOS],
        enc("Q" * 11) + enc("z" * 20) + [EOS]]
    assert dict(report.truncation_counts) == {"prompt_truncated": 1, "response_truncated": 1}


def test_prompt_truncation_keeps_the_end():
    report = LoadReport("test")
    (row,) = tokenize_examples([{"prompt": "a" * 50 + "END>"}], TOK, format="prompt",
                               max_len=64, report=report)  # max_prompt_len = 32
    assert row["prompt_tokens"].tolist() == enc("a" * 28 + "END>")
    assert report.truncation_counts == {"prompt_truncated": 1}


def test_ptx_windows_overlap_by_one_so_every_target_appears_once():
    text = "abcdefghijklmnopqrstuvwxyz" * 3  # 78 bytes + EOS = 79 tokens
    report = LoadReport("test")
    rows = tokenize_examples([{"text": text}], TOK, format="ptx", max_len=32, report=report)
    full = enc(text) + [EOS]
    assert [len(r["tokens"]) for r in rows] == [32, 32, 17]
    targets = [t for r in rows for t, m in zip(r["tokens"].tolist(), r["loss_mask"]) if m]
    assert targets == full[1:]
    assert all(r["index"] == 0 for r in rows) and report.truncation_counts == {"ptx_windows": 2}


# ----------------------------------------------------------------------------- bucket shapes


def test_bucket_length():
    assert [bucket_length(n, (8, 16, 32)) for n in (1, 8, 9, 16, 32)] == [8, 8, 16, 16, 32]
    with pytest.raises(ValueError):
        bucket_length(33, (8, 16, 32))


def _sft_data(lengths, **opts):
    examples = [{"prompt": "p>", "response": "r" * (n - 3)} for n in lengths]  # n tokens each
    rows = tokenize_examples(examples, TOK, format="sft", **opts)
    assert [r["length"] for r in rows] == list(lengths)
    return rows


def test_batches_take_the_smallest_bucket_of_their_longest_row():
    rows = _sft_data([5, 7, 20, 60, 9, 10, 11, 12], buckets=(8, 16, 32, 64))
    it = BatchIterator(rows, 2, collate=collate_for("sft", PAD), buckets=(8, 16, 32, 64),
                       shuffle=False, num_epochs=1)
    shapes = [b["tokens"].shape for b in it]
    assert shapes == [(2, 8), (2, 64), (2, 16), (2, 16)]


def test_max_len_clips_buckets_and_sft_batches_are_right_padded():
    data = build_dataset(format="sft", max_len=48, synthetic={"num_examples": 16})
    assert data.options.buckets == (32, 48)
    batch = next(data.iterator(16, shuffle=False))
    tokens, attn, loss = batch["tokens"], batch["attention_mask"], batch["loss_mask"]
    assert tokens.shape == (16, 32) and tokens.dtype == np.int32
    n = attn.sum(1)
    for b in range(16):
        assert attn[b].tolist() == [1] * n[b] + [0] * (32 - n[b])
        assert tokens[b, n[b] - 1] == EOS and (tokens[b, n[b]:] == PAD).all()
        ex = data.examples[b]
        assert loss[b].sum() == len(ex["response"]) + 1
        assert loss[b, len(ex["prompt"])] == 1 and loss[b, len(ex["prompt"]) - 1] == 0


def test_prompt_batches_are_left_padded_with_index():
    data = build_dataset(format="prompt", synthetic={"num_examples": 8})
    assert data.options.prompt_buckets == (32, 64, 128, 256)
    batch = next(data.iterator(8, shuffle=False))
    assert set(batch) == {"prompt_tokens", "prompt_mask", "index"}
    assert batch["prompt_tokens"].shape == (8, 32) and batch["index"].dtype == np.int64
    for b in range(8):
        prompt = data.examples[batch["index"][b]]["prompt"]
        n = len(prompt)
        assert batch["prompt_mask"][b].tolist() == [0] * (32 - n) + [1] * n
        assert TOK.decode(batch["prompt_tokens"][b]) == prompt
    assert (batch["prompt_mask"][:, -1] == 1).all()


def test_ranking_batches_pad_variable_k_to_max_k():
    task = SyntheticTask(3)
    examples = task.ranking_examples(12, k=4, min_k=2)
    rows = tokenize_examples(examples, TOK, format="ranking", max_k=5)
    it = BatchIterator(rows, 12, collate=collate_for("ranking", PAD, max_k=5), buckets=(32,),
                       shuffle=False)
    batch = next(it)
    assert batch["tokens"].shape == (12, 5, 32) and batch["ranks"].shape == (12, 5)
    for b, ex in enumerate(examples):
        k = len(ex["responses"])
        assert batch["valid"][b].tolist() == [1] * k + [0] * (5 - k)
        assert batch["ranks"][b].tolist() == ex["ranks"] + [-1] * (5 - k)
        assert (batch["attention_mask"][b, k:] == 0).all() and (batch["tokens"][b, k:] == PAD).all()
        for j, resp in enumerate(ex["responses"]):
            seq = enc(ex["prompt"] + resp) + [EOS]
            assert batch["tokens"][b, j, :len(seq)].tolist() == seq
            assert batch["attention_mask"][b, j].sum() == len(seq)
            assert batch["prompt_len"][b, j] == len(ex["prompt"])


def test_preference_batches_have_k_2():
    data = build_dataset(format="preference", synthetic={"num_examples": 8})
    batch = next(data.iterator(4))
    assert batch["tokens"].shape == (4, 2, 32)
    assert (batch["ranks"] == [0, 1]).all() and (batch["valid"] == 1).all()


# ---------------------------------------------------------------------------------- iterator


def _iterator(n=10, batch_size=4, **kw):
    rows = _sft_data([4 + (7 * i) % 40 for i in range(n)])
    return BatchIterator(rows, batch_size, collate=collate_for("sft", PAD),
                         buckets=(16, 32, 64), **kw)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 5])  # 2 batches/epoch: crosses epochs
def test_iterator_restore_gives_the_identical_continuation(stop_after):
    it = _iterator(seed=7)
    reference = [next(it) for _ in range(8)]
    first = _iterator(seed=7)
    for _ in range(stop_after):
        next(first)
    state = first.state()
    assert set(state) == {"epoch", "position"} and all(type(v) is int for v in state.values())
    resumed = _iterator(seed=7)
    resumed.restore(state)
    for want in reference[stop_after:]:
        _same(next(resumed), want)


def test_iterator_state_and_shuffling():
    it = _iterator(seed=1)
    assert it.batches_per_epoch == 2 and it.state() == {"epoch": 0, "position": 0}
    next(it)
    assert it.state() == {"epoch": 0, "position": 1}
    next(it)
    assert it.state() == {"epoch": 1, "position": 0}  # normalised at the boundary
    perm0, perm1 = it.permutation(0), it.permutation(1)
    assert sorted(perm0) == list(range(10)) and not (perm0 == perm1).all()
    np.testing.assert_array_equal(perm0, np.random.default_rng((1, 0)).permutation(10))
    np.testing.assert_array_equal(_iterator(shuffle=False).permutation(3), np.arange(10))
    assert not np.array_equal(_iterator(seed=2).permutation(0), perm0)
    with pytest.raises(ValueError):
        it.restore({"epoch": 0, "position": 3})


def test_single_pass_without_drop_remainder_covers_every_row_once():
    rows = _sft_data([5] * 10)
    for r, i in zip(rows, range(10)):
        r["tokens"] = r["tokens"].copy()
        r["tokens"][0] = i  # tag rows to recognise them
    it = BatchIterator(rows, 4, collate=collate_for("sft", PAD), buckets=(16,), seed=3,
                       drop_remainder=False, num_epochs=1)
    batches = list(it)
    assert len(batches) == 3 and all(b["tokens"].shape == (4, 16) for b in batches)
    assert [b["batch_mask"].tolist() for b in batches][-1] == [1, 1, 0, 0]
    seen = [int(t) for b in batches for t, m in zip(b["tokens"][:, 0], b["batch_mask"]) if m]
    assert sorted(seen) == list(range(10))
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("process_count", [2, 4])
def test_multihost_slices_are_disjoint_and_union_is_the_global_batch(process_count):
    data = build_dataset(format="prompt", synthetic={"num_examples": 40, "max_letters": 10})
    whole = data.iterator(8, seed=5)
    parts = [data.iterator(8, seed=5, process_index=i, process_count=process_count)
             for i in range(process_count)]
    for _ in range(12):  # 5 batches per epoch: crosses epochs
        g = next(whole)
        local = [next(p) for p in parts]
        assert all(b["prompt_tokens"].shape == (8 // process_count, g["prompt_tokens"].shape[1])
                   for b in local)
        for key in g:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), g[key])
        ids = np.concatenate([b["index"] for b in local])
        assert len(set(ids.tolist())) == 8


def test_multihost_pads_every_process_to_the_global_bucket():
    rows = _sft_data([5, 5, 5, 40])
    its = [BatchIterator(rows, 4, collate=collate_for("sft", PAD), buckets=(16, 64),
                         shuffle=False, process_index=i, process_count=2) for i in range(2)]
    assert [next(it)["tokens"].shape for it in its] == [(2, 64), (2, 64)]


def test_iterator_argument_errors():
    rows = _sft_data([5] * 6)
    kw = dict(collate=collate_for("sft", PAD), buckets=(16,))
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(rows, 4, process_count=3, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(rows, 8, **kw)
    with pytest.raises(ValueError, match="no rows"):
        BatchIterator([], 2, **kw)
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        BatchIterator(_sft_data([20]), 1, collate=collate_for("sft", PAD), buckets=(16,))


def test_data_package_does_not_import_jax():
    import subprocess
    import sys

    code = ("import sys, jaxrlhf.data as d; d.build_dataset(format='sft', "
            "synthetic={'num_examples': 8}); assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
