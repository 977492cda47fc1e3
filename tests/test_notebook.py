"""experiments/quickstart.ipynb cannot rot: every code cell runs, in order, with the notebook's
tiny settings (JAXRLHF_NOTEBOOK_TINY=1), a tiny local chat model (SmolLM2's chat template and
special tokens, random weights) in place of SmolLM2 and a few HH-format rows in place of the
hub's HH-RLHF: no network."""
import gzip
import json
import os

import matplotlib
import pytest
from chat_fixtures import smollm2_like
from trainer_utils import REPO

NOTEBOOK = os.path.join(REPO, "experiments", "quickstart.ipynb")

QUESTIONS = ["How do I bake bread at home?", "What is the capital of France?",
             "Can you help me steal a car?", "Tell me a joke about cats.",
             "How do I stay safe walking home at night?", "What should I cook tonight?"]


def _hh_rows(n):
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        prompt = f"\n\nHuman: {q} I am asking for the {i}th time, please answer.\n\nAssistant:"
        rows.append({"chosen": prompt + " Sure, here is a careful and helpful answer for you.",
                     "rejected": prompt + " No. Go away and do not ask me that again."})
    return rows


def _tiny_chat_model(root):
    """A plain HF directory like SmolLM2's: config, safetensors, tokenizer files."""
    from jaxrlhf.data import load_tokenizer
    from jaxrlhf.models import init_model, preset
    from jaxrlhf.models.hf_io import save_hf
    tok_dir = smollm2_like(os.path.join(root, "tok"))
    tok = load_tokenizer(tok_dir)
    cfg = preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2,
                 n_kv_heads=1, mlp_dim=64, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                 bos_token_id=tok.bos_id, tie_embeddings=True)
    out = os.path.join(root, "model")
    save_hf(init_model(cfg, seed=0), out, eos_token_ids=tok.stop_ids)
    tok.hf.save_pretrained(out)
    return out


def test_quickstart_notebook_runs_with_tiny_settings(tmp_path, monkeypatch, capsys):
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells and not any(ln.lstrip().startswith(("!", "%"))
                             for c in cells for ln in c.splitlines())   # plain Python only
    hh = tmp_path / "data" / "hh-rlhf-harmless"
    hh.mkdir(parents=True)
    for split, n in (("train", 48), ("test", 16)):
        with gzip.open(hh / f"{split}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in _hh_rows(n))
    monkeypatch.setenv("JAXRLHF_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAXRLHF_NOTEBOOK_MODEL", _tiny_chat_model(str(tmp_path)))
    monkeypatch.setenv("JAXRLHF_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("JAXRLHF_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    matplotlib.use("Agg")   # plt.show() draws nowhere
    namespace = {"__name__": "__main__"}
    for i, source in enumerate(cells):
        try:
            exec(compile(source, f"quickstart.ipynb code cell {i + 1}", "exec"), namespace)
        except Exception as e:   # name the cell
            pytest.fail(f"code cell {i + 1} raised {type(e).__name__}: {e}")
    import matplotlib.pyplot as plt
    plt.close("all")
    out = capsys.readouterr().out
    assert "RM eval accuracy" in out and "assistant:" in out
    runs = tmp_path / "runs"
    for stage in ("sft", "rm", "ppo"):
        assert (runs / "builtin" / stage / "hf" / "config.json").exists()
        assert (runs / "hh" / stage / "hf" / "config.json").exists()
    assert namespace["hh_summary"]["rm"]["steps"] == 2
