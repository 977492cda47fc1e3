"""SFT -> RM -> PPO on HH-RLHF harmless with any local Hugging Face chat model.

  python tools/get_smollm2.py /tmp/smollm2        # or any local HF dir (Llama / Qwen2 / GPT-2)
  python -m jaxrlhf.train --config configs/hh_pipeline.py:model=/tmp/smollm2 --workdir /tmp/hh

Variants: model=<local HF dir> (required), sft_steps, rm_steps, iterations (PPO), max_len
(longest SFT / RM row, tokens), seed, kl, lora=<rank> (adapters on a frozen base in every
stage, learning rates x10; each stage exports merged weights and a PEFT adapter).

Every stage renders the HH transcripts with the model's chat template (data.chat_template,
"raw" turns it off), drops the oldest turns of over-long prompts, evaluates at step 0 and at
the end, and exports an HF directory: DIR/sft/hf (policy), DIR/rm/hf (reward model, centred in
its weights so transformers scores it identically), DIR/ppo/hf (the RLHF policy). Data paths
are relative to config.data_root ($JAXRLHF_DATA_ROOT or the shared data beside the checkout).
"""
from jaxrlhf.config import parse_arg, pipeline_config, sibling_config


def get_config(arg=None):
    a = parse_arg(arg, model="", sft_steps=60, rm_steps=150, iterations=30, max_len=384,
                  seed=0, kl=0.05, lora=0)
    if not a.model:
        raise ValueError("configs/hh_pipeline.py needs model=<local HF model directory>, e.g. "
                         "configs/hh_pipeline.py:model=/tmp/smollm2 (tools/get_smollm2.py).")
    load = lambda name, arg: sibling_config(__file__, name).get_config(arg)
    sft = load("sft", f"data=hh,init_from={a.model},steps={a.sft_steps},lora={a.lora}")
    rm = load("rm", f"data=hh,init_from={a.model},steps={a.rm_steps},lora={a.lora}")
    rm.init_from = ""           # the pipeline starts the RM from DIR/sft
    ppo = load("ppo", f"data=hh,iterations={a.iterations},kl={a.kl},lora={a.lora}")
    buckets = tuple(b for b in (128, 256, 384, 512) if b < a.max_len) + (a.max_len,)
    for c in (sft, rm):
        for block in (c.data, c.eval_data):
            block.buckets = buckets
    c = pipeline_config(sft, rm, ppo)
    c.seed = a.seed
    return c
