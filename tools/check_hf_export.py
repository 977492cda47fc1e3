"""End-to-end export check against real transformers (needs torch; the tests do not).

    python tools/check_hf_export.py [--fixtures tests/fixtures/hf]

For every fixture: `load_hf` it, `save_hf` it unchanged to a temporary directory, load that
directory with `transformers.AutoModelForCausalLM` (or `AutoModelForSequenceClassification`
for score heads), run both on the fixture's unpadded and left-padded batches, and print a
JSON report of the largest logit differences (relative to max |logit|; padded: real tokens
only). A score head also exports a nonzero bias once, to show the documented HF shift.
Exits 1 if any difference exceeds 1e-4.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from jaxrlhf.models import load_hf, save_hf  # noqa: E402

TOL = 1e-4


def _hf_outputs(model, tokens, mask):
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    att = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    pos = torch.clamp(torch.cumsum(att, -1) - 1, min=0)
    with torch.no_grad():
        if hasattr(model, "score"):  # per-position scores, like the Flax score head
            hidden = model.base_model(input_ids=ids, attention_mask=att,
                                      position_ids=pos).last_hidden_state
            return model.score(hidden)[..., 0].numpy()
        return model(input_ids=ids, attention_mask=att, position_ids=pos).logits.numpy()


def check(fixture: str) -> dict:
    head = "score" if "seqcls" in os.path.basename(fixture) else "lm"
    ref = np.load(os.path.join(fixture, "reference.npz"))
    model = load_hf(fixture, head=head)
    auto = (transformers.AutoModelForSequenceClassification if head == "score"
            else transformers.AutoModelForCausalLM)
    result = {"head": head}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf_model = auto.from_pretrained(tmp, attn_implementation="eager", dtype=torch.float32)
        hf_model.eval()
        result["hf_class"] = type(hf_model).__name__
        for key, tokens, mask in (("unpadded", ref["tokens"], ref["mask"]),
                                  ("left_padded", ref["padded_tokens"], ref["padded_mask"])):
            flax_out = np.asarray(model(tokens, mask))
            hf_out = _hf_outputs(hf_model, tokens, mask)
            real = np.asarray(mask, bool)
            err = np.abs(flax_out - hf_out)[real].max() / np.abs(hf_out[real]).max()
            result[f"max_rel_err_{key}"] = float(err)
    if head == "score":  # a nonzero bias: HF drops it, scores shift by exactly -bias
        bias = 0.5
        model.score_b[...] = bias
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            save_hf(model, tmp)
            hf_model = auto.from_pretrained(tmp, attn_implementation="eager",
                                            dtype=torch.float32).eval()
            shift = np.asarray(model(ref["tokens"], ref["mask"])) - _hf_outputs(
                hf_model, ref["tokens"], ref["mask"])
        result["score_bias_warned"] = any("jaxrlhf_score_bias" in str(x.message) for x in w)
        result["score_bias_shift_flax_minus_hf"] = float(np.mean(shift))
    result["ok"] = all(v <= TOL for k, v in result.items() if k.startswith("max_rel_err"))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "..",
                                                           "tests", "fixtures", "hf"))
    args = parser.parse_args()
    root = os.path.abspath(args.fixtures)
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    report = {"torch": torch.__version__, "transformers": transformers.__version__,
              "fixtures": {name: check(os.path.join(root, name)) for name in names}}
    print(json.dumps(report, indent=2))
    sys.exit(0 if all(r["ok"] for r in report["fixtures"].values()) else 1)


if __name__ == "__main__":
    main()
