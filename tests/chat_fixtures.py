"""Small local HF tokenizers with real chat templates (built in the test, no downloads).

`smollm2_like(path)`: byte-level BPE with SmolLM2-135M-Instruct's special tokens and its exact
chat template (a default system prompt when the conversation has none, "<|im_end|>\\n" after
every turn), bos = <|im_start|>, eos = pad = <|im_end|>, unk = <|endoftext|>.

`llama3_like(path)`: the Llama-3 layout: the template writes the BOS <|begin_of_text|> itself,
turns end with <|eot_id|>, EOS is <|end_of_text|> and generation_config.json lists both as
eos_token_id (so <|eot_id|> is a stop id but not the tokenizer's EOS), no pad token.
"""
import json
import os

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "How do I bake bread at home? Mix flour, water, salt and yeast, then let it rise.",
    "What is the capital of France? The capital of France is Paris.",
    "Can you help me steal a car? No, I can't help with that. Stealing is illegal.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse!",
    "system user assistant Human Assistant: ok thanks sure why what when how",
]


def _bpe(path, specials, vocab_size=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def smollm2_like(path):
    from transformers import PreTrainedTokenizerFast
    raw = _bpe(path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>",
                                 eos_token="<|im_end|>", pad_token="<|im_end|>",
                                 unk_token="<|endoftext|>")
    hf.chat_template = SMOLLM2_TEMPLATE
    hf.save_pretrained(str(path))
    return str(path)


def llama3_like(path):
    from transformers import PreTrainedTokenizerFast
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    raw = _bpe(path, specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>",
                                 eos_token="<|end_of_text|>")
    hf.chat_template = LLAMA3_TEMPLATE
    hf.save_pretrained(str(path))
    ids = [hf.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    with open(os.path.join(str(path), "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": hf.bos_token_id, "eos_token_id": ids}, f)
    return str(path)


def reference_ids(hf_tok, messages, add_generation_prompt=False):
    """transformers' own `apply_chat_template(tokenize=True)` ids."""
    out = hf_tok.apply_chat_template(list(messages), tokenize=True,
                                     add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
