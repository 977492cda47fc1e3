"""The built-in synthetic task: deterministic by seed, file-shaped rows, a gold reward that ranks
demonstrations above random text and punishes repetition, missing EOS and overlength, and a
noisy Bradley-Terry labeller that agrees with gold as often as its noise allows."""
import itertools
import json

import numpy as np
import pytest

from jaxrlhf.data import SyntheticTask, build_dataset, default_data_config, load_examples


def _all(task, n=50, split="train"):
    return {"sft": task.sft_examples(n, split), "ranking": task.ranking_examples(n, 4, split),
            "preference": task.preference_examples(n, split),
            "prompt": task.prompt_examples(n, split), "ptx": task.ptx_examples(n, split)}


def test_deterministic_by_seed_prefix_stable_and_split_independent():
    a, b, c = _all(SyntheticTask(1)), _all(SyntheticTask(1)), _all(SyntheticTask(2))
    assert a == b
    assert all(a[k] != c[k] for k in a)
    assert SyntheticTask(1).sft_examples(10) == a["sft"][:10]
    test = _all(SyntheticTask(1), split="test")
    assert all(a[k] != test[k] for k in a)


def test_rows_are_short_printable_and_well_formed():
    task = SyntheticTask(0)
    data = _all(task, 300)
    texts = [e["prompt"] + e["response"] for e in data["sft"]]
    texts += [e["prompt"] + r for e in data["ranking"] for r in e["responses"]]
    texts += [e["text"] for e in data["ptx"]]
    assert all(t.isascii() and (t.isprintable() or "\n" in t) for t in texts)
    assert max(len(e["prompt"]) + len(r) + 1 for e in data["ranking"]
               for r in e["responses"]) <= 48
    for e in data["ranking"]:
        assert len(set(e["responses"])) == 4 and sorted(set(e["ranks"]))[0] == 0
    for e in data["prompt"]:
        letters = task.letters(e["prompt"])
        assert e["prompt"].endswith(">") and 3 <= len(letters) <= 8
        assert len(set(letters)) == len(letters)
    assert all("<" in line for e in data["ptx"] for line in e["text"].split("\n"))
    assert all(">" not in e["text"] for e in data["ptx"])  # the gold task never leaks into ptx
    variable = task.ranking_examples(100, k=5, min_k=2)
    assert {len(e["responses"]) for e in variable} == {2, 3, 4, 5}


def test_gold_reward_ranks_demonstrations_above_random_text():
    task = SyntheticTask(0)
    demos = task.sft_examples(500)
    prompts = [e["prompt"] for e in demos]
    g_demo = task.gold_reward_batch(prompts, [e["response"] for e in demos])
    g_rand = task.gold_reward_batch(prompts, task.random_text(500))
    g_ideal = task.gold_reward_batch(prompts, [task.ideal_response(p) for p in prompts])
    assert g_demo.dtype == np.float32 and (np.abs(g_demo) <= 1).all()
    assert (g_ideal == 1).all()
    assert g_demo.mean() > 0.1 > -0.8 > g_rand.mean()
    assert (g_demo > g_rand).mean() > 0.97
    assert (g_demo < 1).mean() > 0.5  # noisy demonstrations leave headroom for RLHF


def test_gold_reward_punishes_the_exploits():
    task = SyntheticTask(0)
    prompt = "dbcae>"
    ideal = "abcde"
    gold = task.gold_reward
    assert gold(prompt, ideal) == 1.0
    assert gold(prompt, ideal, ended=False) <= 0.0  # never ended
    assert gold(prompt, ideal + "fghij") <= 0.0  # overlength, even with distinct letters
    assert gold(prompt, "aabbccddee") == -1.0  # repetition
    assert gold(prompt, ideal * 3) == -1.0  # repeated n-grams
    assert gold(prompt, "a" * 40, ended=False) == -1.0
    # graded, not all-or-nothing
    assert gold(prompt, ideal) > gold(prompt, "abcdf") > gold(prompt, "abdcf") > gold(prompt, "")
    assert gold(prompt, "") == -1.0


def test_gold_label_and_noiseless_ranking():
    task = SyntheticTask(0)
    prompt = "cab>"
    assert task.gold_label(prompt, "abc", "acb") == 0 and task.gold_label(prompt, "acb", "abc") == 1
    assert task.gold_label(prompt, "abc", "abc", ended_a=False) == 1
    assert task.label_ranking(prompt, ["acb", "abc", "aaaa"]) == [1, 0, 2]
    ties = SyntheticTask(0, tie_margin=0.01, label_noise=0.0)
    ranks = ties.label_ranking(prompt, ["abd", "abc", "abe"], rng=np.random.default_rng(0))
    assert ranks == [1, 0, 1]


def test_noisy_labeller_agrees_with_gold_as_designed():
    task = SyntheticTask(0, label_noise=0.1, temperature=0.25)
    pairs = task.preference_examples(2000)
    ga = np.array([task.gold_reward(e["prompt"], e["chosen"]) for e in pairs])
    gb = np.array([task.gold_reward(e["prompt"], e["rejected"]) for e in pairs])
    decided = ga != gb
    agree = (ga > gb)[decided].mean()
    expected = (0.9 / (1 + np.exp(-np.abs(ga - gb) / 0.25)) + 0.05)[decided].mean()
    assert abs(agree - expected) < 0.03 and 0.75 < agree < 0.95
    clean = SyntheticTask(0, label_noise=0.0, temperature=1e-3)
    for e in clean.ranking_examples(100, k=4):
        g = [clean.gold_reward(e["prompt"], r) for r in e["responses"]]
        for i, j in itertools.combinations(range(4), 2):
            if g[i] > g[j] + 0.05:
                assert e["ranks"][i] < e["ranks"][j]
    noisy = SyntheticTask(0, label_noise=1.0)  # careless labeller: ranks ignore gold
    flips = np.mean([noisy.gold_label("cab>", "abc", "cba", rng=np.random.default_rng(i))
                     for i in range(400)])
    assert 0.4 < flips < 0.6


def test_same_rows_from_files_and_from_the_task(tmp_path):
    task = SyntheticTask(4)
    rows = task.ranking_examples(20, k=3, min_k=2)
    path = tmp_path / "rank.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file, _ = load_examples(path=str(path), format="ranking")
    assert [{k: v for k, v in e.items() if not k.startswith("_")} for e in from_file] == rows


@pytest.mark.parametrize("fmt", ["sft", "ranking", "preference", "prompt", "ptx"])
def test_default_config_builds_every_synthetic_dataset(fmt):
    cfg = default_data_config()
    cfg.format = fmt
    cfg.synthetic.num_examples = 64
    data = build_dataset(cfg)
    assert len(data.examples) == len(data.rows) == 64 or fmt == "ptx"
    assert data.report.n_rejected == 0 and not data.report.truncation_counts
    batch = next(data.iterator(16, seed=0))
    assert all(v.shape[0] == 16 for v in batch.values())
    if fmt == "prompt":
        task = SyntheticTask.from_config(cfg.synthetic)
        prompts = [data.examples[i]["prompt"] for i in batch["index"]]
        ideal = [task.ideal_response(p) for p in prompts]
        assert (task.gold_reward_batch(prompts, ideal) == 1).all()
    with pytest.raises(ValueError, match="synthetic task has no 'hh'"):
        build_dataset(cfg, format="hh")
