"""Real prompts and their tokenisation (optional: needs the `hf` extras).

  hh_rlhf.py       a TFDS builder for Anthropic's HH-RLHF jsonl.gz files (and the shipped demo prompts)
  prompts.py       the PromptSource protocol: HH-RLHF prompts, prompts from a jsonl file
  tokenization.py  ChatTokenizer: chat-template rendering, left padding, end-keeping truncation
  demo_prompts/    ~320 short instructions in the HH-RLHF format, for the CPU demo

Nothing is imported here, so that importing one module does not pull in the others' dependencies
(TFDS and grain for the datasets, transformers for the tokenizer).
"""
